"""Fine-tuning on the grid the export profile deploys: for TensorRT, unsigned 8-bit activations train as the 7
bits it carries them in, and the checkpoint records the profile so that export rebuilds the trained network."""

from __future__ import annotations

import json

import pytest
import torch

from mpqc import cli
from mpqc.compiler.capture import capture
from mpqc.compiler.deploy_grid import fit_to_profile, narrow_unsigned_int8
from mpqc.compiler.export import export_qdq
from mpqc.compiler.export.parity import check_parity
from mpqc.compiler.plan import uniform_plan
from mpqc.compiler.quantize import LayerQuant, QuantizedModel, RangeMethod
from mpqc.compiler.residual import quantize_residuals_for
from tests.models import resnet_tiny, tiny_images, write_resnet_tiny_files


def _quantized(bits: int = 8) -> QuantizedModel:
    cap = capture(resnet_tiny(), (tiny_images(1, 0),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    qm.apply({op.name: LayerQuant(bits, bits) for op in cap.graph.layers()})
    return qm


def test_trt_trains_unsigned_8_bit_activations_as_7_bits():
    qm = _quantized(8)
    grid = fit_to_profile(qm, "trt")
    mods = {f"aq.{k}": m for k, m in qm.aq.items()} | {f"rq.{k}": m for k, m in qm.rq.items()}
    unsigned = {k for k, m in mods.items() if m.enabled and not m.signed}
    signed = {k for k, m in mods.items() if m.enabled and m.signed}
    assert unsigned and signed  # ReLU outputs; the image and the conv outputs before the adds
    assert set(grid.narrowed) == unsigned
    assert all(mods[k].bits == 7 for k in unsigned) and all(mods[k].bits == 8 for k in signed)
    # trt quantizes one input per add; block1's input reuses the 8-bit reader of block1.c1, block2's needs one
    assert len(grid.residual) == len(qm.rq) == 1

    ort = _quantized(8)
    assert fit_to_profile(ort, "ort").narrowed == ()
    assert all(m.bits == 8 for m in ort.act_quantizers_all())
    assert fit_to_profile(_quantized(8), "qcdq", residual_quant=False).residual == ()
    with pytest.raises(ValueError, match="tensorrt"):
        fit_to_profile(_quantized(8), "tensorrt")


def test_narrowing_a_calibrated_quantizer_keeps_its_range():
    qm = _quantized(8)
    qm.calibrate([tiny_images(32, 2)])
    before = {k: float(m.scale.detach()) * 255 for k, m in qm.aq.items() if not m.signed}
    narrowed = narrow_unsigned_int8(qm.aq.items())
    assert sorted(narrowed) == sorted(before)
    for k, top in before.items():
        assert qm.aq[k].bits == 7 and float(qm.aq[k].scale.detach()) * 127 == pytest.approx(top)
    assert narrow_unsigned_int8(qm.aq.items()) == []  # idempotent


def test_a_model_trained_for_trt_is_exported_as_it_was_trained():
    calib, x = [tiny_images(32, 2)], tiny_images(64, 4)
    trained = _quantized(8)
    fit_to_profile(trained, "trt")
    trained.calibrate(calib)
    with torch.no_grad():
        for m in trained.act_quantizers_all():
            m.scale.mul_(1.1)  # "learned" step sizes
        want = trained(x)
    exported = export_qdq(trained, "trt", calib=calib)
    assert not any("carried as 7 bits" in n or "new 8-bit quantizer" in n for n in exported.notes)
    n7 = len(fit_to_profile(_quantized(8), "trt").narrowed)
    assert n7 > 0 and f"{n7} unsigned 8-bit activations were fine-tuned as 7 bits" in " ".join(exported.notes)
    with torch.no_grad():
        torch.testing.assert_close(exported.reference(x), want)  # the deploy graph is the trained network
    assert check_parity(exported.model, exported.reference, x).passed

    # trained at 8 bits (the ort grid), the same plan is narrowed at export and computes something else
    legacy = _quantized(8)
    quantize_residuals_for(legacy, "trt")
    legacy.calibrate(calib)
    exported = export_qdq(legacy, "trt", calib=calib)
    assert sum("carried as 7 bits" in n for n in exported.notes) == n7
    assert not any("fine-tuned as 7 bits" in n for n in exported.notes)
    with torch.no_grad():
        assert not torch.allclose(exported.reference(x), legacy(x))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy_grid_cli")
    model = write_resnet_tiny_files(d, 96)
    cap = capture(model, (tiny_images(1, 0),), fold_bn=True)
    uniform_plan(cap.graph, 8, 8, "generic").save(d / "plan.json")
    return d


def _mpqc(d, capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([argv[0], str(d / "tiny.pt"), "--arch", "tests.models:ResNetTiny", "--input-shape",
                         "1,3,12,12", "--plan", str(d / "plan.json"), "--data", f"npz:{d / 'data.npz'}", *argv[1:]])
    except SystemExit as e:
        code = int(e.code)
    out, err = capsys.readouterr()
    return code, out, err


def test_export_takes_the_profile_the_checkpoint_was_fine_tuned_for(files, capsys):
    ckpt = files / "trt_q.pt"
    code, _, err = _mpqc(files, capsys, "finetune", "--profile", "trt", "--epochs", "1", "--batch-size", "32",
                         "--no-progress", "-o", str(ckpt))
    assert code == 0, err
    saved = torch.load(ckpt, weights_only=True)
    assert saved["trained_for"] == {"profile": "trt", "residual_quant": True}
    assert any(k.startswith("rq.") for k in saved["model"])

    code, out, err = _mpqc(files, capsys, "export", "--checkpoint", str(ckpt), "--no-speed", "--samples", "32",
                           "--json", "-o", str(files / "m.onnx"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["profile"] == "trt"
    assert summary["parity"]["passed"]

    code, _, err = _mpqc(files, capsys, "export", "--checkpoint", str(ckpt), "--profile", "ort", "--no-speed",
                         "-o", str(files / "o.onnx"))
    assert code == 2 and "--profile trt" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (files / "o.onnx").exists()
