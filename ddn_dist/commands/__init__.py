"""Subcommands of the `ddn` console command, one module each."""
