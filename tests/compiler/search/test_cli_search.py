"""End to end: `mpqc search` on torchvision ResNet-18 with a synthetic table; infeasible budgets exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from mpqc.compiler.plan import Plan

ROOT = Path(__file__).resolve().parents[3]


def _layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def _table(names: list[str], path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    layers = {}
    for n in names:
        bw, ba = rng.lognormal(-2, 1), rng.lognormal(-2, 1)
        layers[n] = {"w": {str(b): bw * 4.0 ** -b for b in range(2, 9)},
                     "a": {str(b): ba * 4.0 ** -b for b in range(2, 9)}}
    path.write_text(json.dumps({"version": 1, "method": "synthetic", "model_hash": "x", "layers": layers}))


def _mpqc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpqc", "search", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_search_resnet18_writes_a_plan_that_meets_the_budgets(tmp_path):
    sens = tmp_path / "sens.json"
    _table(_layers(torchvision.models.resnet18()), sens)
    out = tmp_path / "plan.json"
    r = _mpqc("torchvision:resnet18", "--target", "generic", "--sensitivity", str(sens), "--avg-bits", "W4A8",
              "--compression", "8", "--fix", "conv1=8", "--fix", "fc=8", "-o", str(out), "--pareto", "4", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["status"] == "optimal" and summary["gap"] == 0
    assert set(summary["budgets"]) == {"avg-bits", "compression"}
    for b in summary["budgets"].values():
        assert b["value"] <= b["budget"] * (1 + 1e-9) and b["slack"] >= -1e-9
    plan = Plan.load(out)
    assert (plan.w_bits("conv1"), plan.a_bits("conv1"), plan.w_bits("fc"), plan.a_bits("fc")) == (8, 8, 8, 8)
    assert set(plan.layers) == set(_layers(torchvision.models.resnet18()))
    # consumers of one tensor share its width (tensor mode), e.g. a block input read by conv1 and downsample
    assert plan.a_bits("layer2.0.conv1") == plan.a_bits("layer2.0.downsample.0")
    assert "W4A8" in plan.meta["baselines"] and plan.solver["status"] == "optimal"
    assert Path(summary["pareto"]["csv"]).exists() and Path(summary["pareto"]["png"]).exists()


def test_infeasible_budgets_exit_2_naming_the_smallest_feasible_values(tmp_path):
    from tests.models import DigitsCNN

    weights = tmp_path / "digits.pt"
    torch.save(DigitsCNN().state_dict(), weights)
    sens = tmp_path / "sens.json"
    _table(_layers(DigitsCNN()), sens)
    r = _mpqc(str(weights), "--arch", "tests.models:DigitsCNN", "--target", "generic", "--sensitivity", str(sens),
              "--bitops", "1e-6", "--compression", "10", "-o", str(tmp_path / "p.json"))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "smallest feasible" in err
    assert "--bitops 1e-6 needs >=" in err and "GBOPs (given 1e-06 GBOPs)" in err
    assert "--compression 10: no value works while the other budgets hold" in err
    assert not (tmp_path / "p.json").exists()
    # a bad option value is one line too
    r = _mpqc(str(weights), "--arch", "tests.models:DigitsCNN", "--target", "generic", "--bitops", "-3")
    assert r.returncode == 2 and "--bitops" in r.stderr and r.stderr.strip().count("\n") == 0


def test_relative_budgets_say_what_works_in_their_own_terms(tmp_path):
    """A ratio is told the largest ratio that works, W4A8-style bits the smallest W·A, not a row in MiB or GBOPs."""
    from tests.models import DigitsCNN

    weights = tmp_path / "digits.pt"
    torch.save(DigitsCNN().state_dict(), weights)
    base = (str(weights), "--arch", "tests.models:DigitsCNN", "-o", str(tmp_path / "p.json"))
    r = _mpqc(*base, "--target", "generic", "--compression", "100")
    assert r.returncode == 2, r.stderr
    assert "--compression 100 needs <= " in r.stderr and "x (weights of at least" in r.stderr, r.stderr
    r = _mpqc(*base, "--target", "ort-cpu", "--avg-bits", "W2A2")
    assert r.returncode == 2, r.stderr
    assert "--avg-bits W2A2 needs W·A >= 64 (given 4" in r.stderr and "e.g. --bitops" in r.stderr, r.stderr


def test_a_candidate_width_the_target_lacks_is_named_not_dropped_silently(tmp_path):
    from tests.models import DigitsCNN

    weights = tmp_path / "digits.pt"
    torch.save(DigitsCNN().state_dict(), weights)
    r = _mpqc(str(weights), "--arch", "tests.models:DigitsCNN", "--target", "generic", "--avg-bits", "W4A4",
              "--candidates", "9,4", "-o", str(tmp_path / "p.json"), "--json")
    assert r.returncode == 0, r.stderr
    said = [w for w in json.loads(r.stdout)["warnings"] if w.startswith("--candidates")]
    assert said and "no layer at 9 bits" in said[0] and " 4," not in said[0].split("(")[0], said


def test_an_act_mem_max_budget_is_reported_with_the_others(tmp_path):
    """It is met by leaving wide options out rather than by a row of the ILP; the plan still says how close it is."""
    from tests.models import DigitsCNN

    weights = tmp_path / "digits.pt"
    torch.save(DigitsCNN().state_dict(), weights)
    r = _mpqc(str(weights), "--arch", "tests.models:DigitsCNN", "--target", "generic", "--act-mem-max", "0.3",
              "-o", str(tmp_path / "p.json"), "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["budgets"]["act-mem-max"]
    assert row["budget"] == 0.3 and 0 < row["value"] <= 0.3 and row["slack"] == pytest.approx(0.3 - row["value"])
    assert Plan.load(tmp_path / "p.json").costs["budget:act-mem-max"]["value"] == row["value"]
