"""`ddn toy2d`: fit K free 2D points (one DDL) to a density map, with or without Split-and-Prune."""

from __future__ import annotations

import argparse
import logging
import time

from ddn_dist.toy2d import DENSITY_NAMES, load_density, plot_points, run_toy2d

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """Run the toy experiment and print `kl=<value> real_kl=<value>` as the last line."""
    start = time.perf_counter()
    try:
        result = run_toy2d(
            args.density,
            k=args.k,
            batch=args.batch,
            iterations=args.iters,
            lr=args.lr,
            split_prune=not args.no_split_prune,
            seed=args.seed,
        )
    except ValueError as error:
        log.error("%s", error)
        return 2
    mode = "without Split-and-Prune" if args.no_split_prune else "with Split-and-Prune"
    log.info(
        "fitted %d points to %s %s in %.1f seconds (%d split+prune events, kl/real_kl=%.2f)",
        args.k, args.density, mode, time.perf_counter() - start, result.splits,
        result.kl / result.real_kl,
    )
    if args.plot:
        plot_points(result, load_density(args.density), args.plot, f"{args.density}, {mode}")
        log.info("wrote the plot to %s", args.plot)
    print(f"kl={result.kl:.4f} real_kl={result.real_kl:.4f}")
    return 0


def register(subparsers) -> None:
    """Add the `toy2d` subcommand."""
    parser = subparsers.add_parser(
        "toy2d", help="fit K 2D points to a density map (one DDL) and report the KL divergence"
    )
    parser.add_argument("--density", required=True, choices=DENSITY_NAMES, help="density map name")
    parser.add_argument("--k", type=int, default=2000, help="number of points (DDL outputs)")
    parser.add_argument("--batch", type=int, default=40, help="samples drawn per iteration")
    parser.add_argument("--iters", type=int, default=1800, help="training iterations")
    parser.add_argument(
        "--lr", type=float, default=0.1,
        help="step size: a selected point moves by 2*lr of its distance to the sample",
    )
    parser.add_argument("--no-split-prune", action="store_true", help="plain training, no Split-and-Prune")
    parser.add_argument("--plot", default=None, help="PNG file to draw the points over the density")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the points and samples")
    parser.set_defaults(func=run)
