"""Latency tables: JSON round trip, look-up, flagged interpolation, strict rejection, and a real ORT profile."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mpqc.cli import main
from mpqc.compiler.capture import capture
from mpqc.cost_models import LatencyRow, LatencyTable, fit_per_element, op_signature
from mpqc.errors import UserError
from mpqc.targets import load_target

PROV = {"device": "test", "runtime": "none", "date": "2026-01-01"}


def _row(sig: str, macs: int, ms: float, w=8, a=8, fmt="int", **kw) -> LatencyRow:
    return LatencyRow("ort-cpu", sig, sig.split("|")[0], macs, w, a, fmt, ms, ms / 10, 20, PROV, **kw)


@pytest.fixture
def table() -> LatencyTable:
    rows = [_row("conv|a", 100, 1.0), _row("conv|b", 300, 2.0), _row("conv|a", 100, 3.0, None, None, "float"),
            _row("linear|c", 50, 0.5), _row("conv|d", 100, math.nan, 4, 4, status="unsupported", note="no kernel")]
    return LatencyTable(rows, source="lut.json")


def test_round_trip_through_json(tmp_path, table):
    path = tmp_path / "lut.json"
    table.meta["whole_model"] = {"fp32": {"median_ms": 9.0}}
    table.save(path)
    back = LatencyTable.load(path)
    assert list(back) == list(table) and back.meta == table.meta
    assert json.loads(path.read_text())["version"] == 1
    assert [p for p in os.listdir(tmp_path) if p != "lut.json"] == []  # no temporary file left behind
    umask = os.umask(0o022)
    os.umask(umask)
    # what a plain open() would give (the table's own writer used to leave mkstemp's owner-only 0600)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_unreadable_tables_are_user_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        LatencyTable.load(bad)
    bad.write_text(json.dumps({"format": "mpqc-latency-table", "version": 99, "rows": []}))
    with pytest.raises(UserError, match="version 99"):
        LatencyTable.load(bad)
    with pytest.raises(UserError, match="not found"):
        LatencyTable.load(tmp_path / "missing.json")


def test_exact_lookup(table):
    est = table.lookup("conv|a", 8, 8)
    assert est.ms == 1.0 and not est.interpolated and est.supported
    assert table.lookup("conv|a", None, None).ms == 3.0  # float row, found by its default format
    unsupported = table.lookup("conv|d", 4, 4)
    assert not unsupported.supported and unsupported.ms == math.inf and unsupported.note == "no kernel"


def test_unseen_shape_is_interpolated_by_macs_and_flagged(table):
    est = table.lookup("conv|new", 8, 8, macs=200)
    assert est.interpolated and est.ms == pytest.approx(1.5) and est.basis == ("conv|a", "conv|b")
    assert ("ort-cpu", "conv|new", 8, 8, "int") in table.flagged
    above = table.lookup("conv|big", 8, 8, macs=600)  # beyond the measured range: proportional to MACs
    assert above.interpolated and above.ms == pytest.approx(4.0)
    assert table.lookup("conv|tiny", 8, 8, macs=50).ms == pytest.approx(0.5)


def test_strict_rejects_unseen_shapes_and_missing_precisions_fail(table):
    with pytest.raises(UserError, match="drop --strict"):
        table.lookup("conv|new", 8, 8, macs=200, strict=True)
    with pytest.raises(UserError, match="no conv rows at W2A2"):
        table.lookup("conv|new", 2, 2, macs=200)


def test_boundary_slope_fit():
    rows = [LatencyRow("t", f"boundary|{n}", "boundary", 0, None, 8, "int", n * 2e-6, 0.0, 5, numel=n)
            for n in (1000, 5000, 20000)]
    assert fit_per_element(rows) == pytest.approx(2e-6)
    assert fit_per_element([]) is None


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 8 * 8, 32)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def tiny():
    model = TwoLayer().eval()
    x = torch.randn(1, 3, 8, 8)
    return model, x, capture(model, (x,)).graph


def test_real_ort_cpu_profile_of_a_two_layer_model(tiny):
    from mpqc.cost_models.profile_ort import profile_layers_ort

    _, _, graph = tiny
    target = load_target("ort-cpu")
    table = profile_layers_ort(graph.layers(), target, repeats=5, warmup=1)
    for layer in graph.layers():
        for w, a in ((None, None), (8, 8)):
            row = table.find(op_signature(layer), w, a)
            assert row is not None and row.status == "ok" and row.median_ms > 0 and row.repeats == 5
            assert row.provenance["runtime"] == "onnxruntime"
    fc = graph.layer("fc")
    assert table.lookup(fc, 4, None).ms > 0  # int4 weight-only (MatMulNBits)
    assert any(r.kind == "boundary" for r in table)


def test_single_op_int8_models_fuse_into_integer_kernels(tiny, tmp_path):
    import onnx
    import onnxruntime as ort

    from mpqc.cost_models.profile_ort import build_layer_model

    _, _, graph = tiny
    fused = {}
    for layer, w, a in ((graph.layer("conv"), 8, 8), (graph.layer("fc"), 8, 8), (graph.layer("fc"), 4, None)):
        model, feeds, _ = build_layer_model(layer, w, a)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        so.log_severity_level = 3
        out = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
        assert list(out[0].shape) == layer.out_shape
        fused[(layer.name, w)] = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in fused[("conv", 8)]
    assert {"QGemm", "QLinearMatMul", "MatMulIntegerToFloat"} & fused[("fc", 8)]
    assert "MatMulNBits" in fused[("fc", 4)]


def test_profile_command_writes_a_table(tiny, tmp_path, capsys):
    model, x, _ = tiny
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    out = tmp_path / "lut.json"
    code = main(["profile", str(path), "--target", "ort-cpu", "-o", str(out), "--repeats", "3", "--warmup", "1",
                 "--no-whole-model", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == len(LatencyTable.load(out)) and summary["sum_of_layers"]["fp32"]["ms"] > 0


def test_profile_command_rejects_targets_without_latency(tmp_path, capsys):
    code = main(["profile", "torchvision:resnet18", "--target", "generic", "-o", str(tmp_path / "l.json")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "has no measured latency" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_profiler_needs_a_gpu():
    from mpqc.cost_models.profile_cuda import require_cuda

    with pytest.raises(UserError, match="no CUDA device"):
        require_cuda()


def test_tensorrt_profiler_is_import_guarded():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from mpqc.cost_models.profile_trt import require_tensorrt

        with pytest.raises(UserError, match="TensorRT is not installed"):
            require_tensorrt()
    else:
        pytest.skip("TensorRT is installed")


def test_whole_model_fp32_and_int8_qdq_timing(tiny, tmp_path):
    from mpqc.cost_models.profile_ort import profile_whole_model_ort

    model, x, _ = tiny
    whole = profile_whole_model_ort(model, (x,), str(tmp_path), repeats=3, warmup=1)
    assert set(whole) == {"fp32", "int8"}
    assert all(v["median_ms"] > 0 for v in whole.values()) and "random" in whole["int8"]["how"]


def test_cpu_clock_profile_needs_one_thread(tiny):
    from mpqc.cost_models.profile_ort import profile_layers_ort

    _, _, graph = tiny
    target = load_target("ort-cpu")
    with pytest.raises(UserError, match="--threads 1"):
        profile_layers_ort(graph.layers(), target, repeats=2, warmup=0, clock="cpu")
    table = profile_layers_ort(graph.layers(), target, repeats=3, warmup=1, threads=1, clock="cpu", cache="warm",
                               boundary=False)
    assert table.meta["clock"] == "cpu" and all(r.median_ms > 0 for r in table)


@pytest.mark.parametrize("target,message", [("cuda", "no CUDA device"), ("tensorrt", "TensorRT is not installed")])
def test_profile_command_fails_early_without_the_runtime(tmp_path, capsys, target, message):
    if target == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if target == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("TensorRT is installed")
    code = main(["profile", "torchvision:resnet18", "--target", target, "-o", str(tmp_path / "l.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "l.json").exists()
