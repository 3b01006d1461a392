"""compiler/report.py: the fine-tuning section names the deploy tail when a run used it."""

from mpqc.compiler.report import _finetune_html


def test_finetune_section_reports_the_deploy_tail_only_when_used():
    base = {"epochs": 3, "method": "lsq", "final_accuracy": 91.5}
    tail = {"from_step": 90, "steps": 10, "form": "stats", "biases_on_grid": 19}
    with_tail = _finetune_html({**base, "deploy_tail": tail})
    assert "The last 10 steps trained against the exported bias rounding" in with_tail
    assert "19 conv biases" in with_tail and "folded" not in with_tail
    assert "batch statistics folded, 19" in _finetune_html({**base, "deploy_tail": {**tail, "form": "folded"}})
    assert "bias rounding" not in _finetune_html(base) and "3 epochs of lsq" in _finetune_html(base)
    assert _finetune_html({"epochs": 0}) == ""
