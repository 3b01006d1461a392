"""Export a model at a plan's precision as QDQ ONNX (onnxruntime, TensorRT or QCDQ layout) or a TensorRT engine.

The model is captured with BatchNorm folded, the plan's quantizers are inserted and calibrated on --data's
calibration split (or a fine-tuned state dict from `mpqc finetune` is loaded with --checkpoint), the QDQ file is
exported, checked in onnxruntime against the fake-quant model on held-out samples (graph optimisations on and
off; --no-check skips it), written atomically, and its onnxruntime latency is compared with the fp32 export.
`--profile trt` files are validated against TensorRT's explicit-quantization rules; `--format tensorrt` builds an
engine (TensorRT and an NVIDIA GPU needed) and lists layers that silently fell back to another precision.
"""

from __future__ import annotations

import argparse
import os

from mpqc.atomic import check_output_file
from mpqc.errors import UserError, first_line

from ._common import add_model_arguments

HELP = "export QDQ ONNX (or a TensorRT engine) at a plan's precision, with parity and speed checks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--plan", required=True, metavar="PLAN.json", help="the precision plan (from `mpqc search`)")
    p.add_argument("--checkpoint", metavar="MODEL_Q.pt",
                   help="fine-tuned QuantizedModel state dict (from `mpqc finetune`); default: calibrate")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="output format (default onnx)")
    p.add_argument("--profile", choices=("ort", "trt", "qcdq"),
                   help="QDQ layout: ort (onnxruntime), trt (TensorRT rules) or qcdq (Brevitas-style); "
                        "default: the one --checkpoint was fine-tuned for, else ort (trt with --format tensorrt)")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="calibration and held-out samples: digits, cifar10:DIR, imagefolder:DIR or npz:FILE")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the .onnx file (or the engine) to write")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--samples", type=int, default=512, help="held-out samples for the parity check (default 512)")
    p.add_argument("--no-speed", action="store_true", help="skip the latency comparison with fp32")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads for the latency comparison")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (>= 21; default 21)")


def _check_args(args) -> str:
    profile = args.profile or ("trt" if args.format == "tensorrt" else "ort")
    if args.format == "tensorrt" and profile != "trt":
        raise UserError(f"--format tensorrt needs --profile trt, not {profile}")
    if args.samples < 1:
        raise UserError(f"--samples {args.samples}: give at least 1 held-out sample")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    if args.opset < 21:
        raise UserError(f"--opset {args.opset}: QDQ export needs opset >= 21 (int4 and blocked Q/DQ)")
    check_output_file(args.output, "model.onnx")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: file not found")
    return profile


def _load_checkpoint(qm, path: str, profile: str, *, fixed: bool = True) -> str:
    """Load a fine-tuned QuantizedModel state dict (raw, or inside a fine-tuning checkpoint); returns the profile
    to export with: the one the checkpoint was trained for when it records one and ``fixed`` (the user named a
    profile or a TensorRT engine) is off."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"--checkpoint {path}: not a readable state dict ({first_line(e)})") \
            from None
    grid = obj.get("trained_for") if isinstance(obj, dict) else None
    precision = obj.get("precision") if isinstance(obj, dict) else None
    midway = isinstance(obj, dict) and "optimizer" in obj and "epoch" in obj  # finetune_ckpt/last.pt
    if isinstance(obj, dict):
        obj = obj.get("model", obj.get("state_dict", obj))
    if midway and isinstance(obj, dict) and any(".renorm." in k or k.startswith("gm.renorm") for k in obj):
        raise UserError(f"--checkpoint {path} is a fine-tuning run's own checkpoint, its batch statistics not yet "
                        "folded into the weights; export the model the run writes at its end (model_q.pt, or "
                        "mpqc finetune -o FILE), resuming the run to finish it if it was cut off")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--checkpoint {path}: does not hold a state dict of the quantized model")
    trained_rq = {k.split(".")[1] for k in obj if k.startswith("rq.")}
    if isinstance(grid, dict):  # it says which grid it was trained on: rebuild exactly that one
        from mpqc.compiler.deploy_grid import fit_to_profile

        if grid.get("profile") != profile and not fixed and grid.get("profile") in ("ort", "trt", "qcdq"):
            profile = grid["profile"]
        if grid.get("profile") != profile:
            raise UserError(f"--checkpoint {path} was fine-tuned for --profile {grid.get('profile')}; export it "
                            f"with that profile, or fine-tune again with --profile {profile}")
        fit_to_profile(qm, profile, residual_quant=bool(grid.get("residual_quant")))
    elif trained_rq:  # older file, fine-tuned with residual-add quantizers: place them the same way
        from mpqc.compiler.residual import quantize_residuals_for

        quantize_residuals_for(qm, profile)
        if set(qm.rq) != trained_rq:
            raise UserError(f"--checkpoint {path} was fine-tuned with the residual-add quantizers of another "
                            f"profile than --profile {profile}; pass the --profile it was fine-tuned with")
    if isinstance(precision, dict):  # older files do not say; their step sizes are loaded as they are
        from mpqc.compiler.finetune.driver import precision_signature

        now = precision_signature(qm)
        other = sorted(k for k in set(now) | set(precision) if now.get(k) != precision.get(k))
        if other:
            raise UserError(f"--checkpoint {path} was fine-tuned at another precision than --plan gives "
                            f"({len(other)} quantizers differ, e.g. {other[0]}); pass the plan it was fine-tuned "
                            "with (mpqc finetune writes a learned one beside it as *.plan.json)")
    own = dict(qm.named_buffers(remove_duplicate=False))
    for name, value in obj.items():  # calibration samples vary in size; resize before loading
        buf = own.get(name)
        if buf is not None and buf.shape != value.shape:
            mod_path, _, leaf = name.rpartition(".")
            setattr(qm.get_submodule(mod_path) if mod_path else qm, leaf, torch.empty_like(value))
    try:
        qm.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        raise UserError(f"--checkpoint {path} does not fit this model and plan "
                        f"({first_line(e)}); was it fine-tuned with the same --plan?") \
            from None
    return profile


def run(args):
    from mpqc.compiler.capture import capture
    from mpqc.compiler.data import load_data, make_loader
    from mpqc.compiler.export import (
        bits_summary,
        check_parity,
        export_qdq,
        reference_vs_trained,
        save_model,
        speed_report,
    )
    from mpqc.compiler.export.qdq import apply_plan
    from mpqc.compiler.loading import fit_to_data, image_size, load_model, parse_input_shape
    from mpqc.compiler.plan import Plan
    from mpqc.compiler.quantize import QuantizedModel

    profile = _check_args(args)
    if args.format == "tensorrt":
        from mpqc.compiler.export.tensorrt_engine import load_tensorrt

        load_tensorrt()  # fail before the slow part when TensorRT is missing
    plan = Plan.load(args.plan)
    # the data comes first here (its shape is a TorchScript model's fallback); pictures take --input-shape's size
    shape = parse_input_shape(args.input_shape)
    rank = len(shape) if shape else None
    if rank is None:  # the model's own shape, where it knows one, says how to lay out a 3-D npz array
        try:
            rank = len(load_model(args.model, arch=args.arch, weights=args.weights,
                                  trust_pickle=args.trust_pickle).input_shape)
        except UserError:
            pass  # a TorchScript file: the data's shape decides
    data = load_data(args.data, image_size=image_size(shape), input_rank=rank)
    loaded = load_model(args.model, arch=args.arch, weights=args.weights, trust_pickle=args.trust_pickle,
                        input_shape=args.input_shape or tuple(data.input_shape))
    fit_to_data(loaded, data, args.data, shape_given=args.input_shape is not None, classifier=False)
    cap = capture(loaded.module, loaded.example_inputs, fold_bn=True)
    qm = QuantizedModel(cap, act_groups=plan.act_groups_mode)
    formats = apply_plan(qm, plan)
    calib = [b[0] for b in make_loader(data.calib, 32)][:8]
    if args.checkpoint:
        profile = _load_checkpoint(qm, args.checkpoint, profile,
                                   fixed=args.profile is not None or args.format == "tensorrt")
    else:
        qm.calibrate(calib)
    exported = export_qdq(qm, profile, calib=calib, formats=formats, opset=args.opset)

    parity = None
    if not args.no_check:
        held_out = data.val.tensors[0][: args.samples]
        parity = check_parity(exported.model, exported.reference, held_out)
        if args.checkpoint and parity.to_dict().get("modes"):  # the trained model beside its deployed form
            parity.notes.append(_gap_note(reference_vs_trained(qm, exported.reference, held_out)))
    outputs = {"onnx": os.path.abspath(args.output)}
    engine_report = None
    if args.format == "tensorrt":
        from mpqc.atomic import atomic_write_bytes, atomic_write_json
        from mpqc.compiler.export.tensorrt_engine import build_engine

        onnx_path = os.path.splitext(args.output)[0] + ".onnx"
        if os.path.abspath(onnx_path) == os.path.abspath(args.output):
            onnx_path += ".qdq.onnx"
        blob, engine_report = build_engine(exported.model)
        save_model(exported.model, onnx_path)
        atomic_write_bytes(args.output, blob)
        atomic_write_json(args.output + ".layers.json", engine_report.to_dict())
        outputs = {"engine": os.path.abspath(args.output), "onnx": os.path.abspath(onnx_path)}
    else:
        save_model(exported.model, args.output)
    speed = None
    if not args.no_speed:
        speed = speed_report(exported.model, exported.float_model, threads=args.threads)

    summary = {"outputs": outputs, "profile": profile, "format": args.format, "opset": args.opset,
               "weights": bits_summary(exported.layers), "notes": exported.notes, "layers": exported.layers,
               "parity": parity.to_dict() if parity else None, "speed": speed,
               "engine": engine_report.to_dict() if engine_report else None}
    if not args.json:
        _print(summary, parity, engine_report)
    return summary


def _gap_note(gap: dict) -> str:
    return (f"deployed form (biases on the integer grid) against the fine-tuned fake-quant model: top-1 agreement "
            f"{100 * gap['top1_agreement']:.1f} % on {gap['samples']} samples, largest output difference "
            f"{gap['max_abs_diff']:.3g}" + ("; --deploy-tail F in fine-tuning trains through it"
                                             if gap["top1_agreement"] < 0.99 else ""))


def _print(summary: dict, parity, engine_report) -> None:
    print(f"wrote {', '.join(summary['outputs'].values())} ({summary['profile']} profile, opset {summary['opset']}; "
          f"weights: {summary['weights']})")
    for note in summary["notes"]:
        print(f"  note: {note}")
    if parity is not None:
        print("parity vs the fake-quant model in onnxruntime:")
        for line in parity.summary().splitlines():
            print(f"  {line}")
    speed = summary["speed"]
    if speed:
        q, f = speed["quantized"], speed["fp32"]
        print(f"onnxruntime latency ({speed['threads']} threads, batch {speed['batch']}, {speed['machine']}): "
              f"quantized {q['median_ms']:.2f} ms, fp32 {f['median_ms']:.2f} ms, speed-up {speed['speedup']:.2f}x")
    if engine_report is not None:
        print(f"TensorRT {engine_report.trt_version}: {len(engine_report.layers)} engine layers, "
              f"{len(engine_report.fallbacks)} silent fallbacks")
        for fb in engine_report.fallbacks:
            print(f"  fallback: {fb.layer} planned {fb.planned}, runs {fb.got} ({fb.engine_layer})")
