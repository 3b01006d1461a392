"""Graph passes on the captured GraphModule that run before the IR is built.

``linear_from_matmul`` rewrites a linear layer spelled as ``addmm(b, x, wᵀ)``, ``mm(x, wᵀ)`` (what a decomposed
export, ``ExportedProgram.run_decompositions()`` or the edge dialect, makes of ``nn.Linear``) or ``x @ wᵀ`` back
into ``linear(x, w, b)``, the one form the IR, the quantizers, the integer-bias grid and the export know; and
``x @ W`` or ``addmm(b, x, W)`` with W stored (in, out) likewise, storing W transposed, so that a weight's axis 0
is its output channel everywhere.

``einsum_as_products`` spells a two-operand einsum that is one (batched) matrix product as ``matmul``, so that
it is a layer like any other product (a linear one when an operand is a parameter).

``functional_inplace`` turns in-place ops (``out += identity``, ``relu_``) into their out-of-place forms where
nothing else reads the tensor they would overwrite. The quantizers the compiler inserts later return fresh
tensors that autograd forbids writing to in place, and a graph of pure functions is one the IR can describe.

``explicit_attention`` spells ``scaled_dot_product_attention`` (no mask, no dropout) as the two products it
computes, ``softmax((q·scale) @ kᵀ) @ v``: each product then reads quantized operands, the softmax output
among them, which is what an integer attention and TensorRT's explicit quantization need (the fused op's ONNX
decomposition hid its operands behind a scale Mul and left the softmax in float).

``fold_batchnorm`` folds an inference-mode BatchNorm into the convolution (or linear layer) before it, so the
weights that get quantized are the weights a deployed integer kernel multiplies with: quantizing unfolded
weights and folding afterwards changes every quantized value.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

_BN_TARGETS = {"batch_norm", "_native_batch_norm_legit_no_training"}


def packet(node: torch.fx.Node) -> str:
    """The op's name without overload (``aten.conv2d.default`` -> ``conv2d``; ``operator.add`` -> ``add``)."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    if t is operator.add or t is operator.iadd:
        return "add"
    return getattr(t, "__name__", str(t))


def _get_attr(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    return None


def _set_param(gm: torch.fx.GraphModule, fqn: str, value: torch.Tensor) -> None:
    mod_path, _, leaf = fqn.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    if hasattr(mod, leaf) and leaf in mod._parameters:
        del mod._parameters[leaf]
    elif hasattr(mod, leaf):
        delattr(mod, leaf)
    mod.register_parameter(leaf, torch.nn.Parameter(value.detach().clone()))


def _store_like(gm: torch.fx.GraphModule, fqn: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """Store ``value`` at ``fqn`` as what ``like`` was there: a parameter (same requires_grad) or a buffer (a fixed
    projection held in a buffer is a weight to the IR as much as a parameter is)."""
    if isinstance(like, torch.nn.Parameter):
        _set_param(gm, fqn, value)
        gm.get_parameter(fqn).requires_grad_(like.requires_grad)
        return
    mod_path, _, leaf = fqn.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    persistent = leaf not in getattr(mod, "_non_persistent_buffers_set", set())
    mod._buffers.pop(leaf, None)
    mod.register_buffer(leaf, value.detach().clone(), persistent=persistent)


_TRANSPOSES = {"t", "permute", "transpose", "numpy_T"}


def _transposed_param(gm: torch.fx.GraphModule, node) -> torch.fx.Node | None:
    """The get_attr node of a 2-D parameter that ``node`` transposes (t, permute [1, 0], transpose 0/1), or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or packet(node) not in _TRANSPOSES:
        return None
    src = node.args[0] if node.args else None
    w = _get_attr(gm, src)
    if w is None or w.dim() != 2:
        return None
    rest = list(node.args[1:])
    if packet(node) == "permute" and [d % 2 for d in (rest[0] if rest else [])] != [1, 0]:
        return None
    if packet(node) == "transpose" and sorted(d % 2 for d in rest) != [0, 1]:
        return None
    return src


# the attributes mpqc adds to a captured GraphModule's root (quantizers, splices, the export's bias quantizers)
RESERVED_NAMES = ("wq", "aq", "rq", "bq", "sbn", "noise", "renorm", "tail_bq")


def free_reserved_names(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Rename the model's own root attributes that clash with :data:`RESERVED_NAMES` (a ``self.wq`` projection)
    to ``<name>_`` (or the first free ``<name>_<k>``), in the graph's targets and module paths too; returns
    {old: new}. Adding the quantizers stopped with "attribute 'wq' already exists" otherwise."""
    renamed: dict[str, str] = {}
    for name in RESERVED_NAMES:
        if not hasattr(gm, name) or name in type(gm).__dict__:
            continue
        new, k = f"{name}_", 1
        while hasattr(gm, new):
            k += 1
            new = f"{name}_{k}"
        obj = getattr(gm, name)
        if name in gm._modules:
            gm._modules[new] = gm._modules.pop(name)
        elif name in gm._parameters:
            gm._parameters[new] = gm._parameters.pop(name)
        elif name in gm._buffers:
            gm._buffers[new] = gm._buffers.pop(name)
        else:
            delattr(gm, name)
            setattr(gm, new, obj)
        renamed[name] = new

    def moved(path: str) -> str:
        head, dot, rest = path.partition(".")
        return renamed[head] + dot + rest if head in renamed else path

    if not renamed:
        return renamed
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module") and isinstance(n.target, str):
            n.target = moved(n.target)
        stack = n.meta.get("nn_module_stack")
        if stack:
            n.meta["nn_module_stack"] = {k_: (moved(v[0]), v[1]) if isinstance(v, tuple) and isinstance(v[0], str)
                                         else v for k_, v in stack.items()}
    gm.recompile()
    return renamed


def _only_read_as(gm: torch.fx.GraphModule, fqn: str, reads) -> bool:
    """Whether every node that reads parameter ``fqn`` is one that ``reads(user, get_attr_node)`` accepts: a weight
    stored transposed for those readers must not change what any other reader computes with (its layout)."""
    attrs = [a for a in gm.graph.nodes if a.op == "get_attr" and str(a.target) == fqn]
    return bool(attrs) and all(reads(u, a) for a in attrs for u in a.users)


_NOOP_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
                 torch.nn.FeatureAlphaDropout, torch.nn.Identity)


def drop_eval_noops(gm: torch.fx.GraphModule) -> int:
    """Remove what an inference graph does not compute: dropout (modules, or functions called with training off),
    nn.Identity, torchvision's stochastic depth with training off; returns the count. torch.export leaves none of
    them; under torch.fx they stood between a layer and its residual add, which then got no quantizers (every
    post-norm block failed TensorRT's residual-add rule)."""
    done = 0
    for n in list(gm.graph.nodes):
        if not n.args or not isinstance(n.args[0], torch.fx.Node):
            continue
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            noop = isinstance(m, _NOOP_MODULES) and not m.training and len(n.args) == 1 and not n.kwargs
        elif n.op == "call_function" and packet(n) in ("dropout", "alpha_dropout", "feature_alpha_dropout",
                                                          "dropout1d", "dropout2d", "dropout3d"):
            noop = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True) is False
        elif n.op == "call_function" and packet(n) == "stochastic_depth":
            noop = n.kwargs.get("training", n.args[3] if len(n.args) > 3 else True) is False
        else:
            noop = False
        if noop:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _tied(gm: torch.fx.GraphModule) -> set[str]:
    """Names of parameters reachable under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


def _einsum_operands(node: torch.fx.Node) -> tuple[str, list] | None:
    """(equation without spaces, operand nodes) of a call to einsum, else None."""
    if node.op != "call_function" or packet(node) != "einsum" or not node.args or not isinstance(node.args[0], str):
        return None
    rest = node.args[1:]
    ops = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return node.args[0].replace(" ", ""), ops


def _product_form(eq: str) -> tuple[bool, bool] | None:
    """How a two-operand einsum is one (batched) matrix product: ``(swap, transpose_b)`` for ``a @ b`` with
    (a, b) the operands in order (``swap``: the second operand is the left factor, ``"bnd,hn->bhd"`` is
    ``W @ x``) and b held (..., k, n) or, with ``transpose_b``, (..., n, k); None when it is not (several
    contracted indices, a permuted output, repeated or summed-out indices, batch dimensions that do not
    broadcast from the right)."""
    if eq.count("->") != 1:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    parts = [p.replace("...", "@") for p in parts]  # the broadcast dimensions as one index
    out = out.replace("...", "@")
    if "." in "".join(parts) + out or any(len(set(p)) != len(p) for p in (*parts, out)):
        return None
    for swap in (False, True):
        a, b = parts[::-1] if swap else parts
        if len(a) < 2 or len(b) < 2:
            continue
        a_batch, m, k = a[:-2], a[-2], a[-1]
        if k in out or k not in b[-2:] or m in b:
            continue
        n = b[-1] if b[-2] == k else b[-2]
        b_batch = b[:-2]
        batch = a_batch if len(a_batch) >= len(b_batch) else b_batch  # matmul broadcasts from the right
        if n in a or not batch.endswith(a_batch) or not batch.endswith(b_batch) or out != batch + m + n:
            continue
        return swap, b[-2:] == n + k
    return None


def einsum_as_products(gm: torch.fx.GraphModule) -> int:
    """A two-operand einsum that is one (batched) matrix product becomes ``matmul(a, b)`` (with ``b`` transposed
    when held (..., n, k)): ``"bsi,oi->bso"`` is a linear layer, ``"bhqd,bhkd->bhqk"`` an attention product;
    returns the count. Nodes carry ``meta['val']``.

    As einsums they were counted (MACs) but stayed float outside every cost and budget; as products they are
    layers the search prices and quantizes, and a parameter operand becomes a linear layer (linear_from_matmul).
    """
    done = 0
    for n in list(gm.graph.nodes):
        got = _einsum_operands(n)
        if got is None or len(got[1]) != 2 or not all(isinstance(o, torch.fx.Node) for o in got[1]):
            continue
        form = _product_form(got[0])
        vals = [o.meta.get("val") for o in got[1]]
        if form is None or not all(isinstance(v, torch.Tensor) for v in vals):
            continue
        swap, transpose_b = form
        (a, b), vals = (got[1][::-1], vals[::-1]) if swap else (got[1], vals)
        with gm.graph.inserting_before(n):
            if transpose_b:
                bt = gm.graph.call_function(torch.ops.aten.transpose.int, (b, -2, -1))
                bt.meta = {"val": vals[1].transpose(-2, -1)}
                b = bt
            mm = gm.graph.call_function(torch.ops.aten.matmul.default, (a, b))
        mm.meta = {k_: v_ for k_, v_ in n.meta.items() if k_ in ("nn_module_stack", "stack_trace", "val")}
        n.replace_all_uses_with(mm)
        name = n.name
        gm.graph.erase_node(n)
        mm._rename(name)  # the layer keeps the name the einsum gave it (plans and reports name it so)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _absorb_bias(gm: torch.fx.GraphModule, lin: torch.fx.Node) -> None:
    """``linear(x, W) + b`` -> ``linear(x, W, b)`` for a 1-D parameter b of W's output size that nothing else
    needs the bias-free product for: the bias then sits on the integer accumulator grid like any layer's."""
    if len(lin.users) != 1:
        return
    (add,) = lin.users
    if add.op != "call_function" or packet(add) != "add" or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return
    b_node = add.args[1] if add.args[0] is lin else add.args[0]
    b, w = _get_attr(gm, b_node), _get_attr(gm, lin.args[1])
    if not isinstance(b, torch.nn.Parameter) or b.dim() != 1 or w is None or b.shape[0] != w.shape[0] \
            or not isinstance(add.meta.get("val"), torch.Tensor) or add.meta["val"].shape != lin.meta["val"].shape:
        return
    if b_node.op == "get_attr":  # torch.fx records the bias's get_attr where `+ self.b` reads it: after the product
        lin.prepend(b_node)
    lin.args = (lin.args[0], lin.args[1], b_node)
    lin.meta = dict(add.meta)
    add.replace_all_uses_with(lin)
    gm.graph.erase_node(add)


def _read_back_transposed(gm: torch.fx.GraphModule, fqn: str, d0: int, d1: int, keep=frozenset()) -> None:
    """After parameter ``fqn`` was stored with dimensions ``d0`` and ``d1`` swapped, make every reader of it other
    than the nodes in ``keep`` read ``transpose(W', d0, d1)``, the values it read before."""
    for a in [a for a in gm.graph.nodes if a.op == "get_attr" and str(a.target) == fqn]:
        stored = _get_attr(gm, a)
        if isinstance(a.meta.get("val"), torch.Tensor):
            a.meta["val"] = stored.detach().to("meta")
        for user in [u for u in a.users if u not in keep]:
            # one transpose per reader: each reading layer gets its own weight quantizer spliced in before it
            with gm.graph.inserting_after(a):
                back = gm.graph.call_function(torch.ops.aten.transpose.int, (a, d0, d1))
            back.meta = {"val": stored.detach().transpose(d0, d1).to("meta")}
            user.replace_input_with(a, back)


_CONV_TRANSPOSE = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


def transposed_conv_groups(node: torch.fx.Node) -> int | None:
    """The groups of a transposed convolution node (conv_transpose{1,2,3}d, or convolution with transposed=True),
    or None for any other node."""
    if node.op != "call_function":
        return None
    p = packet(node)
    if p in _CONV_TRANSPOSE:
        g = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    elif p in ("convolution", "_convolution") and len(node.args) > 8 and node.args[6]:
        g = node.args[8]
    else:
        return None
    return g if isinstance(g, int) else None


def output_channels_first(gm: torch.fx.GraphModule) -> int:
    """Store the weight of every ungrouped transposed convolution (C_in, C_out, k...) as (C_out, C_in, k...), read
    through ``transpose(0, 1)``; returns the count. Nodes carry ``meta['val']``.

    Axis 0 is then its output channel, as for every other weight: one scale and width per output channel (the
    export's per-axis DequantizeLinear along axis 1 of the ONNX ConvTranspose weight, where TensorRT and
    XNNPACK expect it). A grouped one (C_in, C_out/groups, k...) has no axis of whole output channels and stays
    float, as do tied weights and weights something else reads too.
    """
    tied, done = _tied(gm), set()
    for n in gm.graph.nodes:
        if transposed_conv_groups(n) != 1 or len(n.args) < 2:
            continue
        w_node = n.args[1]
        w = _get_attr(gm, w_node)
        fqn = str(w_node.target) if isinstance(w_node, torch.fx.Node) else ""
        if not isinstance(w, torch.nn.Parameter) or w.dim() < 3 or not w.is_floating_point() or fqn in tied \
                or fqn in done or not _only_read_as(gm, fqn, lambda u, a: transposed_conv_groups(u) == 1 and
                                                   len(u.args) > 1 and u.args[1] is a and a not in u.args[2:]):
            continue
        _store_like(gm, fqn, w.detach().transpose(0, 1).contiguous(), w)
        _read_back_transposed(gm, fqn, 0, 1)
        done.add(fqn)
    if done:
        gm.graph.lint()
        gm.recompile()
    return len(done)


# ops that make a weighted layer of a parameter they read (directly or through views): a second layout of that
# parameter would be read along the wrong axis there
_LAYER_OPS = {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "conv1d", "conv2d", "conv3d", "convolution",
              "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "embedding", "einsum",
              "t", "transpose", "permute", "view", "reshape", "expand", "unsqueeze", "_unsafe_view"}


def _right_operand(user: torch.fx.Node, w: torch.fx.Node) -> bool:
    """``user`` is ``x @ w`` (matmul or mm, w the right operand only), or no layer reads w there (a sum, a norm)."""
    if user.op == "call_function" and packet(user) in ("matmul", "mm") and len(user.args) == 2 \
            and user.args[1] is w and user.args[0] is not w and not user.kwargs:
        return True
    if user.op == "call_function" and packet(user) == "addmm" and len(user.args) == 3 and user.args[2] is w \
            and w not in user.args[:2]:
        return True  # addmm(b, x, W): GPT-2's Conv1D
    return user.op not in ("call_function", "call_method") or packet(user) not in _LAYER_OPS


def linear_from_matmul(gm: torch.fx.GraphModule) -> int:
    """``x @ Wᵀ`` / ``mm(x, Wᵀ)`` / ``addmm(b, x, Wᵀ)`` -> ``linear(x, W[, b])`` (addmm's beta and alpha at 1), and
    ``x @ W`` (or GPT-2's ``addmm(b, x, W)``) with a 2-D parameter W stored (in, out) -> ``linear(x, W')`` where
    W' = Wᵀ is stored (out, in) under W's name; a bias added right after a product joins it. Returns the count;
    the transposes left unused go. Nodes carry ``meta['val']``.

    Every weight stage takes axis 0 as the output channel (per-channel scales and bit-widths, channel
    sensitivities, the export's per-axis scales); an (in, out) weight would get one scale per *input* row, which
    no integer kernel can apply after its dot products. Other readers of a flipped W read ``W'ᵀ``, so the
    function is unchanged; the quantized model's state dict holds W'. Tied parameters, and a W that something other
    than such products also reads (a linear layer's weight reused as ``h @ W``), are left as they are.
    """
    tied, flipped, made = _tied(gm), set(), set()
    done = 0
    for n in list(gm.graph.nodes):
        bias = None
        if n.op == "call_function" and packet(n) == "addmm" and len(n.args) == 3 \
                and all(n.kwargs.get(k, 1) == 1 for k in ("beta", "alpha")):
            bias, x, w = n.args  # addmm(b, x, Wᵀ) (a decomposed nn.Linear), or addmm(b, x, W) with W stored (in, out)
            b = _get_attr(gm, bias)
            if b is None or b.dim() != 1:
                continue
        elif n.op != "call_function" or packet(n) not in ("matmul", "mm") or len(n.args) != 2 or n.kwargs:
            continue
        else:
            x, w = n.args
        xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(xv, torch.Tensor) or xv.dim() < 1 or _get_attr(gm, x) is not None:
            continue
        weight = _transposed_param(gm, w)
        if weight is not None and bias is not None and _get_attr(gm, bias).shape[0] != _get_attr(gm, weight).shape[0]:
            continue
        if weight is None:
            p = _get_attr(gm, w)
            fqn = str(w.target) if isinstance(w, torch.fx.Node) else ""
            if not isinstance(p, torch.Tensor) or p.dim() != 2 or not p.is_floating_point() or fqn in tied \
                    or not _only_read_as(gm, fqn, _right_operand) \
                    or (bias is not None and _get_attr(gm, bias).shape[0] != p.shape[1]):
                continue  # (a W a linear layer also reads, or an addmm bias of another size: left as it is)
            if fqn not in flipped:
                _store_like(gm, fqn, p.detach().t().contiguous(), p)
                flipped.add(fqn)
            weight = w
        with gm.graph.inserting_before(n):
            lin = gm.graph.call_function(torch.ops.aten.linear.default,
                                         (x, weight) if bias is None else (x, weight, bias))
        lin.meta = dict(n.meta)
        made.add(lin)
        n.replace_all_uses_with(lin)
        gm.graph.erase_node(n)
        if bias is None:
            _absorb_bias(gm, lin)
        done += 1
    for fqn in flipped:
        _read_back_transposed(gm, fqn, 0, 1, keep=made)
    if done:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return done


_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def _functional_form(n: torch.fx.Node):
    """The out-of-place target of an in-place op that writes only its first argument, or None."""
    t = n.target
    if n.op == "call_function" and t in _INPLACE_OPERATORS:
        return _INPLACE_OPERATORS[t]
    if n.op == "call_method" and isinstance(t, str) and t.endswith("_") and not t.startswith("_"):
        return t[:-1] if hasattr(torch.Tensor, t[:-1]) else None
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    args = t._schema.arguments
    writes = [a.alias_info is not None and a.alias_info.is_write for a in args]
    if not writes or not writes[0] or any(writes[1:]):
        return None
    name = t._overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet_ = getattr(torch.ops.aten, name[:-1], None)
    out = getattr(packet_, t._overloadname, None) if packet_ is not None else None
    return out if out is not None and len(out._schema.arguments) == len(args) else None


# what may return a view of its input where the schema does not say (torch.fx traces Python calls, not aten ops)
_VIEWS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "t", "expand",
          "expand_as", "narrow", "squeeze", "unsqueeze", "select", "split", "chunk", "unbind", "movedim", "swapaxes",
          "getitem", "__getitem__", "contiguous", "detach", "as_strided", "diagonal", "unfold", "real", "imag"}


def _may_alias_another(gm: torch.fx.GraphModule, node) -> bool:
    """Whether writing into ``node`` could change another tensor: a graph input, a parameter or buffer, or what
    may be a view of another tensor (an aten op whose schema returns an alias; under torch.fx a slice, a reshape
    or a module such as nn.Identity that hands its input back)."""
    if not isinstance(node, torch.fx.Node) or node.op in ("placeholder", "get_attr"):
        return True
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        return any(r.alias_info is not None for r in t._schema.returns)
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(t)), (torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten))
    return (t if isinstance(t, str) else getattr(t, "__name__", "")) in _VIEWS


def functional_inplace(gm: torch.fx.GraphModule) -> int:
    """Rewrite in-place ops whose overwritten tensor nothing reads afterwards into their out-of-place forms;
    returns the count. Writes into graph inputs, parameters, buffers and views are left as they are."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = 0
    for n in gm.graph.nodes:
        target = _functional_form(n)
        if target is None or not n.args:
            continue
        dest = n.args[0]
        if _may_alias_another(gm, dest) or any(order[u] > order[n] for u in dest.users if u is not n):
            continue
        n.target = target  # same node, same name: layer2.0.relu/relu__5 stays the tensor's name in plans
        done += 1
    if done:
        gm.recompile()
    return done


def fold_batchnorm(gm: torch.fx.GraphModule) -> int:
    """Fold every inference BatchNorm whose only input is a conv/linear (or an ungrouped transposed conv, its weight
    stored output-channel first) used nowhere else; returns the count.

    w' = w·γ/√(σ²+ε) per output channel, b' = (b − μ)·γ/√(σ²+ε) + β.
    """
    folded = 0
    for bn in list(gm.graph.nodes):
        if bn.op == "call_function" and packet(bn) in _BN_TARGETS:
            args = list(bn.args)
            if packet(bn) == "batch_norm" and (len(args) < 6 or args[5] is not False):
                continue  # training-mode BN: statistics come from the batch, nothing to fold
            conv = args[0]
            if not isinstance(conv, torch.fx.Node) or conv.op != "call_function" or len(conv.users) != 1:
                continue
            t_groups = transposed_conv_groups(conv)
            if t_groups is None and (packet(conv) not in {"conv1d", "conv2d", "conv3d", "convolution", "linear"} or (
                    packet(conv) == "convolution" and len(conv.args) > 6 and conv.args[6])):
                continue  # (a transposed convolution whose groups are not a plain int stays unfolded)
            w_node = conv.args[1]
            if t_groups is not None:  # foldable once output_channels_first stored its weight output-channel first
                if t_groups != 1 or not isinstance(w_node, torch.fx.Node) or packet(w_node) != "transpose" \
                        or _get_attr(gm, w_node.args[0]) is None:
                    continue
                w_node = w_node.args[0]
            if packet(bn) != "batch_norm" and not all(u.op == "call_function" and u.target is operator.getitem
                                                       and u.args[1] == 0 for u in bn.users):
                continue  # something reads the saved statistics too
            gamma, beta, mean, var = (_get_attr(gm, a) for a in args[1:5])
            eps = args[7] if packet(bn) == "batch_norm" else args[6]
            w = _get_attr(gm, w_node)
            if w is None or mean is None or var is None:
                continue
            if not _only_read_as(gm, str(w_node.target), lambda u, a, c=conv: u is c or (
                    len(u.users) == 1 and next(iter(u.users)) is c and packet(u) == "transpose")):
                continue  # a weight another layer also computes with (a conv applied twice) keeps its values
            b_node = conv.args[2] if len(conv.args) > 2 else None
            b = _get_attr(gm, b_node) if b_node is not None else None
            with torch.no_grad():
                inv = torch.rsqrt(var.float() + eps)
                g = gamma.float() * inv if gamma is not None else inv
                w_new = w.float() * g.reshape(-1, *([1] * (w.dim() - 1)))
                b0 = b.float() if b is not None else torch.zeros_like(mean, dtype=torch.float32)
                b_new = (b0 - mean.float()) * g + (beta.float() if beta is not None else 0.0)
            w_fqn = str(w_node.target)
            _set_param(gm, w_fqn, w_new.to(w.dtype))
            b_fqn = w_fqn.rsplit(".", 1)[0] + ".bias" if "." in w_fqn else w_fqn + "_bias"
            _set_param(gm, b_fqn, b_new.to(w.dtype))
            with gm.graph.inserting_before(conv):
                new_b = gm.graph.get_attr(b_fqn)
            cargs = list(conv.args)
            if len(cargs) > 2:
                cargs[2] = new_b
            else:
                cargs.append(new_b)
            conv.args = tuple(cargs)
            if packet(bn) == "batch_norm":
                if "val" in bn.meta:
                    conv.meta["val"] = bn.meta["val"]
                bn.replace_all_uses_with(conv)
            else:  # the decomposed op returns (out, mean, rstd): its users read the output as getitem(bn, 0)
                for user in list(bn.users):
                    if "val" in user.meta:
                        conv.meta["val"] = user.meta["val"]
                    user.replace_all_uses_with(conv)
                    gm.graph.erase_node(user)
            gm.graph.erase_node(bn)
            folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        _drop_unused_attrs(gm)
    return folded


def _drop_unused_attrs(gm: torch.fx.GraphModule) -> None:
    """Remove BN parameters and buffers no node reads any more, so they do not count as model weights."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            mod_path, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(mod_path) if mod_path else gm
            mod._parameters.pop(leaf, None)
            mod._buffers.pop(leaf, None)


def explicit_attention(gm: torch.fx.GraphModule) -> int:
    """``scaled_dot_product_attention(q, k, v)`` -> ``softmax((q * scale) @ k.transpose(-2, -1), -1) @ v`` where it
    has no mask, no dropout, no causal flag and no grouped heads; returns the count. Nodes carry ``meta['val']``."""
    done = 0
    names = ("q", "k", "v", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or packet(n) != "scaled_dot_product_attention":
            continue
        a = dict(zip(names, n.args))
        a.update(n.kwargs)
        q, k, v = a["q"], a["k"], a["v"]
        if a.get("attn_mask") is not None or a.get("dropout_p", 0.0) or a.get("is_causal", False) \
                or a.get("enable_gqa", False) or not all(isinstance(t, torch.fx.Node) and
                                                         isinstance(t.meta.get("val"), torch.Tensor)
                                                         for t in (q, k, v)):
            continue
        qv, kv, vv = q.meta["val"], k.meta["val"], v.meta["val"]
        scale = a.get("scale") or 1.0 / math.sqrt(qv.shape[-1])
        with gm.graph.inserting_before(n):
            qs = gm.graph.call_function(operator.mul, (q, float(scale)))
            kt = gm.graph.call_function(torch.transpose, (k, -2, -1))
            scores = gm.graph.call_function(torch.matmul, (qs, kt))
            attn = gm.graph.call_function(torch.softmax, (scores, -1))
            out = gm.graph.call_function(torch.matmul, (attn, v))
        vals = {qs: qv * float(scale), kt: kv.transpose(-2, -1)}
        vals[scores] = torch.matmul(vals[qs], vals[kt])
        vals[attn] = torch.softmax(vals[scores], -1)
        vals[out] = torch.matmul(vals[attn], vv)
        for node, val in vals.items():
            node.meta = {k_: v_ for k_, v_ in n.meta.items() if k_ in ("nn_module_stack", "stack_trace")}
            node.meta["val"] = val
        n.replace_all_uses_with(out)
        gm.graph.erase_node(n)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
