"""Command-line argument types and the usage error, shared by ``fusedlinear train``, ``bench`` and
``parity``. A leaf: it imports nothing of fusedlinear, so every command module may import it.

Bad input is refused before any work starts, with one line naming the value and the fix: an
argparse type raises ``argparse.ArgumentTypeError`` (argparse prints it and exits with 2); a check
after parsing raises :class:`UsageError` (``cli.main`` prints it and returns 2).
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import tempfile


class UsageError(Exception):
    """A bad argument or environment value: ``cli.main`` prints it as one line and exits with 2."""


def number(kind, minimum):
    """An argparse type: a finite ``kind`` (int or float) of at least ``minimum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of at least {minimum}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number(int, minimum=1)


def output_target(path: str) -> tuple[str, bool]:
    """Where an output named ``path`` is written (report.atomic_write): its symlinks followed one at
    a time; and whether it is written in place — a FIFO, a device, or a step through ``/proc``
    (``/dev/stdout``, ``/dev/fd/N``: an open descriptor, not a name) — not renamed over."""
    path = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on a symlink chain
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if path.startswith("/proc/"):
            return path, os.path.exists(path)
        if not os.path.islink(path):
            return path, os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    raise OSError(f"too many levels of symbolic links in {path!r}")


def writable_file(text: str) -> str:
    """An argparse type: a file path whose directory exists and may be written (checked before
    any work, so a long run does not end in a failed save); or a FIFO or character device that
    may be written (written in place)."""
    target, in_place = output_target(text)
    directory = os.path.dirname(target)
    if os.path.isdir(target):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name in it")
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"{text!r}: directory {directory} does not exist; create it first")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written here; choose a writable path")
    if in_place:
        if stat.S_ISBLK(os.stat(target).st_mode):
            raise argparse.ArgumentTypeError(f"{text!r} is a block device (a disk); give a regular file")
        return text
    try:  # a real write, as the save will do (os.access says yes to root on /proc and read-only mounts)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fusedlinear-check-"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written here ({exc.strerror}); "
                                         f"choose a writable path") from None
    return text


def seed(text: str) -> int:
    """An argparse type: a seed that torch.manual_seed takes (0 <= seed < 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; use a seed from 0 to 2**63 - 1")
    return value


def choices(value: str, valid, option: str) -> list[str]:
    """The comma-separated names in ``value`` (of ``--option``), each one of ``valid``; else a UsageError."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in valid]
    if bad or not items:
        raise UsageError(f"--{option} {value!r}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                         f"choose from {', '.join(valid)} (comma-separated)")
    return items
