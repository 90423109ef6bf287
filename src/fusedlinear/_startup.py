"""Ctrl-C while the ``fusedlinear`` command starts (torch's import alone takes ~0.5 s): one line
on stderr and exit status 130, not a traceback from inside an import.

Imported first by the package's ``__init__``; installs its SIGINT handler only when this process
is the command (the console script, or ``python -m fusedlinear``), never in a program that merely
imports the library. ``cli.main`` hands Ctrl-C back to Python's KeyboardInterrupt (``done``) once
it can report what was saved.
"""

import os
import signal
import sys


def _interrupted(signum, frame):
    print("fusedlinear: interrupted (Ctrl-C) while starting; nothing done", file=sys.stderr, flush=True)
    raise SystemExit(130)  # 128 + SIGINT, as a shell reports it; SystemExit prints no traceback


def _is_the_command() -> bool:
    # sys.orig_argv, not sys.argv: multiprocessing's spawned workers get the parent's sys.argv
    argv = getattr(sys, "orig_argv", [])
    if len(argv) > 1 and os.path.basename(argv[1]).removesuffix(".exe") == "fusedlinear":
        return True  # the console script, run by its #! line as `python .../bin/fusedlinear ...`
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] in ("fusedlinear", "fusedlinear.cli")


def done() -> None:
    """Python's own Ctrl-C (KeyboardInterrupt) again, if the startup handler is in place."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if _is_the_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)
