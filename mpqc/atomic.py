"""Atomic file writes: a temp file in the same directory, then os.replace, so a kill never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

from mpqc.errors import UserError


def _prepare_dir(path: str) -> str:
    return ensure_dir(os.path.dirname(os.path.abspath(path)))


def ensure_dir(d: str) -> str:
    """Create ``d`` if needed and check it is writable; a one-line UserError otherwise."""
    check_output_dir(d)
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory {d} ({e.strerror}); choose a writable -o") from None
    return d


def check_output_dir(d: str) -> None:
    """Refuse an output directory that could not be created or written, without creating it yet."""
    if os.path.exists(d) and not os.path.isdir(d):
        raise UserError(f"-o {d} is a file; give a directory")
    parent = os.path.abspath(d)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"the output directory {d} cannot be {'written' if parent == os.path.abspath(d) else 'created'}"
                        f" ({parent} is not a writable directory); choose another -o")


def check_output_file(path: str, example: str) -> None:
    """Refuse an ``-o`` file that cannot be written, before the command does any work: a directory, a folder that
    does not exist, or one that is not writable (``example`` is a file name to suggest)."""
    if os.path.isdir(path):
        raise UserError(f"-o {path} is a directory; give a file name such as {example}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"-o {path}: the directory {folder} does not exist; create it or choose another -o")
    if not os.access(folder, os.W_OK):
        raise UserError(f"-o {path}: the directory {folder} is not writable; choose another -o")


def atomic_write_with(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` only if it succeeded."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a directory; choose a file name")
    d = _prepare_dir(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); choose another path") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file what a plain open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write_with(path, w)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")
