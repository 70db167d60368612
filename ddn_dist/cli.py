"""The `ddn` console command.

Each subcommand lives in its own module under `ddn_dist.commands` and exposes
`register(subparsers)`, which adds its parser and sets `func` to a callable taking the parsed
arguments and returning an exit status. Modules are imported only when their command runs, so
`ddn info` does not pay for importing DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Subcommand name -> module under ddn_dist.commands, in the order `ddn --help` lists them.
COMMANDS = {
    "demo": "demo",
    "info": "info",
    "toy2d": "toy2d",
    "prep": "prep",
    "sample": "sample",
    "encode": "codec",
    "decode": "codec",
    "guide": "guide",
    "eval": "evaluate",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; with `only`, import just that subcommand's module."""
    parser = argparse.ArgumentParser(prog="ddn", description="Discrete Distribution Networks at scale")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="logging level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[only]] if only in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        module = importlib.import_module(f"ddn_dist.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `ddn` command line and return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    from ddn_dist.logs import setup_logging

    setup_logging(args.log_level)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
            FileExistsError) as error:
        # These carry messages written for the user (the bad value and the fix) or an OS error that
        # names the path. A traceback would only bury them, but DDN_TRACEBACK=1 shows it anyway.
        if os.environ.get("DDN_TRACEBACK") == "1":
            raise
        logging.getLogger("ddn_dist").error("%s", error)
        return 1
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    """Shut down the process group a command joined under torchrun or accelerate launch.

    A gloo group left for interpreter exit can abort the process ("terminate called without an
    active exception") after the command has finished.
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
