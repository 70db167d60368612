"""The training loop: streaming batches into a DeepSpeed engine, S&P across ranks, EMA and schedule."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddn_dist.checkpoint import CheckpointManager
from ddn_dist.config import ConfigError, TrainConfig, model_config
from ddn_dist.data.loader import LoaderConfig, StreamingLoader
from ddn_dist.model import SplitPrune, build_model
from ddn_dist.trainer import engine as engine_setup
from ddn_dist.trainer.ema import WeightEMA
from ddn_dist.trainer.metrics_hook import build_metrics
from ddn_dist.trainer.param_access import DeepSpeedParamAccess
from ddn_dist.trainer.preemption import EXIT_OK, REQUEUE_EXIT_CODE, PreemptionFlag
from ddn_dist.trainer.resume import (Progress, build_client_state, gather_rng_states,
                                     restore_client_state, seed_rank_rng)
from ddn_dist.trainer.schedule import Interval, ema_beta, learning_rate
from ddn_dist.trainer.snapshots import full_fp32_state_dict, write_sample_grid, write_snapshot
from ddn_dist.trainer.stats import StatsWriter, TickAccumulator

log = logging.getLogger("ddn_dist.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class StepResult:
    """Outcome of one optimizer step, identical on every rank."""

    finite: bool
    loss: float
    group_losses: dict[str, float]
    sp_events: int
    stop_requested: bool
    snapshot_time_due: bool
    checkpoint_time_due: bool
    data_wait_seconds: float


# Slots of the per-step all-reduce before the per-group loss sums.
EXTRA_SLOTS = 6


class Trainer:
    """Builds the model, loader, engine and checkpoint manager, then runs the loop to the end."""

    def __init__(self, cfg: TrainConfig, info: engine_setup.DistInfo):
        self.cfg = cfg
        self.info = info
        self.run_dir = os.path.abspath(cfg.train.run_dir)
        self.model_cfg = model_config(cfg)
        self.config_hash = cfg.config_hash()
        self.micro_batch, self.grad_accum = cfg.resolve_batch(info.world_size)
        self.preemption = PreemptionFlag()
        self.progress = Progress()
        self.is_rank0 = info.rank == 0

    # ----- setup -----

    def setup(self) -> None:
        """Create everything, then resume from the latest checkpoint if there is one."""
        cfg, info = self.cfg, self.info
        os.makedirs(self.run_dir, exist_ok=True)

        torch.manual_seed(cfg.train.seed)
        model = build_model(self.model_cfg).to(info.device)
        model.train()
        self.group_names = list(dict.fromkeys(model.layer_groups))
        self.layer_groups = list(model.layer_groups)

        self.loader = StreamingLoader(self._loader_config(), info.rank, info.world_size)
        self._check_data_matches_model()

        ds_config = engine_setup.build_ds_config(cfg, info.world_size)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last,
                                      cfg.checkpoint.mirror_url, cfg.checkpoint.endpoint_url)
        ds_config = self.ckpt.prepare_ds_config(ds_config)
        self.stage = engine_setup.zero_stage_of(ds_config)
        self.precision = engine_setup.precision_of(ds_config)
        self.engine = engine_setup.build_engine(model, ds_config)
        warmup_samples = int(cfg.train.sp_warmup_kimg * 1000)
        # The compact layout all-reduces each step's (winner, runner-up) pairs instead of K x K
        # runner-up matrices: 2.7 MiB instead of 159 MiB per step for the FFHQ preset on 64 ranks.
        self.sp = SplitPrune(self.engine.module, warmup_samples=warmup_samples,
                             max_samples_per_step=self.micro_batch * self.grad_accum,
                             rank=info.rank, world_size=info.world_size)
        self.ema = None
        if cfg.train.ema_halflife_kimg > 0:
            self.ema = WeightEMA(self.engine.module, self.stage)
        callbacks = [self.ema.copy_rows] if self.ema is not None else []
        self.access = DeepSpeedParamAccess(self.engine, on_copy=callbacks)

        self.metrics = build_metrics(cfg, info, self.config_hash)
        client_state = self.ckpt.load(self.engine)
        if client_state is None:
            seed_rank_rng(cfg.train.seed, 0, info.rank)
            log.info("starting run %s: world size %d, ZeRO stage %d, %s, global batch %d "
                     "(micro-batch %d x accumulation %d x %d ranks), %.1f kimg",
                     self.run_dir, info.world_size, self.stage, self.precision, cfg.train.batch,
                     self.micro_batch, self.grad_accum, info.world_size, cfg.train.duration_kimg)
        else:
            self.progress = restore_client_state(
                client_state, loader=self.loader, split_prune=self.sp, ema=self.ema,
                config_hash=self.config_hash, seed=cfg.train.seed, rank=info.rank,
                world_size=info.world_size)
            self.metrics.restarted()
            log.info("resumed at step %d, %.2f kimg, at world size %d", self.progress.step,
                     self.progress.kimg, info.world_size)
        if self.is_rank0:
            # Written after the checkpoint loads, so a rejected resume keeps the run's config.yaml.
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as handle:
                handle.write(cfg.to_yaml())
        self.stats = StatsWriter(self.run_dir, self.is_rank0)
        self.preemption.install()

    def _loader_config(self) -> LoaderConfig:
        data = self.cfg.data
        return LoaderConfig(data=data.data, endpoint_url=data.endpoint_url,
                            batch_size=self.micro_batch,
                            num_workers=data.num_workers, seed=data.seed, remainder=data.remainder,
                            on_corrupt=data.on_corrupt, audit_dir=data.audit_dir,
                            pin_memory=data.pin_memory, persistent_workers=data.persistent_workers)

    def _check_data_matches_model(self) -> None:
        facts = self.loader.index.dataset
        want = (self.model_cfg.image_channels, self.model_cfg.resolution)
        if (facts.channels, facts.resolution) != want:
            raise ConfigError(
                f"data set {self.cfg.data.data} contains {facts.channels}-channel {facts.resolution}x"
                f"{facts.resolution} images but model needs {want[0]}-channel {want[1]}x{want[1]}; "
                f"set model.image_channels / model.resolution or point data.data at other shards")

    # ----- the loop -----

    def run(self) -> int:
        """Train until duration_kimg, stop_at_step or preemption; return the process exit status."""
        cfg = self.cfg.train
        total_nimg = int(cfg.duration_kimg * 1000)
        tick = TickAccumulator()
        tick_interval = Interval(cfg.tick_kimg)
        snapshot_interval = Interval(cfg.snapshot_kimg, cfg.snapshot_minutes)
        checkpoint_interval = Interval(cfg.checkpoint_kimg, cfg.checkpoint_minutes)
        self._timed = (snapshot_interval, checkpoint_interval)
        self._iterator = None
        self._pending = []
        try:
            while self.progress.nimg < total_nimg:
                prev_nimg = self.progress.nimg
                step_started = time.monotonic()
                result = self.train_step()
                self._account(result, tick, time.monotonic() - step_started)

                done = self.progress.nimg >= total_nimg
                stop_at = cfg.stop_at_step > 0 and self.progress.step >= cfg.stop_at_step
                if tick_interval.due(prev_nimg, self.progress.nimg) or done or stop_at:
                    self._end_tick(tick)
                    tick = TickAccumulator()
                    tick_interval.reset()
                if (snapshot_interval.kimg_due(prev_nimg, self.progress.nimg) or done
                        or result.snapshot_time_due):
                    self.snapshot()
                    snapshot_interval.reset()
                if (checkpoint_interval.kimg_due(prev_nimg, self.progress.nimg) or done or stop_at
                        or result.stop_requested or result.checkpoint_time_due):
                    self.checkpoint()
                    checkpoint_interval.reset()
                if result.stop_requested:
                    log.warning("preempted at step %d (%.2f kimg); checkpoint saved, exiting with "
                                "status %d so the launcher requeues the job", self.progress.step,
                                self.progress.kimg, REQUEUE_EXIT_CODE)
                    return REQUEUE_EXIT_CODE
                if stop_at:
                    log.info("stopped at step %d as train.stop_at_step requests", self.progress.step)
                    return EXIT_OK
            log.info("training finished at %.2f kimg (step %d)", self.progress.kimg, self.progress.step)
            return EXIT_OK
        finally:
            self.preemption.uninstall()

    def _next_batch(self):
        while True:
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                # Starting loader workers draws seeds from the global RNG; keep those draws out of
                # the model's random stream (chain dropout) so a resumed run continues it exactly.
                with torch.random.fork_rng(devices=[]):
                    return next(self._iterator)
            except StopIteration:
                # The loader starts the next epoch only after every batch of this one is marked.
                self._mark_pending(self.progress.step + 1)
                self._iterator = None

    def _mark_pending(self, step: int) -> None:
        for batch in self._pending:
            self.loader.mark_consumed(batch, step)
        self._pending = []

    def train_step(self) -> StepResult:
        """Run one optimizer step (grad_accum micro-batches) and S&P; collective."""
        engine = self.engine
        step = self.progress.step + 1
        batch_images = self.cfg.train.batch
        lr = learning_rate(self.progress.nimg + batch_images, self.cfg.train.lr,
                           self.cfg.train.lr_warmup_kimg)
        engine_setup.set_learning_rate(engine, lr)
        self.lr = lr
        self._dropped_gradients = False

        # [loss sum, valid count, nonfinite flag, stop flag, snapshot due, checkpoint due,
        #  per-group loss sums (x valid count)]
        extras = torch.zeros(EXTRA_SLOTS + len(self.group_names), dtype=torch.float64)
        data_wait = 0.0
        for micro in range(self.grad_accum):
            waited = time.monotonic()
            batch = self._next_batch()
            data_wait += time.monotonic() - waited
            self._pending.append(batch)

            images = batch.images.to(self.info.device)
            valid = batch.valid.to(self.info.device)
            if self.precision == "bf16":
                images = images.bfloat16()
            elif self.precision == "fp16":
                images = images.half()
            out = engine(images, valid=valid)
            weights = valid.to(out.per_sample_loss.dtype)
            # Divide by the nominal micro-batch so every real sample weighs the same on every rank.
            loss = (out.per_sample_loss * weights).sum() / valid.numel()
            if step in self.cfg.train.nonfinite_at_steps and self.info.rank == 0:
                loss = loss * float("nan")
            count = float(valid.sum())
            extras[0] += float(loss.detach()) * valid.numel()
            extras[1] += count
            if not torch.isfinite(loss.detach()):
                extras[2] = 1.0
            for layer_loss, group in zip(out.layer_losses.detach().float().tolist(), self.layer_groups):
                extras[EXTRA_SLOTS + self.group_names.index(group)] += layer_loss * count
            engine.backward(loss)
            if micro == self.grad_accum - 1 and self.stage == 0 and self.precision == "fp32":
                self._drop_nonfinite_gradients()
            engine.step()

        applied = bool(engine.was_step_applied()) and not self._dropped_gradients
        extras[3] = 1.0 if self.preemption.requested else 0.0
        if self.is_rank0:
            # Wall-clock intervals follow rank 0's clock so that every rank saves at the same step.
            extras[4] = float(self._timed[0].time_due())
            extras[5] = float(self._timed[1].time_due())
        delta = self.sp.local_stats_delta()
        combined = torch.cat([delta.double(), extras])
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_reduce(combined, op=dist.ReduceOp.SUM)
        delta_sum, totals = combined[: delta.numel()], combined[delta.numel():]
        finite = applied and float(totals[2]) == 0.0

        events = []
        if finite:
            self.access.defer()
            events = self.sp.step(delta_sum, self.access)
            self.access.flush()
            if self.ema is not None:
                self.ema.update(ema_beta(batch_images, self.cfg.train.ema_halflife_kimg))
        self._mark_pending(step)
        self.progress.step = step
        self.progress.nimg += batch_images
        for event in events:
            self.metrics.split_prune(event.group, 1)

        count = max(float(totals[1]), 1.0)
        group_counts = {g: self.layer_groups.count(g) for g in self.group_names}
        group_losses = {g: float(totals[EXTRA_SLOTS + i]) / count / group_counts[g]
                        for i, g in enumerate(self.group_names)}
        return StepResult(finite=finite, loss=float(totals[0]) / count, group_losses=group_losses,
                          sp_events=len(events), stop_requested=float(totals[3]) > 0,
                          snapshot_time_due=float(totals[4]) > 0,
                          checkpoint_time_due=float(totals[5]) > 0, data_wait_seconds=data_wait)

    def _drop_nonfinite_gradients(self) -> None:
        # At stage 0 in fp32, DeepSpeed wraps a plain torch optimizer that would apply NaN
        # gradients. The gradients are all-reduced by now, so every rank decides the same.
        # Adam skips parameters whose grad is None, which makes the step a no-op.
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        self._dropped_gradients = not finite
        if not finite:
            for p in params:
                p.grad = None

    _dropped_gradients = False

    def _account(self, result: StepResult, tick: TickAccumulator, seconds: float) -> None:
        progress = self.progress
        progress.sp_events_total += result.sp_events
        if result.finite:
            self.consecutive_nonfinite = 0
        else:
            progress.nonfinite_total += 1
            self.consecutive_nonfinite = getattr(self, "consecutive_nonfinite", 0) + 1
            self.metrics.skipped_nonfinite()
            log.warning("step %d skipped: non-finite loss or gradients (%d in a row)", progress.step,
                        self.consecutive_nonfinite)
            if self.consecutive_nonfinite >= self.cfg.train.max_nonfinite_steps:
                raise NonFiniteError(
                    f"stopping: {self.consecutive_nonfinite} consecutive steps up to step "
                    f"{progress.step} ({progress.kimg:.2f} kimg) had a non-finite loss or gradient "
                    f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); lower "
                    f"train.lr, use deepspeed.precision=fp32, or check the data")
        tick.add_step(self.cfg.train.batch, result.loss, result.group_losses, result.sp_events,
                      result.data_wait_seconds, result.finite)
        grad_norm = self.engine.get_global_grad_norm()
        self.metrics.observe_step(
            images=self.micro_batch * self.grad_accum, kimg=progress.kimg, step_seconds=seconds,
            data_wait_seconds=result.data_wait_seconds,
            loss=result.loss if result.finite else float("nan"), group_losses=result.group_losses,
            grad_norm=float(grad_norm) if grad_norm is not None else 0.0, lr=self.lr)

    def _end_tick(self, tick: TickAccumulator) -> None:
        self.stats.record(tick, kimg=self.progress.kimg, step=self.progress.step, lr=self.lr,
                          total_sp_events=self.progress.sp_events_total,
                          total_nonfinite=self.progress.nonfinite_total)
        self.metrics.update_storage(self.loader.counters())
        self.metrics.update_memory()
        self.metrics.update_frequencies(self.sp, self.layer_groups)

    # ----- outputs -----

    def snapshot(self) -> None:
        """Write the inference snapshot (EMA weights when enabled) and a sample grid. Collective."""
        weights = full_fp32_state_dict(self.engine)
        if self.ema is not None:
            weights.update(self.ema.full_state_dict())
        if not self.is_rank0:
            return
        meta = {"kimg": self.progress.kimg, "step": self.progress.step, "ema": self.ema is not None,
                "config_hash": self.config_hash}
        # Building the sampling model initialises weights from the global RNG; keep it out of
        # the training stream so runs with and without a resume stay identical.
        with torch.random.fork_rng(devices=[]):
            path = write_snapshot(self.run_dir, weights, self.model_cfg, meta)
            grid = write_sample_grid(self.run_dir, weights, self.model_cfg, self.progress.kimg,
                                     self.cfg.train.grid_size, self.cfg.train.grid_seed)
        log.info("wrote snapshot %s and sample grid %s", path, grid)

    def checkpoint(self) -> None:
        """Save a DeepSpeed checkpoint with the trainer's client state. Collective."""
        started = time.monotonic()
        client_state = build_client_state(
            self.progress, loader_state=self.loader.state_dict(), sp_state=self.sp.state_dict(),
            ema_state=self.ema.full_state_dict() if self.ema is not None else None,
            rng_states=gather_rng_states(), config_hash=self.config_hash,
            config=self.cfg.to_dict(), world_size=self.info.world_size)
        self.ckpt.save(self.engine, f"step{self.progress.step:08d}", client_state)
        self.metrics.checkpoint_saved(time.monotonic() - started)

    def close(self) -> None:
        """Stop the metrics endpoint and the loader workers."""
        for closer in (getattr(self, "metrics", None), getattr(self, "loader", None)):
            if closer is not None:
                closer.close()
