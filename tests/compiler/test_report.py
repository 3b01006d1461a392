"""compiler/report.py: the fine-tuning section names the deploy tail when a run used it; the search section says
how close to optimal the plan is, how that was proved, and the search's warnings."""

from mpqc.compiler.report import _finetune_html, _parity_html, _run_html, _search_html


def test_finetune_section_reports_the_deploy_tail_only_when_used():
    base = {"epochs": 3, "method": "lsq", "final_accuracy": 91.5}
    tail = {"from_step": 90, "steps": 10, "form": "stats", "biases_on_grid": 19}
    with_tail = _finetune_html({**base, "deploy_tail": tail})
    assert "The last 10 steps trained against the exported bias rounding" in with_tail
    assert "19 conv and linear biases" in with_tail and "folded" not in with_tail
    assert "batch statistics folded, 19" in _finetune_html({**base, "deploy_tail": {**tail, "form": "folded"}})
    assert "bias rounding" not in _finetune_html(base) and "3 epochs of lsq" in _finetune_html(base)
    assert _finetune_html({"epochs": 0}) == ""


def test_search_section_says_how_the_plan_was_proved_and_lists_the_warnings():
    base = {"name": "mckp-coupled", "objective": 1.2, "time_s": 0.36, "binaries": 5026, "groups": 718}
    proof = {"tried_act_choices": 5, "local_moves": 0, "branch_nodes": 2, "root_gap": 0.00348}
    page = _search_html({**base, "status": "optimal", "gap": 4.3e-4, "proof": proof}, [])
    assert "mckp-coupled: optimal, within 0.043 % of the best possible" in page
    assert "knapsack left by 5 activation choices" in page and "local search" not in page
    assert "expanded 2 nodes (the bound before branching left 0.348 %)" in page and "Warnings" not in page
    warned = _search_html({**base, "status": "feasible", "gap": 0.0111, "proof": {"tried_act_choices": 3}},
                          ["the search stopped before proving <its> plan optimal"])
    assert "feasible, not proved optimal: within 1.11 %" in warned and "branch-and-bound" not in warned
    assert "left by 3 activation choices" in warned
    one = _search_html({**base, "status": "optimal", "gap": 0.0,
                        "proof": {"tried_act_choices": 1, "local_moves": 1}}, [])
    assert "left by 1 activation choice, a local search moved 1 activation width." in one
    assert "<li>the search stopped before proving &lt;its&gt; plan optimal</li>" in warned
    layer = _search_html({**base, "name": "highs", "status": "optimal", "gap": 0.0}, [])
    assert "highs: optimal (" in layer and "decomposition" not in layer
    assert _search_html({}, ["x"]) == ""


def test_the_export_check_and_the_options_the_compile_ran_with_are_on_the_page(tmp_path):
    parity = {"samples": 256, "lsb": 0.0064, "lsb_source": "int8 step", "min_top1": 0.995, "threshold": 0.995,
              "passed": True, "modes": [{"mode": "no-opt", "top1_agreement": 1.0, "err_max_lsb": 0.0,
                                         "err_mean_lsb": 0.0, "exact_fraction": 1.0},
                                        {"mode": "opt", "top1_agreement": 0.9961, "err_max_lsb": 1.5,
                                         "err_mean_lsb": 0.01, "exact_fraction": 0.93}]}
    page = _parity_html(parity)
    assert "on 256 held-out samples: passed" in page and "<td>opt</td><td>99.61</td><td>1.5</td>" in page
    assert "failed" in _parity_html({**parity, "passed": False}) and _parity_html(None) == ""
    assert _run_html(str(tmp_path)) == ""
    (tmp_path / "compile.toml").write_text('avg-bits = "W3A3"\nfix = ["conv1=<8>"]\n')
    run = _run_html(str(tmp_path))
    assert f"mpqc compile --config {tmp_path}/compile.toml" in run
    assert 'avg-bits = &quot;W3A3&quot;' in run and "conv1=&lt;8&gt;" in run  # escaped, as written
