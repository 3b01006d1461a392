"""Compile a model for a target: capture, sensitivity, search, fine-tune, export, evaluate and report.

Every stage writes its artifact into OUTDIR with a manifest (content hashes, options, versions, timings);
a re-run reuses the stages whose inputs did not change, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse

from ._common import add_model_arguments

HELP = "the whole pipeline, with a report"
OPTIONS_FILE = True  # --config FILE holds these options (commands/config_file.py); finetune's --config differs


def add_arguments(p) -> None:
    from .search import add_budget_arguments, add_search_options

    add_model_arguments(p, optional=True)
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of these options, keyed by their long names (avg-bits = \"W3A3\", model = "
                        "\"m.pt\"); the command line overrides it. Every compile writes OUTDIR/compile.toml")
    p.add_argument("--target", help="built-in target name or a .toml file (required)")
    p.add_argument("--data", metavar="SPEC", help="digits, cifar10:DIR, imagefolder:DIR or npz:FILE (required)")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="directory for every artifact (required)")
    add_budget_arguments(p)
    add_search_options(p)
    p.add_argument("--sensitivity", default="fisher",
                   choices=("fisher", "hutchinson", "impq", "eval", "limpq", "dual", "analog"),
                   help="sensitivity method (default fisher; analog targets use the analog noise method)")
    p.add_argument("--samples", type=int, default=256, help="data samples for the sensitivity pass")
    p.add_argument("--probe-steps", type=int, default=100,
                   help="--weight-alpha auto: batches of each of the three probe fine-tunings (default 100)")
    p.add_argument("--learn-steps", type=int, default=300,
                   help="--search learned (analog): batches of 64 images of log-E training (default 300)")
    t = p.add_argument_group("fine-tuning and export")
    t.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3; 0 = calibrate only)")
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd",
                   help="fine-tuning optimizer (sgd: Nesterov momentum)")
    t.add_argument("--batch-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="LSQ, PD-QAT: normalise the BN-folded convs with batch statistics while fine-tuning, folded "
                        "back afterwards (default on)")
    t.add_argument("--deploy-tail", type=float, default=0.0, metavar="F",
                   help="LSQ: the last fraction F of the fine-tuning steps trains with the conv biases rounded "
                        "onto the int32 grid the export writes (default 0 = off; e.g. 0.1)")
    t.add_argument("--residual-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="fine-tune with the 8-bit quantizers the --profile puts on residual-add inputs, so the "
                        "export computes what was trained (default on)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--finetune-method", choices=("lsq", "pdqat", "energy", "dxmax"),
                   help="default: lsq; analog targets: noise-aware training at the planned energies")
    t.add_argument("--profile", choices=("ort", "trt", "qcdq"), default="ort", help="QDQ export profile")
    p.add_argument("--stop-after", choices=("capture", "sensitivity", "search", "finetune", "export", "evaluate",
                                             "report"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto",
                   help="where sensitivity, fine-tuning and evaluation run: auto (CUDA when available), cpu, cuda")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads of PyTorch and onnxruntime (default: one per core); on a CPU shared with "
                        "other work, fewer run faster (README, Limits)")


def run(args):
    import mpqc

    from .config_file import require

    require(args, "model", "target", "data", "output")
    res = mpqc.compile(
        args.model, target=args.target, data=args.data, out=args.output, arch=args.arch, weights=args.weights,
        trust_pickle=args.trust_pickle, input_shape=args.input_shape, bitops=args.bitops, avg_bits=args.avg_bits,
        size=args.size, compression=args.compression, act_mem=args.act_mem, act_mem_max=args.act_mem_max,
        latency=args.latency, lut=args.lut, energy=args.energy, emac=args.emac, sensitivity=args.sensitivity,
        granularity=args.granularity, clusters=args.clusters, candidates=args.candidates, fix=tuple(args.fix),
        weight_alpha=args.weight_alpha, probe_steps=args.probe_steps, monotone=args.monotone,
        act_groups=args.act_groups, solver=args.solver,
        time_limit=args.time_limit, search=args.search, learn_steps=args.learn_steps, pareto=args.pareto,
        epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, batch_stats=args.batch_stats,
        deploy_tail=args.deploy_tail, residual_quant=args.residual_quant,
        batch_size=args.batch_size, finetune_method=args.finetune_method, profile=args.profile, seed=args.seed,
        stop_after=args.stop_after, samples=args.samples, progress=not args.json,
        device=args.device, threads=args.threads)
    if not args.json:
        from mpqc.compiler.summary import print_summary

        print_summary(res)
    return res.to_dict()
