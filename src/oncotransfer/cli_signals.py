"""Ctrl-C before the command line is ready: importing typer, rich and the command modules takes a second or
more, and an interrupt then printed a KeyboardInterrupt traceback from deep inside an import."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _interrupted_early(signum: int, frame: object) -> None:  # nothing to clean up while modules still load
    os.write(2, b"interrupted\n")
    os._exit(130)


def install_early(module_name: str) -> None:
    """Make Ctrl-C a one-line exit 130 until ``restore``: only when the command line runs (not when the CLI
    module is imported by a program or a test) and only over Python's default handler (an inherited ignore stays)."""
    cli = module_name == "__main__" or Path(sys.argv[0]).name == "oncotransfer"
    if cli and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_early)


def restore() -> None:
    """Back to KeyboardInterrupt, which ``cli.main`` turns into its hint and exit 130."""
    if signal.getsignal(signal.SIGINT) is _interrupted_early:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted_hint(args: list[str], run_dir: Path | None = None) -> str:
    """What to type to continue after Ctrl-C, for the command that was interrupted."""
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "grid":
        return ("interrupted; finished runs are kept: run the same `oncotransfer grid GRID.yaml` again "
                "to continue with the rest")
    if command == "train":
        return f"interrupted; continue with `oncotransfer train CONFIG --resume {run_dir or 'RUN_DIR'}`"
    return "interrupted"
