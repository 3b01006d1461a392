"""compiler/report.py: the fine-tuning section names the deploy tail when a run used it."""

from mpqc.compiler.report import _finetune_html


def test_finetune_section_reports_the_deploy_tail_only_when_used():
    base = {"epochs": 3, "method": "lsq", "final_accuracy": 91.5}
    with_tail = _finetune_html({**base, "deploy_tail": {"from_step": 90, "steps": 10, "biases_on_grid": 19}})
    assert "The last 10 steps trained the exported form" in with_tail and "19 conv biases" in with_tail
    assert "exported form" not in _finetune_html(base) and "3 epochs of lsq" in _finetune_html(base)
    assert _finetune_html({"epochs": 0}) == ""
