"""Duck types for what the cost models read, so ``cost_models`` never imports ``mpqc.compiler``.

The IR's ``Op`` and ``ActGroup`` satisfy these protocols as they are; tests and users can also pass any small
object (a dataclass, a ``SimpleNamespace``) with the same attributes.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

# the IR's op kinds that carry a precision (mirrors mpqc.compiler.ir.QUANTIZABLE; kept here as data so that
# cost_models and targets stay independent of the compiler)
QUANTIZABLE_KINDS = ("conv", "linear", "matmul", "embedding")
OP_KINDS = QUANTIZABLE_KINDS + ("add", "mul", "cat", "pool", "norm", "act", "reshape", "other")


def kind_name(kind: Any) -> str:
    """The plain string of an op kind: accepts a str enum member (the IR's ``OpKind``) or a str."""
    return str(getattr(kind, "value", kind))


@runtime_checkable
class LayerLike(Protocol):
    """A quantizable layer.

    ``macs`` counts one forward pass at the captured input shape (batch included); ``fan_in`` is the length of
    one output element's dot product ((C_in/groups)·k_h·k_w for a conv); ``weight_shape`` is None (or empty) for
    an activation x activation matmul. ``in_shapes``/``out_shape``/``attrs`` are only read by the latency
    table (the op signature) and the profilers.
    """

    name: str
    kind: Any  # "conv" | "linear" | "matmul" | "embedding" | ... (a str enum is fine)
    macs: int
    weight_shape: Sequence[int] | None
    fan_in: int
    groups: int

    @property
    def out_channels(self) -> int: ...

    @property
    def weight_numel(self) -> int: ...


@runtime_checkable
class ActLike(Protocol):
    """An activation group: one tensor with one precision. ``numel`` is per sample (batch excluded)."""

    name: str
    signed: bool

    @property
    def numel(self) -> int: ...
