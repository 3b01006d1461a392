"""Capture: trace a model into a runnable FX graph and build the IR from it.

``torch.export`` (non-strict) is tried first: it gives ATen ops with shapes and ``nn_module_stack``
metadata, and its ``.module()`` is a GraphModule whose ``get_attr`` nodes carry the parameters' full names,
so every op maps back to its module path. ``torch.fx`` symbolic tracing plus a shape-recording run is the
fallback for models export rejects; it traces into weighted layers and inference batch norms so that their
parameters are ``get_attr`` nodes there too. TorchScript files are converted to an ExportedProgram first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx

from mpqc.errors import UserError, first_line

from .ir import Graph, Op, OpKind, Tensor
from .passes import transposed_conv_groups

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """The IR, the runnable GraphModule it describes, and how it was obtained."""

    graph: Graph
    gm: torch.fx.GraphModule
    method: str  # "export" | "fx" | "torchscript"
    example_inputs: tuple


# --------------------------------------------------------------------------------------------------------
# op classification (shared by both capture paths)
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_MATMUL = {"matmul", "bmm", "mm", "baddbmm", "scaled_dot_product_attention", "__matmul__"}
_EMBED = {"embedding", "embedding_bag", "_embedding_bag"}
_NORM = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
         "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm", "rms_norm"}
_NONNEG_ACT = {"relu", "relu_", "relu6", "sigmoid", "softmax", "_softmax", "hardsigmoid", "hardsigmoid_",
               "sigmoid_"}
_ACT = _NONNEG_ACT | {"gelu", "silu", "silu_", "tanh", "hardswish", "hardswish_", "leaky_relu", "leaky_relu_",
                      "elu", "mish", "log_softmax", "_log_softmax", "hardtanh", "hardtanh_", "erf"}
_POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
         "adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "max_pool2d_with_indices", "amax", "sum"}
_ADD = {"add", "add_", "sub", "sub_", "iadd"}
_MUL = {"mul", "mul_", "div", "div_", "truediv", "imul"}
_CAT = {"cat", "stack", "concat"}
_RESHAPE = {"view", "reshape", "flatten", "permute", "transpose", "t", "contiguous", "unsqueeze", "squeeze",
            "expand", "clone", "dropout", "getitem", "slice", "select", "split", "chunk", "_unsafe_view", "alias",
            "detach", "unflatten", "size", "narrow", "split_with_sizes", "unbind", "to", "type_as", "_to_copy",
            "native_dropout", "feature_dropout", "alpha_dropout", "lift_fresh_copy", "expand_as", "repeat",
            "flip", "roll", "pad", "constant_pad_nd", "channel_shuffle", "pixel_shuffle", "movedim", "squeeze_",
            "unsqueeze_", "as_strided", "view_as", "identity"}
# passthrough kinds keep "known non-negative" when every input is (a subtraction does not, whatever its inputs)
_PASSTHROUGH = {OpKind.POOL, OpKind.RESHAPE, OpKind.CAT, OpKind.ADD, OpKind.MUL}
_SUBTRACT = {"sub", "sub_", "isub", "rsub", "__sub__", "__rsub__"}
_FILL = {"pad", "constant_pad_nd"}  # pass data through, with a fill value that may be negative
# resampling by non-negative weights (a nearest pick or a convex combination) keeps non-negative values so;
# bicubic's weights go below zero and do not
_RESAMPLE = {"upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
             "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
             "upsample_trilinear3d", "_upsample_bilinear2d_aa", "adaptive_avg_pool3d"}
_RESAMPLE_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}

_MODULE_KINDS: list[tuple[type, OpKind]] = [
    (torch.nn.modules.conv._ConvNd, OpKind.CONV),
    (torch.nn.Linear, OpKind.LINEAR),
    (torch.nn.Embedding, OpKind.EMBEDDING),
    (torch.nn.EmbeddingBag, OpKind.EMBEDDING),
    (torch.nn.modules.batchnorm._NormBase, OpKind.NORM),
    (torch.nn.LayerNorm, OpKind.NORM),
    (torch.nn.GroupNorm, OpKind.NORM),
    (torch.nn.modules.pooling._MaxPoolNd, OpKind.POOL),
    (torch.nn.modules.pooling._AvgPoolNd, OpKind.POOL),
    (torch.nn.modules.pooling._AdaptiveAvgPoolNd, OpKind.POOL),
    (torch.nn.Flatten, OpKind.RESHAPE),
    (torch.nn.Dropout, OpKind.RESHAPE),
    (torch.nn.Identity, OpKind.RESHAPE),
]
_NONNEG_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Sigmoid, torch.nn.Softmax, torch.nn.Hardsigmoid)
_ACT_MODULES = _NONNEG_MODULES + (torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Hardswish,
                                  torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Hardtanh, torch.nn.Mish)


def _base_name(node: torch.fx.Node) -> str:
    """The bare op name of a call_function / call_method node: 'aten.conv2d.default' -> 'conv2d'."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))


def _kind_of_name(name: str) -> OpKind:
    if name in _CONV:
        return OpKind.CONV
    if name in {"linear", "addmm"}:
        return OpKind.LINEAR
    if name in _MATMUL:
        return OpKind.MATMUL
    if name in _EMBED:
        return OpKind.EMBEDDING
    if name in _NORM:
        return OpKind.NORM
    if name in _ACT:
        return OpKind.ACT
    if name in _POOL:
        return OpKind.POOL
    if name in _ADD:
        return OpKind.ADD
    if name in _MUL:
        return OpKind.MUL
    if name in _CAT:
        return OpKind.CAT
    if name in _RESHAPE:
        return OpKind.RESHAPE
    return OpKind.OTHER


def _shape(v) -> list[int] | None:
    if isinstance(v, torch.Tensor):
        return [int(s) for s in v.shape]
    return None


# --------------------------------------------------------------------------------------------------------
# tracing
def trace(model: torch.nn.Module, example_inputs: tuple, method: str = "auto") -> tuple[torch.fx.GraphModule, str]:
    """Trace ``model`` to a GraphModule with a tensor value in ``node.meta['val']`` for every node.

    ``method``: "auto" (export, then fx), "export" or "fx".
    """
    if isinstance(model, torch.jit.ScriptModule):
        from torch._export.converter import TS2EPConverter

        try:
            with warnings.catch_warnings(), _quiet("torch._export.non_strict_utils"):
                warnings.simplefilter("ignore")  # the converter warns once per unused BN counter
                ep = TS2EPConverter(model, example_inputs).convert()
        except Exception as e:  # noqa: BLE001 - report the converter's reason in one line
            raise UserError(f"cannot convert this TorchScript model to a graph ({first_line(e, 300)}); "
                            "save the model with torch.export.save or as a state dict with --arch") from None
        gm = ep.module()
        # the converter fixes the example's shapes with a guard (x.size(0) == 1); without it the ops run at any
        # batch, unless the model wrote its batch into a shape (compile's data check names that case)
        _drop_guards(gm)
        gm = _export_dynamic_batch(gm, example_inputs) or gm
        _promote_trainable_buffers(gm)
        _record_values(gm, example_inputs)
        return gm, "torchscript"
    export_error: BaseException | None = None
    if method in ("auto", "export"):
        try:
            gm = _export_dynamic_batch(model, example_inputs)
            if gm is None:
                gm = torch.export.export(model, example_inputs, strict=False).module()
            _record_values(gm, example_inputs)
            return gm, "export"
        except Exception as e:  # noqa: BLE001 - export fails in many ways; fall back to fx
            if method == "export":
                raise UserError(f"torch.export failed: {first_line(e, 300)}; check --input-shape") from None
            export_error = e
            log.info("torch.export failed (%s); falling back to torch.fx.symbolic_trace", first_line(e, 300))
    try:
        tracer = _WeightsVisibleTracer()
        gm = torch.fx.GraphModule(model, tracer.trace(model), type(model).__name__)
        _record_values(gm, example_inputs)
        return gm, "fx"
    except Exception as e:  # noqa: BLE001
        why = f"torch.export failed ({first_line(export_error, 300)}) and " if export_error else ""
        raise UserError(f"cannot capture the model: {why}"
                        f"torch.fx.symbolic_trace failed ({first_line(e, 300)}); check --input-shape, or make the "
                        "forward exportable (no data-dependent Python control flow)") from None


class _WeightsVisibleTracer(torch.fx.Tracer):
    """symbolic_trace, except that convolutions, linear layers, embeddings and inference batch norms become their
    functional calls reading the weights through get_attr, where the quantizers go and BN folding looks (as leaf
    modules they hid them, and a model that fell back to torch.fx could not be quantized)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.Embedding)) or _frozen_bn(m):
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if _frozen_bn(m) and len(args) == 1 and not kwargs:
            # its forward checks the input's rank in Python, which a proxy cannot answer; an inference BN is one
            # aten batch_norm on its buffers (the form fold_batchnorm folds)
            path = self.path_of_module(m)

            def forward(x):
                attr = [self.create_proxy("get_attr", f"{path}.{n}", (), {}) if getattr(m, n) is not None else None
                        for n in ("weight", "bias", "running_mean", "running_var")]
                return self.create_proxy("call_function", torch.batch_norm, (x, *attr, False, 0.0, m.eps, False), {})
        return super().call_module(m, forward, args, kwargs)


def _frozen_bn(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats \
        and m.running_mean is not None


@contextlib.contextmanager
def _quiet(logger: str):
    """Hold a library logger to errors: the TorchScript converter logs its own shape specialisations (a batch of 1
    "specialized") as warnings on stderr, which say nothing to the user and are not theirs to fix."""
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _drop_guards(gm: torch.fx.GraphModule) -> None:
    """Remove the input-shape guard call an unlifted ExportedProgram module makes first (``self._guards_fn(x)``)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target) == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
    gm.recompile()


def _promote_trainable_buffers(gm: torch.fx.GraphModule) -> None:
    """Buffers that require grad back to parameters. The TorchScript converter keeps some of a model's parameters
    (a traced linear's weight and bias) as buffers that still require grad; as buffers they would not train, and
    once anything clones them (non-leaf tensors) the graph can no longer be deep-copied."""
    for name, buf in list(gm.named_buffers()):
        if buf.is_floating_point() and buf.requires_grad:
            mod_path, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(mod_path) if mod_path else gm
            del mod._buffers[leaf]
            mod.register_parameter(leaf, torch.nn.Parameter(buf.detach().clone()))


def _export_dynamic_batch(model: torch.nn.Module, example_inputs: tuple) -> torch.fx.GraphModule | None:
    """Export with a symbolic batch dimension so the graph runs on any batch size; None if the model refuses.

    The example is doubled along dim 0 first: export specialises a size of 1 to a constant.
    """
    if not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in example_inputs):
        return None
    doubled = tuple(torch.cat([x, x]) for x in example_inputs)
    dims = tuple({0: torch.export.Dim.AUTO} for _ in example_inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, doubled, dynamic_shapes=dims, strict=False).module()
    except Exception as e:  # noqa: BLE001 - a static graph still serves the IR
        log.info("export with a dynamic batch failed (%s); the graph keeps the example's batch", first_line(e, 300))
        return None


def _record_values(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Run the traced module once, storing each node's output in ``meta['val']`` (what export gives)."""

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            # shapes and dtypes only: meta tensors keep no activation memory alive
            n.meta["val"] = torch.fx.node.map_aggregate(
                out, lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v)
            return out

    with torch.no_grad():
        _Recorder(gm).run(*example_inputs)


def capture(model: torch.nn.Module, example_inputs: tuple, *, fold_bn: bool = False,
            method: str = "auto") -> Captured:
    """Trace ``model`` and build the IR from the traced graph.

    With ``fold_bn`` the inference BatchNorms are folded into the layers before them (what a deployed
    integer graph computes); ``mpqc inspect`` shows the model as written, the pipeline folds.
    """
    from .loading import set_eval
    from .passes import (
        drop_eval_noops,
        einsum_as_products,
        explicit_attention,
        free_reserved_names,
        functional_inplace,
        linear_from_matmul,
        output_channels_first,
    )

    model = set_eval(model)
    gm, method = trace(model, example_inputs, method)
    free_reserved_names(gm)
    drop_eval_noops(gm)
    functional_inplace(gm)
    einsum_as_products(gm)
    linear_from_matmul(gm)
    output_channels_first(gm)
    explicit_attention(gm)
    if fold_bn:
        from .passes import fold_batchnorm

        fold_batchnorm(gm)
    graph = build_ir(gm, total_params=sum(p.numel() for p in model.parameters()),
                     input_shapes=[_shape(x) for x in example_inputs], method=method)
    return Captured(graph, gm, method, example_inputs)


# --------------------------------------------------------------------------------------------------------
# IR construction
def _module_path(node: torch.fx.Node) -> tuple[str, type | None]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", None
    path, typ = list(stack.values())[-1]
    if isinstance(typ, str):
        return path, None
    return path, typ


# what stands between a parameter and its matmul: a decomposed .pt2's linear is t -> unsqueeze -> expand -> bmm
_WEIGHT_VIEWS = {"t", "permute", "transpose", "view", "reshape", "_unsafe_view", "to", "_to_copy", "expand",
                 "unsqueeze", "squeeze", "contiguous", "clone", "alias"}


def _param_name(gm: torch.fx.GraphModule, node) -> str | None:
    """The parameter FQN a node reads, following single-input views (t, permute, expand) back to a get_attr."""
    for _ in range(8):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "get_attr":
            return str(node.target)
        if node.op in ("call_function", "call_method") and _base_name(node) in _WEIGHT_VIEWS:
            node = node.args[0]
            continue
        return None
    return None


def _flat_nodes(args) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, out.append)
    return out


def build_ir(gm: torch.fx.GraphModule, *, total_params: int, input_shapes, method: str) -> Graph:
    """Build the IR from a GraphModule whose nodes carry ``meta['val']``."""
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    params.update(dict(gm.named_buffers()))
    ops: list[Op] = []
    tensors: dict[str, Tensor] = {}
    name_of: dict[str, str] = {}  # fx node name -> IR tensor/op name
    used: set[str] = set()
    inputs: list[str] = []
    outputs: list[str] = []
    unquantized: dict[str, dict] = {}

    def unique(name: str) -> str:
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}@{k}"
        used.add(name)
        return name

    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            if not isinstance(val, torch.Tensor):
                continue
            name = unique(str(node.target))
            name_of[node.name] = name
            tensors[name] = Tensor(name, _shape(val), str(val.dtype).replace("torch.", ""), None)
            inputs.append(name)
            continue
        if node.op == "get_attr" or (node.op == "call_module" and str(node.target) == "_guards_fn"):
            continue  # a loaded .pt2's input-shape check: no data flows through it
        if node.op == "output":
            for a in _flat_nodes(node.args):
                if a.name in name_of:
                    outputs.append(name_of[a.name])
            continue
        # call_function / call_method / call_module
        weight_fqn = bias_fqn = None
        transposed = False
        if node.op == "call_module":
            mod = modules[str(node.target)]
            kind = next((k for cls, k in _MODULE_KINDS if isinstance(mod, cls)), None)
            if kind is None:
                kind = OpKind.ACT if isinstance(mod, _ACT_MODULES) else OpKind.OTHER
            nonneg_act = isinstance(mod, _NONNEG_MODULES)
            module_path, base = str(node.target), type(mod).__name__.lower()
            if kind in (OpKind.CONV, OpKind.LINEAR, OpKind.EMBEDDING):
                weight_fqn = f"{node.target}.weight"
                if getattr(mod, "bias", None) is not None:
                    bias_fqn = f"{node.target}.bias"
            if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd):
                kind = OpKind.OTHER
        else:
            base = _base_name(node)
            kind = _kind_of_name(base)
            nonneg_act = base in _NONNEG_ACT or (base in {"hardtanh", "hardtanh_", "clamp"} and _min_arg(node) >= 0)
            module_path, _ = _module_path(node)
            args = list(node.args)
            t_groups = transposed_conv_groups(node)
            if t_groups is not None:
                # quantized when output_channels_first stored its weight (C_out, C_in, k...): read through a
                # transpose; grouped ones stay float, kept for structure
                w_arg = args[1] if len(args) > 1 else None
                if t_groups == 1 and isinstance(w_arg, torch.fx.Node) and _base_name(w_arg) == "transpose" \
                        and w_arg.args[0].op == "get_attr":
                    kind, transposed = OpKind.CONV, True
                    weight_fqn = str(w_arg.args[0].target)
                    bias_fqn = _param_name(gm, args[2]) if len(args) > 2 else None
                else:
                    kind = OpKind.OTHER
            elif kind == OpKind.CONV:
                weight_fqn = _param_name(gm, args[1])
                bias_fqn = _param_name(gm, args[2]) if len(args) > 2 else None
            elif kind == OpKind.LINEAR and base == "linear":
                weight_fqn = _param_name(gm, args[1])
                bias_fqn = _param_name(gm, args[2]) if len(args) > 2 else None
            elif kind == OpKind.LINEAR and base == "addmm":
                weight_fqn = _param_name(gm, args[2])
                bias_fqn = _param_name(gm, args[0])
            elif kind == OpKind.EMBEDDING:
                weight_fqn = _param_name(gm, args[0])
            elif kind == OpKind.MATMUL:
                for a in (args[1:3] if base == "baddbmm" else args[:2]):  # the product's operands
                    if _param_name(gm, a):  # a matmul with a parameter operand is a linear layer
                        kind, weight_fqn = OpKind.LINEAR, _param_name(gm, a)
            if kind in (OpKind.CONV, OpKind.LINEAR, OpKind.EMBEDDING) and weight_fqn is None:
                kind = OpKind.MATMUL if kind == OpKind.LINEAR else OpKind.OTHER

        in_nodes = [a for a in _flat_nodes((node.args, node.kwargs)) if a.name in name_of]
        in_names = [name_of[a.name] for a in in_nodes]
        if weight_fqn is not None:
            name = unique(weight_fqn.rsplit(".", 1)[0] if "." in weight_fqn else weight_fqn)
        elif module_path and module_path not in used and node.op != "call_module" and kind != OpKind.OTHER \
                and _is_leaf_module_op(node):
            name = unique(module_path)
        elif node.op == "call_module":
            name = unique(module_path)
        else:
            name = unique(f"{module_path}/{node.name}" if module_path else node.name)
        name_of[node.name] = name

        out_shape = _shape(val[0] if isinstance(val, (tuple, list)) and val and
                           isinstance(val[0], torch.Tensor) and base != "split" else val) or []
        op = Op(name=name, kind=kind, target=_target_name(node) if node.op != "call_module" else type(
            modules[str(node.target)]).__name__, inputs=in_names, output=name,
            in_shapes=[tensors[n].shape for n in in_names], out_shape=out_shape, module=module_path,
            weight_fqn=weight_fqn, bias_fqn=bias_fqn, attrs={"node": node.name, **({"transposed": True}
                                                                              if transposed else {})})
        if weight_fqn is not None:
            op.weight_shape = [int(s) for s in params[weight_fqn].shape]
        _annotate(op, node, params)
        # a shape argument (x.view(x.size(0), -1): a symbolic size) is not data the op passes through
        data_in = [name_of[a.name] for a in in_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        nonneg = nonneg_act or (bool(data_in) and all(tensors[n].nonnegative for n in data_in) and
                                _keeps_nonnegative(node, kind, base))
        tensors[name] = Tensor(name, out_shape, _dtype(val), name, nonnegative=bool(nonneg))
        for n in in_names:
            if name not in tensors[n].consumers:
                tensors[n].consumers.append(name)
        ops.append(op)
        if kind == OpKind.OTHER and base not in ("prelu", "_prelu_kernel") and not (
                node.op == "call_module" and isinstance(modules[str(node.target)], torch.nn.PReLU)):
            # (element-wise ops reading a parameter, a PReLU slope or a layer scale, multiply nothing)
            held = _params_read(gm, node, modules, params)
            if held or base == "einsum":
                unquantized[name] = {"op": op.target if node.op == "call_module" else base, "params": held,
                                     "macs": _transposed_conv_macs(node, val) or _einsum_macs(node)}

    meta = {"total_params": int(total_params), "input_shapes": input_shapes, "capture": method}
    if unquantized:  # parameterised ops that stay float and outside every cost (LSTM, ConvTranspose, einsum)
        meta["unquantized"] = unquantized
    return Graph(ops, tensors.values(), inputs, outputs, meta)


def _target_name(node: torch.fx.Node) -> str:
    """``aten.conv2d.default`` for an aten op; ``torch.conv2d``, ``operator.add`` or a method's name for what torch.fx
    records (str() of a builtin carries its memory address)."""
    t = node.target
    if isinstance(t, str) or isinstance(t, torch._ops.OpOverload):
        return str(t)
    name = getattr(t, "__name__", None)
    if name is None:
        return str(t)
    module = getattr(t, "__module__", None) or ("torch" if getattr(torch, name, None) is t else "")
    return f"{module.replace('torch._C._nn', 'torch.nn.functional')}.{name}" if module else name


def _params_read(gm, node: torch.fx.Node, modules: dict, params: dict) -> int:
    """How many parameter elements an op reads: its module's own, or those of get_attr inputs (through views)."""
    if node.op == "call_module":
        return sum(p.numel() for p in modules[str(node.target)].parameters())
    seen = {_param_name(gm, a) for a in _flat_nodes((node.args, node.kwargs))}
    return sum(params[f].numel() for f in seen if f in params and isinstance(params[f], torch.nn.Parameter))


def _einsum_macs(node: torch.fx.Node) -> int:
    """An einsum's MACs as a direct contraction: the product of the sizes of all its indices (0 when it is not
    an einsum, or spells broadcast dimensions with '...')."""
    if node.op != "call_function" or _base_name(node) != "einsum" or not node.args:
        return 0
    eq, rest = node.args[0], node.args[1:]
    ops = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    if not isinstance(eq, str) or "..." in eq or len(ops) < 2:
        return 0
    sizes: dict[str, int] = {}
    for spec, t in zip(eq.replace(" ", "").split("->")[0].split(","), ops):
        v = t.meta.get("val") if isinstance(t, torch.fx.Node) else None
        if not isinstance(v, torch.Tensor) or len(spec) != v.dim():
            return 0
        sizes.update(zip(spec, (int(d) for d in v.shape)))
    return int(math.prod(sizes.values()))


def _transposed_conv_macs(node: torch.fx.Node, val) -> int:
    """A transposed convolution's MACs: every input element times C_out/groups·k (each input pixel scatters one
    kernel per output channel of its group); 0 for any other op."""
    mod = node.graph.owning_module.get_submodule(str(node.target)) if node.op == "call_module" else None
    if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd):
        w = mod.weight
    elif node.op == "call_function" and ("conv_transpose" in _base_name(node) or (
            _base_name(node) in {"convolution", "_convolution"} and len(node.args) > 6 and node.args[6])):
        wv = node.args[1].meta.get("val") if isinstance(node.args[1], torch.fx.Node) else None
        if not isinstance(wv, torch.Tensor):
            return 0
        w = wv
    else:
        return 0
    x = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(x, torch.Tensor):
        return 0
    return int(x.numel() * math.prod(w.shape[1:]))  # weight: (C_in, C_out/groups, k...)


def _is_leaf_module_op(node: torch.fx.Node) -> bool:
    """True when the op is the whole of a library leaf module (e.g. a BatchNorm2d), so it can take its name."""
    _, typ = _module_path(node)
    return typ is not None and typ.__module__.startswith("torch.nn.modules")


def _keeps_nonnegative(node: torch.fx.Node, kind: OpKind, base: str) -> bool:
    """Whether the op's output is non-negative whenever its data inputs are."""
    if node.op == "call_module":  # base: the module's class name, lower case
        if isinstance(node.graph.owning_module.get_submodule(str(node.target)), torch.nn.Upsample):
            return node.graph.owning_module.get_submodule(str(node.target)).mode in _RESAMPLE_MODES
        return kind in _PASSTHROUGH
    if base in _SUBTRACT:
        return False
    if base in _RESAMPLE:
        return True
    if base == "interpolate":
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        return mode in _RESAMPLE_MODES
    if kind in (OpKind.ADD, OpKind.MUL) or base in _FILL:
        return _scalars_nonnegative(node)
    return kind in _PASSTHROUGH


def _scalars_nonnegative(node: torch.fx.Node) -> bool:
    """No number among an add's or a mul's arguments is negative (``x * -1``, ``add(x, y, alpha=-1)``)."""
    nums = [v for v in (*node.args, *node.kwargs.values())
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return all(v >= 0 for v in nums)


def _min_arg(node: torch.fx.Node) -> float:
    args = list(node.args)
    v = args[1] if len(args) > 1 else node.kwargs.get("min_val", node.kwargs.get("min", -1.0))
    return float(v) if isinstance(v, (int, float)) else -1.0


def _dtype(val) -> str:
    if isinstance(val, torch.Tensor):
        return str(val.dtype).replace("torch.", "")
    return "tuple"


def _annotate(op: Op, node: torch.fx.Node, params: dict) -> None:
    """Fill groups, fan-in, MACs and params from the exact geometry (DESIGN.md, units)."""
    out_numel = math.prod(op.out_shape) if op.out_shape else 0
    if op.weight_fqn is not None:
        op.params = params[op.weight_fqn].numel() + (params[op.bias_fqn].numel() if op.bias_fqn else 0)
    if op.kind == OpKind.CONV and op.attrs.get("transposed"):
        # weight stored (C_out, C_in, k...) by output_channels_first; every input element scatters C_out·k
        # products, so an output element sums macs / out_numel of them on average (fewer near the borders)
        op.groups = 1
        op.macs = _transposed_conv_macs(node, None)
        op.fan_in = max(1, op.macs // max(out_numel, 1))
        op.act_inputs = op.inputs[:1]
        op.attrs.update(_conv_attrs(node, transposed=True))
    elif op.kind == OpKind.CONV:
        w = op.weight_shape
        c_in = op.in_shapes[0][1] if op.in_shapes and len(op.in_shapes[0]) > 1 else w[1]
        op.groups = max(1, c_in // w[1])
        op.fan_in = math.prod(w[1:])
        # C_out*H_out*W_out*(C_in/groups)*k_h*k_w: the output elements times what each one reduces over
        op.macs = out_numel * op.fan_in
        op.act_inputs = op.inputs[:1]
        op.attrs.update(_conv_attrs(node))
    elif op.kind == OpKind.LINEAR:
        op.fan_in = op.weight_shape[-1] if len(op.weight_shape) == 2 else op.weight_shape[0]
        base = _base_name(node) if node.op != "call_module" else ""
        if base in _MATMUL and base != "baddbmm":  # x @ W: the reduced dimension is the first operand's last
            a = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            if isinstance(a, torch.Tensor) and a.dim():  # (a tied (in, out) weight that linear_from_matmul kept)
                op.fan_in = int(a.shape[-1])
        op.macs = out_numel * op.fan_in
        op.act_inputs = [n for n in op.inputs][:1]
    elif op.kind == OpKind.MATMUL:
        base = _base_name(node) if node.op != "call_module" else ""
        if base == "scaled_dot_product_attention":
            q, k, v = op.in_shapes[:3]
            bh = math.prod(q[:-2])
            op.macs = bh * q[-2] * k[-2] * q[-1] + bh * q[-2] * k[-2] * v[-1]
            op.fan_in = q[-1]
            op.act_inputs = op.inputs[:3]
        else:
            # baddbmm(input, a, b): the product operands are the last two, and a's last dimension is reduced
            a = (op.in_shapes[-2] if len(op.in_shapes) >= 3 else []) if base == "baddbmm" else \
                (op.in_shapes[0] if op.in_shapes else [])
            k = a[-1] if a else 0
            op.fan_in = k
            op.macs = out_numel * k
            op.act_inputs = op.inputs[-2:] if base == "baddbmm" else op.inputs[:2]
    elif op.kind == OpKind.EMBEDDING:
        op.fan_in = 1
        op.macs = 0  # a table look-up, no multiply-accumulate
    elif op.kind == OpKind.NORM:
        for a in _flat_nodes(node.args)[1:3]:
            if a.op == "get_attr" and str(a.target) in params:
                op.params += params[str(a.target)].numel()


def _conv_attrs(node: torch.fx.Node, transposed: bool = False) -> dict:
    args = list(node.args)
    if node.op == "call_module":
        return {}
    names = ["stride", "padding", "dilation"]
    if transposed:  # conv_transpose(x, w, b, stride, padding, output_padding, groups, dilation)
        names = ["stride", "padding", "output_padding", "groups", "dilation"] if _base_name(node) in \
            {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"} else \
            ["stride", "padding", "dilation", "transposed", "output_padding"]  # convolution(..., transposed, ...)
    out = {}
    for i, k in enumerate(names, start=3):
        if len(args) > i and isinstance(args[i], (list, tuple, int, str)):
            out[k] = list(args[i]) if isinstance(args[i], (list, tuple)) else args[i]
    out.pop("groups", None)  # the IR's own field
    return out
