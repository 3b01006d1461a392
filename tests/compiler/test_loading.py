"""Model loading: every accepted format, and one-line errors (exit code 2) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torchvision

from mpqc.compiler.capture import capture
from mpqc.compiler.loading import load_model, parse_input_shape
from mpqc.errors import UserError
from tests.models import DigitsCNN


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mpqc", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_torchscript_file(tmp_path):
    m = DigitsCNN().eval()
    path = tmp_path / "m.ts"
    torch.jit.trace(m, torch.randn(1, 1, 8, 8)).save(str(path))
    loaded = load_model(str(path), input_shape="1,1,8,8")
    torch.testing.assert_close(loaded.module(loaded.example_inputs[0]), m(loaded.example_inputs[0]))


def test_export_file_keeps_its_input_shape(tmp_path):
    m = DigitsCNN().eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(2, 1, 8, 8),)), str(path))
    loaded = load_model(str(path))
    assert loaded.input_shape == [2, 1, 8, 8]  # a static batch: the only shape the program runs at


def test_an_export_file_with_a_dynamic_batch_is_costed_per_image(tmp_path):
    m = DigitsCNN().eval()
    path = tmp_path / "m.pt2"
    ep = torch.export.export(m, (torch.randn(4, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, str(path))
    loaded = load_model(str(path))
    assert loaded.input_shape == [1, 1, 8, 8]
    g = capture(loaded.module, loaded.example_inputs)
    assert g.graph.total_macs() == capture(m, (torch.randn(1, 1, 8, 8),)).graph.total_macs()
    assert not [op for op in g.graph.ops if "guards" in op]  # the program's shape check is not an op of the model


def test_state_dict_with_arch(tmp_path):
    m = DigitsCNN()
    path = tmp_path / "sd.pt"
    torch.save({"module." + k: v for k, v in m.state_dict().items()}, path)  # DDP-style prefix accepted
    loaded = load_model(str(path), arch="tests.models:DigitsCNN")
    assert loaded.input_shape == [1, 1, 8, 8]  # the class's own default
    torch.testing.assert_close(loaded.module.conv1.weight, m.conv1.weight)


def test_torchvision_with_weights(tmp_path):
    m = torchvision.models.resnet18()
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    loaded = load_model("torchvision:resnet18", weights=str(path))
    torch.testing.assert_close(loaded.module.fc.weight, m.fc.weight)
    assert loaded.input_shape == [1, 3, 224, 224]


@pytest.mark.parametrize("name,head", [("resnet18", "fc"), ("squeezenet1_0", "classifier.1")])
def test_a_torchvision_model_fine_tuned_for_its_own_classes_gets_that_head(tmp_path, name, head):
    m = torchvision.models.get_model(name, num_classes=10)
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    loaded = load_model(f"torchvision:{name}", weights=str(path))
    w = loaded.module.get_submodule(head).weight
    assert w.shape[0] == 10
    torch.testing.assert_close(w, m.get_submodule(head).weight)


def test_weights_of_another_shape_name_the_first_mismatch(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    state["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        load_model("torchvision:resnet18", weights=str(path))
    msg = str(e.value)
    assert "size mismatch for layer1.0.conv1.weight" in msg and "1 more" in msg and "\n" not in msg, msg


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(DigitsCNN(), path)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(str(path))
    assert isinstance(load_model(str(path), trust_pickle=True).module, DigitsCNN)


def test_nan_weights_rejected(tmp_path):
    m = DigitsCNN()
    m.conv2.weight.data[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(m.state_dict(), path)
    with pytest.raises(UserError, match="conv2.weight contains NaN"):
        load_model(str(path), arch="tests.models:DigitsCNN")


@pytest.mark.parametrize("text", ["1,3,x", "", "1,-3,4", "0,3"])
def test_bad_input_shape_text(text):
    with pytest.raises(UserError, match="--input-shape"):
        parse_input_shape(text)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = d / "good.ts"
    torch.jit.trace(DigitsCNN().eval(), torch.randn(1, 1, 8, 8)).save(str(good))
    data = good.read_bytes()
    (d / "truncated.ts").write_bytes(data[: len(data) // 2])
    (d / "corrupt.pt").write_bytes(b"\x80\x04not a pickle at all" * 10)
    (d / "empty.pt").write_bytes(b"")
    torch.save(DigitsCNN(), d / "pickled.pt")
    torch.save(DigitsCNN().state_dict(), d / "sd.pt")
    return d


@pytest.mark.parametrize("args,words", [
    (["missing.pt"], ["not found"]),
    (["truncated.ts"], ["truncated or corrupt"]),
    (["corrupt.pt"], ["truncated or corrupt"]),
    (["empty.pt"], ["empty"]),
    (["pickled.pt"], ["--trust-pickle", "runs code"]),
    (["sd.pt"], ["--arch"]),
    (["sd.pt", "--arch", "nomodule_xyz:f"], ["cannot import"]),
    (["sd.pt", "--arch", "tests.models"], ["pkg.module:factory"]),
    (["sd.pt", "--arch", "tests.models:nothing"], ["no callable"]),
    (["torchvision:resnet19"], ["unknown torchvision model", "resnet18"]),
    (["torchvision:resnet18", "--input-shape", "1,3,224"], ["cannot capture", "--input-shape"]),
    (["torchvision:resnet18", "--input-shape", "a,b"], ["--input-shape"]),
])
def test_cli_bad_input_is_one_line_exit_2(files, args, words):
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    proc = run_cli("inspect", *[str(files / a) if a.endswith((".pt", ".ts")) else a for a in args], cwd=root)
    assert_one_line_error(proc, *words)


def test_cli_inspect_resnet18_acceptance():
    proc = run_cli("inspect", "torchvision:resnet18", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert len(d["layers"]) == 21
    assert sum(1 for layer in d["layers"] if layer["op"] == "conv") == 20
    assert abs(d["total_macs"] - 1.814e9) / 1.814e9 < 1e-3
    assert abs(d["total_params"] - 11.69e6) / 11.69e6 < 1e-3
    by_name = {layer["name"]: layer for layer in d["layers"]}
    for stage in ("layer2", "layer3", "layer4"):
        assert by_name[f"{stage}.0.conv1"]["act_group"] == by_name[f"{stage}.0.downsample.0"]["act_group"]
    assert set(by_name["layer1.0.conv1"]) >= {"name", "op", "macs", "params", "in_shape", "out_shape", "act_group",
                                              "weight_shape"}


def test_cli_inspect_table_prints():
    proc = run_cli("inspect", "torchvision:resnet18", "--input-shape", "1,3,64,64")
    assert proc.returncode == 0
    assert "layer4.1.conv2" in proc.stdout and "total" in proc.stdout


@pytest.mark.parametrize("name,text,words", [
    ("plan.json", '{"version": 1, "layers": {}}', "is a JSON file"),
    ("model.onnx", "\x08\x0a\x12\x04mpqc", "is an ONNX file"),
    ("target.toml", 'name = "x"', "is a TOML file"),
])
def test_a_file_that_is_not_a_model_is_named_for_what_it_is(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=words):
        load_model(str(path))


def test_a_model_of_two_inputs_is_named_as_unsupported_not_as_bad_data():
    from mpqc.compiler.data import load_data
    from mpqc.compiler.loading import LoadedModel, fit_to_data

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)

        def forward(self, x, y):
            return self.a(x.flatten(1)) + self.b(y.flatten(1))

    x = torch.randn(1, 1, 8, 8)
    loaded = LoadedModel(TwoInputs().eval(), (x, x), "two")
    with pytest.raises(UserError, match="takes 2 inputs.*not supported yet"):
        fit_to_data(loaded, load_data("digits"), "digits")
