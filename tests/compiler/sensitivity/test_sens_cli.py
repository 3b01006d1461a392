"""`mpqc sensitivity`: a run on the digits CNN saved as a state dict, the cache, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mpqc.cli import main
from mpqc.commands.sensitivity import METHOD_NAMES
from mpqc.compiler.sensitivity import METHODS, SensitivityTable
from mpqc.compiler.zoo import digits_cnn, resnet20


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "digits.pt"
    torch.save(digits_cnn().state_dict(), path)
    return str(path)


def _args(model, out, *extra):
    return ["sensitivity", model, "--arch", "mpqc.compiler.zoo:digits_cnn", "--data", "digits", "-o", str(out),
            *extra]


def test_cli_writes_a_table_and_reuses_the_cache(state_dict, tmp_path, capsys):
    out = tmp_path / "sens.json"
    cache = tmp_path / "cache"
    assert main(_args(state_dict, out, "--candidates", "4,2", "--samples", "64", "--cache-dir", str(cache),
                      "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "fisher" and summary["layers"] == 5 and summary["cached"] is False
    assert summary["candidates"] == [4, 2] and len(summary["most_sensitive"]) == 5
    table = SensitivityTable.load(out)
    assert set(table.layers) == {"conv1", "conv2", "conv3", "conv4", "fc"}
    assert set(table.layers["conv2"].w) == {4, 2}

    assert main(_args(state_dict, out, "--candidates", "4,2", "--samples", "64", "--cache-dir", str(cache),
                      "--json", "--monotone")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cached"] is True and summary["monotone_repairs"] is not None


def test_cli_prints_a_table_and_takes_method_options(state_dict, tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(_args(state_dict, out, "--method", "hutchinson", "--candidates", "2", "--samples", "32",
                      "--option", "probes=4", "--option", "min_probes=2", "--no-cache")) == 0
    text = capsys.readouterr().out
    assert "conv2" in text and "w2" in text
    assert SensitivityTable.load(out).options["probes"] == 4


@pytest.mark.parametrize("extra, words", [
    (["--candidates", "8,x"], "--candidates"),
    (["--candidates", "9,1"], "outside 2..16"),
    (["--method", "analog"], "--target"),
    (["--method", "analog", "--target", "nosuch"], "nosuch"),
    (["--option", "probes"], "KEY=VALUE"),
    (["--option", "probes=3"], "no option 'probes'"),
    (["--method", "eval", "--granularity", "channel"], "granularity layer"),
    (["--samples", "0"], "--samples"),
])
def test_bad_input_is_one_line_and_exit_2(state_dict, tmp_path, capsys, extra, words):
    assert main(_args(state_dict, tmp_path / "x.json", "--no-cache", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mpqc: error:") and words in err, err


def test_bad_model_and_data_exit_2(state_dict, tmp_path, capsys):
    assert main(["sensitivity", str(tmp_path / "none.pt"), "--data", "digits", "-o", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sensitivity", state_dict, "--arch", "mpqc.compiler.zoo:digits_cnn", "--data", "mnist",
                 "-o", str(tmp_path / "x")]) == 2
    assert "unknown data set" in capsys.readouterr().err


def test_data_that_does_not_fit_the_model_is_one_line_before_any_work(tmp_path, capsys):
    """A 3-channel CIFAR model scored on 1-channel digits once died in capture's shape guard with a traceback."""
    torch.manual_seed(0)
    model = tmp_path / "r20.pt"
    torch.save(resnet20().state_dict(), model)
    out = tmp_path / "x.json"
    assert main(["sensitivity", str(model), "--arch", "mpqc.compiler.zoo:resnet20", "--data", "digits",
                 "-o", str(out), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "does not fit the model's input [3, 32, 32]" in err and "[1, 8, 8]" in err, err
    assert not out.exists()

    # an explicit --input-shape that disagrees with the data names both
    assert main(["sensitivity", str(model), "--arch", "mpqc.compiler.zoo:resnet20", "--data", "digits",
                 "--input-shape", "1,3,32,32", "-o", str(out), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--input-shape 1,3,32,32" in err and "[1, 8, 8]" in err, err


def test_unknown_method_is_an_argparse_error_in_a_subprocess(state_dict, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpqc", "sensitivity", state_dict, "--data", "digits",
                           "--method", "magic", "-o", str(tmp_path / "x")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "magic" in err and "Traceback" not in err


def test_method_names_match_the_registry():
    assert tuple(METHODS) == METHOD_NAMES


def test_search_warns_when_the_table_was_measured_on_other_weights(state_dict, tmp_path, capsys):
    """Same architecture, other weights: the layer names match, so only the table's model hash can tell."""
    out = tmp_path / "sens.json"
    assert main(_args(state_dict, out, "--samples", "64")) == 0
    torch.manual_seed(7)
    other = tmp_path / "other.pt"
    torch.save(digits_cnn().state_dict(), other)
    capsys.readouterr()
    said = {}
    for name, model in (("same", state_dict), ("other", str(other))):
        assert main(["search", model, "--arch", "mpqc.compiler.zoo:digits_cnn", "--target", "bitserial",
                     "--avg-bits", "W4A4", "--sensitivity", str(out), "-o", str(tmp_path / f"{name}.json"),
                     "--json"]) == 0
        said[name] = [w for w in json.loads(capsys.readouterr().out)["warnings"] if "other weights" in w]
    assert not said["same"] and said["other"] and "run mpqc sensitivity" in said["other"][0]
