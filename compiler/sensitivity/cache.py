"""A directory of sensitivity tables keyed by (model hash, data hash, method, options).

Scores are expensive (a Hessian trace, a measured pass per candidate) and the search re-reads them for every
budget, so a re-run with the same model, data and options reads the stored table instead. The key is a
SHA-256 of the canonical JSON of the four parts; each entry is a table file written atomically, so a crash
never leaves half an entry. An unreadable entry counts as a miss (and is overwritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from mpqc.errors import UserError

from .table import SensitivityTable

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """``$MPQC_CACHE_DIR/sensitivity``, else ``$XDG_CACHE_HOME/mpqc/sensitivity``, else ``~/.cache/mpqc/...``."""
    root = os.environ.get("MPQC_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "mpqc")
    return os.path.join(root, "sensitivity")


def cache_key(model_hash: str, data_hash: str, method: str, options: dict) -> str:
    """The hex key of one (model, data, method, options) combination."""
    blob = json.dumps({"model": model_hash, "data": data_hash, "method": method, "options": options},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class SensitivityCache:
    """Tables stored as ``<dir>/<method>-<key[:24]>.json``; ``hits``/``misses`` count look-ups."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = os.fspath(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, key: str, method: str) -> str:
        return os.path.join(self.directory, f"{method}-{key[:24]}.json")

    def get(self, model_hash: str, data_hash: str, method: str, options: dict) -> SensitivityTable | None:
        """The stored table, or None (a miss)."""
        key = cache_key(model_hash, data_hash, method, options)
        p = self.path(key, method)
        if os.path.isfile(p):
            try:
                table = SensitivityTable.load(p)
            except UserError as e:
                log.warning("ignoring unreadable cache entry %s (%s)", p, e)
            else:
                if table.meta.get("cache_key") == key:
                    self.hits += 1
                    return table
                log.warning("ignoring cache entry %s: it was written for another key", p)
        self.misses += 1
        return None

    def put(self, table: SensitivityTable) -> str:
        """Store ``table`` under its own hashes, method and options; returns the file path."""
        key = cache_key(table.model_hash, table.data_hash, table.method, table.options)
        table.meta["cache_key"] = key
        p = self.path(key, table.method)
        try:
            table.save(p)
        except OSError as e:
            raise UserError(f"cannot write the sensitivity cache in {self.directory} ({e.strerror}); "
                            "pass --cache-dir DIR or --no-cache") from None
        return p

    def clear(self) -> int:
        """Delete every entry; returns how many were removed."""
        if not os.path.isdir(self.directory):
            return 0
        n = 0
        for f in os.listdir(self.directory):
            if f.endswith(".json"):
                os.unlink(os.path.join(self.directory, f))
                n += 1
        return n


__all__ = ["SensitivityCache", "cache_key", "default_cache_dir"]
