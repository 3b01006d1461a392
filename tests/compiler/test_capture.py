"""Capture + IR: MACs per layer equal hand counts taken from module hooks, on the model zoo and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from mpqc.compiler.capture import capture
from mpqc.compiler.ir import OpKind
from tests.models import TinyBert, TinyDLRM

ZOO = {
    "resnet18": 64, "resnet50": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64, "shufflenet_v2_x1_0": 64,
    "googlenet": 64, "inception_v3": 96, "efficientnet_b0": 64, "regnet_y_400mf": 64,
}


def hook_macs(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """MACs of every Conv/Linear from its module and the output shape a forward hook sees (independent of mpqc)."""
    macs: dict[str, int] = {}

    def make(name, mod):
        def hook(_m, inp, out):
            if isinstance(mod, nn.modules.conv._ConvNd):
                c_out, h_w = out.shape[1], math.prod(out.shape[2:])
                macs[name] = out.shape[0] * c_out * h_w * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
            else:
                macs[name] = out.numel() * mod.in_features
        return hook

    handles = [m.register_forward_hook(make(n, m)) for n, m in model.named_modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return macs


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_layer_macs_equal_hook_counts(name):
    kw = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(name, **kw).eval()
    x = (torch.randn(1, 3, ZOO[name], ZOO[name]),)
    expected = hook_macs(model, x)
    graph = capture(model, x).graph
    got = {op.name: op.macs for op in graph.layers() if op.kind in (OpKind.CONV, OpKind.LINEAR)}
    assert got == expected
    assert graph.total_params() == sum(p.numel() for p in model.parameters())


def test_vit_linear_and_attention_macs():
    model = torchvision.models.vit_b_16(image_size=64).eval()
    x = (torch.randn(1, 3, 64, 64),)
    graph = capture(model, x).graph
    expected = hook_macs(model, x)
    # nn.MultiheadAttention's in-projection is a bare parameter (F.linear), not a Linear module
    for name, macs in expected.items():
        assert graph.ops[name].macs == macs
    tokens, heads, dh = 17, 12, 64  # 4x4 patches + class token
    attn = [op for op in graph.layers() if op.kind == OpKind.MATMUL]
    assert len(attn) == 24  # the fused attention of each layer spelled as its two products (passes.py)
    assert all(op.macs == heads * tokens * tokens * dh for op in attn)
    in_proj = graph.ops["encoder.layers.encoder_layer_0.self_attention"]
    assert in_proj.kind == OpKind.LINEAR and in_proj.macs == tokens * 3 * 768 * 768


def test_bert_style_encoder_counts_attention_as_activation_products():
    model = TinyBert().eval()
    graph = capture(model, model.example_inputs()).graph
    b, t, d, h = 2, 12, 32, 4
    mm = [op for op in graph.layers() if op.kind == OpKind.MATMUL]
    assert len(mm) == 4  # scores and context, two layers
    for op in mm:
        assert op.weight_fqn is None and len(op.act_inputs) == 2  # both operands are activations
        assert op.macs == b * h * t * t * (d // h)
    emb = [op for op in graph.layers() if op.kind == OpKind.EMBEDDING]
    assert {op.name for op in emb} == {"tok", "pos"} and all(op.macs == 0 for op in emb)
    assert graph.ops["layers.0.ff1"].macs == b * t * d * 64
    assert graph.ops["cls"].macs == b * d * 3


def test_dlrm_like_embeddings_mlp_and_interaction():
    model = TinyDLRM().eval()
    graph = capture(model, model.example_inputs()).graph
    kinds = [op.kind for op in graph.layers()]
    assert kinds.count(OpKind.EMBEDDING) == 3 and kinds.count(OpKind.LINEAR) == 4
    (bmm,) = [op for op in graph.layers() if op.kind == OpKind.MATMUL]
    assert bmm.macs == 4 * 4 * 4 * 16  # batch x f x f x dim
    assert graph.ops["emb.0"].params == 50 * 16


@pytest.mark.parametrize("cfg", [
    dict(cin=3, cout=8, k=3, stride=1, padding=0, dilation=1, groups=1, hw=(11, 9)),
    dict(cin=4, cout=6, k=3, stride=2, padding=1, dilation=1, groups=2, hw=(13, 13)),
    dict(cin=5, cout=7, k=(3, 5), stride=(2, 1), padding=(2, 0), dilation=(1, 2), groups=1, hw=(10, 17)),
    dict(cin=8, cout=8, k=3, stride=1, padding=2, dilation=2, groups=8, hw=(9, 9)),  # depthwise
])
def test_conv_macs_hand_checked(cfg):
    conv = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
                     dilation=cfg["dilation"], groups=cfg["groups"])
    k = conv.kernel_size
    hw_out = [
        (cfg["hw"][i] + 2 * conv.padding[i] - conv.dilation[i] * (k[i] - 1) - 1) // conv.stride[i] + 1
        for i in range(2)
    ]
    graph = capture(nn.Sequential(conv), (torch.randn(1, cfg["cin"], *cfg["hw"]),)).graph
    (op,) = graph.layers()
    assert op.out_shape == [1, cfg["cout"], *hw_out]
    assert op.groups == cfg["groups"]
    assert op.fan_in == cfg["cin"] // cfg["groups"] * k[0] * k[1]
    assert op.macs == cfg["cout"] * hw_out[0] * hw_out[1] * (cfg["cin"] // cfg["groups"]) * k[0] * k[1]


def test_linear_and_batched_matmul_macs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(7, 5)

        def forward(self, a, b):
            return self.fc(torch.bmm(a, b))

    graph = capture(M(), (torch.randn(3, 4, 6), torch.randn(3, 6, 7))).graph
    mm = next(op for op in graph.layers() if op.kind == OpKind.MATMUL)
    assert mm.macs == 3 * 4 * 7 * 6
    assert graph.ops["fc"].macs == 3 * 4 * 5 * 7


def test_resnet18_residual_inputs_form_one_activation_group():
    graph = capture(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),)).graph
    groups = {g.consumers: g for g in graph.act_groups()}
    for stage in ("layer2", "layer3", "layer4"):
        g = groups[(f"{stage}.0.conv1", f"{stage}.0.downsample.0")]
        assert not g.signed  # read after a ReLU: unsigned
    first = next(g for g in graph.act_groups() if "conv1" in g.consumers)
    assert first.signed  # the image input can be negative


def test_fx_fallback_matches_export():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x = (torch.randn(1, 3, 8, 8),)
    a, b = capture(model, x, method="export"), capture(model, x, method="fx")
    assert b.method == "fx"
    assert [(o.name, o.macs) for o in a.graph.layers()] == [(o.name, o.macs) for o in b.graph.layers()]
    assert torch.allclose(a.gm(*x), b.gm(*x))


def test_torchscript_capture_names_layers_by_weight():
    model = torchvision.models.resnet18().eval()
    x = (torch.randn(1, 3, 64, 64),)
    ts = torch.jit.trace(model, x)
    cap = capture(ts, x)
    assert cap.method == "torchscript"
    assert {op.name for op in cap.graph.layers()} == {op.name for op in capture(model, x).graph.layers()}


def test_fold_batchnorm_keeps_outputs():
    model = torchvision.models.resnet18().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(2, 3, 64, 64),)
    cap = capture(model, x, fold_bn=True)
    assert not any(op.kind == OpKind.NORM for op in cap.graph)
    assert all(op.bias_fqn for op in cap.graph.layers())
    torch.testing.assert_close(cap.gm(*x), model(*x), rtol=1e-4, atol=1e-4)


class _MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32, bias=bias), nn.Linear(32, 10, bias=bias)
        self.mix = nn.Parameter(torch.randn(10, 10))

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x.flatten(1))))
        return torch.addmm(h, h, self.mix.tanh().t(), alpha=0.5)  # no parameter is transposed here: stays addmm


@pytest.mark.parametrize("bias", [True, False])
def test_a_decomposed_export_captures_its_linears_as_linear(bias):
    """ExportedProgram.run_decompositions() spells nn.Linear as addmm(b, x, permute(w)) (mm without a bias); the
    compiler once crashed on such a .pt2. Capture turns them back into linear layers with their weights and biases,
    and leaves a genuine addmm alone."""
    torch.manual_seed(0)
    m = _MLP(bias).eval()
    x = torch.randn(4, 1, 8, 8)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).run_decompositions()
    spelled = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any(("addmm" if bias else "aten.mm") in t for t in spelled)  # the form the pass is for
    cap = capture(ep.module(), (x,))
    ops = cap.graph.layers()
    assert [op.kind for op in ops] == [OpKind.LINEAR, OpKind.LINEAR, OpKind.MATMUL]
    layers = {op.name: op for op in ops if op.kind == OpKind.LINEAR}
    for op in layers.values():
        assert op.weight_fqn and op.weight_fqn.endswith("weight")
        assert (op.bias_fqn is not None) == bias
    assert layers[next(iter(layers))].macs == 4 * 64 * 32
    targets = [str(n.target) for n in cap.gm.graph.nodes if n.op == "call_function"]
    assert targets.count("aten.linear.default") == 2 and sum("addmm" in t for t in targets) == 1
    transposed = [n.args[0] for n in cap.gm.graph.nodes if n.op == "call_function" and "permute" in str(n.target)]
    assert all(a.op != "get_attr" for a in transposed)  # the weights' transposes went with the addmm / mm
    torch.testing.assert_close(cap.gm(x), m(x))


def test_batchnorm_folds_in_a_decomposed_export_too():
    """Decomposed, BatchNorm is _native_batch_norm_legit_no_training, read through getitem(bn, 0): folding it must
    hand its users the conv's output itself (once it was indexed instead: out[0], the first image of the batch)."""
    from mpqc.compiler.zoo import DigitsCNN

    torch.manual_seed(0)
    m = DigitsCNN().eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    ep = torch.export.export(m, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    ep = ep.run_decompositions()
    assert any("_native_batch_norm_legit_no_training" in str(n.target) for n in ep.graph.nodes)
    cap = capture(ep.module(), (torch.randn(2, 1, 8, 8),), fold_bn=True)
    assert not any("batch_norm" in str(n.target) or "getitem" in str(n.target) for n in cap.gm.graph.nodes)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(cap.gm(x), m(x), atol=1e-5, rtol=1e-5)


class _Overwrites(nn.Module):
    """Three in-place ops: two that nothing reads past, and one whose overwritten tensor is read again."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.c(x)
        y += 1.0  # nothing reads y's old value: becomes add
        z = y.relu_()  # likewise: becomes relu
        t = self.c(x)
        u = t.mul_(2.0)  # t is read again below: must stay in place
        return z + u + t


@pytest.mark.parametrize("method", ["export", "fx"])
def test_in_place_ops_become_out_of_place_only_where_nothing_reads_what_they_overwrite(method):
    """torch.export points every later read of an overwritten tensor at the in-place op's result, so all three
    go; torch.fx keeps reading ``t`` itself after ``t.mul_``, so that one stays."""
    from mpqc.compiler.passes import packet

    model = _Overwrites().eval()
    x = torch.randn(2, 3, 6, 6)
    cap = capture(model, (x,), method=method)
    names = [packet(n) if n.op == "call_function" else str(n.target) for n in cap.gm.graph.nodes
             if n.op in ("call_function", "call_method")]
    assert "add_" not in names and "relu_" not in names and "relu" in names, names
    assert ("mul_" in names) == (method == "fx"), names
    torch.testing.assert_close(cap.gm(x), model(x))


class _WritesIntoViews(nn.Module):
    """In-place writes into a slice and into a flattened view: both change the tensor the model returns."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.c(x)
        y[:, :2].mul_(2.0)
        torch.flatten(y, 1).add_(1.0)
        return y * 1.0


@pytest.mark.parametrize("method", ["export", "fx"])
def test_writes_into_views_stay_in_place(method):
    """torch.fx records a slice or torch.flatten as a Python call whose result may be a view of its input;
    made out-of-place, those writes were lost (the fx graph differed from the model by 2.6)."""
    model = _WritesIntoViews().eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(capture(model, (x,), method=method).gm(x), model(x))


class _ShapedByBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 36, 10)
        self.fc2 = nn.Linear(4 * 36, 10)

    def forward(self, x):
        h = torch.relu(self.c(x))
        flat = h.view(h.size(0), -1)  # the batch comes in as a symbolic size under a dynamic export
        return self.fc(flat) + self.fc2(flat * -1.0)


def test_a_reshape_keeps_its_input_unsigned_and_a_negative_scale_does_not():
    cap = capture(_ShapedByBatch().eval(), (torch.randn(1, 3, 6, 6),))
    fc_in = cap.graph.tensors[cap.graph.layer("fc").act_inputs[0]]
    fc2_in = cap.graph.tensors[cap.graph.layer("fc2").act_inputs[0]]
    assert fc_in.nonnegative, fc_in.name
    assert not fc2_in.nonnegative, fc2_in.name


def test_a_batchnorm_left_unfolded_has_its_weights_hashed():
    """A BatchNorm on the input folds into nothing; its 0-d ``num_batches_tracked`` broke the weights hash."""
    from mpqc.compiler.quantize import QuantizedModel
    from mpqc.compiler.sensitivity._common import weights_hash

    def model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)).eval()

    x = torch.randn(1, 3, 6, 6)
    hashes = []
    for seed in (0, 0, 1):
        m = model(seed)
        m(x)
        hashes.append(weights_hash(QuantizedModel(capture(m, (x,), fold_bn=True))))
    assert hashes[0] == hashes[1] != hashes[2]


class _SignsOfDerivedTensors(nn.Module):
    """Each 1x1 conv reads one tensor derived from two ReLU outputs; the expected sign of each is in SIGNED."""

    SIGNED = {"c_diff": True, "c_shift": True, "c_pad_neg": True, "c_bicubic": True,
              "c_sum": False, "c_pad": False, "c_nearest": False, "c_bilinear": False, "c_up": False}

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        for name in self.SIGNED:
            setattr(self, name, nn.Conv2d(4, 2, 1))

    def forward(self, x):
        p, q = torch.relu(self.a(x)), torch.relu(self.b(x))
        f = nn.functional
        feeds = {"c_diff": p - q, "c_shift": p - 0.5, "c_pad_neg": f.pad(p, (1, 1, 1, 1), value=-1.0),
                 "c_bicubic": f.interpolate(p, scale_factor=2, mode="bicubic"), "c_sum": p + q,
                 "c_pad": f.pad(p, (1, 1, 1, 1)), "c_nearest": f.interpolate(p, scale_factor=2, mode="nearest"),
                 "c_bilinear": f.interpolate(p, scale_factor=2, mode="bilinear"), "c_up": self.up(q)}
        return sum(getattr(self, k)(v).mean((2, 3)) for k, v in feeds.items())


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_difference_of_non_negative_tensors_is_signed_and_resampling_keeps_unsigned(method):
    """``relu(a) - relu(b)`` was marked non-negative and quantized on an unsigned grid, clipping its negative
    half to 0 (a W8A8 compile fell from 77.7 to 18.4 %); nearest/bilinear resampling lost a known sign."""
    cap = capture(_SignsOfDerivedTensors().eval(), (torch.randn(1, 3, 6, 6),), method=method)
    signed = {k: not cap.graph.tensors[cap.graph.layer(k).act_inputs[0]].nonnegative
              for k in _SignsOfDerivedTensors.SIGNED}
    assert signed == _SignsOfDerivedTensors.SIGNED


class _ProductsWithParameters(nn.Module):
    """A parameter stored (in, out) and used as x @ W, and a baddbmm whose added input is a parameter."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(8, 32))  # (in, out)
        self.q, self.k = nn.Linear(32, 16), nn.Linear(32, 16)
        self.bias = nn.Parameter(torch.zeros(8, 8))

    def forward(self, x):
        h = x.flatten(1, 2) @ self.W  # [B, 8, 8] @ [8, 32]
        q, k = self.q(h), self.k(h)
        return torch.baddbmm(self.bias.expand(x.shape[0], 8, 8), q, k.transpose(1, 2))


def test_products_with_parameters_count_the_dimension_they_reduce():
    """x @ W with W stored (in, out) was counted with fan-in 32 (its output size: 4x the MACs), and baddbmm read
    the reduced size off its added input (half the MACs); following expand() must not turn that input into a
    weight."""
    cap = capture(_ProductsWithParameters().eval(), (torch.randn(1, 1, 8, 8),))
    ops = {op.name: op for op in cap.graph.layers()}
    assert ops["W"].kind.value == "linear" and ops["W"].macs == 8 * 32 * 8
    bad = next(op for op in ops.values() if op.kind.value == "matmul")
    assert bad.macs == 8 * 8 * 16 and bad.weight_fqn is None
    assert "bias" not in ops


def test_the_fx_fallback_captures_what_export_does_and_can_be_quantized():
    """torch.fx kept convolutions, linear layers and batch norms as leaf modules: their weights never appeared as
    get_attr nodes, so BN did not fold and building the quantized model failed ("does not read parameter"): any
    model that fell back from torch.export to torch.fx stopped there."""
    import torchvision

    from mpqc.compiler.quantize import QuantizedModel

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding them matters
            nn.init.uniform_(m.running_var, 0.5, 2.0)
            nn.init.normal_(m.running_mean, 0, 0.2)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    caps = {method: capture(model, (x[:1],), method=method, fold_bn=True) for method in ("export", "fx")}
    fx, ex = caps["fx"].graph, caps["export"].graph
    assert [(op.name, op.macs, op.weight_shape, op.bias_fqn is not None) for op in fx.layers()] == \
        [(op.name, op.macs, op.weight_shape, op.bias_fqn is not None) for op in ex.layers()]
    assert not any(op.kind.value == "norm" for op in fx.ops.values())  # every BN folded
    assert all(not op.target.startswith("<") for op in fx.ops.values())  # no memory addresses in names
    outs = {}
    for method, cap in caps.items():
        qm = QuantizedModel(cap)
        for op in cap.graph.layers():
            qm.set_precision(op.name, w_bits=4)
        outs[method] = qm(x)
    assert torch.allclose(outs["fx"], outs["export"], atol=1e-5)
    assert not torch.allclose(outs["fx"], model(x), atol=1e-3)  # 4-bit weights: the quantizers are in the graph


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_batch_norm_after_a_transposed_conv_folds_into_its_output_channels(method):
    """A decoder's ConvTranspose2d -> BatchNorm2d: the BN stayed a float op after the quantized layer, so the
    deployed integer kernel's weights were not the ones quantized. Stored output-channel first, the weight
    takes the BN's per-channel gain like any conv's."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    nn.init.uniform_(bn.running_var, 0.5, 2.0)
    nn.init.normal_(bn.running_mean, 0, 0.3)
    nn.init.normal_(bn.weight, 1, 0.3)
    for bias in (True, False):
        model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, bias=bias), bn,
                              nn.ReLU()).eval()
        x = torch.randn(2, 4, 5, 5)
        cap = capture(model, (x[:1],), method=method, fold_bn=True)
        assert not any(op.kind.value == "norm" for op in cap.graph.ops.values())
        (layer,) = cap.graph.layers()
        assert layer.attrs["transposed"] and layer.bias_fqn is not None
        torch.testing.assert_close(cap.gm(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_bias_added_after_x_at_w_joins_the_layer(method):
    """``x @ W + b``: the bias joins the linear layer (its integer grid); under torch.fx the bias's get_attr comes
    after the product, and the rewritten graph read it before it was defined (a RuntimeError in capture)."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.b = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32))

        def forward(self, x):
            return x @ self.W + self.b

    model, x = Dense().eval(), torch.randn(4, 16)
    cap = capture(model, (x[:1],), method=method)
    (op,) = cap.graph.layers()
    assert op.bias_fqn == "b" and op.weight_shape == [32, 16]
    torch.testing.assert_close(cap.gm(x), model(x))


def test_a_linear_weight_also_read_as_x_at_w_keeps_its_layout():
    """One parameter as nn.Linear's weight and as ``h @ W`` (a tied decoder): storing it transposed for the product
    made the linear read it through a transpose, which the IR took for a (16, 32) weight: 16 output channels
    instead of 32, twice the MACs, per-channel scales along its inputs. Such a weight keeps its layout."""

    class TiedDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(16, 32)

        def forward(self, x):
            return torch.relu(self.enc(x)) @ self.enc.weight

    model, x = TiedDecoder().eval(), torch.randn(2, 16)
    cap = capture(model, (x,))
    enc = cap.graph.layer("enc")
    assert enc.weight_shape == [32, 16] and enc.out_channels == 32 and enc.macs == 2 * 32 * 16
    torch.testing.assert_close(cap.gm(x), model(x))


class _Conv1D(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x, W)`` with W stored (in, out)."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf) / 4), nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_gpt2_conv1d_and_buffer_projections_are_per_output_channel_layers(method):
    """addmm(b, x, W) with W (in, out) (GPT-2's Conv1D) and an (in, out) projection held in a buffer were captured as
    linear layers whose axis 0 is their input: per-channel scales along the inputs, a TensorRT weight-axis error."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = _Conv1D(16, 24)
            self.register_buffer("proj", torch.randn(24, 8) / 4)

        def forward(self, x):  # [B, T, 16]
            return torch.einsum("bti,io->bto", torch.relu(self.c_attn(x)), self.proj)

    model, x = Net().eval(), torch.randn(2, 5, 16)
    cap = capture(model, (x[:1],), method=method)
    ops = {op.name: op for op in cap.graph.layers()}
    assert ops["c_attn"].weight_shape == [24, 16] and ops["c_attn"].bias_fqn == "c_attn.bias"
    assert ops["proj"].weight_shape == [8, 24] and ops["proj"].out_channels == 8
    assert ops["c_attn"].macs == 5 * 16 * 24 and ops["proj"].macs == 5 * 24 * 8
    torch.testing.assert_close(cap.gm(x), model(x))


class _InOutWeight(nn.Module):
    """``x @ W`` with W stored (in, out), a second product ``x @ Vᵀ``, and another reader of W."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(16, 8))  # (in, out)
        self.V = nn.Parameter(torch.randn(4, 8))  # (out, in), read through .t()

    def forward(self, x):
        h = torch.relu(x @ self.W) @ self.V.t()
        return h + self.W.sum(0)[:4]


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_weight_stored_in_out_is_quantized_per_output_channel(method):
    """A weight used as ``x @ W`` got its per-channel scales and bit-widths along axis 0, its *input* rows: one
    4-bit "channel" then touched every output. It is stored transposed so axis 0 is the output channel."""
    from mpqc.compiler.quantize import QuantizedModel

    torch.manual_seed(0)
    model, x = _InOutWeight().eval(), torch.randn(32, 16)
    cap = capture(model, (x,), method=method)
    ops = {op.name: op for op in cap.graph.layers()}
    assert ops["W"].kind.value == "linear" and ops["W"].weight_shape == [8, 16] and ops["W"].out_channels == 8
    assert ops["W"].macs == 32 * 8 * 16 and ops["V"].weight_shape == [4, 8]
    assert torch.allclose(cap.gm(x), model(x), atol=1e-5)  # the other reader of W still sees (in, out) values
    qm = QuantizedModel(cap)
    qm.set_precision("W", w_bits=(2,) * 4 + (8,) * 4)  # output channels 0..3 coarse, 4..7 fine
    out = {}
    hook = qm.act_quantizers("V")[0].register_forward_pre_hook(lambda m, a: out.__setitem__("h", a[0]))
    qm(x)
    hook.remove()
    ref = torch.relu(x @ model.W)
    err = (out["h"] - ref).abs().mean(0)
    assert err[4:].max() < 0.2 * err[:4].min()


def test_a_decomposed_export_finds_the_weight_of_its_batched_linear(tmp_path):
    """run_decompositions() turns MultiheadAttention's in-projection into t -> unsqueeze -> expand -> bmm; the
    weight was not traced back, so it was quantized as a per-tensor activation and left out of the size."""
    from mpqc.compiler.loading import load_model

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):  # x: [N, L, E]
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 8, 16)  # a dynamic batch: the in-projection becomes a bmm on an expanded weight
    ep = torch.export.export(MHA().eval(), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).run_decompositions()
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    loaded = load_model(str(tmp_path / "m.pt2"))
    g = capture(loaded.module, loaded.example_inputs).graph
    weighted = {op.weight_fqn for op in g.layers() if op.weight_fqn}
    assert any(w.endswith("in_proj_weight") for w in weighted), weighted
    in_proj = next(op for op in g.layers() if op.weight_fqn and op.weight_fqn.endswith("in_proj_weight"))
    assert in_proj.macs == 8 * 48 * 16 and in_proj.params >= 48 * 16


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_weight_read_through_views_gets_its_quantizer(method):
    """``x @ W.t()`` is a linear layer whose weight reaches the product through a view; inserting its quantizer
    looked for the parameter among the product's direct inputs and stopped with StopIteration."""
    from mpqc.compiler.quantize import QuantizedModel

    class ViewedWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(10, 64))

        def forward(self, x):
            return x.flatten(1) @ self.W.t()

    model, x = ViewedWeight().eval(), torch.randn(4, 1, 8, 8)
    qm = QuantizedModel(capture(model, (x,), method=method))
    (op,) = qm.graph_ir.layers()
    assert op.kind.value == "linear" and op.weight_fqn == "W"
    qm.set_precision(op.name, w_bits=4)
    w4 = qm(x)
    qm.set_precision(op.name, w_bits=8)
    w8 = qm(x)
    ref = model(x)
    assert (w8 - ref).abs().max() < (w4 - ref).abs().max()  # the weight is what gets quantized
    assert (w8 - ref).abs().max() < 0.05 * ref.abs().max()


class _FloatOnlyOps(nn.Module):
    """Parameterised ops mpqc does not quantize: a grouped transposed conv and an LSTM (an ungrouped transposed conv
    is a quantized layer); and element-wise ones that read a parameter but multiply nothing (a PReLU, a layer
    scale), which are not listed."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 8, 3, padding=1)
        self.act, self.gamma = nn.PReLU(), nn.Parameter(torch.ones(8, 1, 1))
        self.up = nn.ConvTranspose2d(8, 16, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose2d(16, 16, 2, stride=2, groups=4, bias=False)
        self.rnn = nn.LSTM(16, 8, batch_first=True)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.up2(self.up(self.act(self.c(x)) * self.gamma + torch.nn.functional.prelu(x, self.act.weight)))
        seq = h.mean(3).transpose(1, 2)  # [B, 32, 16]
        return self.fc(self.rnn(seq)[0][:, -1])


@pytest.mark.parametrize("method", ["export", "fx"])
def test_parameterised_ops_left_float_are_listed_with_their_macs_and_params(method):
    """A ConvTranspose2d counted 0 MACs and 0 params and an LSTM vanished from the IR, with no word anywhere:
    a UNet's compile reported half its MACs, and the plan's size left their weights out."""
    import numpy as np

    from mpqc.compiler.search import build_problem, parse_budgets, read_sensitivity
    from mpqc.targets import load_target
    from tests.compiler.search.helpers import synthetic_table

    g = capture(_FloatOnlyOps().eval(), (torch.randn(1, 1, 8, 8),), method=method).graph
    u = sorted(g.unquantized().values(), key=lambda v: -v["params"])
    assert [v["params"] for v in u] == [4 * 8 * (16 + 8) + 2 * 4 * 8, 16 * 4 * 4]
    macs = {v["params"]: v["macs"] for v in u}
    up = g.layer("up")
    assert up.params == 8 * 16 * 9 + 16 and up.weight_shape == [16, 8, 3, 3]
    assert up.macs == (8 * 8 * 8) * 16 * 9  # each input pixel scatters a 3x3 kernel per output channel
    assert macs[16 * 4 * 4] == (16 * 16 * 16) * 4 * 4  # groups of 4: C_out/groups = 4 per input channel
    layer_macs = sum(op.macs for op in g.ops.values())
    assert g.total_macs() == layer_macs + sum(v["macs"] for v in u)
    table = read_sensitivity(synthetic_table(g, (8, 4, 2), np.random.default_rng(0)))
    sp = build_problem(g, load_target("generic"), parse_budgets(avg_bits="W4A4"), table)
    assert any("stay float" in w and "2 op(s)" in w for w in sp.warnings), sp.warnings


class _ReservedNames(nn.Module):
    """Root attributes named like mpqc's own (a ``self.wq`` query projection is common in attention code)."""

    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(16, 16)
        self.aq = nn.Parameter(torch.randn(16, 8) / 4)
        self.rq = nn.Sequential(nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.rq(torch.relu(self.wq(x)) @ self.aq)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_model_attribute_named_like_a_quantizer_table_is_renamed_not_a_crash(method):
    """Building the quantized model stopped with KeyError "attribute 'wq' already exists" on any model with a root
    attribute wq, aq or rq: mpqc's quantizer tables hang there. The model's own are renamed with a "_"."""
    from mpqc.compiler.quantize import QuantizedModel

    torch.manual_seed(0)
    model, x = _ReservedNames().eval(), torch.randn(64, 16)
    cap = capture(model, (x[:1],), method=method)
    assert [op.name for op in cap.graph.layers()] == ["wq_", "aq_", "rq_.1"]
    qm = QuantizedModel(cap)
    for op in cap.graph.layers():
        qm.set_precision(op.name, w_bits=8, a_bits=8)
    qm.calibrate([x])
    ref = model(x)
    assert (qm(x) - ref).abs().max() < 0.05 * ref.abs().max()


class _EinsumAttention(nn.Module):
    """Projections and attention spelled as einsums (a JAX port's style), and an outer product that is no matmul."""

    def __init__(self):
        super().__init__()
        self.w_q, self.w_k = nn.Parameter(torch.randn(16, 16) / 4), nn.Parameter(torch.randn(16, 16) / 4)
        self.w_o = nn.Parameter(torch.randn(16, 10) / 4)  # (in, out)

    def forward(self, x):  # [B, 8, 16]
        q, k = torch.einsum("bsi,oi->bso", x, self.w_q), torch.einsum("...i,oi->...o", x, self.w_k)
        a = torch.einsum("bqd,bkd->bqk", q, k).softmax(-1)
        h = torch.einsum("bqk,bkd->bqd", a, k)
        outer = torch.einsum("bi,bj->bij", h.mean(1), h.mean(1)).mean((1, 2))
        return torch.einsum("bsd,do->bso", h, self.w_o).mean(1) + outer[:, None]


@pytest.mark.parametrize("method", ["export", "fx"])
def test_einsums_that_are_matrix_products_become_layers(method):
    """An einsum was counted but stayed float, outside every cost: a model written with einsums compiled with its
    projections and attention unquantized. One that is a (batched) matrix product is now a linear layer (a
    parameter operand, either layout) or an activation product; any other einsum stays listed as float."""
    model, x = _EinsumAttention().eval(), torch.randn(2, 8, 16)
    cap = capture(model, (x[:1],), method=method)
    layers = {op.weight_fqn or "matmul": op for op in cap.graph.layers()}
    assert {k: v.kind.value for k, v in layers.items() if k != "matmul"} == {"w_q": "linear", "w_k": "linear",
                                                                             "w_o": "linear"}
    assert layers["w_o"].weight_shape == [10, 16] and layers["w_o"].macs == 8 * 16 * 10
    products = [op for op in cap.graph.layers() if op.kind.value == "matmul"]
    assert len(products) == 2 and all(op.macs == 8 * 8 * 16 for op in products)
    assert [v["op"] for v in cap.graph.unquantized().values()] == ["einsum"]  # the outer product
    torch.testing.assert_close(cap.gm(x), model(x), atol=1e-5, rtol=1e-5)


class _TokenMixer(nn.Module):
    """MLP-Mixer's token mixing as an einsum with the parameter second: ``W @ x`` along the token axis."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Parameter(torch.randn(12, 8) / 3)
        self.head = nn.Linear(16, 10)

    def forward(self, x):  # [B, 8 tokens, 16]
        return self.head(torch.relu(torch.einsum("bnd,hn->bhd", x, self.tok)).mean(1))


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_token_mixing_einsum_is_a_layer_whose_weight_is_the_left_factor(method):
    """``"bnd,hn->bhd"`` is ``W @ x``: it stayed a float einsum; now a linear layer whose rows (axis 0) are its
    output channels, with exact MACs."""
    model, x = _TokenMixer().eval(), torch.randn(4, 8, 16)
    cap = capture(model, (x[:1],), method=method)
    tok = cap.graph.layer("tok")
    assert tok.kind.value == "linear" and tok.weight_shape == [12, 8] and tok.macs == 12 * 16 * 8
    assert not cap.graph.unquantized()
    torch.testing.assert_close(cap.gm(x), model(x))


class _Attention(nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        self.qkv, self.masked = nn.Linear(8, 24), masked

    def forward(self, x):  # [B, 8, 8]: 8 tokens of 8 features, 2 heads
        q, k, v = self.qkv(x.flatten(1, 2)).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        mask = torch.ones(8, 8, dtype=torch.bool).tril() if self.masked else None
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3 if self.masked else None)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_fused_attention_is_spelled_as_its_two_products_where_unmasked(method):
    x = torch.randn(2, 1, 8, 8)
    for masked, products in ((False, 2), (True, 1)):  # a masked one stays fused (and is priced as one op)
        model = _Attention(masked).eval()
        cap = capture(model, (x,), method=method)
        mm = [op for op in cap.graph.layers() if op.kind.value == "matmul"]
        assert len(mm) == products and sum(op.macs for op in mm) == 2 * 2 * 8 * 8 * 4 * 2
        with torch.no_grad():
            torch.testing.assert_close(cap.gm(x), model(x), atol=1e-5, rtol=1e-5)
    plain = capture(_Attention(False).eval(), (x,), method=method).graph
    scores, mixed = [op for op in plain.layers() if op.kind.value == "matmul"]
    assert plain.tensors[mixed.act_inputs[0]].nonnegative  # softmax output: an unsigned grid


@pytest.mark.parametrize("method", ["export", "fx"])
def test_einsums_that_are_no_matrix_product_are_listed_as_float_with_their_contraction_macs(method):
    """An einsum that is not one matrix product is neither a matmul nor a linear layer to mpqc: it stays float, and
    was counted nowhere."""

    class Einsums(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(16, 8))

        def forward(self, x):  # [B, 8, 8]
            h = torch.einsum("bid,ed->be", x.flatten(1, 2), self.W)  # a weight, i summed out too: [B, 16]
            return torch.einsum("bi,bj->bij", h, h).flatten(1)  # an outer product of activations: [B, 16, 16]

    g = capture(Einsums().eval(), (torch.randn(1, 1, 8, 8),), method=method).graph
    u = sorted(g.unquantized().values(), key=lambda v: -v["params"])
    assert [(v["params"], v["macs"]) for v in u] == [(128, 8 * 8 * 16), (0, 16 * 16)]
    assert g.total_macs() == 8 * 8 * 16 + 16 * 16
