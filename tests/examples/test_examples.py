"""examples/: every file there is checked or run here, so the examples work with the code beside them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpqc.cli import build_parser, main
from mpqc.commands.config_file import apply_config, require
from mpqc.targets import load_target

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TOMLS = sorted(EXAMPLES.glob("*.toml"))
CONFIGS = [p for p in TOMLS if "target" in tomllib.loads(p.read_text())]  # a target file has no target key
TARGETS = [p for p in TOMLS if p not in CONFIGS]
ARCH = "mpqc.compiler.zoo:digits_cnn"


def _compile_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["compile"]


@pytest.fixture
def model(digits_cnn_file):
    return digits_cnn_file


def test_the_examples_folder_lists_every_file_it_holds():
    listed = (EXAMPLES / "README.md").read_text()
    files = [p.name for p in EXAMPLES.iterdir() if p.name != "README.md"]
    assert files and CONFIGS and TARGETS
    assert [f for f in files if f"`{f}`" not in listed] == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_compile_config_passes_the_commands_own_checks(path, monkeypatch):
    """What `mpqc compile --config` checks before it starts: known keys, values the options take, the required
    ones present, and a target that loads (a built-in name or a file beside it)."""
    monkeypatch.chdir(ROOT)
    p = _compile_parser()
    args = p.parse_args(["--config", str(path)])
    apply_config(p, [], args)
    require(args, "model", "target", "data", "output")
    assert load_target(args.target).name
    assert args.avg_bits or args.bitops or args.emac  # each example sets a budget


@pytest.mark.parametrize("path", TARGETS, ids=lambda p: p.name)
def test_every_target_example_loads(path):
    t = load_target(str(path))
    assert t.weight_bits and t.act_bits


def test_the_edge_npu_plan_keeps_to_its_rules_and_its_energy_budget(model, tmp_path, capsys):
    """The custom target's rules reach the plan: 4/8-bit widths only, the fc at 8-bit activations (its only
    rule), the first layer fixed at 8 bits, and the energy row within its limit."""
    plan_path = tmp_path / "plan.json"
    assert main(["search", str(model), "--arch", ARCH, "--target", str(EXAMPLES / "edge_npu.toml"), "--energy",
                 "0.1uJ", "--granularity", "channel", "-o", str(plan_path), "--json"]) == 0
    capsys.readouterr()
    plan = json.loads(plan_path.read_text())
    layers = {name: {**lay, "w_bits": lay["w_bits"] if isinstance(lay["w_bits"], list) else [lay["w_bits"]]}
              for name, lay in plan["layers"].items()}
    widths = {b for lay in layers.values() for b in lay["w_bits"]}
    assert widths <= {4, 8} and 4 in widths  # the budget binds somewhere
    assert {lay["a_bits"] for lay in layers.values()} <= {4, 8} and layers["fc"]["a_bits"] == 8
    first = layers[next(iter(layers))]
    assert first["a_bits"] == 8 and set(first["w_bits"]) == {8}
    row = plan["costs"]["budget:energy"]
    assert row["budget"] == pytest.approx(1e5) and row["value"] <= row["budget"] * (1 + 1e-9)  # 0.1 uJ in pJ


def test_the_digits_example_compiles_with_the_command_line_overriding_it(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # its target path is relative to the repository root, as its comment says
    out = tmp_path / "out"
    assert main(["compile", "--config", "examples/digits_edge_npu.toml", str(model), "--epochs", "1",
                 "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metrics"]["accuracy"]["exported ONNX (onnxruntime)"] is not None
    ran = tomllib.loads((out / "compile.toml").read_text())
    assert ran["epochs"] == 1 and ran["model"] == str(model)  # the command line
    assert ran["target"] == "examples/edge_npu.toml" and ran["granularity"] == "channel"  # the file
    plan = json.loads((out / "plan.json").read_text())
    assert any(isinstance(lay["w_bits"], list) for lay in plan["layers"].values())  # kernel-wise


def test_the_stages_script_runs_each_stage_on_the_files_of_the_one_before(model, tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "mpqc").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mpqc "$@"\n')
    (shim / "mpqc").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "stages"
    proc = subprocess.run(["bash", str(EXAMPLES / "stages.sh"), str(model), str(out)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("sens.json", "plan.json", "model_q.pt", "model.onnx"):
        assert (out / f).stat().st_size > 0, f
    assert "parity vs the fake-quant model" in proc.stdout  # export checked it (a failed check exits non-zero)
