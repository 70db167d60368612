"""Train the digits preset single-process on CPU and print the digits quality figures as it trains.

Usage (one thread, as on the two-core quick-start machine):
    OMP_NUM_THREADS=1 python benchmarks/eval_digits_quality.py --steps 3000 --every 500 \
        --out runs/bench-digits/snapshot.safetensors

Adam 1e-3, Split-and-Prune after every step, 64 images a step drawn uniformly from the 1,797
scikit-learn digits; no DeepSpeed, so the figures isolate the model and the quality measure.
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from ddn_dist.model import LocalParamAccess, ModelConfig, SplitPrune, build_model
from ddn_dist.quality import digits_images, digits_quality
from ddn_dist.snapshot import save_snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml",
                        help="preset YAML with a model: section")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--every", type=int, default=500, help="measure every this many steps")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per measurement")
    parser.add_argument("--out", default=None, help="snapshot to write at the end")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
    args = parser.parse_args()

    with open(args.config) as f:
        config = ModelConfig.from_dict(yaml.safe_load(f)["model"])
    torch.manual_seed(args.seed)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    split_prune = SplitPrune(model)
    access = LocalParamAccess(optimizer)
    images = torch.from_numpy(digits_images()[0])
    generator = torch.Generator().manual_seed(args.seed)

    train_seconds = 0.0
    for step in range(1, args.steps + 1):
        start = time.monotonic()
        model.train()
        batch = images[torch.randint(len(images), (args.batch_size,), generator=generator)]
        output = model(batch)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        split_prune.step(split_prune.local_stats_delta(), access)
        train_seconds += time.monotonic() - start
        if step % args.every == 0 or step == args.steps:
            model.eval()
            quality = digits_quality(model, args.num_samples, measure_psnr=step == args.steps)
            rate = step * args.batch_size / train_seconds
            print(f"step {step} ({step * args.batch_size / 1000:.1f} kimg, {rate:.0f} images/s, "
                  f"loss {output.loss.item():.4f}): {quality.summary()}", flush=True)
    if quality.psnr_by_layers:
        print("reconstruction PSNR (dB) by layers: "
              + " ".join(f"{value:.1f}" for value in quality.psnr_by_layers))
    if args.out:
        save_snapshot(args.out, model.state_dict(), config, {"steps": args.steps})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
