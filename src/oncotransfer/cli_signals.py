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


_CLI = False
"""This process is the command line (not a program or a test that imported the CLI module)."""


def install_early(module_name: str) -> None:
    """Make Ctrl-C a one-line exit 130 until ``restore``: only when the command line runs (not when the CLI
    module is imported by a program or a test) and only over Python's default handler (an inherited ignore stays)."""
    global _CLI
    cli = _CLI = module_name == "__main__" or Path(sys.argv[0]).name == "oncotransfer"
    if cli and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_early)


def restore() -> None:
    """Back to KeyboardInterrupt, which ``cli.main`` turns into its hint and exit 130, except while a module is
    being imported (``_interrupted``)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_early:
        signal.signal(signal.SIGINT, _interrupted)


def importing() -> bool:
    """A module is being executed by the import system (commands import torch, numpy... lazily, for seconds)."""
    return any(getattr(getattr(m, "__spec__", None), "_initializing", False) for m in list(sys.modules.values()))


def _interrupted(signum: int, frame: object) -> None:
    # A KeyboardInterrupt raised inside an import leaves the module half-initialised (numpy then recursed for
    # ever on its next use: a RecursionError traceback), and one that passes through an extension's
    # PyRun_String makes CPython end the process by SIGINT (-2) however it was caught. Nothing has run yet.
    if importing():
        exit_interrupted(interrupted_hint(sys.argv[1:]))
    raise KeyboardInterrupt


def exit_interrupted(line: str) -> None:
    """``line`` on stderr, the exit handlers (multiprocessing stops its children), then exit 130 directly: after
    an interrupt CPython may end by re-raising SIGINT instead (see ``_interrupted``)."""
    import atexit

    from oncotransfer.cli_output import safe_text  # loaded with the CLI: a run folder's name is printed
    line = safe_text(line)
    if not _CLI:  # main() called by a program or a test: an ordinary SystemExit
        sys.stderr.write(line + "\n")
        raise SystemExit(130)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while cleaning up changes nothing
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, (line + "\n").encode("utf-8", "replace"))
    atexit._run_exitfuncs()
    os._exit(130)


def interrupted_hint(args: list[str], run_dir: Path | None = None) -> str:
    """What to type to continue after Ctrl-C, for the command that was interrupted."""
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "grid":
        return ("interrupted; finished runs are kept: run the same `oncotransfer grid GRID.yaml` again "
                "to continue with the rest")
    if command == "train":
        return f"interrupted; continue with `oncotransfer train CONFIG --resume {run_dir or 'RUN_DIR'}`"
    return "interrupted"
