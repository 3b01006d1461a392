"""Residual-add quantizers placed before fine-tuning: where each profile puts them, that they train, and that
the exporter then finds them and adds nothing (so the export computes what fine-tuning trained)."""

from __future__ import annotations

import os

import pytest
import torch

from mpqc import cli
from mpqc.compiler.capture import capture
from mpqc.compiler.export import export_qdq
from mpqc.compiler.export.parity import check_parity
from mpqc.compiler.passes import packet
from mpqc.compiler.plan import uniform_plan
from mpqc.compiler.quantize import LayerQuant, QuantizedModel, RangeMethod
from mpqc.compiler.residual import is_quantizer, quantize_residuals_for
from tests.models import resnet_tiny, tiny_images, write_resnet_tiny_files

_images, _model = tiny_images, resnet_tiny


def _quantized(bits: int = 4, a_bits: dict | None = None) -> QuantizedModel:
    cap = capture(_model(), (_images(1, 0),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    qm.apply({op.name: LayerQuant(bits, (a_bits or {}).get(op.name, bits)) for op in cap.graph.layers()})
    return qm


def _adds(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and packet(n) == "add"]


def _module(gm, node):
    return gm.get_submodule(str(node.target))


def test_ort_reads_every_add_input_at_8_bits_and_narrower_readers_requantize():
    qm = _quantized(4)
    placed = quantize_residuals_for(qm, "ort")
    adds = _adds(qm.gm)
    assert len(adds) == 2
    for add in adds:
        for a in add.args[:2]:
            assert is_quantizer(a, ("rq.",)) and _module(qm.gm, a).bits == 8
    # block1's input is a ReLU output (unsigned) read by block1.c1 at 4 bits: that reader now requantizes the
    # 8-bit codes; the conv outputs before the adds are signed
    stem_out = next(r for r in placed if r.requantizing)
    assert not qm.rq[stem_out.key.split(".", 1)[1]].signed
    conv_fed = [r for r in placed if not r.requantizing]
    assert conv_fed and all(qm.rq[r.key.split(".", 1)[1]].signed for r in conv_fed)
    reader = next(n for n in qm.gm.graph.nodes if str(n.target) == stem_out.requantizing[0])
    assert is_quantizer(reader.args[0], ("rq.",))
    assert len(qm.rq) == 4  # block1: conv output + stem output; block2: both conv outputs
    assert quantize_residuals_for(qm, "ort") == [] and len(qm.rq) == 4  # idempotent


def test_trt_leaves_the_conv_output_the_add_fuses_into_in_float():
    qm = _quantized(4)
    quantize_residuals_for(qm, "trt")
    for add in _adds(qm.gm):
        kinds = [("conv" if a.op == "call_function" else "q") for a in add.args[:2]]
        assert sorted(kinds) == ["conv", "q"]
    assert len(qm.rq) == 2
    assert quantize_residuals_for(qm, "qcdq") == []


def test_an_existing_8_bit_reader_is_reused_instead_of_a_new_quantizer():
    qm = _quantized(4, a_bits={"block1.c1": 8})
    placed = quantize_residuals_for(qm, "ort")
    assert not any(r.requantizing for r in placed)
    add = _adds(qm.gm)[0]
    assert any(str(a.target).startswith("aq.") and _module(qm.gm, a).bits == 8 for a in add.args[:2])


def test_residual_step_sizes_are_calibrated_and_learned():
    qm = _quantized(4)
    quantize_residuals_for(qm, "ort")
    qm.calibrate([_images(32, 2)])
    rq_scales = [q.scale for q in qm.rq.values()]
    assert all(float(s.detach()) != 1.0 for s in rq_scales)  # set from the observed ranges, not left at the init
    ids = {id(p) for p in qm.quant_parameters()}
    assert all(id(s) in ids for s in rq_scales)
    qm.train()
    qm(_images(16, 3)).square().sum().backward()
    assert all(s.grad is not None and float(s.grad.abs()) > 0 for s in rq_scales)


class _InPlaceAdds(torch.nn.Module):
    """ResNetTiny's blocks written the torchvision way: ``out += identity`` and an in-place ReLU."""

    def __init__(self, tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, x):
        x = self.tiny.stem(x)
        for b in (self.tiny.block1, self.tiny.block2):
            out = b.b2(b.c2(torch.relu(b.b1(b.c1(x)))))
            out += x if b.down is None else b.down(x)
            x = out.relu_()
        return self.tiny.fc(x.mean((2, 3)))


def test_a_model_that_adds_in_place_trains_with_its_residual_quantizers():
    """torchvision's ResNets, MobileNetV3 and EfficientNet add the skip path in place. Writing into a quantizer's
    output is refused by autograd, so every such compile failed in fine-tuning until capture made the adds
    out-of-place."""
    model = _InPlaceAdds(_model())
    cap = capture(model, (_images(1, 0),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    qm.apply({op.name: LayerQuant(4, 4) for op in cap.graph.layers()})
    assert len(quantize_residuals_for(qm, "ort")) == 4
    qm.calibrate([_images(32, 2)])
    qm.train()
    qm(_images(16, 3)).square().sum().backward()
    assert all(float(q.scale.grad.abs()) > 0 for q in qm.rq.values())


@pytest.mark.parametrize("profile", ["ort", "trt"])
def test_export_finds_the_trained_quantizers_and_adds_none(profile):
    calib = [_images(32, 2)]
    trained = _quantized(3)
    quantize_residuals_for(trained, profile)
    trained.calibrate(calib)
    with torch.no_grad():
        for q in trained.rq.values():
            q.scale.mul_(1.3)  # "learned" step sizes, unlike what calibration at export would give
    exported = export_qdq(trained, profile, calib=calib)
    assert not any("new 8-bit quantizer" in n for n in exported.notes)
    assert any("trained with the model" in n for n in exported.notes)
    assert check_parity(exported.model, exported.reference, _images(64, 4)).passed
    ref = dict(exported.reference.named_modules())
    for k, q in trained.rq.items():  # (TensorRT carries an unsigned 8-bit grid as 7 bits over the same range)
        widen = 255 / 127 if profile == "trt" and not q.signed else 1.0
        assert float(ref[f"rq.{k}"].scale.detach()) == pytest.approx(float(q.scale.detach()) * widen)

    # without them, the exporter places the same quantizers by the same rule (and calibrates them itself)
    plain = _quantized(3)
    plain.calibrate(calib)
    exported_plain = export_qdq(plain, profile, calib=calib)
    new = {n.split(":")[0] for n in exported_plain.notes if "new 8-bit quantizer" in n}
    assert new == {f"rq.{k}" for k in trained.rq}


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("residual_cli")
    model = write_resnet_tiny_files(d, 160)
    cap = capture(model, (_images(1, 0),), fold_bn=True)
    plan = uniform_plan(cap.graph, 4, 4, "generic")
    plan.save(d / "plan.json")
    qm = QuantizedModel(cap)
    qm.apply_plan(plan)
    quantize_residuals_for(qm, "ort")
    qm.calibrate([_images(32, 2)])
    torch.save(qm.state_dict(), d / "model_q.pt")
    return d


def _export_cli(d, capsys, *extra):
    code = cli.main(["export", str(d / "tiny.pt"), "--arch", "tests.models:ResNetTiny", "--plan",
                     str(d / "plan.json"), "--data", f"npz:{d / 'data.npz'}", "--checkpoint", str(d / "model_q.pt"),
                     "--no-speed", "--samples", "32", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_cli_places_the_checkpoints_residual_quantizers(cli_files, capsys):
    code, out, err = _export_cli(cli_files, capsys, "-o", str(cli_files / "m.onnx"))
    assert code == 0, err
    assert (cli_files / "m.onnx").exists()


def test_export_cli_with_another_profile_than_fine_tuning_exits_2(cli_files, capsys):
    code, _, err = _export_cli(cli_files, capsys, "--profile", "trt", "-o", str(cli_files / "t.onnx"))
    assert code == 2 and "--profile" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (cli_files / "t.onnx").exists()


def test_compile_fine_tunes_with_the_residual_quantizers_and_exports_them(cli_files, tmp_path):
    import mpqc

    kw = dict(arch="tests.models:ResNetTiny", target="generic", data=f"npz:{cli_files / 'data.npz'}",
              avg_bits="W4A4", input_shape=(1, 3, 12, 12), sensitivity="fisher", epochs=1, samples=32,
              batch_size=32, progress=False, device="cpu")
    out = tmp_path / "run"
    res = mpqc.compile(str(cli_files / "tiny.pt"), out=str(out), **kw)
    saved = torch.load(out / "model_q.pt", weights_only=True)
    assert saved["trained_for"] == {"profile": "ort", "residual_quant": True}
    state = saved["model"]
    assert len([k for k in state if k.startswith("rq.") and k.endswith(".scale")]) == 4  # ort: every add input
    assert os.path.exists(res.paths["model.onnx"])
    off = mpqc.compile(str(cli_files / "tiny.pt"), out=str(out), residual_quant=False, **kw)
    assert "finetune" not in off.reused and "search" in off.reused
    saved = torch.load(out / "model_q.pt", weights_only=True)
    assert saved["trained_for"] == {"profile": "ort", "residual_quant": False}
    state = saved["model"]
    assert not any(k.startswith("rq.") for k in state)
