"""Train a DDN with DeepSpeed ZeRO data parallelism from streamed WebDataset shards.

One process per rank, started by torchrun or srun:

    torchrun --nproc-per-node 2 -m ddn_dist.train --config configs/digits.yaml
    torchrun --nproc-per-node 2 -m ddn_dist.train --config configs/digits.yaml \\
        data.data=s3://bucket/digits deepspeed.stage=3 train.run_dir=runs/digits-z3
    srun python -m ddn_dist.train --config configs/ffhq64.yaml   # SLURM_PROCID etc. + MASTER_ADDR/PORT

Resuming is running the same command again: the latest complete checkpoint in
`<train.run_dir>/checkpoints` is loaded, at any world size. Exit codes: 0 finished (or stopped at
train.stop_at_step), 1 error, 2 invalid configuration, 75 preempted by SIGUSR1/SIGTERM after
saving a checkpoint (requeue the job).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ddn_dist.config import ConfigError, load_config, model_config
from ddn_dist.data.index import IndexError_
from ddn_dist.logs import setup_logging
from ddn_dist.storage import MissingCredentialsError
from ddn_dist.trainer.preemption import EXIT_CONFIG, EXIT_ERROR

log = logging.getLogger("ddn_dist.train")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of the training entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m ddn_dist.train",
        description="Train a Discrete Distribution Network with DeepSpeed ZeRO. Run under torchrun "
                    "or srun; run the same command again to resume from the latest checkpoint.",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config value, e.g. train.batch=256 deepspeed.stage=3")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Validate the configuration, then train; return the process exit status."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        setup_logging(cfg.logging.level.upper())
        from ddn_dist.trainer.engine import resolve_ranks

        # Everything that can be checked without data or peers is checked before either is touched.
        _, _, world_size = resolve_ranks()
        cfg.resolve_batch(world_size)
        model_config(cfg)
    except ConfigError as error:
        log.error("invalid configuration: %s", error)
        return EXIT_CONFIG

    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.train.threads))
    from ddn_dist.trainer.engine import init_distributed
    from ddn_dist.trainer.loop import NonFiniteError, Trainer

    try:
        info = init_distributed(cfg.train.threads)
    except ConfigError as error:  # launcher variables such as MASTER_ADDR are missing
        log.error("invalid configuration: %s", error)
        return EXIT_CONFIG
    trainer = Trainer(cfg, info)
    try:
        trainer.setup()
        return trainer.run()
    except ConfigError as error:  # the data set does not match the model section
        log.error("invalid configuration: %s", error)
        return EXIT_CONFIG
    except (IndexError_, MissingCredentialsError) as error:  # data set or credentials missing
        log.error("%s", error)
        return EXIT_ERROR
    except NonFiniteError as error:
        log.error("%s", error)
        return EXIT_ERROR
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main())
