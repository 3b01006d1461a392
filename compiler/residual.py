"""Quantizers on the inputs of residual adds, placed the way the target runtime reads them.

Runtimes add quantized tensors: onnxruntime fuses an add of two Q/DQ inputs into ``QLinearAdd``, TensorRT fuses
an add into the epilogue of the conv that produces one input and reads the other quantized (research/formats.md
§7). The exporter must therefore quantize those inputs. Placing the quantizers only at export means fine-tuning
trained a network whose skip paths were float, and the exported one differs from it twice over: the skip tensor
is rounded to 8 bits, and the next conv, which reads the same block input at fewer bits, now requantizes those
8-bit codes. :func:`quantize_residual_adds` is the one placement rule; the pipeline applies it before
fine-tuning (so LSQ learns the step sizes and trains through both roundings) and the exporter applies it again,
which then finds every input already quantized and adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from .passes import packet
from .quantize import ActQuantizer, QuantizedModel, RangeMethod

RESIDUAL_BITS = 8  # what QLinearAdd and TensorRT's int8 adds read
_WEIGHTED = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "addmm", "matmul", "bmm", "mm"}
_ADD = {"add", "add_"}
QUANTIZERS = ("wq.", "aq.", "rq.", "bq.")


@dataclass(frozen=True)
class ResidualQuantizer:
    """One quantizer added on an input of a residual add."""

    key: str  # "rq.<key>", the module's path in the GraphModule
    tensor: str  # the FX node it quantizes
    add: str  # the add that reads it
    requantizing: tuple[str, ...]  # narrower quantizers of the same tensor that now read its 8-bit codes


def is_quantizer(node, prefixes=QUANTIZERS) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_module" and str(node.target).startswith(prefixes)


def active(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return bool(gm.get_submodule(str(node.target)).enabled)


def at_least(gm: torch.fx.GraphModule, node: torch.fx.Node, bits: int) -> bool:
    """The quantizer at ``node`` keeps ``bits`` or more (an fp8 quantizer, with no integer width, counts)."""
    b = getattr(gm.get_submodule(str(node.target)), "bits", None)
    return b is None or int(b) >= bits


# between a layer and its add, ops that leave no node in the exported graph (a post-norm block's dropout); a
# reshape stays in ONNX, where TensorRT fuses no add through it, so that input is quantized (and trained so)
_PASS = {"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "clone", "alias", "contiguous", "detach",
         "identity"}


def _weighted_producer(n) -> torch.fx.Node | None:
    """The conv/linear/matmul that produces ``n``, directly or through pass-through ops; None if none does."""
    for _ in range(4):
        if not isinstance(n, torch.fx.Node):
            return None
        if n.op == "call_function" and packet(n) in _WEIGHTED:
            return n
        if n.op not in ("call_function", "call_method") or packet(n) not in _PASS or not n.args:
            return None
        n = n.args[0]
    return None


def _quantized_layer(gm: torch.fx.GraphModule, n: torch.fx.Node) -> bool:
    return any(is_quantizer(a) and active(gm, a) for a in n.all_input_nodes)


def _unwrapped(gm: torch.fx.GraphModule, n: torch.fx.Node) -> torch.fx.Node:
    """The tensor under a residual quantizer (the node itself when it is none)."""
    return n.args[0] if is_quantizer(n, ("rq.",)) else n


def residual_adds(gm: torch.fx.GraphModule):
    """(add node, its two tensor inputs) for every add of two tensors one of which a quantized layer produces."""
    for add in gm.graph.nodes:
        if add.op != "call_function" or packet(add) not in _ADD or len(add.args) < 2:
            continue
        ins = [a for a in add.args[:2] if isinstance(a, torch.fx.Node)]
        if len(ins) != 2:
            continue
        weighted = [w for w in (_weighted_producer(_unwrapped(gm, a)) for a in ins) if w is not None]
        if any(_quantized_layer(gm, w) for w in weighted):
            yield add, ins


def quantize_residual_adds(gm: torch.fx.GraphModule, rq: nn.ModuleDict, nonnegative: dict[str, bool], *,
                           fuse_one: bool, bits: int = RESIDUAL_BITS,
                           method: RangeMethod = RangeMethod.MSE) -> list[ResidualQuantizer]:
    """Make residual adds read quantized inputs; returns the quantizers that had to be added (uncalibrated).

    ``fuse_one`` (TensorRT) leaves one weighted-op input of each add in float, the one the add fuses into;
    otherwise (onnxruntime) every input is quantized. An input that already has an active quantizer of at least
    ``bits`` is read through it; one that has only narrower quantizers (a block input the next conv reads at 2
    bits) gets a new ``bits``-bit quantizer, and the narrower ones requantize its codes, so the tensor keeps one
    quantizer feeding everything (and the add that made it still fuses). ``nonnegative`` maps FX node names to
    whether the tensor is known to be >= 0 (an unsigned grid). The graph is relinted and recompiled.
    """
    added: list[ResidualQuantizer] = []
    for add, ins in list(residual_adds(gm)):
        keep = None
        if fuse_one:
            keep = next((a for a in ins if _weighted_producer(a) is not None), None)
        for a in ins:
            if a is keep or is_quantizer(a):  # fused, or already read through a quantizer
                continue
            readers = [u for u in a.users if is_quantizer(u, ("aq.", "rq.")) and active(gm, u)]
            existing = next((u for u in readers if at_least(gm, u, bits)), None)
            if existing is None:
                key = f"res_{a.name}"
                rq[key] = ActQuantizer(signed=not nonnegative.get(a.name, False), bits=bits, method=method)
                with gm.graph.inserting_after(a):
                    existing = gm.graph.call_module(f"rq.{key}", (a,))
                for u in readers:
                    u.replace_input_with(a, existing)
                added.append(ResidualQuantizer(f"rq.{key}", a.name, add.name, tuple(str(u.target) for u in readers)))
            add.replace_input_with(a, existing)
    gm.graph.lint()
    gm.recompile()
    return added


def nonnegative_nodes(qm: QuantizedModel) -> dict[str, bool]:
    """{FX node name: the IR knows its tensor is >= 0} for every op output of ``qm``."""
    return {op.attrs.get("node"): qm.graph_ir.tensors[op.output].nonnegative for op in qm.graph_ir.ops.values()}


def quantize_residuals_for(qm: QuantizedModel, profile: str, *, bits: int = RESIDUAL_BITS) -> list[ResidualQuantizer]:
    """Put ``profile``'s residual quantizers into ``qm`` before fine-tuning (``qcdq``: none), at the plan's bits
    as they are set now; their ranges are set by the next ``qm.calibrate``."""
    if profile not in ("ort", "trt", "qcdq"):
        raise ValueError(f"profile {profile!r}: use ort, trt or qcdq")
    if profile == "qcdq":
        return []
    return quantize_residual_adds(qm.gm, qm.rq, nonnegative_nodes(qm), fuse_one=profile == "trt", bits=bits,
                                  method=next((m.method for m in qm.aq.values()), RangeMethod.MSE))


__all__ = ["RESIDUAL_BITS", "ResidualQuantizer", "nonnegative_nodes", "quantize_residual_adds",
           "quantize_residuals_for", "residual_adds"]
