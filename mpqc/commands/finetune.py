"""Fine-tune a model to a precision plan: LSQ QAT with distillation, PD-QAT, energy training or learned d/x_max.

The model is captured with BatchNorm folded into the convolutions (what the integer graph computes), the plan's
quantizers are inserted and calibrated on the calibration split, then trained; the QuantizedModel's state dict,
the profile it was trained for and each quantizer's precision (``{"model", "trained_for", "precision"}``) are
written atomically to -o. A checkpoint is kept after every epoch (default: OUTPUT.ckpt/); running the same
command again after an interruption resumes from it (--no-resume starts over; other settings start afresh).
With --method dxmax the bits are learned and with --method energy the energy per MAC: the updated plan is
written next to -o as OUTPUT.plan.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from mpqc.errors import UserError

from ._common import add_model_arguments

HELP = "fine-tune the quantized model to a plan (QAT), with checkpoints and resume"

_METHODS = ("lsq", "pdqat", "energy", "dxmax")


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--plan", required=True, metavar="PLAN.json", help="the precision plan (from `mpqc search`)")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="digits, cifar10:DIR, imagefolder:DIR or npz:FILE")
    p.add_argument("--config", metavar="FILE.toml", help="fine-tuning settings (options below override them)")
    p.add_argument("--epochs", type=int, help="training epochs (default 5)")
    p.add_argument("--lr", type=float, help="learning rate of weights and step sizes (default 0.005)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 64)")
    p.add_argument("--method", choices=_METHODS, help="lsq (default), pdqat, energy or dxmax")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                   help="distil from the float model (default on)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the last checkpoint when there is one (default on)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="where last.pt is kept (default OUTPUT.ckpt)")
    p.add_argument("--seed", type=int, help="seed of data order, augmentation and noise (default 0)")
    p.add_argument("--ddp", action="store_true", help="data-parallel when launched with torchrun")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--profile", choices=("ort", "trt", "qcdq"), default="ort",
                   help="the export profile to train for: its 8-bit residual-add quantizers are trained with the "
                        "model (ort: every add input; trt: all but the fused conv output; qcdq: none; default ort), "
                        "and for trt unsigned 8-bit activations train as the 7 bits TensorRT carries them in; "
                        "`mpqc export --checkpoint` reads the profile from the file")
    p.add_argument("--residual-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="train the profile's residual-add quantizers (default on)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_Q.pt",
                   help="where the fine-tuned QuantizedModel state dict (and its profile) is written")


def _config(args):
    from mpqc.compiler.finetune import FinetuneConfig

    try:
        config = FinetuneConfig.load(args.config) if args.config else FinetuneConfig()
    except OSError as e:
        raise UserError(f"--config {args.config}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"--config {args.config}: {e}") from None
    changes = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size),
                                 ("method", args.method), ("resume", args.resume), ("seed", args.seed),
                                 ("checkpoint_dir", args.checkpoint_dir)) if v is not None}
    if args.ddp:
        changes["ddp"] = True
    if config.checkpoint_dir is None and "checkpoint_dir" not in changes:
        changes["checkpoint_dir"] = os.path.abspath(args.output) + ".ckpt"
    if args.distill is not None:
        changes["distill"] = dataclasses.replace(config.distill, enabled=args.distill)
    try:
        return config.replace(**changes)
    except ValueError as e:
        raise UserError(f"bad fine-tuning setting: {e}") from None


def run(args):
    import torch

    from mpqc.atomic import atomic_write_with, check_output_file
    from mpqc.compiler.capture import capture
    from mpqc.compiler.data import load_data, make_loader
    from mpqc.compiler.finetune import accuracy, apply_plan, finetune
    from mpqc.compiler.loading import fit_to_data, image_size, load_model
    from mpqc.compiler.plan import Plan, plan_after_finetune
    from mpqc.compiler.quantize import QuantizedModel, RangeMethod

    config = _config(args)
    check_output_file(args.output, "model_q.pt")
    plan = Plan.load(args.plan)
    loaded = load_model(args.model, arch=args.arch, weights=args.weights, trust_pickle=args.trust_pickle,
                        input_shape=args.input_shape)
    data = load_data(args.data, image_size=image_size(loaded.input_shape), input_rank=len(loaded.input_shape))
    fit_to_data(loaded, data, args.data, shape_given=args.input_shape is not None)
    teacher = loaded.module
    cap = capture(teacher, loaded.example_inputs, fold_bn=True)
    method = RangeMethod(config.range_init.value)
    q = QuantizedModel(cap, act_groups=plan.act_groups_mode, method=method)
    try:
        emac = apply_plan(q, plan)
    except KeyError as e:
        raise UserError(f"--plan {args.plan}: {e.args[0]}; was it made for this model?") from None
    except ValueError as e:
        raise UserError(f"--plan {args.plan}: {e}") from None
    from mpqc.compiler.deploy_grid import fit_to_profile, model_checkpoint

    fit_to_profile(q, args.profile, residual_quant=args.residual_quant)
    q.calibrate(make_loader(data.calib, config.eval_batch_size), method=method, max_batches=config.calib_batches)
    calibrated = accuracy(q, data.val, batch_size=config.eval_batch_size)
    try:
        result = finetune(q, teacher, data, config, progress=not (args.json or args.no_progress),
                          emac=emac or None)
    except (ValueError, FloatingPointError) as e:
        raise UserError(str(e)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 writes and reports
    atomic_write_with(args.output, lambda tmp: torch.save(
        model_checkpoint(q, args.profile, args.residual_quant), tmp))
    plan_out = None
    if result.bits or result.emac:
        plan_out = os.path.splitext(args.output)[0] + ".plan.json"
        plan_after_finetune(plan, q, result, config.method.value).save(plan_out)
    last = result.metrics[-1] if result.metrics else {}
    if not args.json:
        print(f"{config.method.value}: {len(result.metrics)} epochs, val accuracy {calibrated:.2f}% calibrated -> "
              f"{result.final_accuracy:.2f}% fine-tuned; wrote {args.output}"
              + (f" and {plan_out}" if plan_out else ""))
    summary = {k: v for k, v in result.summary.items() if k not in ("history",)}
    return {"output": os.path.abspath(args.output), "plan": plan_out, "method": config.method.value,
            "epochs": len(result.metrics), "calibrated_accuracy": calibrated,
            "final_accuracy": result.final_accuracy, "resumed_from": result.resumed_from,
            "checkpoint": result.checkpoint, "last_epoch": last, "summary": summary}
