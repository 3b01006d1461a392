"""bench_pareto_coupled: its options are checked before any work (one line, exit 2)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("args, says", [
    (["--points", "1"], "--points 1 must be >= 2"),
    (["--old-limit", "0"], "--old-limit 0.0 must be > 0"),
    (["--points", "x"], "invalid int value"),
])
def test_bad_options_are_one_line_errors(args, says):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_pareto_coupled.py"), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not r.stdout
