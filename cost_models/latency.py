"""Measured latency tables: one row per (target, op signature, w_bits, a_bits, format), in milliseconds.

A row holds the median and the spread (inter-quartile range) of ``repeats`` timed runs, the op's MACs, and its
provenance (device, driver and runtime versions, date). Tables are JSON files with a version, written by
``mpqc profile`` and read by the search (``--latency MS --lut FILE``).

Look-up is exact on the op signature (kind, shapes, groups, stride/padding/dilation, bias). An unseen signature
is interpolated by MACs among the measured rows of the same op kind and precision (piecewise linear inside the
measured range, proportional to MACs outside it) and FLAGGED: the estimate says so, the table remembers it
(``flagged``) and a warning is logged once. ``strict=True`` rejects it instead. A precision the runtime cannot
run is an ``unsupported`` row; its look-up gives ``inf`` with ``supported=False``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from mpqc.atomic import atomic_write_text
from mpqc.errors import UserError

from .protocols import LayerLike, kind_name

log = logging.getLogger(__name__)

LUT_VERSION = 1
LUT_FORMAT = "mpqc-latency-table"
STATUSES = ("ok", "unsupported")


def default_format(w_bits: int | None, a_bits: int | None) -> str:
    """The format a bare (w, a) pair means: float for (None, None), bf16 for 16 bits, else int."""
    if w_bits is None and a_bits is None:
        return "float"
    return "bf16" if 16 in (w_bits, a_bits) else "int"


def precision_label(w_bits: int | None, a_bits: int | None, fmt: str | None = None) -> str:
    fmt = fmt or default_format(w_bits, a_bits)
    if w_bits is None and a_bits is not None:  # a convert on an activation (boundary rows)
        return f"A{a_bits}"
    if fmt in ("float", "bf16", "fp16"):
        return fmt if w_bits in (None, 16) else f"W{w_bits}A{fmt}"
    text = f"W{w_bits}A{'float' if a_bits is None else a_bits}"
    return text if fmt == "int" else f"{text}:{fmt}"


def _dims(shape) -> str:
    return "x".join(str(int(s)) for s in shape) if shape else "-"


def op_signature(layer: LayerLike) -> str:
    """What determines an op's time: kind, input/weight/output shapes, groups, stride/padding/dilation (a
    transposed conv's output padding and its flag), bias."""
    in_shapes = getattr(layer, "in_shapes", None)
    if in_shapes is None:
        raise ValueError(f"{layer.name}: a latency signature needs the layer's in_shapes")
    parts = [kind_name(layer.kind), "in=" + ";".join(_dims(s) for s in in_shapes), "w=" + _dims(layer.weight_shape),
             "out=" + _dims(getattr(layer, "out_shape", None)), f"g={layer.groups}"]
    attrs = getattr(layer, "attrs", None) or {}
    for key, short in (("stride", "s"), ("padding", "p"), ("dilation", "d"), ("output_padding", "op")):
        v = attrs.get(key)
        if v is not None:
            parts.append(f"{short}=" + (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)))
    if attrs.get("transposed"):
        parts.append("transposed")
    if getattr(layer, "bias_fqn", None):
        parts.append("bias")
    return "|".join(parts)


@dataclass(frozen=True)
class LatencyRow:
    """One measured (or unsupported) op at one precision. Times are milliseconds per call (one batch)."""

    target: str
    signature: str
    kind: str
    macs: int
    w_bits: int | None
    a_bits: int | None
    format: str
    median_ms: float | None  # None for an unsupported row
    spread_ms: float | None
    repeats: int
    provenance: dict = field(default_factory=dict)
    status: str = "ok"
    note: str = ""
    layer: str = ""  # the first layer measured with this signature, for humans
    numel: int = 0  # input activation elements (boundary rows)
    spread: str = "iqr"

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"row status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.status != "ok":  # nothing was measured (JSON has no NaN)
            object.__setattr__(self, "median_ms", None)
            object.__setattr__(self, "spread_ms", None)
        else:
            if not (math.isfinite(self.median_ms) and self.median_ms > 0):
                raise ValueError(f"{self.signature}: median {self.median_ms!r} ms must be finite and > 0")
            if not (math.isfinite(self.spread_ms) and self.spread_ms >= 0) or self.repeats < 1:
                raise ValueError(f"{self.signature}: spread must be >= 0 and repeats >= 1")

    @property
    def key(self) -> tuple:
        return (self.target, self.signature, self.w_bits, self.a_bits, self.format)

    @property
    def label(self) -> str:
        return precision_label(self.w_bits, self.a_bits, self.format)


@dataclass(frozen=True)
class LatencyEstimate:
    """A look-up result: ``interpolated`` marks an estimate for a signature that was never measured."""

    ms: float
    spread_ms: float = 0.0
    interpolated: bool = False
    supported: bool = True
    basis: tuple[str, ...] = ()  # the signatures the value came from
    note: str = ""


class LatencyTable:
    """Rows keyed by (target, signature, w_bits, a_bits, format), plus free-form ``meta`` (whole-model times)."""

    def __init__(self, rows: Any = (), *, meta: dict | None = None, source: str = "<table>"):
        self.rows: dict[tuple, LatencyRow] = {}
        self.meta = dict(meta or {})
        self.source = source
        self.flagged: dict[tuple, LatencyEstimate] = {}
        for r in rows:
            self.add(r)

    def add(self, row: LatencyRow) -> None:
        """Insert ``row``, replacing an older measurement of the same key."""
        self.rows[row.key] = row

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LatencyRow]:
        return iter(self.rows.values())

    def targets(self) -> list[str]:
        return sorted({r.target for r in self})

    def _target(self, target: str | None) -> str:
        if target is not None:
            return target
        ts = self.targets()
        if len(ts) != 1:
            raise ValueError(f"{self.source} holds rows of {len(ts)} targets ({', '.join(ts)}); pass target=")
        return ts[0]

    def find(self, signature: str, w_bits, a_bits, *, fmt: str | None = None, target: str | None = None):
        """The exact row, or None. Without ``fmt`` the pair's default format is preferred."""
        t = self._target(target)
        want = [fmt] if fmt else [default_format(w_bits, a_bits), "int", "float", "bf16", "fp16", "fp8"]
        for f in want:
            row = self.rows.get((t, signature, w_bits, a_bits, f))
            if row is not None:
                return row
        return None

    def lookup(self, layer: LayerLike | str, w_bits, a_bits, *, fmt: str | None = None, target: str | None = None,
               strict: bool = False, macs: int | None = None, kind: str | None = None) -> LatencyEstimate:
        """The latency of ``layer`` (or of a signature string, then with ``macs``/``kind``) at a precision."""
        if isinstance(layer, str):
            sig, name, kind = layer, layer, kind or layer.split("|", 1)[0]
        else:
            sig, name, macs, kind = op_signature(layer), layer.name, layer.macs, kind_name(layer.kind)
        t = self._target(target)
        label = precision_label(w_bits, a_bits, fmt)
        row = self.find(sig, w_bits, a_bits, fmt=fmt, target=t)
        if row is not None:
            if row.status != "ok":
                return LatencyEstimate(math.inf, supported=False, basis=(sig,), note=row.note)
            return LatencyEstimate(row.median_ms, row.spread_ms, basis=(sig,))
        if strict:
            raise UserError(f"{self.source}: no measured latency for {name} ({sig}) at {label} on {t}; re-run "
                            "`mpqc profile` on this model, or drop --strict to interpolate by MACs")
        est = self._interpolate(t, kind, macs or 0, w_bits, a_bits, fmt, name, label)
        key = (t, sig, w_bits, a_bits, fmt or default_format(w_bits, a_bits))
        if key not in self.flagged:
            log.warning("latency of %s at %s interpolated by MACs (%.4g ms from %s); profile it for a measured value",
                        name, label, est.ms, ", ".join(est.basis))
        self.flagged[key] = est
        return est

    def _interpolate(self, t, kind, macs, w_bits, a_bits, fmt, name, label) -> LatencyEstimate:
        fmts = {fmt} if fmt else {default_format(w_bits, a_bits)}
        pool = sorted((r for r in self if r.target == t and r.kind == kind and r.w_bits == w_bits and
                       r.a_bits == a_bits and r.format in fmts and r.status == "ok" and r.macs > 0),
                      key=lambda r: r.macs)
        if not pool:
            raise UserError(f"{self.source}: no {kind} rows at {label} on {t} to estimate {name} from; run "
                            "`mpqc profile` on a model with such layers, or drop this precision")
        if macs <= 0:
            lo = pool[0]
            return LatencyEstimate(lo.median_ms, lo.spread_ms, True, basis=(lo.signature,), note="no MACs")
        lo = max((r for r in pool if r.macs <= macs), key=lambda r: r.macs, default=None)
        hi = min((r for r in pool if r.macs >= macs), key=lambda r: r.macs, default=None)
        if lo is None or hi is None or lo.macs == hi.macs:  # outside the range (or on a point): proportional
            ref = lo or hi
            k = macs / ref.macs
            return LatencyEstimate(ref.median_ms * k, ref.spread_ms * k, True, basis=(ref.signature,))
        f = (macs - lo.macs) / (hi.macs - lo.macs)
        return LatencyEstimate(lo.median_ms + f * (hi.median_ms - lo.median_ms),
                               lo.spread_ms + f * (hi.spread_ms - lo.spread_ms), True,
                               basis=(lo.signature, hi.signature))

    def sum_over(self, layers, w_bits, a_bits, *, fmt: str | None = None, target: str | None = None,
                 fallback: tuple | None = (None, None)) -> tuple[float, list[str]]:
        """Σ of the measured times of ``layers`` at one precision (a sum-of-layers model estimate).

        A layer with no supported row at that precision counts at ``fallback`` (float by default) and is
        listed in the second return value; no interpolation happens here.
        """
        total, fell_back = 0.0, []
        for layer in layers:
            row = self.find(op_signature(layer), w_bits, a_bits, fmt=fmt, target=target)
            if (row is None or row.status != "ok") and fallback is not None:
                fell_back.append(layer.name)
                row = self.find(op_signature(layer), *fallback, target=target)
            if row is None or row.status != "ok":
                raise UserError(f"{self.source}: no measured row for {layer.name}; re-run `mpqc profile`")
            total += row.median_ms
        return total, fell_back

    def merge(self, other: LatencyTable) -> LatencyTable:
        """Add ``other``'s rows (they win on equal keys) and meta."""
        for r in other:
            self.add(r)
        self.meta.update(other.meta)
        return self

    # -- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": LUT_FORMAT, "version": LUT_VERSION, "units": "ms", "meta": self.meta,
                "rows": [asdict(r) for r in self]}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != LUT_FORMAT:
            raise UserError(f"{source}: not an mpqc latency table; write one with `mpqc profile MODEL --target T -o "
                            f"{os.path.basename(source)}`")
        if d.get("version") != LUT_VERSION:
            raise UserError(f"{source}: latency table version {d.get('version')!r} is not {LUT_VERSION}; "
                            "re-run `mpqc profile`")
        rows = []
        for i, r in enumerate(d.get("rows", [])):
            try:
                rows.append(LatencyRow(**r))
            except (TypeError, ValueError) as e:
                raise UserError(f"{source}: rows[{i}]: {e}; re-run `mpqc profile` or fix the row") from None
        return cls(rows, meta=d.get("meta", {}), source=source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON atomically (a temporary file in the same folder, then ``os.replace``)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: latency table not found; write one with `mpqc profile`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e}); re-run `mpqc profile`") from None
        return cls.from_dict(data, source=path)


def plan_measurements(layers, target) -> list[tuple[str, Any, Any]]:
    """(signature, first layer with it, candidate) for every distinct signature and candidate precision."""
    seen: dict[str, Any] = {}
    for layer in layers:
        seen.setdefault(op_signature(layer), layer)
    return [(sig, layer, cand) for sig, layer in seen.items() for cand in target.candidate_specs(layer.kind)]

