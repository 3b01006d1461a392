"""The compile directory's manifest: what each stage read and wrote, so a re-run reuses finished stages.

A stage is reused when its recorded input key (a hash of its options and of the files it reads) equals
the current one and every file it wrote still has the recorded content hash. The manifest is rewritten
atomically after each stage, so a kill leaves it describing exactly the stages that finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

from mpqc.atomic import atomic_write_json

MANIFEST_VERSION = 1


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def key_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict:
    import numpy
    import torch

    import mpqc

    out = {"mpqc": mpqc.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - a dependency, but the manifest must not fail on it
        pass
    return out


@dataclass
class Manifest:
    """Stage records of one compile directory."""

    out: str
    stages: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return os.path.join(self.out, "manifest.json")

    @classmethod
    def load(cls, out: str) -> Manifest:
        m = cls(out)
        if os.path.exists(m.path):
            try:
                with open(m.path) as f:
                    data = json.load(f)
                if data.get("version") == MANIFEST_VERSION:
                    m.stages = data.get("stages", {})
            except (OSError, json.JSONDecodeError):
                m.stages = {}  # unreadable: every stage re-runs, which is always correct
        return m

    def save(self) -> None:
        atomic_write_json(self.path, {"version": MANIFEST_VERSION, "versions": versions(), "stages": self.stages})

    def is_fresh(self, stage: str, key: str) -> bool:
        rec = self.stages.get(stage)
        if not rec or rec.get("key") != key:
            return False
        for rel, digest in rec.get("outputs", {}).items():
            p = os.path.join(self.out, rel)
            if not os.path.exists(p) or file_hash(p) != digest:
                return False
        return True

    def run(self, stage: str, inputs: dict, outputs: list[str], fn: Callable[[], dict | None], *,
            reuse: bool = True) -> tuple[bool, dict]:
        """Run ``fn`` unless the stage is fresh; record its outputs' hashes, options and time."""
        in_files = {k: file_hash(os.path.join(self.out, v)) for k, v in inputs.pop("_files", {}).items()}
        key = key_of({"options": inputs, "files": in_files})
        if reuse and self.is_fresh(stage, key):
            return True, self.stages[stage].get("info", {})
        # invalidate before running: a kill mid-stage must not leave an old record pointing at new files
        self.stages.pop(stage, None)
        self.save()
        t0 = time.perf_counter()
        info = fn() or {}
        self.stages[stage] = {
            "key": key, "options": inputs, "inputs": in_files,
            "outputs": {rel: file_hash(os.path.join(self.out, rel)) for rel in outputs
                        if os.path.exists(os.path.join(self.out, rel))},
            "time_s": round(time.perf_counter() - t0, 3), "info": info,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.save()
        return False, info
