"""`mpqc compile`: capture → sensitivity → search → fine-tune → export → evaluate → report, one straight line.

Each stage writes its artifact into OUT and records it in OUT/manifest.json (content hashes, options,
versions, time); a re-run reuses every stage whose inputs did not change, so a killed run resumes where
it stopped (fine-tuning also resumes mid-stage from its per-epoch checkpoint). NOTE: stage order matters:
the search reads the sensitivity table, fine-tuning reads the plan, export reads the fine-tuned state.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from mpqc.atomic import atomic_write_json, atomic_write_text, atomic_write_with, check_output_dir, ensure_dir
from mpqc.errors import UserError, out_of_memory_summary

from .devices import resolve_device
from .manifest import Manifest

log = logging.getLogger(__name__)

STAGES = ("capture", "sensitivity", "search", "finetune", "export", "evaluate", "report")


@dataclass
class CompileOptions:
    """Everything `mpqc compile` takes (the Python API mirrors the CLI)."""

    model: str
    target: str
    data: str
    out: str
    arch: str | None = None
    weights: str | None = None
    trust_pickle: bool = False
    input_shape: str | None = None
    # budgets, as on the command line
    bitops: str | None = None
    avg_bits: str | None = None
    size: str | None = None
    compression: str | None = None
    act_mem: str | None = None
    act_mem_max: str | None = None
    latency: str | None = None
    lut: str | None = None
    energy: str | None = None
    emac: str | None = None
    # search
    sensitivity: str = "fisher"
    granularity: str = "layer"
    clusters: int | None = None
    candidates: str | None = None
    fix: tuple[str, ...] = ()
    weight_alpha: float | str = 1.0  # "auto": measured by three probe fine-tunings (sensitivity/recovery.py)
    probe_steps: int = 100  # --weight-alpha auto: batches of each probe fine-tuning
    monotone: bool = True
    act_groups: str = "tensor"
    solver: str = "highs"
    time_limit: float | None = None
    search: str = "ilp"
    learn_steps: int = 300  # --search learned: batches of log-E training
    pareto: int | None = None
    # fine-tuning and export
    epochs: int = 3
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd (Nesterov momentum), adam, adamw
    batch_stats: bool = True  # LSQ: batch statistics on the folded convs while fine-tuning (finetune/renorm.py)
    deploy_tail: float = 0.0  # LSQ: last fraction of the steps on the deploy form (finetune/deploy_tail.py)
    residual_quant: bool = True  # fine-tune with the profile's 8-bit residual-add quantizers (compiler/residual.py)
    batch_size: int = 64
    finetune_method: str | None = None  # default: lsq (digital), energy with a fixed allocation (analog)
    profile: str = "ort"
    seed: int = 0
    stop_after: str | None = None
    samples: int = 256  # data samples for the sensitivity pass
    progress: bool = True
    device: str = "auto"  # sensitivity, fine-tuning and PyTorch evaluation: "auto" = CUDA when available
    threads: int | None = None  # CPU threads of torch and onnxruntime (None: torch's default, one per core)

    def __post_init__(self):
        if self.stop_after is not None and self.stop_after not in STAGES:
            raise UserError(f"--stop-after {self.stop_after!r}: choose one of {', '.join(STAGES)}")
        if self.epochs < 0:
            raise UserError(f"--epochs {self.epochs} must be >= 0")
        if self.granularity not in ("layer", "channel"):
            raise UserError(f"--granularity {self.granularity!r}: use layer or channel")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise UserError(f"--optimizer {self.optimizer!r}: use sgd, adam or adamw")
        if not (self.lr > 0):
            raise UserError(f"--lr {self.lr} must be > 0")
        if self.search not in ("ilp", "greedy", "learned"):
            raise UserError(f"--search {self.search!r}: use ilp, greedy or learned")
        if self.learn_steps < 1:
            raise UserError(f"--learn-steps {self.learn_steps} must be >= 1")
        from .search.problem import parse_weight_alpha

        self.weight_alpha = parse_weight_alpha(self.weight_alpha, allow_auto=True)
        if isinstance(self.probe_steps, bool) or not isinstance(self.probe_steps, int) or self.probe_steps < 1:
            raise UserError(f"--probe-steps {self.probe_steps!r} must be an integer >= 1")
        if (isinstance(self.deploy_tail, bool) or not isinstance(self.deploy_tail, (int, float))
                or not 0 <= self.deploy_tail < 1):
            raise UserError(f"--deploy-tail {self.deploy_tail!r} must be a fraction in [0, 1) (0 turns it off)")
        if self.profile not in ("ort", "trt", "qcdq"):  # the residual quantizers are placed for it before export
            raise UserError(f"--profile {self.profile!r}: use ort, trt or qcdq")
        self.fix = tuple(self.fix)
        for name in ("batch_size", "samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"--{name.replace('_', '-')} {v!r} must be an integer >= 1")
        if self.clusters is not None and self.clusters < 1:
            raise UserError(f"--clusters {self.clusters} must be >= 1")
        if self.pareto is not None and not 2 <= self.pareto <= 1000:
            raise UserError(f"--pareto {self.pareto} must be between 2 and 1000 points")
        if self.time_limit is not None and not self.time_limit > 0:
            raise UserError(f"--time-limit {self.time_limit} must be positive (seconds)")
        from .search.problem import parse_candidates, parse_fix

        parse_candidates(self.candidates)  # the syntax now; names and widths against the model and target later
        parse_fix(self.fix)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise UserError(f"--threads {self.threads!r} must be an integer >= 1")


@dataclass
class CompileResult:
    """Where everything went and the headline numbers."""

    out: str
    paths: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    reused: list = field(default_factory=list)
    stopped_after: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _budget_kwargs(o: CompileOptions) -> dict:
    return {k: getattr(o, k) for k in ("bitops", "avg_bits", "size", "compression", "act_mem", "act_mem_max",
                                       "latency", "lut", "energy", "emac")}


class _Run:
    """State shared by the stages of one compile (loaded lazily: reused stages skip the expensive parts)."""

    def __init__(self, o: CompileOptions):
        from mpqc.targets import load_target

        from .capture import capture
        from .data import load_data
        from .loading import fit_to_data, image_size, load_model

        self.o = o
        self.out = o.out
        self.target = load_target(o.target)
        if o.search == "learned" and self.target.kind != "analog":
            raise UserError(f"--search learned trains the energy per MAC of an analog target; target "
                            f"{self.target.name} is {self.target.kind}: use --search ilp or greedy")
        if o.finetune_method == "energy" and self.target.kind != "analog":
            raise UserError(f"--finetune-method energy trains an analog array's noise; target {self.target.name} "
                            f"is {self.target.kind}: use lsq, pdqat or dxmax, or an analog target")
        self.budgets = self._budgets()
        self.loaded = load_model(o.model, arch=o.arch, weights=o.weights, trust_pickle=o.trust_pickle,
                                 input_shape=o.input_shape)
        self.data = load_data(o.data, seed=o.seed, image_size=image_size(self.loaded.input_shape),
                              input_rank=len(self.loaded.input_shape))
        fit_to_data(self.loaded, self.data, o.data, shape_given=o.input_shape is not None)
        self.teacher = self.loaded.module
        self.device = resolve_device(o.device)
        self.captured = capture(copy.deepcopy(self.loaded.module), self.loaded.example_inputs, fold_bn=True)
        self.manifest = Manifest.load(o.out)

    def _budgets(self):
        from .search import budgets as B

        budgets = B.parse_budgets(**_budget_kwargs(self.o))
        if not budgets:
            raise UserError("give at least one budget (--avg-bits, --bitops, --size, --compression, --act-mem, "
                            "--latency, --energy, --emac)")
        if self.target.kind == "analog" and not any(b.kind == "emac" for b in budgets):
            raise UserError(f"target {self.target.name} is analog: give the energy budget --emac E")
        return budgets

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    # -- helpers -----------------------------------------------------------------------------------------
    def plan_file(self) -> str:
        """The plan the fine-tuned model runs at: the search's, or the widths dxmax learned from it."""
        return "plan_trained.json" if self.finetune_method() == "dxmax" and self.o.epochs > 0 else "plan.json"

    def plan(self, name: str | None = None):
        from .plan import Plan

        return Plan.load(self.path(name or self.plan_file()))

    def quantized(self, *, state: bool, plan=None):
        """A QuantizedModel at the plan (plan.json unless given), calibrated; with ``state`` the fine-tuned
        weights are loaded."""
        from .finetune import FinetuneConfig, prepare
        from .finetune.driver import apply_plan

        plan = plan if plan is not None else self.plan()
        q = prepare(copy.deepcopy(self.captured), {}, self.data, FinetuneConfig(), act_groups=plan.act_groups_mode)
        emac = apply_plan(q, plan)
        from .deploy_grid import fit_to_profile

        fit_to_profile(q, self.o.profile, residual_quant=self.o.residual_quant)
        from .data import make_loader

        q.calibrate(make_loader(self.data.calib, 256))
        if state and os.path.exists(self.path("model_q.pt")):
            sd = torch.load(self.path("model_q.pt"), map_location="cpu", weights_only=True)
            q.load_state_dict(sd.get("model", sd), strict=False)
        return q, emac

    def checkpoint(self, q) -> dict:
        """model_q.pt: the state dict and the grid it was trained on (``mpqc export --checkpoint`` reads both)."""
        from .deploy_grid import model_checkpoint

        return model_checkpoint(q, self.o.profile, self.o.residual_quant)

    def finetune_method(self) -> str:
        if self.o.finetune_method:
            return self.o.finetune_method
        return "energy" if self.target.kind == "analog" else "lsq"


@torch.no_grad()
def _evaluate_on(r: _Run, model, ds) -> float:
    """Top-1 accuracy of ``model`` on ``r.device`` (moved there for the call and back)."""
    from .train import evaluate

    home = next(iter(model.parameters())).device
    try:
        return evaluate(model.to(r.device), ds, device=r.device)
    finally:
        model.to(home)


# ------------------------------------------------------------------------------------------------------------
# stages
def _stage_capture(r: _Run) -> dict:
    atomic_write_text(r.path("ir.json"), r.captured.graph.to_json())
    return {"fp_accuracy": _evaluate_on(r, r.teacher, r.data.val), "layers": len(r.captured.graph.layers()),
            "total_macs": r.captured.graph.total_macs(), "capture": r.captured.method}


def _stage_sensitivity(r: _Run) -> dict:
    from .search.problem import parse_candidates
    from .sensitivity import run_sensitivity

    o = r.o
    method = "analog" if r.target.kind == "analog" and o.sensitivity == "fisher" else o.sensitivity
    cands = parse_candidates(o.candidates) or tuple(sorted({b for b in r.target.weight_bits + r.target.act_bits
                                                            if b <= 8}, reverse=True))
    options = {"candidates": cands, "granularity": o.granularity, "samples": o.samples, "seed": o.seed,
               "act_groups": o.act_groups, "device": str(r.device)}
    if method == "analog":
        options["target"] = o.target
    from .progress import StageBars

    with StageBars(o.progress) as progress:  # the longest silent stage otherwise: minutes on a real model
        table = run_sensitivity(method, r.captured, r.data, options, progress=progress,
                                cache=os.path.join(r.out, ".cache"))
    table.save(r.path("sensitivity.json"))
    return {"method": method}


def _stage_search(r: _Run) -> dict:
    import numpy as np

    from .plan import plan_costs, uniform_plan
    from .search.pareto import pareto_sweep, write_pareto
    from .search.problem import SearchOptions, parse_candidates, parse_fix, read_sensitivity, score_plan
    from .search.solve import search

    o = r.o
    table = read_sensitivity(r.path("sensitivity.json"), monotone=o.monotone)
    cands = parse_candidates(o.candidates)
    fix = parse_fix(list(o.fix))
    alpha, recovery = o.weight_alpha, None
    if alpha == "auto":
        recovery = _probe_recovery(r, cands, fix)
        alpha = recovery["alpha"]
    options = SearchOptions(granularity=o.granularity, clusters=o.clusters, w_candidates=cands, a_candidates=cands,
                            fix=fix, weight_alpha=alpha, monotone=o.monotone, act_groups=o.act_groups)
    lut = None
    if o.lut:
        from mpqc.cost_models.latency import LatencyTable

        lut = LatencyTable.load(o.lut)
    solver = {"highs": "auto", "highs-mip": "highs", "cbc": "cbc"}.get(o.solver, "auto")
    if o.search == "greedy":
        from .search.greedy import greedy_search
        from .search.problem import build_problem

        sp = build_problem(r.captured.graph, r.target, r.budgets, table, options, lut=lut)
        sol = greedy_search(sp, table)
    else:
        sp, sol = search(r.captured.graph, r.target, r.budgets, table, options, solver=solver,
                         time_limit=o.time_limit, lut=lut)
    plan = sp.to_plan(sol, sensitivity="sensitivity.json", lut=lut,
                      meta={"model": r.loaded.source, "search": o.search, "weight_alpha": alpha,
                            **({"recovery": recovery} if recovery else {})})
    for w in sp.warnings:  # kept in plan.json too; said here so that a compile's user sees them as they happen
        log.warning(w)
    if o.search == "learned":
        plan = _learn_energies(r, plan, table)
    if r.target.kind != "analog":
        baselines = {}
        for b in r.budgets:
            if b.avg_bits is not None:
                up = uniform_plan(r.captured.graph, *b.avg_bits, r.target.name, act_groups_mode=o.act_groups)
                costs = plan_costs(up, r.captured.graph, r.target, lut=lut)
                baselines[f"W{b.avg_bits[0]}A{b.avg_bits[1]}"] = {
                    "objective": score_plan(up, r.captured.graph, table, alpha, channels=o.granularity == "channel"),
                    **{k: v["value"] for k, v in costs.items()}}
        plan.meta["baselines"] = baselines
    plan.save(r.path("plan.json"))
    info = {"status": plan.solver["status"], "objective": plan.objective, "time_s": plan.solver["time_s"]}
    if recovery:
        info.update(weight_alpha=alpha, probe_s=recovery["time_s"])
    if o.pareto:
        points = pareto_sweep(sp, o.pareto, row=0, solver=solver, time_limit=o.time_limit)
        from .search.pareto import _div

        chosen = (float(np.asarray(sol.budget_values)[0]) / _div(sp.rows[0]), float(sol.objective))
        atomic_write_with(r.path("pareto.csv"),
                          lambda tmp: write_pareto(points, sp, 0, tmp, None, chosen=chosen))
        info["pareto_points"] = len(points)
    return info


def _probe_recovery(r: _Run, cands, fix: dict) -> dict:
    """``--weight-alpha auto``: the weight/activation factor from three probe fine-tunings with the compile's
    recipe (sensitivity/recovery.py); written to recovery.json beside the plan."""
    from .sensitivity.recovery import ProbeConfig, probe_recovery

    o = r.o
    if r.target.kind == "analog":
        raise UserError(f"--weight-alpha auto weighs digital weight against activation bits; target "
                        f"{r.target.name} is analog: give a number")
    w_c = [b for b in (cands or r.target.weight_bits) if b <= 8]
    a_c = [b for b in (cands or r.target.act_bits) if b <= 8]
    if not w_c or not a_c:
        raise UserError("--weight-alpha auto needs integer candidate widths of at most 8 bits (see --candidates)")
    if min(w_c) == max(w_c) and min(a_c) == max(a_c):
        raise UserError("--weight-alpha auto: one candidate width leaves nothing to weigh; give a number")
    cfg = ProbeConfig(steps=o.probe_steps, batch_size=o.batch_size, lr=o.lr, optimizer=o.optimizer,
                      batch_stats=o.batch_stats, seed=o.seed, device=str(r.device))
    try:
        rec = probe_recovery(r.captured, r.teacher, r.data, w_bits=min(w_c), a_bits=min(a_c),
                             high_bits=max(max(w_c), max(a_c)), fix=fix, config=cfg, act_groups=o.act_groups,
                             progress=o.progress)
    except ValueError as e:
        raise UserError(f"--weight-alpha auto: {e}") from None
    out = rec.to_dict()
    atomic_write_json(r.path("recovery.json"), out)
    log.info("weight-alpha auto: rho_w %.3g, rho_a %.3g -> alpha %.3g (%.0f s)", rec.rho_w, rec.rho_a, rec.alpha,
             rec.time_s)
    return {k: out[k] for k in ("alpha", "rho_w", "rho_a", "w_bits", "a_bits", "steps", "time_s")}


def _learn_energies(r: _Run, plan, table):
    """``--search learned``: Garg et al.'s allocation (research/seeds.md §2.3) in place of the ILP's energies.

    The ILP plan fixes which layers are analog and their widths; every analog layer (or output channel at
    channel granularity) then starts at the budget E* and only log E trains (weights and ranges frozen) on
    CE + 4·max(0, log Ē − log E*), Adam at 0.01, ``learn_steps`` batches of 64 training images. The result
    is scaled down onto the budget where the soft penalty left Ē above it; energies stay continuous (the
    target's grid is what the ILP chooses from).
    """
    import numpy as np
    from torch.utils.data import TensorDataset

    from .data import DataSplits
    from .finetune import DistillConfig, EnergyConfig, FinetuneConfig, finetune
    from .plan import plan_costs
    from .search.problem import score_plan

    o = r.o
    t0 = time.perf_counter()
    budget = float(next(b.value for b in r.budgets if b.kind == "emac"))
    macs = {op.name: float(op.macs) for op in r.captured.graph.layers()}
    analog = {n: lp for n, lp in plan.layers.items() if lp.emac is not None}
    if not analog:
        raise UserError("--search learned: every layer stays digital on this target; nothing to learn")
    q, _ = r.quantized(state=False, plan=plan)
    bs = 64
    xt, yt = r.data.train.tensors
    g = torch.Generator().manual_seed(o.seed)
    idx = torch.randperm(len(xt), generator=g)[: bs * o.learn_steps]
    subset = DataSplits(r.data.name, TensorDataset(xt[idx], yt[idx]), r.data.calib, r.data.val, r.data.num_classes,
                        "none")
    channel = plan.granularity == "channel"
    cfg = FinetuneConfig(epochs=1, method="energy", batch_size=bs, scheduler="constant", seed=o.seed,
                         distill=DistillConfig(enabled=False), checkpoint_dir=None, device=r.device.type,
                         energy=EnergyConfig(mode="learn", e_init=budget, e_target=budget, penalty=4.0, lr=0.01,
                                             per_channel=channel, **_noise_settings(r.target)))
    res = finetune(q, None, subset, cfg, progress=o.progress, emac={n: budget for n in analog})
    learned = {n: np.asarray(res.emac[n], dtype=float) for n in analog}
    total = sum(macs[n] for n in analog)
    e_bar = sum(macs[n] * float(learned[n].mean()) for n in analog) / total
    scale = min(1.0, budget / e_bar)
    for n, lp in analog.items():
        e = learned[n] * scale
        plan.layers[n] = replace(lp, emac=e.tolist() if channel else float(e.mean()))
    costs = plan_costs(plan, r.captured.graph, r.target)
    for k, c in costs.items():
        plan.costs.setdefault(k, {}).update(value=c["value"])
    row = plan.costs.get("budget:emac")
    if row is not None:
        row.update(value=costs["emac"]["value"], slack=row["budget"] - costs["emac"]["value"],
                   binding=bool(row["budget"] - costs["emac"]["value"] <= 1e-6 * max(row["budget"], 1.0)))
    plan.objective = score_plan(plan, r.captured.graph, table)
    plan.meta["learned"] = {"steps": int(len(idx) // bs), "batch_size": bs, "e_bar_trained": e_bar,
                            "scaled_onto_budget": scale < 1.0, "ilp_objective": plan.solver.get("objective"),
                            "noisy_val_accuracy": res.final_accuracy}
    plan.solver = {"name": "learned (Garg et al.)", "status": "feasible", "objective": plan.objective,
                   "gap": float("nan"), "time_s": time.perf_counter() - t0, "bound": float("nan"),
                   "binaries": 0, "groups": 0}
    return plan


def _noise_settings(target) -> dict:
    """The target's analog noise model, as the energy fine-tuning config carries it."""
    a = target.analog
    return {"noise": a.noise, "sigma_t": a.sigma_t, "weight_noise": a.weight_noise}


def _stage_finetune(r: _Run) -> dict:
    from .finetune import FinetuneConfig, finetune

    o = r.o
    searched = r.plan("plan.json")
    q, emac = r.quantized(state=False, plan=searched)
    if o.epochs == 0:
        atomic_write_with(r.path("model_q.pt"), lambda tmp: torch.save(r.checkpoint(q), tmp))
        return {"epochs": 0}
    method = r.finetune_method()
    cfg = {"epochs": o.epochs, "lr": o.lr, "optimizer": o.optimizer, "batch_size": o.batch_size, "seed": o.seed,
           "method": method, "batch_stats": o.batch_stats, "deploy_tail": o.deploy_tail,
           "device": r.device.type,
           "checkpoint_dir": r.path("finetune_ckpt"), "resume": True}
    if method == "energy":
        from .finetune.config import EnergyConfig

        cfg["energy"] = EnergyConfig(mode="fixed", **_noise_settings(r.target))
    config = FinetuneConfig(**cfg)
    _drop_stale_checkpoint(config, q)
    from .finetune import accuracy

    # the widths stay what the plan says (lsq, pdqat): ending below the start means the steps hurt
    start = accuracy(q, r.data.val, batch_size=config.eval_batch_size, device=r.device) \
        if method in ("lsq", "pdqat") else None
    try:
        res = finetune(q, r.teacher, r.data, config, progress=o.progress, emac=emac or None)
    except (ValueError, FloatingPointError) as e:  # a diverged loss, a split smaller than a batch: the options'
        raise UserError(f"fine-tuning: {e}") from None
    if res.bits:  # dxmax learned the widths: the later stages run (and report) what was trained
        from .plan import plan_after_finetune

        plan_after_finetune(searched, q, res, method, r.captured.graph, r.target).save(r.path(r.plan_file()))
    atomic_write_with(r.path("model_q.pt"), lambda tmp: torch.save(r.checkpoint(q), tmp))
    if start is not None and res.final_accuracy < start - _WORSE_BY:
        log.warning("fine-tuning ended at %.2f %% validation accuracy, below the %.2f %% of the calibrated model "
                    "it started from: the steps were too large for this model; try a smaller --lr (this run: %g) "
                    "or --epochs 0", res.final_accuracy, start, o.lr)
    return {"epochs": o.epochs, "method": method, "calibrated_accuracy": start, "final_accuracy": res.final_accuracy,
            "resumed_from": res.resumed_from, **({"deploy_tail": res.summary["deploy_tail"]}
                                                 if "deploy_tail" in res.summary else {})}


_WORSE_BY = 2.0  # points of validation accuracy a fine-tuning may lose to its start before the run warns


def _drop_stale_checkpoint(config, q) -> None:
    """Remove a fine-tuning checkpoint written for other quantizers (the plan or the residual placement changed
    since): the stage re-runs because its inputs changed, and resuming is only for a run cut off midway."""
    from .finetune import checkpoint_path, load_checkpoint
    from .finetune.driver import precision_signature

    path = checkpoint_path(config)
    if not path or not os.path.exists(path):
        return
    try:
        stale = load_checkpoint(path).get("precision") != precision_signature(q)
    except (OSError, RuntimeError, EOFError, ValueError):
        stale = True
    if stale:
        log.info("the fine-tuning checkpoint %s was written for other quantizers: starting afresh", path)
        os.remove(path)


def _stage_export(r: _Run) -> dict:
    from .data import make_loader
    from .export import check_parity, export_qdq
    from .export.parity import failure, reference_vs_trained

    q, _ = r.quantized(state=True)
    exported = export_qdq(q, r.o.profile, calib=make_loader(r.data.calib, 64),
                          example_inputs=(r.data.val.tensors[0][:2],))
    x = r.data.val.tensors[0][:256]
    report = check_parity(exported.model, exported.reference, x, threads=torch.get_num_threads(),
                          raise_on_failure=False)
    d = report.to_dict()
    d["reference_vs_trained"] = reference_vs_trained(q, exported.reference, x)
    atomic_write_json(r.path("parity.json"), d)  # kept either way: it says what went wrong
    gap = d["reference_vs_trained"]
    if gap["top1_agreement"] < 0.99 and round((1 - gap["top1_agreement"]) * gap["samples"]) >= 2:  # not one tie
        log.warning("the exported model (its biases rounded onto the integer grid) agrees with the fine-tuned "
                    "fake-quant model on %.1f %% of %d validation samples' top-1; --deploy-tail F (e.g. 0.3) "
                    "fine-tunes through that rounding", 100 * gap["top1_agreement"], gap["samples"])
    if not report.passed:  # no model.onnx that disagrees with what was trained; the trained weights stay
        raise UserError(f"{failure(report)} ({r.path('parity.json')}); the fine-tuned model is kept, and "
                        f"`{_export_command(r)} --no-check` writes the ONNX file anyway")
    exported.save(r.path("model.onnx"))
    return {"parity": report.summary()}


def _export_command(r: _Run) -> str:
    """The `mpqc export` command that exports this compile's fine-tuned model (quoted for a POSIX shell)."""
    import shlex

    o = r.o
    args = ["mpqc", "export", o.model, *(["--arch", o.arch] if o.arch else []),
            *(["--weights", o.weights] if o.weights else []), *(["--trust-pickle"] if o.trust_pickle else []),
            *(["--input-shape", o.input_shape] if o.input_shape else []), "--plan", r.path(r.plan_file()),
            "--checkpoint", r.path("model_q.pt"), "--profile", o.profile,
            "--data", o.data, "-o", r.path("model.onnx")]
    return shlex.join(args)


def ort_hits(path: str, ds, threads: int | None = None):
    """Whether the exported ONNX model at ``path`` gets each sample of ``ds`` right (onnxruntime CPU, bool array).

    Per sample, so that two exports can be compared image by image (bench_cifar's paired table); ``threads``
    defaults to torch's thread count, not every core.
    """
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x, y = ds.tensors
    hits = [np.argmax(sess.run(None, {name: x[i:i + 256].numpy()})[0], -1) == y[i:i + 256].numpy()
            for i in range(0, len(x), 256)]
    return np.concatenate(hits) if hits else np.zeros(0, dtype=bool)


def _ort_accuracy(path: str, ds) -> float:
    hits = ort_hits(path, ds)
    return 100.0 * int(hits.sum()) / max(1, len(hits))


def _stage_evaluate(r: _Run) -> dict:
    q, emac = r.quantized(state=True)
    plan = r.plan()
    acc = {"full precision": _evaluate_on(r, r.teacher, r.data.val)}
    metrics: dict = {"accuracy": acc, "target": r.target.name}
    if r.target.kind == "analog":
        metrics["analog"] = _analog_comparison(r, q, plan, acc)
    else:
        acc["fake-quant (PyTorch)"] = _evaluate_on(r, q, r.data.val)
    if os.path.exists(r.path("model.onnx")):
        acc["exported ONNX (onnxruntime)"] = _ort_accuracy(r.path("model.onnx"), r.data.val)
    metrics["costs"] = {k: v for k, v in plan.costs.items()}
    atomic_write_json(r.path("metrics.json"), metrics)
    return {"accuracy": acc}


def _analog_comparison(r: _Run, q, plan, acc: dict) -> dict:
    """Accuracy at the planned energy allocation vs a uniform E at the same MAC-weighted average, and the
    energy each needs to stay within 1 point of full precision (the energy saved at equal accuracy)."""
    import numpy as np

    from .finetune.energy import evaluate_at_energy

    layers = [op for op in r.captured.graph.layers() if op.name in plan.layers and plan.emac(op.name) is not None]
    macs = {op.name: op.macs for op in layers}
    emac = {n: np.asarray(plan.emac(n), dtype=float) for n in macs}  # per channel at channel granularity
    total = sum(macs.values()) or 1
    e_avg = sum(macs[n] * float(emac[n].mean()) for n in macs) / total
    shape = {n: emac[n] / e_avg for n in macs}  # the allocation's profile, MAC-weighted mean 1

    def at(scale: float, profile: dict) -> float:
        return evaluate_at_energy(q, r.data.val, {n: (np.asarray(profile[n]) * scale).tolist() for n in macs},
                                  noise=r.target, layers=list(macs))

    planned, uniform = at(e_avg, shape), at(e_avg, {n: 1.0 for n in macs})
    acc["fake-quant + analog noise (planned E)"] = planned
    acc[f"fake-quant + analog noise (uniform E = {e_avg:.4g})"] = uniform
    goal = acc["full precision"] - 1.0
    grid = r.target.analog.e_grid()
    lo, hi = float(min(grid)) / 1e3, float(max(grid))  # below the grid too: small models tolerate E < 1

    def needed(profile: dict) -> float | None:
        """Smallest MAC-weighted mean E (geometric bisection, 7 steps) reaching ``goal``."""
        if at(hi, profile) < goal:
            return None
        a, b = lo, hi
        if at(a, profile) >= goal:
            return a
        for _ in range(7):
            mid = (a * b) ** 0.5
            a, b = (a, mid) if at(mid, profile) >= goal else (mid, b)
        return b

    e_plan, e_uni = needed(shape), needed({n: 1.0 for n in macs})
    out = {"mac_weighted_E (planned)": e_avg, "accuracy planned (%)": planned,
           "accuracy uniform at same E (%)": uniform, "total energy planned": e_avg * total,
           "accuracy goal (FP - 1 point, %)": goal,
           "E needed for the goal, planned allocation": e_plan if e_plan is not None else f"> {hi:.4g}",
           "E needed for the goal, uniform": e_uni if e_uni is not None else f"> {hi:.4g}"}
    if e_plan is not None and e_uni is not None:
        out["energy saved at equal accuracy (%)"] = 100.0 * (1 - e_plan / e_uni)
    return out


def _stage_report(r: _Run) -> dict:
    from .report import write_report

    return {"paths": write_report(r.out)}


# ------------------------------------------------------------------------------------------------------------
def compile(model: str, *, target: str, data: str, out: str, **kwargs) -> CompileResult:  # noqa: A001
    """Run the whole pipeline (see the module docstring); returns the paths and headline numbers."""
    o = CompileOptions(model=model, target=target, data=data, out=out, **kwargs)
    threads_before = torch.get_num_threads()
    if o.threads is not None:  # for this compile only: the caller's setting is put back at the end
        torch.set_num_threads(o.threads)
    try:
        return _compile(o)
    finally:
        torch.set_num_threads(threads_before)


def _compile(o: CompileOptions) -> CompileResult:
    check_output_dir(o.out)
    r = _Run(o)  # checks the target, budgets, model and data before anything is written
    ensure_dir(o.out)
    from .options_file import options_toml

    atomic_write_text(r.path("compile.toml"), options_toml(o))  # `mpqc compile --config` repeats the compile
    result = CompileResult(out=o.out)
    opts = {k: v for k, v in asdict(o).items() if k not in ("out", "progress", "stop_after", "threads")}
    common = {"model": opts["model"], "arch": o.arch, "weights": o.weights, "input_shape": o.input_shape,
              "model_hash": _model_hash(r), "data": o.data, "seed": o.seed}
    # a target file edited in place keeps its name: its contents key every stage that prices or simulates it
    common_t = {**common, "target_hash": _target_hash(r.target)}
    plan_in = {"sens": "sensitivity.json"}
    probe_in = {"probe": {k: getattr(o, k) for k in ("lr", "batch_size", "optimizer", "batch_stats",
                                                            "probe_steps")}}
    from .deploy_grid import trained_for

    grid = trained_for(o.profile, o.residual_quant)  # the grid fine-tuning trains on
    run_plan = r.plan_file()  # what the fine-tuned model runs at (dxmax writes its learned widths there)
    steps = [
        ("capture", {**common}, ["ir.json"], _stage_capture),
        ("sensitivity", {**common_t, "target": o.target, "method": o.sensitivity, "granularity": o.granularity,
                         "candidates": o.candidates, "samples": o.samples, "act_groups": o.act_groups},
         ["sensitivity.json"], _stage_sensitivity),
        ("search", {**common_t, **{k: v for k, v in opts.items() if k not in ("epochs", "lr", "batch_size", "profile",
                                                                              "finetune_method", "optimizer",
                                                                              "device", "batch_stats",
                                                                              "deploy_tail", "probe_steps",
                                                                              "residual_quant")},
                    **(probe_in if o.weight_alpha == "auto" else {}), "_files": plan_in},
         ["plan.json"] + (["pareto.csv"] if o.pareto else []) + (["recovery.json"] if o.weight_alpha == "auto" else []),
         _stage_search),
        ("finetune", {**common_t, "epochs": o.epochs, "lr": o.lr, "optimizer": o.optimizer,
                      "batch_size": o.batch_size, "batch_stats": o.batch_stats, "deploy_tail": o.deploy_tail,
                      "method": o.finetune_method, "_files": {"plan": "plan.json"},
                      "trained_for": grid}, ["model_q.pt"] + ([run_plan] if run_plan != "plan.json" else []),
         _stage_finetune),
        ("export", {**common_t, "profile": o.profile, "residual_quant": o.residual_quant,
                    "_files": {"plan": run_plan, "state": "model_q.pt"}},
         ["model.onnx", "parity.json"], _stage_export),
        ("evaluate", {**common_t, "trained_for": grid,
                      "_files": {"plan": run_plan, "state": "model_q.pt", "onnx": "model.onnx"}},
         ["metrics.json"], _stage_evaluate),
        ("report", {"_files": {"plan": run_plan, "metrics": "metrics.json"}}, ["report.html"], _stage_report),
    ]
    t0 = time.perf_counter()
    _run_stages(o, r, steps, result)
    result.metrics["total_time_s"] = time.perf_counter() - t0
    if os.path.exists(r.path("metrics.json")):
        import json

        with open(r.path("metrics.json")) as f:
            result.metrics.update(json.load(f))
    return result


def _run_stages(o: CompileOptions, r: _Run, steps: list, result: CompileResult) -> None:
    from .progress import stage_status

    for name, inputs, outputs, fn in steps:
        quiet = name in ("capture", "export", "evaluate", "report") or (  # stages with no bars of their own
            name == "search" and o.weight_alpha != "auto" and o.search != "learned")  # (those two fine-tune)
        with stage_status(f"{name} …", o.progress and quiet):
            try:
                reused, info = r.manifest.run(name, inputs, outputs, lambda fn=fn: fn(r))
            except torch.OutOfMemoryError as e:  # a limit the options can move: say which, not a traceback
                raise UserError(_out_of_memory(o, r, name, e)) from None
        if reused:
            result.reused.append(name)
        log.info("stage %s %s", name, "reused" if reused else "done")
        for rel in outputs:
            result.paths[rel] = r.path(rel)
        if name == "evaluate" or name == "capture":
            result.metrics.update(info)
        if o.stop_after == name:
            result.stopped_after = name
            break


def _out_of_memory(o: CompileOptions, r: _Run, stage: str, e: BaseException) -> str:
    """One line for a device that ran out of memory in ``stage``: where, and the option that needs less."""
    what = out_of_memory_summary(e)
    if stage == "finetune" or (stage == "search" and (o.weight_alpha == "auto" or o.search == "learned")):
        fix = f"lower --batch-size (now {o.batch_size}), or run with --device cpu"
    elif stage == "sensitivity":
        fix = f"lower --samples (now {o.samples}), or run with --device cpu"
    else:
        fix = "run with --device cpu"
    return f"{r.device} ran out of memory in the {stage} stage ({what}); {fix}"


def _target_hash(target) -> str:
    """A digest of the loaded target's contents (its costs, rules, analog constants), not of its name."""
    import dataclasses

    from .manifest import key_of

    return key_of(dataclasses.asdict(target))


def _model_hash(r: _Run) -> str:
    from .loading import model_hash

    return model_hash(r.loaded.module)
