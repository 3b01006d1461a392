"""FinetuneConfig: validation raises ValueError, TOML and dict round trips are exact, the public API is complete."""

from __future__ import annotations

import dataclasses

import pytest

import mpqc.compiler.finetune as ft
from mpqc.compiler.finetune import (
    DistillConfig,
    DxmaxConfig,
    EnergyConfig,
    EnergyMode,
    FinetuneConfig,
    Method,
    PDQATConfig,
)


def _custom() -> FinetuneConfig:
    return FinetuneConfig(
        epochs=7, lr=0.02, quant_lr=0.001, batch_size=32, optimizer="adamw", momentum=0.5, weight_decay=0.0,
        scheduler="constant", method="dxmax", range_init="percentile", freeze_bn_last_epochs=2, seed=5,
        checkpoint_dir="/tmp/ck", resume=False, ddp=True, device="cpu", eval_batch_size=100, calib_batches=3,
        distill=DistillConfig(enabled=False, temperature=4.0, weight=0.25),
        pdqat=PDQATConfig(eps_layer=1 / 255, eps_out=0.1, dual_lr=0.5, dual_batches=4, normalize=False),
        energy=EnergyConfig(mode="fixed", e_init=50.0, e_target=5.0, penalty=8.0, per_channel=True, noise_seed=3),
        dxmax=DxmaxConfig(weight_kb=70.1, act_kb=8.1, act_mode="sum", penalty_w=1.0, d_range=(2**-10, 0.5)),
    )


@pytest.mark.parametrize("config", [FinetuneConfig(), _custom()], ids=["defaults", "custom"])
def test_config_round_trips_through_toml_and_dict(config, tmp_path):
    assert FinetuneConfig.from_toml(config.to_toml()) == config
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "ft.toml"
    config.save(path)
    assert FinetuneConfig.load(path) == config


def test_strings_become_enums_and_lists_become_tuples():
    c = _custom()
    assert c.method is Method.DXMAX and c.energy.mode is EnergyMode.FIXED
    assert FinetuneConfig.from_dict({"dxmax": {"d_range": [0.001, 1.0]}}).dxmax.d_range == (0.001, 1.0)


@pytest.mark.parametrize("changes", [
    {"epochs": 0}, {"epochs": 2.5}, {"lr": 0.0}, {"lr": float("nan")}, {"batch_size": 0}, {"optimizer": "lion"},
    {"method": "magic"}, {"range_init": "max"}, {"momentum": 1.0}, {"weight_decay": -1.0},
    {"freeze_bn_last_epochs": 6}, {"seed": -1}, {"device": "tpu"}, {"resume": "yes"}, {"version": 2},
    {"distill": {"weight": 1.5}}, {"distill": {"temperature": 0}},
    {"pdqat": {"dual_lr": -0.1}}, {"pdqat": {"dual_batches": 0}}, {"energy": {"e_target": 0.0}},
    {"energy": {"mode": "guess"}}, {"dxmax": {"act_mode": "mean"}}, {"dxmax": {"d_range": [1.0, 0.5]}},
    {"dxmax": {"weight_kb": -3.0}}, {"dxmax": {"min_bits": 1}}, {"dxmax": {"max_bits": 4, "min_bits": 6}},
    {"dxmax": {"budget_from_plan": "yes"}},
], ids=str)
def test_bad_values_raise_value_error(changes):
    with pytest.raises(ValueError):
        FinetuneConfig.from_dict({**FinetuneConfig().to_dict(), **changes})


def test_unknown_keys_and_bad_toml_raise_value_error():
    with pytest.raises(ValueError, match="unknown config key 'epoch'"):
        FinetuneConfig.from_toml("epoch = 3\n")
    with pytest.raises(ValueError, match="unknown key 'eps' in \\[pdqat\\]"):
        FinetuneConfig.from_toml("[pdqat]\neps = 0.1\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        FinetuneConfig.from_toml("epochs = = 3")


def test_config_is_frozen_and_replace_validates():
    c = FinetuneConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.epochs = 3  # type: ignore[misc]
    assert c.replace(epochs=2).epochs == 2
    with pytest.raises(ValueError):
        c.replace(batch_size=-4)


def test_public_api_matches_all():
    exported = {n for n in dir(ft) if not n.startswith("_")} - {"config", "ddp", "driver", "dxmax", "energy",
                                                                   "pdqat", "renorm", "graph_taps", "deploy_tail"}
    assert exported == set(ft.__all__)
    for name in ft.__all__:
        assert getattr(ft, name).__doc__, f"{name} has no docstring"
