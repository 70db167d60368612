"""Split-and-Prune: the rule, redistribution on hand-worked cases, row copies and state."""

import pytest
import torch

from ddn_dist.model import LocalParamAccess, ModelConfig, SplitEvent, SplitPrune, build_model
from ddn_dist.model.ddl import SelectionStats
from ddn_dist.model.split_prune import apply_split_prune, choose_split_prune


def tensor(values):
    return torch.tensor(values, dtype=torch.float64)


def make_stats(count, near2, loss_acc=None):
    stats = SelectionStats(len(count), torch.device("cpu"))
    stats.count.copy_(tensor(count))
    stats.near2.copy_(tensor(near2))
    if loss_acc is not None:
        stats.loss_acc.copy_(tensor(loss_acc))
    stats.seen.fill_(sum(count))
    return stats


@pytest.mark.parametrize(
    "count, expected",
    [
        ([8, 4, 3, 1], (0, 3)),  # p_s - p_d = 7/16 > 1/4
        ([5, 4, 4, 3], None),  # difference 2/16 and p_d = 3/16: no trigger
        ([5, 5, 5, 1], (0, 3)),  # difference exactly 1/4 does not trigger, but p_d = 1/16 < 1/8
        ([5, 5, 4, 2], None),  # p_d = 1/8 is not below 1/8, difference 3/16
        ([0, 0, 0, 0], None),  # nothing seen yet
    ],
)
def test_rule_trigger(count, expected):
    assert choose_split_prune(tensor(count), torch.zeros(4, dtype=torch.float64)) == expected


def test_rule_zero_count_tie_takes_largest_loss():
    count = tensor([5, 3, 0, 0, 0])
    loss_acc = tensor([1, 2, 7, 9, 4])
    assert choose_split_prune(count, loss_acc) == (0, 3)


def test_redistribution_hand_worked():
    # Rows sum to the counts: near2[i, j] = wins of i with j as runner-up.
    stats = make_stats(
        [8, 4, 3, 1],
        [[0, 5, 2, 1], [3, 0, 1, 0], [2, 1, 0, 0], [0, 1, 0, 0]],
        loss_acc=[10, 20, 30, 40],
    )
    apply_split_prune(stats, split=0, prune=3)
    # Head 3 only ever had head 1 as runner-up, so head 1 takes its single win; head 0's win
    # with runner-up 3 gets runner-up 1. Then head 0 (8 wins) splits into slots 0 and 3.
    assert torch.equal(stats.count, tensor([4, 5, 3, 4]))
    expected_near2 = tensor(
        [[0, 0, 0, 4], [1.875, 0, 1.25, 1.875], [1, 1, 0, 1], [4, 0, 0, 0]]
    )
    assert torch.allclose(stats.near2, expected_near2, atol=1e-12)
    assert torch.equal(stats.loss_acc, tensor([10, 20, 30, 10]))
    assert torch.allclose(stats.near2.sum(1), stats.count)


def test_redistribution_uniform_without_runner_up_data():
    stats = make_stats([6, 0, 3, 3], [[0, 0, 3, 3], [0, 0, 0, 0], [3, 0, 0, 0], [3, 0, 0, 0]])
    apply_split_prune(stats, split=0, prune=1)
    assert torch.equal(stats.count, tensor([3, 3, 3, 3]))
    assert float(stats.near2.sum()) == 12


def test_prune_shares_count_by_runner_up_row():
    stats = make_stats([9, 1, 1, 3], [[0, 1, 4, 4], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 2, 0]])
    apply_split_prune(stats, split=0, prune=1)
    # Head 1's single win had runner-up 3, so head 3 takes it before head 0 splits.
    assert torch.equal(stats.count, tensor([4.5, 4.5, 1, 4]))
    assert torch.allclose(stats.near2.sum(1), stats.count)
    assert float(stats.near2.diagonal().abs().sum()) == 0


def test_two_heads_runner_up_is_other_head():
    stats = make_stats([7, 1], [[0, 7], [1, 0]])
    assert choose_split_prune(stats.count, stats.loss_acc) == (0, 1)
    apply_split_prune(stats, 0, 1)
    assert torch.equal(stats.count, tensor([4, 4]))
    assert torch.equal(stats.near2, tensor([[0, 4], [4, 0]]))


def tiny_model(k=4, **options):
    torch.manual_seed(0)
    cfg = ModelConfig(
        resolution=2, image_channels=3, max_channels=8, max_k=k, max_blocks=1, **options
    )
    return build_model(cfg)


def flat_delta(model, counts):
    """A statistics delta whose near2 rows put each head's wins on the next head."""
    parts = []
    for ddl, count in zip(model.ddls, counts):
        k = ddl.k
        near2 = torch.zeros(k, k, dtype=torch.float64)
        for head, wins in enumerate(count):
            near2[head, (head + 1) % k] = wins
        parts += [tensor(count), near2.flatten(), torch.zeros(k, dtype=torch.float64), tensor([sum(count)])]
    return torch.cat(parts)


def test_row_copy_weights_and_adam_moments():
    model = tiny_model(k=4, chain_dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.rand(4, 3, 2, 2) * 2 - 1
    for _ in range(2):
        model(target).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    split_prune = SplitPrune(model)
    split_prune.local_stats_delta()  # drop what the warm-up passes recorded

    layer = model.ddls[1]
    weight_before = layer.weight.detach().clone()
    state = optimizer.state[layer.weight]
    moments_before = {name: state[name].clone() for name in ("exp_avg", "exp_avg_sq")}
    step_before = state["step"].clone()

    counts = [[1, 1, 1, 1], [1, 8, 3, 4]]  # layer 0 balanced; layer 1: split 1, prune 0
    events = split_prune.step(flat_delta(model, counts), LocalParamAccess(optimizer))
    assert events == [SplitEvent(layer=1, group="2x2", split=1, pruned=0)]

    # Head 0's rows (0..2) now hold head 1's rows (3..5); the other rows are unchanged.
    for name, before in [("weight", weight_before), *moments_before.items()]:
        after = layer.weight.detach() if name == "weight" else state[name]
        assert torch.equal(after[0:3], before[3:6]), name
        assert torch.equal(after[3:], before[3:]), name
    assert torch.equal(state["step"], step_before)


def test_counts_sum_to_samples_seen_while_training():
    model = tiny_model(k=8, chain_dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    split_prune = SplitPrune(model)
    access = LocalParamAccess(optimizer)
    events = 0
    for step in range(30):
        target = torch.rand(5, 3, 2, 2) * 2 - 1
        model(target).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        events += len(split_prune.step(split_prune.local_stats_delta(), access))
        for stats in split_prune.stats:
            assert float(stats.seen) == 5 * (step + 1)
            assert float(stats.count.sum()) == pytest.approx(float(stats.seen), abs=1e-9)
            assert float(stats.near2.sum()) == pytest.approx(float(stats.seen), abs=1e-9)
    assert events > 0


def test_delta_from_two_ranks_sums():
    model = tiny_model(k=4)
    split_prune = SplitPrune(model)
    model(torch.rand(3, 3, 2, 2)).loss.backward()
    first = split_prune.local_stats_delta()
    model(torch.rand(2, 3, 2, 2)).loss.backward()
    second = split_prune.local_stats_delta()
    assert first.dtype == torch.float64
    assert first.numel() == split_prune.delta_size == 2 * (16 + 8 + 1)
    assert float(first[24]) == 3  # "seen" of layer 0
    assert float(second[24]) == 2
    assert float(split_prune.local_stats_delta().abs().sum()) == 0  # pending was zeroed


def test_warmup_delays_split():
    model = tiny_model(k=4)
    split_prune = SplitPrune(model, warmup_samples=100)
    access = LocalParamAccess(None)
    assert split_prune.step(flat_delta(model, [[9, 1, 0, 0]] * 2), access) == []
    events = split_prune.step(flat_delta(model, [[90, 1, 0, 0]] * 2), access)
    assert [event.layer for event in events] == [0, 1]


def test_state_dict_round_trip_exact():
    model = tiny_model(k=4)
    split_prune = SplitPrune(model, warmup_samples=3)
    split_prune.step(flat_delta(model, [[5, 2, 1, 1], [3, 3, 2, 1]]), LocalParamAccess(None))
    state = split_prune.state_dict()

    restored = SplitPrune(tiny_model(k=4))
    restored.load_state_dict(state)
    assert restored.warmup_samples == 3
    for a, b in zip(split_prune.stats, restored.stats):
        for name, value in a.tensors().items():
            assert torch.equal(value, b.tensors()[name]), name
    assert torch.equal(split_prune.frequencies(1), restored.frequencies(1))

    with pytest.raises(ValueError, match="another architecture"):
        SplitPrune(tiny_model(k=8)).load_state_dict(state)


def test_step_rejects_wrong_delta_size():
    split_prune = SplitPrune(tiny_model(k=4))
    with pytest.raises(ValueError, match="expected"):
        split_prune.step(torch.zeros(7, dtype=torch.float64), LocalParamAccess(None))


def test_compact_delta_from_two_ranks_equals_dense():
    torch.manual_seed(2)
    batches = [torch.rand(3, 3, 2, 2) * 2 - 1, torch.rand(5, 3, 2, 2) * 2 - 1]
    dense_model = tiny_model(k=4, chain_dropout=0.0)
    dense = SplitPrune(dense_model)
    for batch in batches:
        dense_model(batch)
    dense_events = dense.step(dense.local_stats_delta(), LocalParamAccess(None))

    ranks = []
    for rank, batch in enumerate(batches):
        model = tiny_model(k=4, chain_dropout=0.0)
        split_prune = SplitPrune(model, max_samples_per_step=6, rank=rank, world_size=2)
        model(batch)
        ranks.append(split_prune)
    deltas = [split_prune.local_stats_delta() for split_prune in ranks]
    assert deltas[0].numel() == ranks[0].delta_size == 2 * (4 + 4 + 1 + 2 * 6)
    summed = deltas[0] + deltas[1]
    for split_prune in ranks:
        assert split_prune.step(summed, LocalParamAccess(None)) == dense_events
        for ours, reference in zip(split_prune.stats, dense.stats):
            for name, value in ours.tensors().items():
                assert torch.equal(value, reference.tensors()[name]), name


def test_compact_delta_overflow_is_reported():
    model = tiny_model(k=4)
    split_prune = SplitPrune(model, max_samples_per_step=2, rank=0, world_size=1)
    model(torch.rand(3, 3, 2, 2))
    with pytest.raises(ValueError, match="max_samples_per_step=2"):
        split_prune.local_stats_delta()
