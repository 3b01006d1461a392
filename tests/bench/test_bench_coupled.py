"""bench_coupled: its inputs are checked before any work, and a run prints one row per problem the
decomposition's tries leave unproved plus a summary that counts every problem (ResNet-20 with synthetic scores)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpqc.compiler.search.problem import read_sensitivity  # noqa: F401 - the package must import
from tests.compiler.search.helpers import synthetic_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_coupled.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import json

    from mpqc.compiler.capture import capture
    from mpqc.compiler.zoo import resnet20

    d = tmp_path_factory.mktemp("coupled")
    torch.manual_seed(0)
    model = resnet20().eval()
    torch.save(model.state_dict(), d / "fp.pt")
    graph = capture(model, (torch.zeros(1, 3, 32, 32),), fold_bn=True).graph
    (d / "t.json").write_text(json.dumps(synthetic_table(graph, (8, 6, 5, 4, 3, 2), np.random.default_rng(5),
                                                         channels=True)))
    return d


@pytest.mark.parametrize("args, says", [
    (["--plans", "W9Z"], "--plans: 'W9Z' is not of the form"),
    (["--alphas", "x"], "--alphas 'x'"),
    (["--alphas", "0.4,-1"], "each must be > 0"),
    (["--gap", "2"], "--gap 2"),
    (["--size-kb", "-1"], "--size-kb -1"),
    (["--mip-seconds", "0"], "--mip-seconds 0"),
])
def test_bad_options_are_one_line_errors(files, args, says):
    r = _bench("--model", str(files / "fp.pt"), "--tables", str(files / "t.json"), *args, timeout=120)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and not r.stdout


def test_a_missing_table_or_model_is_a_one_line_error(files, tmp_path):
    r = _bench("--model", str(files / "fp.pt"), "--tables", str(tmp_path / "nope.json"), timeout=120)
    assert r.returncode == 2 and "--tables" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _bench("--model", str(tmp_path / "nope.pt"), "--tables", str(files / "t.json"), timeout=120)
    assert r.returncode == 2 and "not a ResNet-20 state dict" in r.stderr, r.stderr


def test_a_run_counts_every_problem_and_rows_only_the_unproved(files):
    """These scores at the W2A2 BitOPs leave the decomposition's tries 1.1 % short of their bound, at W3A3 they do
    not; on the W2A2 one the branch-and-bound finds a better plan and proves it, where the MIP's 2 s do not."""
    r = _bench("--model", str(files / "fp.pt"), "--tables", str(files / "t.json"), "--plans", "W2A2,W3A3",
               "--alphas", "0.151", "--size-kb", "0", "--mip-seconds", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in r.stdout.splitlines()
            if line.startswith("| t |")]
    assert r.stdout.strip().splitlines()[-1].startswith("2 problems; 1 proved by the decomposition's tries"), r.stdout
    assert len(rows) == 1 and rows[0][1] == "W2A2 BitOPs", r.stdout
    status, gap = rows[0][3].split(", ")
    assert status == "optimal" and float(gap.rstrip(" %")) <= 0.1
    moves, knapsacks = rows[0][5].split(", ")
    assert int(knapsacks) >= int(moves)  # the local search's knapsacks, each move among them
    nodes, root_gap = rows[0][6].split(", ")
    assert int(nodes) >= 1 and float(root_gap.rstrip(" %")) > 0.1  # the root bound alone did not prove it
    old_solver, old_gap = rows[0][7].split(", ")
    assert old_solver == "highs feasible" and float(old_gap.rstrip(" %")) > 0.1  # the previous path went on to the MIP
    assert float(rows[0][9]) <= 1.001  # proved within 0.1 %: no worse than what the MIP found
