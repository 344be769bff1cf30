"""Checks of command-line values shared by the ``fastppo`` subcommands and the trainer.

Kept apart from ``fastppo.cli`` so that the modules which add their own subcommand options
(``fastppo.inspect``) or check an output directory (``fastppo.train``) need not import the
command itself, which imports them.
"""

from __future__ import annotations

import argparse
import os
import tempfile


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def seed(text: str) -> int:
    """argparse type: a whole number in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2**63), got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2**63), got {value}")
    return value


def op_list(text: str) -> str:
    """argparse type: op names separated by commas (none empty)."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected op names separated by commas, got {text!r}")
    return ",".join(names)


def unwritable(path: str, *, parents: bool = True) -> str | None:
    """Why files cannot be created at or under directory ``path`` (made with its parents when
    ``parents``), or None when they can.

    Permission bits are not enough: root passes ``os.access`` everywhere, and pseudo file systems
    (``/proc``, ``/sys``) or read-only mounts refuse new files whatever the bits say. So a
    throw-away file is created (and removed) in the nearest directory that exists.
    """
    probe = os.path.abspath(path)
    if not parents and not os.path.isdir(probe):
        return f"directory {probe!r} does not exist"
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe!r} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to write in {probe!r}"
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".fastppo-probe-")
    except OSError as exc:
        return f"cannot create files in {probe!r} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(name)
    return None


def output_file(parents: bool):
    """argparse type: a file to write; not a directory, in a directory that exists (``parents``:
    or can be made) and takes new files. ``auto`` passes (the command picks the name)."""

    def check(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError("expected a file name")
        if text == "auto":
            return text
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file name")
        if os.path.exists(text):
            try:  # an existing file is overwritten: it must open for writing (without truncating it here)
                os.close(os.open(text, os.O_WRONLY))
            except OSError as exc:
                raise argparse.ArgumentTypeError(f"cannot write {text!r} ({exc.strerror or exc})") from None
            return text
        why = unwritable(os.path.dirname(os.path.abspath(text)), parents=parents)
        if why:
            raise argparse.ArgumentTypeError(why)
        return text

    check.__name__ = "file name"
    return check
