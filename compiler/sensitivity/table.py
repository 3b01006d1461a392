"""The sensitivity table: one non-negative score per (group, candidate), and its file formats.

A score predicts how much the task loss grows when a group is quantized at a candidate precision (or, on an
analog target, run at an energy per MAC); the search minimises their sum. The JSON file (DESIGN.md, file
formats) is::

    {"version": 1, "method": "fisher", "model_hash": "...", "data_hash": "...", "options": {...},
     "layers": {"conv1": {"w": {"8": s, "4": s}, "a": {"8": s, "4": s},
                          "w_channel": {"8": [s_c, ...]}, "e": {"1.0": s, "10.0": s},
                          "e_channel": {"1.0": [s_c, ...], ...}}},
     "act_groups": {"relu": {"consumers": ["conv2"], "a": {"8": s}}}, "meta": {...}}

Bit keys are strings in JSON and ints in Python; energy keys are ``repr(float)`` strings. ``a`` under a layer
is the score of the activation group(s) the layer reads, split evenly among the group's consumers, so summing
``a`` over layers counts each group once; ``act_groups`` keeps the group's whole score.

mpqc also reads LIMPQ's importance-indicator pickle (``read_limpq_pickle``): the learned LSQ step sizes per
layer and bit-width (research/seeds.md §3.2).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from mpqc.errors import UserError

TABLE_VERSION = 1


@dataclass
class LayerScores:
    """Scores of one layer: weights ``w`` and input activations ``a`` per bit-width, per output channel
    (``w_channel``, bits -> one score per channel) and per analog energy ``e`` (E -> score; ``e_channel``,
    E -> one score per output channel)."""

    w: dict[int, float] = field(default_factory=dict)
    a: dict[int, float] = field(default_factory=dict)
    w_channel: dict[int, list[float]] | None = None
    e: dict[float, float] | None = None
    e_channel: dict[float, list[float]] | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"w": {str(b): float(s) for b, s in sorted(self.w.items(), reverse=True)},
                             "a": {str(b): float(s) for b, s in sorted(self.a.items(), reverse=True)}}
        if self.w_channel is not None:
            d["w_channel"] = {str(b): [float(v) for v in s] for b, s in sorted(self.w_channel.items(), reverse=True)}
        if self.e is not None:
            d["e"] = {repr(float(k)): float(s) for k, s in sorted(self.e.items())}
        if self.e_channel is not None:
            d["e_channel"] = {repr(float(k)): [float(v) for v in s] for k, s in sorted(self.e_channel.items())}
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> LayerScores:
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected an object with \"w\"/\"a\" score maps, got {type(d).__name__}")
        unknown = set(d) - {"w", "a", "w_channel", "e", "e_channel"}
        if unknown:
            raise UserError(f"{where}: unknown keys {sorted(unknown)}; allowed: w, a, w_channel, e, e_channel")
        d = {k: v for k, v in d.items() if v is not None}  # null = not scored
        w = _bits_map(d.get("w", {}), f"{where}.w")
        a = _bits_map(d.get("a", {}), f"{where}.a")
        wc = _per_channel_map(d.get("w_channel"), f"{where}.w_channel", _bits_key, "bits")
        e = None
        if d.get("e") is not None:
            raw = d["e"]
            if not isinstance(raw, dict):
                raise UserError(f"{where}.e: expected an object energy -> score")
            e = {}
            for k, v in raw.items():
                e[_energy_key(k, f"{where}.e")] = _score(v, f"{where}.e.{k}")
        ec = _per_channel_map(d.get("e_channel"), f"{where}.e_channel", _energy_key, "energy")
        return cls(w, a, wc, e, ec)


def _bits_key(k: Any, where: str) -> int:
    if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, str) and k.strip().isdigit())):
        raise UserError(f"{where}: key {k!r} is not a bit-width (an integer)")
    b = int(k)
    if not 1 <= b <= 32:
        raise UserError(f"{where}: bit-width {b} is outside 1..32")
    return b


def _per_channel_map(raw: Any, where: str, key: Callable[[Any, str], Any], what: str) -> dict | None:
    """``{key: [score per output channel]}`` (``w_channel`` keyed by bits, ``e_channel`` by energy), or None."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object {what} -> list of scores")
    out = {}
    for k, v in raw.items():
        kk = key(k, where)
        if not isinstance(v, list) or not v:
            raise UserError(f"{where}.{k}: expected a non-empty list of scores")
        out[kk] = [_score(x, f"{where}.{k}[{i}]") for i, x in enumerate(v)]
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise UserError(f"{where}: the lists have different lengths {sorted(lengths)} (one score per output "
                        "channel)")
    return out


def _energy_key(k: Any, where: str) -> float:
    try:
        ek = float(k)
    except (TypeError, ValueError):
        raise UserError(f"{where}: key {k!r} is not a number (an energy per MAC)") from None
    if not (math.isfinite(ek) and ek > 0):
        raise UserError(f"{where}: key {k!r} must be a positive energy (finite, > 0)")
    return ek


def _score(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where}: score {v!r} is not a number")
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise UserError(f"{where}: score {v!r} must be finite and >= 0")
    return v


def _bits_map(raw: Any, where: str) -> dict[int, float]:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object bits -> score, got {type(raw).__name__}")
    return {_bits_key(k, where): _score(v, f"{where}.{k}") for k, v in raw.items()}


def _cummax_desc(scores: dict, *, increasing_key_is_better: bool = True) -> tuple[dict, int]:
    """Make scores non-increasing in the key (more bits or more energy never scores higher).

    Walking from the largest key down, each score becomes the maximum of itself and every score at a larger
    key; the number of entries raised is returned.
    """
    out, fixed, running = {}, 0, -math.inf
    for k in sorted(scores, reverse=increasing_key_is_better):
        s = scores[k]
        if s < running:
            fixed += 1
            s = running
        running = max(running, s)
        out[k] = s
    return {k: out[k] for k in scores}, fixed


def _cummax_columns(per_key: dict | None) -> tuple[dict | None, int]:
    """:func:`_cummax_desc` on every channel of a key -> per-channel-list map; (repaired map, entries raised)."""
    if per_key is None:
        return None, 0
    keys = sorted(per_key, reverse=True)
    fixed_cols, n = [], 0
    for col in zip(*(per_key[k] for k in keys)):
        m, k = _cummax_desc(dict(zip(keys, col)))
        n += k
        fixed_cols.append([m[b] for b in keys])
    return {b: [c[i] for c in fixed_cols] for i, b in enumerate(keys)}, n


@dataclass
class SensitivityTable:
    """Scores per layer from one method, with the hashes and options that produced them."""

    method: str
    model_hash: str
    data_hash: str
    options: dict
    layers: dict[str, LayerScores]
    act_groups: dict[str, dict] = field(default_factory=dict)  # tensor -> {"consumers": [...], "a": {b: s}}
    meta: dict = field(default_factory=dict)
    source: str = field(default="<table>", compare=False)  # the file it came from, for error messages
    # per-channel scores as arrays, built once per layer: the greedy search asks for them on every move
    _arrays: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- queries -----------------------------------------------------------------------------------------
    # The search reads one layer at a time; a layer absent from the table has no scores ({}).
    def w(self, layer: str) -> dict[int, float]:
        ls = self.layers.get(layer)
        return ls.w if ls is not None else {}

    def a(self, layer: str) -> dict[int, float]:
        ls = self.layers.get(layer)
        return ls.a if ls is not None else {}

    def e(self, layer: str) -> dict[float, float]:
        ls = self.layers.get(layer)
        return (ls.e or {}) if ls is not None else {}

    def w_channel(self, layer: str) -> dict[int, np.ndarray]:
        """bits -> one score per output channel (arrays, for the search's vector arithmetic)."""
        return self._channel_arrays("w_channel", layer)

    def e_channel(self, layer: str) -> dict[float, np.ndarray]:
        return self._channel_arrays("e_channel", layer)

    def _channel_arrays(self, kind: str, layer: str) -> dict:
        """A table is not changed once read (repairs return a copy), so the arrays are converted once."""
        key = (kind, layer)
        if key not in self._arrays:
            ls = self.layers.get(layer)
            raw = (getattr(ls, kind) or {}) if ls is not None else {}
            self._arrays[key] = {k: np.asarray(v, dtype=float) for k, v in raw.items()}
        return self._arrays[key]

    def scores(self, kind: str, bits: int) -> dict[str, float]:
        """``{layer: score}`` of the weights (``kind="w"``) or input activations (``"a"``) at ``bits``."""
        if kind not in ("w", "a"):
            raise ValueError(f"kind must be 'w' or 'a', not {kind!r}")
        return {n: getattr(ls, kind)[bits] for n, ls in self.layers.items() if bits in getattr(ls, kind)}

    def bits(self) -> list[int]:
        """Every bit-width some layer has a score for, highest first."""
        b = {k for ls in self.layers.values() for k in (*ls.w, *ls.a)}
        return sorted(b, reverse=True)

    # -- repair ------------------------------------------------------------------------------------------
    def monotone(self) -> SensitivityTable:
        """A copy whose scores never grow with bits (or energy): score(b) = max over b' >= b of score(b').

        Second-order estimates and learned indicators can be non-monotone by noise (LIMPQ's file has two such
        points); the search assumes more bits never cost accuracy. The number of raised entries is recorded in
        ``meta["monotone_repairs"]``.
        """
        layers, n = {}, 0
        for name, ls in self.layers.items():
            w, k1 = _cummax_desc(ls.w)
            a, k2 = _cummax_desc(ls.a)
            n += k1 + k2
            wc, k1 = _cummax_columns(ls.w_channel)
            ec, k2 = _cummax_columns(ls.e_channel)
            n += k1 + k2
            e = None
            if ls.e is not None:
                e, k = _cummax_desc(ls.e)
                n += k
            layers[name] = LayerScores(w, a, wc, e, ec)
        groups = {}
        for t, g in self.act_groups.items():
            a, _ = _cummax_desc(g.get("a", {}))
            groups[t] = {**g, "a": a}
        return replace(self, layers=layers, act_groups=groups,
                       meta={**self.meta, "monotone_repairs": n, "monotone": True})

    # -- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": TABLE_VERSION, "method": self.method, "model_hash": self.model_hash,
                "data_hash": self.data_hash, "options": self.options,
                "layers": {n: ls.to_dict() for n, ls in self.layers.items()},
                "act_groups": {t: {"consumers": list(g.get("consumers", [])),
                                   "a": {str(b): float(s) for b, s in sorted(g.get("a", {}).items(), reverse=True)}}
                               for t, g in self.act_groups.items()},
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> SensitivityTable:
        if not isinstance(d, dict):
            raise UserError(f"{source}: a sensitivity table is a JSON object, not {type(d).__name__}")
        if d.get("version") != TABLE_VERSION:
            raise UserError(f"{source}: sensitivity table version {d.get('version')!r} is not {TABLE_VERSION}; "
                            "re-run mpqc sensitivity")
        for k in ("method", "layers"):
            if k not in d:
                raise UserError(f"{source}: the sensitivity table has no {k!r} key")
        if not isinstance(d["method"], str):
            raise UserError(f"{source}: \"method\" must be a string")
        if not isinstance(d["layers"], dict) or not d["layers"]:
            raise UserError(f"{source}: \"layers\" must be a non-empty object layer -> scores")
        layers = {str(n): LayerScores.from_dict(v, f"{source}: layers.{n}") for n, v in d["layers"].items()}
        groups = {}
        raw_groups = d.get("act_groups") or {}
        if not isinstance(raw_groups, dict):
            raise UserError(f"{source}: \"act_groups\" must be an object")
        for t, g in raw_groups.items():
            if not isinstance(g, dict) or not isinstance(g.get("consumers", []), list):
                raise UserError(f"{source}: act_groups.{t} must be {{\"consumers\": [...], \"a\": {{...}}}}")
            groups[t] = {"consumers": [str(c) for c in g.get("consumers", [])],
                         "a": _bits_map(g.get("a", {}), f"{source}: act_groups.{t}.a")}
        opts = d.get("options") or {}
        meta = d.get("meta") or {}
        if not isinstance(opts, dict) or not isinstance(meta, dict):
            raise UserError(f"{source}: \"options\" and \"meta\" must be objects")
        return cls(d["method"], str(d.get("model_hash") or ""), str(d.get("data_hash") or ""), opts, layers, groups,
                   meta, source)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file atomically (a temporary file in the same folder, then a rename)."""
        from mpqc.atomic import atomic_write_text

        atomic_write_text(os.fspath(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityTable:
        """Read a table written by :meth:`save`; a malformed file raises a one-line ``UserError``."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"sensitivity table {path} not found")
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a JSON sensitivity table ({str(e).splitlines()[0]})") from None
        return cls.from_dict(d, path)


# ------------------------------------------------------------------------------------------------------------
# LIMPQ's indicator pickle
class _BuiltinsOnly(pickle.Unpickler):
    """Unpickler that refuses every class and function: LIMPQ's file holds only dicts, lists, str and float."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it references {module}.{name}; an indicator file holds only builtin types")


def read_limpq_pickle(path: str | os.PathLike) -> SensitivityTable:
    """Read LIMPQ's importance-indicator pickle into a table (method ``"limpq"``).

    The file is ``{"weight": {layer: {bits: s}}, "act": {layer: {bits: s}}, "layer_name": [names]}``
    (research/seeds.md §3.2); names may carry DataParallel's ``module.`` prefix, which is dropped. The
    indicator is the learned step size, which grows as bits shrink. The pickle is read without running any
    code (no classes are resolved); anything malformed raises a one-line ``UserError``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"LIMPQ indicator file {path} not found")
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _BuiltinsOnly(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a LIMPQ indicator pickle ({e})") from None
    except Exception as e:  # noqa: BLE001 - truncated or foreign bytes fail in many ways
        raise UserError(f"{path} is not a readable pickle ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: a LIMPQ indicator file holds a dict, not a {type(obj).__name__}")
    return table_from_limpq(obj, path)


def table_from_limpq(obj: dict, path: str = "<limpq>") -> SensitivityTable:
    """LIMPQ's indicator dict (the unpickled file, see :func:`read_limpq_pickle`) as a table."""
    missing = [k for k in ("weight", "act", "layer_name") if k not in obj]
    if missing:
        raise UserError(f"{path}: the LIMPQ indicator dict has no {', '.join(map(repr, missing))} key "
                        f"(found {sorted(map(str, obj))[:5]})")
    names = obj["layer_name"]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: \"layer_name\" must be a non-empty list of layer names")
    for part in ("weight", "act"):
        if not isinstance(obj[part], dict):
            raise UserError(f"{path}: \"{part}\" must be a dict layer -> {{bits: step size}}")
        absent = [n for n in names if n not in obj[part]]
        if absent:
            raise UserError(f"{path}: layer {absent[0]!r} of layer_name has no \"{part}\" indicators")

    def strip(n: str) -> str:
        return n[len("module."):] if n.startswith("module.") else n

    layers: dict[str, LayerScores] = {}
    for n in names:
        key = strip(n)
        if key in layers:
            raise UserError(f"{path}: layer {key!r} is listed twice")
        layers[key] = LayerScores(_bits_map(obj["weight"][n], f"{path}: weight[{n!r}]"),
                                  _bits_map(obj["act"][n], f"{path}: act[{n!r}]"))
    return SensitivityTable("limpq", "", "", {"source": os.path.basename(path)}, layers,
                            meta={"imported_from": "limpq-pickle"}, source=path)


def load_table(path: str | os.PathLike) -> SensitivityTable:
    """Read a sensitivity table: mpqc's JSON, or LIMPQ's indicator pickle (recognised by its first byte)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"sensitivity table {path} not found; write one with `mpqc sensitivity`")
    with open(path, "rb") as f:
        head = f.read(1)
    if not head:
        raise UserError(f"{path}: the sensitivity table is empty; write one with `mpqc sensitivity`")
    if head == b"\x80":  # pickle protocol >= 2 opcode
        return read_limpq_pickle(path)
    return SensitivityTable.load(path)


__all__ = ["TABLE_VERSION", "LayerScores", "SensitivityTable", "load_table", "read_limpq_pickle", "table_from_limpq"]
