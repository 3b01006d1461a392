"""`mpqc export`: a full run (calibrated and from a fine-tuned state dict) and one-line errors with exit 2."""

from __future__ import annotations

import json
import os

import onnx
import pytest
import torch

from mpqc import cli
from mpqc.compiler.capture import capture
from mpqc.compiler.data import load_data, make_loader
from mpqc.compiler.export.qdq import apply_plan
from mpqc.compiler.plan import Plan, uniform_plan
from mpqc.compiler.quantize import QuantizedModel, RangeMethod
from mpqc.compiler.zoo import DigitsCNN

ARCH = "mpqc.compiler.zoo:DigitsCNN"


@pytest.fixture(autouse=True)
def only_export(monkeypatch):
    # other sub-commands are built by other stages; this file tests `export` through the real entry point
    monkeypatch.setattr(cli, "COMMANDS", ("export",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_cli")
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    torch.save(model.state_dict(), d / "digits.pt")
    cap = capture(model, (torch.randn(1, 1, 8, 8),), fold_bn=True)
    plan = uniform_plan(cap.graph, 4, 6, "generic")
    plan.layers["conv2"].w_bits = [2, 3, 4, 5, 6, 7, 8, 8] * 2  # per-channel mixed
    plan.save(d / "plan.json")
    return d


def _run(capsys, *argv):
    code = cli.main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _base(d, *extra):
    return (d / "digits.pt", "--arch", ARCH, "--plan", d / "plan.json", "--data", "digits", *extra)


def test_export_writes_a_checked_qdq_file(files, capsys):
    out = files / "model.onnx"
    code, stdout, err = _run(capsys, *_base(files, "-o", out, "--json", "--samples", "200"))
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["parity"]["passed"] and summary["parity"]["samples"] == 200
    assert summary["layers"]["conv2"]["w_bits"] == [2, 3, 4, 5, 6, 7, 8, 8] * 2  # numbers, not a JSON string
    assert summary["layers"]["conv1"]["w_bits"] == 4
    assert summary["speed"]["quantized"]["median_ms"] > 0 and summary["speed"]["fp32"]["median_ms"] > 0
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props}["mpqc.profile"] == "ort"
    assert not [f for f in os.listdir(files) if f.startswith(".tmp-")]  # atomic write left nothing behind


def _calibrated(d) -> QuantizedModel:
    """The digits model quantized at plan.json and calibrated, as `mpqc finetune` starts from."""
    model = DigitsCNN()
    model.load_state_dict(torch.load(d / "digits.pt"))
    cap = capture(model.eval(), (torch.randn(1, 1, 8, 8),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    apply_plan(qm, Plan.load(d / "plan.json"))
    qm.calibrate([b[0] for b in make_loader(load_data("digits").calib, 64)][:2])
    return qm


def test_export_from_a_finetuned_checkpoint(files, capsys):
    # what `mpqc finetune` writes: the QuantizedModel state dict, trained
    qm = _calibrated(files)
    with torch.no_grad():
        for q in qm.aq.values():
            q.scale.mul_(1.1)  # "trained" step sizes differ from what calibration would give
    torch.save(qm.state_dict(), files / "model_q.pt")
    code, stdout, err = _run(capsys, *_base(files, "--checkpoint", files / "model_q.pt", "--profile", "trt",
                                            "-o", files / "ft.onnx", "--json", "--no-speed", "--samples", "100"))
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["parity"]["passed"] and summary["profile"] == "trt"
    assert any(n.startswith("deployed form") and "on 100 samples" in n for n in summary["parity"]["notes"])
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(files / "ft.onnx").graph.initializer}
    conv2_in = next(k for k in qm.aq if "relu" in k)
    assert float(scales[f"aq.{conv2_in}.scale"]) == pytest.approx(float(qm.aq[conv2_in].scale.abs()))


@pytest.mark.parametrize("extra, message", [
    (("--plan", "missing.json"), "plan file"),
    (("--format", "tensorrt"), "TensorRT is not installed"),
    (("--format", "tensorrt", "--profile", "ort"), "--format tensorrt needs --profile trt"),
    (("--samples", "0"), "--samples"),
    (("--checkpoint", "nope.pt"), "--checkpoint nope.pt: file not found"),
    (("--data", "cifar10:/does/not/exist"), "directory not found"),
    (("--opset", "17"), "opset"),
])
def test_bad_input_is_one_line_and_exit_2(files, capsys, extra, message):
    args = list(_base(files, "-o", files / "x.onnx"))
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.exists(files / "x.onnx")


def test_plan_for_another_model_exits_2(files, capsys):
    plan = Plan.load(files / "plan.json")
    plan.layers["no.such.layer"] = plan.layers.pop("conv1")
    plan.save(files / "other.json")
    code, _, err = _run(capsys, *_base(files, "-o", files / "y.onnx"), "--plan", files / "other.json")
    assert code == 2 and "no.such.layer" in err


def test_output_into_a_missing_directory_exits_2(files, capsys):
    code, _, err = _run(capsys, *_base(files, "-o", files / "nowhere" / "m.onnx"))
    assert code == 2 and "does not exist" in err


def test_a_mismatched_checkpoint_exits_2(files, capsys):
    torch.save({"wq.conv1.scale": torch.ones(3)}, files / "bad_q.pt")
    code, _, err = _run(capsys, *_base(files, "-o", files / "z.onnx", "--checkpoint", files / "bad_q.pt"))
    assert code == 2 and "does not fit" in err


def test_a_runs_own_midway_checkpoint_is_named_as_such(files, capsys):
    """finetune_ckpt/last.pt holds the batch-statistics maps not yet folded: it was refused with "was it fine-tuned
    with the same --plan?", which sent users looking for another plan."""
    state = {f"gm.renorm.r0.{k}": torch.ones(4) for k in ("gain", "bias", "running_mean", "running_var")}
    torch.save({"epoch": 1, "method": "lsq", "model": state, "optimizer": {}, "precision": {}}, files / "last.pt")
    code, _, err = _run(capsys, *_base(files, "-o", files / "l.onnx", "--checkpoint", files / "last.pt"))
    assert code == 2 and "fine-tuning run's own checkpoint" in err and "model_q.pt" in err, err
    assert not (files / "l.onnx").exists()


def test_a_checkpoint_fine_tuned_at_another_plan_exits_2(files, capsys):
    """Its step sizes were learned for other widths: exporting them at this plan's would be silently wrong."""
    from mpqc.compiler.deploy_grid import model_checkpoint

    torch.save(model_checkpoint(_calibrated(files), "ort", False), files / "planned_q.pt")
    other = Plan.load(files / "plan.json")
    other.layers["conv2"].w_bits = [3] * 16
    other.save(files / "other_bits.json")
    code, _, err = _run(capsys, *_base(files, "-o", files / "w.onnx", "--checkpoint", files / "planned_q.pt",
                                       "--no-speed"), "--plan", files / "other_bits.json")
    assert code == 2 and "another precision" in err and "wq.conv2" in err, err
    assert not (files / "w.onnx").exists()
    code, _, err = _run(capsys, *_base(files, "-o", files / "w.onnx", "--checkpoint", files / "planned_q.pt",
                                       "--no-speed", "--samples", "100"))
    assert code == 0, err
