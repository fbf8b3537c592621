"""Writing a run's files so that a full disk or an unwritable place is explained, not a traceback,
and a file cut short is never read back as whole.

Whole files (config.json, results.json, plots, tables) are written to a temporary name in the same
directory and renamed over the old one: `os.replace` is atomic, so a reader sees the old file or
the new one, never a part. Append-only logs (metrics.jsonl) are not renamed; their reader skips a
line cut short instead.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from resnet_jax.errors import UserError

# A file that was never written, kept aside until it is: a crash leaves only this name behind.
_TMP_PREFIX = ".tmp-"


class WriteError(UserError):
    """A file could not be written (a full disk, a read-only or missing directory)."""


def write_error(path: str | Path, error: BaseException) -> WriteError:
    """`error` (an OSError, or TensorFlow's while tfds prepares a dataset) explained for `path`."""
    reason = getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)
    reason = " ".join(str(reason).split())
    if len(reason) > 300:  # long library messages end with the cause: "...; File too large"
        reason = "..." + reason[-300:]
    return WriteError(
        f"Cannot write {path}: {reason}. Free disk space or make the directory writable (or pass "
        "another path), then rerun the same command: a training run resumes from its latest "
        "checkpoint, and files written earlier are whole."
    )


@contextlib.contextmanager
def explain_write_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a WriteError that says what to do."""
    try:
        yield
    except OSError as error:
        raise write_error(path, error) from None


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` to write a file, then rename it to `path` (see the module docstring).

    The temporary file keeps `path`'s suffix, so writers that pick a format by it (matplotlib)
    pick the right one. On failure it is removed and a WriteError raised.
    """
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with explain_write_errors(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """`path`'s new contents, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def check_writable(directory: str | Path, what: str) -> Path:
    """Create `directory` (and its parents) and write a small file in it, before any long work.

    `what` names the directory in the message, e.g. "--output's directory". Returns the
    directory as an absolute path; raises WriteError naming it and the reason.
    """
    path = Path(directory).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise WriteError(
            f"Cannot write to {what} {path}: {error.strerror or error}. Pass a path in a "
            "directory that exists or can be created, is writable and has free space."
        ) from None
    return path
