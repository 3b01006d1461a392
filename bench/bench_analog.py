"""Analog in-memory compute: accuracy vs the MAC-weighted average energy per MAC Ē, per allocation.

Target: the built-in ``analog`` target (thermal noise sigma = sigma_t sqrt(N) R_w R_x / sqrt(E) on every
output of the conv/linear layers it runs in analog; first and last layers digital, noise-free). The model is
the pipeline's quantized model for this target (``mpqc compile``'s plan: weights and activations fake-quantized
at 8 bits, BN folded), noise injected by ``mpqc.compiler.finetune.energy.NoiseInjector`` with R_w, R_x from its
quantizers. No weight is retrained: every curve evaluates the same weights, only the E allocation differs.

Curves (all at the same MAC-weighted Ē = Σ MAC_l E_l / Σ MAC_l over the analog layers):
  uniform        every analog layer at E = Ē
  closed-layer   E_l ∝ sqrt(s_l / MAC_l), s_l the repo's analog sensitivity (``run_sensitivity("analog")``) at E=1
  ilp-layer      mpqc's MCKP search with an ``--emac Ē`` budget (layer-wise; the repo's table on a wide E grid)
  ilp-channel    the same search at ``--granularity channel``: one E per output channel (array column), from the
                 repo's per-channel analog sensitivity (``e_channel``): what ``mpqc compile --granularity channel``
                 plans
  closed-channel E_c ∝ sqrt(s_c / MAC_c), s_c the per-output-channel Fisher-weighted noise variance measured with
                 the evaluation's own NoiseInjector sigma (so prediction and evaluation share one noise model)
  closed-channel-measured  the same with each layer's s_c scaled by its measured / predicted loss increase (that
                 layer's noise alone, on training images)
  learned-E*     Garg et al.'s energy training (``EnergyObjective`` mode=learn, weights frozen), profile rescaled

GPU (H100: ~2.5 minutes measured on a weaker ResNet-20 without highspy, i.e. without the ILP curve)::

    TRITON_INTERPRET=0 python bench/bench_analog.py --model MODEL.pt --arch mpqc.compiler.zoo:resnet20 \
        --data cifar10:/work/shared/data/cifar10 --device cuda --seeds 3 --out OUT

CPU smoke test (a few minutes)::

    TRITON_INTERPRET=1 python bench/bench_analog.py --model /tmp/analog_smoke/model.pt \
        --arch mpqc.compiler.zoo:resnet20 --data cifar10:/work/shared/data/cifar10 --limit 4000 \
        --device cpu --quick --out /tmp/analog_smoke

Writes OUT/analog.json (raw numbers, incrementally), OUT/analog_table.md and OUT/analog.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--arch", default="mpqc.compiler.zoo:resnet20")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=None, help="passed to load_data (smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=None, help="noise seeds per point (3; --quick: 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--eval-images", type=int, default=None)
    p.add_argument("--points", type=int, default=None, help="grid points of Ē")
    p.add_argument("--e-lo", type=float, default=0.25)
    p.add_argument("--e-hi", type=float, default=1000.0)
    p.add_argument("--samples", type=int, default=None, help="sensitivity samples")
    p.add_argument("--learn-targets", default=None, help="comma-separated target Ē of the learned runs")
    p.add_argument("--learn-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--all-analog", action="store_true",
                   help="noise on every conv/linear layer (the target's digital first/last layers run analog too)")
    p.add_argument("--train-ebars", default=None,
                   help="comma-separated Ē of the noise-aware fine-tuning runs (uniform and closed-channel; 0: none)")
    p.add_argument("--train-epochs", type=int, default=None, help="epochs of each noise-aware fine-tuning run")
    p.add_argument("--train-lr", type=float, default=1e-4)
    p.add_argument("--train-optimizer", choices=("sgd", "adam", "adamw"), default="adam",
                   help="noise-aware fine-tuning optimizer (SGD at lr 0.002 lost 11 points in one CPU epoch at E=8; "
                        "Adam 1e-4 kept the most, bench/RESULTS.md)")
    p.add_argument("--sens-ranges", choices=("quantizer", "float"), default="quantizer",
                   help="noise ranges the analog sensitivity prices with: the calibrated quantizers' (default, what "
                        "fine-tuning draws) or the float weights' and inputs' (before 2026-12-08)")
    p.add_argument("--only", default=None,
                   help="comma-separated parts to run besides setup/sensitivity/search/summary (e.g. uniform,"
                        "closed-channel,ilp-channel,check,measure,learned,trained-uniform@4); default: all")
    return p.parse_args(argv)


class Bench:
    def __init__(self, a):
        self.a = a
        self.dev = torch.device(a.device)
        q = a.quick
        if a.seeds is None:
            a.seeds = 1 if q else 3
        self.n_eval = a.eval_images or (256 if q else 5000)
        self.points = a.points or (6 if q else 40)
        self.samples = a.samples or (128 if q else 2048)
        self.learn_targets = [float(v) for v in (a.learn_targets or ("5" if q else "2,5,10")).split(",") if v]
        self.learn_steps = a.learn_steps or (20 if q else 300)
        self.train_ebars = [float(v) for v in (a.train_ebars or ("2" if q else "8,16")).split(",") if float(v) > 0]
        self.train_epochs = a.train_epochs or (1 if q else 3)
        self.grid = np.geomspace(a.e_lo, a.e_hi, self.points)
        os.makedirs(a.out, exist_ok=True)
        self.res: dict = {"args": vars(a), "grid": self.grid.tolist(), "curves": {}, "timings_s": {}, "errors": {},
                          "checks": {}}

    # -- bookkeeping ------------------------------------------------------------------------------------
    def save(self) -> None:
        path = os.path.join(self.a.out, "analog.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.res, f, indent=1, default=float)
        os.replace(path + ".tmp", path)

    ALWAYS = ("setup", "sensitivity", "search", "sensitivity_channel", "summary", "plot")

    def part(self, name: str, fn) -> None:
        only = self.a.only.split(",") if self.a.only else None
        if only is not None and name not in self.ALWAYS and name not in only:
            return
        t = time.perf_counter()
        log(f"== {name}")
        try:
            fn()
        except Exception:  # noqa: BLE001 - log and go on with the other parts
            tb = traceback.format_exc()
            print(tb, flush=True)
            self.res["errors"][name] = tb
        self.res["timings_s"][name] = self.res["timings_s"].get(name, 0.0) + time.perf_counter() - t
        log(f"   {name}: {time.perf_counter() - t:.1f}s")
        self.save()

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from mpqc.compiler.capture import capture
        from mpqc.compiler.data import load_data
        from mpqc.compiler.loading import load_model
        from mpqc.targets import load_target

        a = self.a
        self.data = load_data(a.data, seed=0, limit=a.limit)
        self.loaded = load_model(a.model, arch=a.arch)
        self.captured = capture(copy.deepcopy(self.loaded.module), self.loaded.example_inputs, fold_bn=True)
        self.target = load_target("analog")
        if a.all_analog:
            from dataclasses import replace

            self.target = replace(self.target, analog=replace(self.target.analog, digital_layers=()))
        x, y = self.data.val.tensors
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(x), generator=g)[: self.n_eval]
        self.xe, self.ye = x[idx].to(self.dev), y[idx].to(self.dev)
        self.res["eval_images"] = len(idx)
        xt, yt = self.data.train.tensors  # training images for the measured correction (never the test images)
        idx = torch.randperm(len(xt), generator=g)[: min(len(xt), self.n_eval // 2)]
        self.xm, self.ym = xt[idx].to(self.dev), yt[idx].to(self.dev)
        an = self.target.analog
        self.res["noise_model"] = {"noise": an.noise, "sigma_t": an.sigma_t, "digital_layers": list(an.digital_layers),
                                   "formula": "sigma = sigma_t*sqrt(fan_in)*R_w*R_x/sqrt(E) per output channel, "
                                              "R_w, R_x from the 8-bit quantizers (NoiseInjector)"}
        teacher = copy.deepcopy(self.loaded.module).to(self.dev).eval()
        self.res["fp_accuracy"] = self.accuracy(teacher)
        log(f"FP accuracy on {self.res['eval_images']} test images: {self.res['fp_accuracy']:.2f}%")
        del teacher

    @torch.no_grad()
    def accuracy(self, model) -> float:
        correct = 0
        for i in range(0, len(self.xe), self.a.batch):
            out = model(self.xe[i:i + self.a.batch])
            correct += int((out.argmax(-1) == self.ye[i:i + self.a.batch]).sum())
        return 100.0 * correct / len(self.xe)

    @torch.no_grad()
    def mean_loss(self, model, x=None, y=None) -> float:
        x, y = (self.xe, self.ye) if x is None else (x, y)
        tot = 0.0
        for i in range(0, len(x), self.a.batch):
            out = model(x[i:i + self.a.batch])
            tot += float(F.cross_entropy(out.float(), y[i:i + self.a.batch], reduction="sum"))
        return tot / len(x)

    # -- sensitivity (the repo's analog method) --------------------------------------------------------
    def sensitivity(self) -> None:
        from mpqc.compiler.sensitivity import run_sensitivity

        t = time.perf_counter()
        table = run_sensitivity("analog", self.captured, self.data,
                                {"target": "analog", "samples": self.samples, "device": str(self.dev),
                                 "granularity": "channel", "ranges": self.a.sens_ranges})
        self.s_repo = {n: float(ls.e[min(ls.e, key=lambda e: abs(e - 1.0))]) for n, ls in table.layers.items()
                       if ls.e}
        self.s_repo_ch = {n: np.asarray(ls.e_channel[min(ls.e_channel, key=lambda e: abs(e - 1.0))])
                          for n, ls in table.layers.items() if ls.e_channel}
        self.res["timings_s"]["sensitivity_repo"] = time.perf_counter() - t
        self.res["s_repo_at_E1"] = self.s_repo
        log(f"repo analog sensitivity: {len(self.s_repo)} layers, {self.samples} samples")

    # -- search + the pipeline's quantized model -------------------------------------------------------
    def _wide(self):
        """The analog target on a wide grid (1e-3..1e5, 65 points: the curves reach Ē = 0.25) and the repo's
        table extended to it (thermal scores are exactly s(1)/E)."""
        from dataclasses import replace

        from mpqc.compiler.search.problem import read_sensitivity

        target = replace(self.target, analog=replace(self.target.analog, e_min=1e-3, e_max=1e5, points=65))
        grid = [float(e) for e in target.analog.e_grid()]
        layers = {n: {"e": {repr(e): s / e for e in grid}} for n, s in self.s_repo.items()}
        for n, sc in self.s_repo_ch.items():
            layers[n]["e_channel"] = {repr(e): (sc / e).tolist() for e in grid}
        return target, read_sensitivity({"version": 1, "method": "analog", "layers": layers})

    def ilp(self, ebar: float, target=None, table=None, granularity: str = "layer"):
        from mpqc.compiler.search.budgets import parse_budgets
        from mpqc.compiler.search.problem import SearchOptions
        from mpqc.compiler.search.solve import search

        if target is None:
            target, table = self._wide()
        sp, sol = search(self.captured.graph, target, parse_budgets(emac=repr(float(ebar))), table,
                         SearchOptions(granularity=granularity))
        return sp.to_plan(sol)

    def build_model(self) -> None:
        from mpqc.compiler.data import make_loader
        from mpqc.compiler.finetune import FinetuneConfig, prepare
        from mpqc.compiler.finetune.driver import apply_plan

        try:  # the pipeline's way: the plan of a search, applied to a calibrated QuantizedModel
            plan = self.ilp(10.0)
            self.analog = [op.name for op in self.captured.graph.layers() if op.name in plan.layers
                           and plan.emac(op.name) is not None]
            q = prepare(copy.deepcopy(self.captured), {}, self.data, FinetuneConfig(), act_groups=plan.act_groups_mode)
            apply_plan(q, plan)
            self.res["quantization"] = {n: [plan.layers[n].w_bits, plan.layers[n].a_bits] for n in plan.layers}
        except Exception:  # noqa: BLE001 - e.g. no highspy: W8A8 everywhere (what the plan gives), first/last digital
            print(traceback.format_exc(), flush=True)
            log("search failed: falling back to W8A8 on every layer, the target's first/last layers digital")
            from mpqc.compiler.quantize import LayerQuant

            layers = [op for op in self.captured.graph.layers() if op.name in self.s_repo]
            self.analog = [op.name for op in layers[1:-1]]
            q = prepare(copy.deepcopy(self.captured), {op.name: LayerQuant(8, 8) for op in layers}, self.data,
                        FinetuneConfig())
            self.res["quantization"] = {op.name: [8, 8] for op in layers}
            self.res["errors"]["search_for_plan"] = traceback.format_exc()
        q.calibrate(make_loader(self.data.calib, 256))
        q.to(self.dev).eval()
        self.q_clean = q  # no noise attached: copied for the learned runs
        self.ops = {op.name: op for op in q.graph_ir.layers()}
        self.macs = {n: float(self.ops[n].macs) for n in self.analog}
        self.chans = {n: int(self.ops[n].out_channels) for n in self.analog}
        self.res["analog_layers"] = {n: {"macs": self.macs[n], "channels": self.chans[n]} for n in self.analog}
        self.res["digital_layers"] = [n for n in self.res["quantization"] if n not in self.analog]
        self.res["fake_quant_accuracy"] = self.accuracy(q)
        log(f"analog layers: {len(self.analog)}; digital: {self.res['digital_layers']}; fake-quant (no noise) "
            f"accuracy {self.res['fake_quant_accuracy']:.2f}%")
        from mpqc.compiler.finetune import NoiseInjector

        self.qn = copy.deepcopy(q)
        self.inj = NoiseInjector(self.qn, 1.0, layers=self.analog, per_channel=True, seed=0)

    # -- per-channel sensitivity with the evaluation's own sigma ----------------------------------------
    def channel_sensitivity(self) -> None:
        from mpqc.compiler.data import make_loader

        inj, qn = self.inj, self.qn
        inj.enabled = False  # identity: its output is the layer output the noise is added to
        outs: dict = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o))
                 for n, m in inj.modules.items()]
        ggn = {n: torch.zeros(self.chans[n], dtype=torch.float64, device=self.dev) for n in self.analog}
        emp = {n: torch.zeros(self.chans[n], dtype=torch.float64, device=self.dev) for n in self.analog}
        from torch.utils.data import TensorDataset

        xs, ys = self.data.calib.tensors
        if len(xs) < self.samples:
            xt, yt = self.data.train.tensors
            xs, ys = torch.cat([xs, xt[: self.samples - len(xs)]]), torch.cat([ys, yt[: self.samples - len(ys)]])
        xs, ys = xs[: self.samples], ys[: self.samples]
        gen = torch.Generator(device=self.dev).manual_seed(0)
        n_total = 0
        try:
            for x, y in make_loader(TensorDataset(xs, ys), 256):
                x, y = x.to(self.dev).requires_grad_(True), y.to(self.dev)
                for kind, acc in (("ggn", ggn), ("emp", emp)):
                    outs.clear()
                    logits = qn(x)
                    if kind == "ggn":  # labels drawn from the model: E[g g^T] = the Gauss-Newton matrix
                        lab = torch.multinomial(logits.detach().float().softmax(-1), 1, generator=gen).squeeze(1)
                    else:
                        lab = y
                    loss = F.cross_entropy(logits.float(), lab, reduction="sum")
                    names = [n for n in self.analog if n in outs]
                    grads = torch.autograd.grad(loss, [outs[n] for n in names])
                    for n, g in zip(names, grads):
                        dim = 1 if g.dim() > 2 else g.dim() - 1
                        acc[n] += g.double().pow(2).transpose(0, dim).reshape(g.shape[dim], -1).sum(1)
                n_total += len(x)
        finally:
            for h in hooks:
                h.remove()
            inj.enabled = True
        self.s_ch, self.s_ch_emp = {}, {}
        for n in self.analog:
            s1 = inj.modules[n].sigma_fn().detach().double().to(self.dev)
            s1 = s1.expand(self.chans[n]) if s1.dim() == 0 else s1
            self.s_ch[n] = (0.5 * s1.pow(2) * ggn[n] / n_total).cpu().numpy()
            self.s_ch_emp[n] = (0.5 * s1.pow(2) * emp[n] / n_total).cpu().numpy()
        self.res["s_channel_sum_ggn"] = {n: float(v.sum()) for n, v in self.s_ch.items()}
        self.res["s_channel_sum_empirical"] = {n: float(v.sum()) for n, v in self.s_ch_emp.items()}
        log("layer sensitivity at E=1 (repo table vs per-channel sums, GGN / empirical Fisher):")
        for n in self.analog:
            log(f"   {n:28s} repo {self.s_repo.get(n, float('nan')):10.4g}  ggn {self.s_ch[n].sum():10.4g}  "
                f"emp {self.s_ch_emp[n].sum():10.4g}")

    def check_prediction(self) -> None:
        """Predicted vs measured loss increase with one layer's noise alone."""
        picks = [self.analog[0], self.analog[len(self.analog) // 2], self.analog[-1]]
        base = self.mean_loss(self.q_clean)
        out = {}
        for n in picks:
            s_ggn = float(self.s_ch[n].sum())
            e = s_ggn / 0.02  # predicted increase 0.02 nats (small: the quadratic regime)
            self.inj.set_energy({m: (e if m == n else 1e12) for m in self.analog})
            meas = []
            for s in range(self.a.seeds):
                with self.inj.fixed_noise(100 + s):
                    meas.append(self.mean_loss(self.qn) - base)
            m = float(np.mean(meas))
            out[n] = {"E": e, "predicted_ggn": s_ggn / e, "predicted_empirical": float(self.s_ch_emp[n].sum()) / e,
                      "predicted_repo": self.s_repo.get(n, float("nan")) / e, "measured": m,
                      "ratio_measured_over_ggn": m / (s_ggn / e)}
            log(f"check {n}: E={e:.4g} loss increase predicted {s_ggn / e:.4f} (GGN), "
                f"{out[n]['predicted_empirical']:.4f} (emp. Fisher), {out[n]['predicted_repo']:.4f} (repo table); "
                f"measured {m:.4f} (ratio measured/GGN {out[n]['ratio_measured_over_ggn']:.2f})")
        self.res["checks"]["single_layer_loss_increase"] = out

    def measure_layers(self, target: float = 0.05) -> None:
        """Each analog layer's noise alone, at the E where the Gauss-Newton model predicts ``target`` nats, on
        training images: the measured / predicted ratio corrects that layer's channel sensitivities (the
        quadratic model misses by a factor that differs per layer)."""
        base = self.mean_loss(self.q_clean, self.xm, self.ym)
        self.ratio, out = {}, {}
        for n in self.analog:
            e = float(self.s_ch[n].sum()) / target
            self.inj.set_energy({m: (e if m == n else 1e12) for m in self.analog})
            meas = []
            for s in range(self.a.seeds):
                with self.inj.fixed_noise(200 + s):
                    meas.append(self.mean_loss(self.qn, self.xm, self.ym) - base)
            self.ratio[n] = max(float(np.mean(meas)), 0.05 * target) / target
            out[n] = {"E": e, "measured": float(np.mean(meas)), "ratio": self.ratio[n]}
        self.res["measured_correction"] = out
        log("measured / predicted loss increase per layer: "
            + " ".join(f"{n}:{v:.2f}" for n, v in self.ratio.items()))

    # -- allocations ------------------------------------------------------------------------------------
    def profile_layer(self, s: dict) -> dict:
        """E_l ∝ sqrt(s_l / MAC_l), MAC-weighted mean 1."""
        raw = {n: math.sqrt(max(s[n], 1e-30) / self.macs[n]) for n in self.analog}
        return self.normalize(raw)

    def profile_channel(self, s_ch: dict, floor: float = 0.01) -> dict:
        """E_c ∝ sqrt(s_c / MAC_c), each s_c floored at ``floor`` x its layer's mean (Fisher-dead channels)."""
        raw = {}
        for n in self.analog:
            sc = np.maximum(s_ch[n], floor * max(float(np.mean(s_ch[n])), 1e-30))
            raw[n] = np.sqrt(sc / (self.macs[n] / self.chans[n])).tolist()
        return self.normalize(raw)

    def normalize(self, raw: dict) -> dict:
        tot = sum(self.macs.values())
        mean = sum(self.macs[n] * float(np.mean(raw[n])) for n in self.analog) / tot
        return {n: (np.asarray(raw[n], dtype=float) / mean).tolist() if isinstance(raw[n], list)
                else float(raw[n]) / mean for n in self.analog}

    def scaled(self, profile: dict, ebar: float) -> dict:
        return {n: ([v * ebar for v in p] if isinstance(p, list) else p * ebar) for n, p in profile.items()}

    def ebar_of(self, emac: dict) -> float:
        tot = sum(self.macs.values())
        return sum(self.macs[n] * float(np.mean(emac[n])) for n in self.analog) / tot

    def eval_alloc(self, emac: dict, qn=None, inj=None) -> list[float]:
        qn, inj = (qn, inj) if qn is not None else (self.qn, self.inj)
        inj.set_energy(emac)
        accs = []
        for s in range(self.a.seeds):
            with inj.fixed_noise(1000 + s):
                accs.append(self.accuracy(qn))
        return accs

    def curve(self, name: str, alloc_at, qn=None, inj=None) -> None:
        t = time.perf_counter()
        pts = []
        for eb in self.grid:
            emac = alloc_at(float(eb))
            accs = self.eval_alloc(emac, qn, inj)
            pts.append({"ebar": float(eb), "ebar_check": self.ebar_of(emac), "acc_mean": float(np.mean(accs)),
                        "acc_seeds": accs})
        self.res["curves"][name] = {"points": pts, "eval_s": time.perf_counter() - t}
        self.res["timings_s"]["evaluation"] = self.res["timings_s"].get("evaluation", 0.0) + time.perf_counter() - t
        log(f"   {name}: " + " ".join(f"{p['ebar']:.3g}:{p['acc_mean']:.1f}" for p in pts))
        self.save()

    def run_learned(self) -> None:
        from torch.utils.data import TensorDataset

        from mpqc.compiler.data import DataSplits
        from mpqc.compiler.finetune import DistillConfig, EnergyConfig, FinetuneConfig, finetune

        bs = 128 if not self.a.quick else 32
        xt, yt = self.data.train.tensors
        g = torch.Generator().manual_seed(1)
        idx = torch.randperm(len(xt), generator=g)[: min(len(xt), bs * self.learn_steps)]
        xv, yv = self.data.val.tensors
        vi = torch.randperm(len(xv), generator=g)[:500]  # CIFAR-10's stored test split is sorted by label
        small = DataSplits(self.data.name, TensorDataset(xt[idx], yt[idx]), self.data.calib,
                           TensorDataset(xv[vi], yv[vi]), self.data.num_classes, self.data.augment)
        self.learned = {}
        for et in self.learn_targets:
            t = time.perf_counter()
            q = copy.deepcopy(self.q_clean)
            cfg = FinetuneConfig(epochs=1, method="energy", batch_size=bs, scheduler="constant",
                                 distill=DistillConfig(enabled=False), checkpoint_dir=None, device=self.dev.type,
                                 energy=EnergyConfig(mode="learn", e_init=et, e_target=et, penalty=4.0, lr=0.03))
            r = finetune(q, None, small, cfg, progress=False, emac={n: et for n in self.analog})
            emac = {n: r.emac[n] for n in self.analog}
            dt = time.perf_counter() - t
            self.res["timings_s"]["learned"] = self.res["timings_s"].get("learned", 0.0) + dt
            self.learned[et] = self.normalize({n: (list(v) if isinstance(v, list) else float(v))
                                               for n, v in emac.items()})
            self.res.setdefault("learned", {})[repr(et)] = {"emac": emac, "ebar": self.ebar_of(emac),
                                                            "final_accuracy_500": r.final_accuracy, "time_s": dt,
                                                            "steps": len(idx) // bs}
            log(f"learned E*={et}: Ē={self.ebar_of(emac):.3g}, {len(idx) // bs} steps, {dt:.1f}s; profile "
                + " ".join(f"{v:.2f}" for v in self.learned[et].values()))
            self.save()

    def run_trained(self, name: str, profile: dict, ebar: float) -> None:
        """Noise-aware fine-tuning (``EnergyObjective`` mode=fixed: weights and step sizes trained with the noise
        of ``profile`` scaled to ``ebar`` on, distillation from the float model) and that model's curve.

        This is what ``mpqc compile --target analog`` does after its search; the same run at a uniform E is the
        baseline it has to beat, so both curves come from equally trained weights.
        """
        from mpqc.compiler.finetune import EnergyConfig, FinetuneConfig, NoiseInjector, finetune

        t = time.perf_counter()
        q = copy.deepcopy(self.q_clean)
        teacher = copy.deepcopy(self.loaded.module).eval()
        cfg = FinetuneConfig(epochs=self.train_epochs, lr=self.a.train_lr, optimizer=self.a.train_optimizer,
                             batch_size=256, method="energy",
                             checkpoint_dir=None, device=self.dev.type, energy=EnergyConfig(mode="fixed"))
        r = finetune(q, teacher, self.data, cfg, progress=False, emac=self.scaled(profile, ebar))
        q.to(self.dev).eval()
        dt = time.perf_counter() - t
        self.res["timings_s"]["noise_aware_training"] = self.res["timings_s"].get("noise_aware_training", 0.0) + dt
        self.res.setdefault("trained", {})[name] = {"ebar_train": ebar, "epochs": self.train_epochs,
                                                    "lr": self.a.train_lr, "time_s": dt,
                                                    "val_acc_per_epoch": [m.get("val_acc") for m in r.metrics]}
        log(f"trained {name} at Ē={ebar:g}: {self.train_epochs} epochs in {dt:.1f}s, val "
            + " ".join(f"{m.get('val_acc', float('nan')):.2f}" for m in r.metrics))
        inj = NoiseInjector(q, 1.0, layers=self.analog, per_channel=True, seed=0)
        self.curve(name, lambda eb: self.scaled(profile, eb), q, inj)
        inj.remove()

    # -- summary ----------------------------------------------------------------------------------------
    def needed(self, pts: list, goal: float):
        """Smallest Ē from which on the curve stays >= goal, log-linearly interpolated; (Ē, bracket)."""
        e = [p["ebar"] for p in pts]
        acc = [p["acc_mean"] for p in pts]
        k = len(acc)
        while k > 0 and acc[k - 1] >= goal:
            k -= 1
        if k == len(acc):
            return None, f"> {e[-1]:.3g}"
        if k == 0:
            return e[0], f"<= {e[0]:.3g}"
        t = (goal - acc[k - 1]) / (acc[k] - acc[k - 1])
        val = math.exp(math.log(e[k - 1]) + t * (math.log(e[k]) - math.log(e[k - 1])))
        return val, f"[{e[k - 1]:.3g} ({acc[k - 1]:.2f}%), {e[k]:.3g} ({acc[k]:.2f}%)]"

    def acc_at(self, pts: list, eb: float):
        e = np.log([p["ebar"] for p in pts])
        if not (e[0] - 1e-9 <= math.log(eb) <= e[-1] + 1e-9):
            return None
        return float(np.interp(math.log(eb), e, [p["acc_mean"] for p in pts]))

    def summarize(self) -> None:
        fp = self.res["fp_accuracy"]
        goal = fp - 1.0
        rows, summary = [], {}
        uni = self.res["curves"].get("uniform")
        e_uni = self.needed(uni["points"], goal)[0] if uni else None
        for name, c in self.res["curves"].items():
            e_need, bracket = self.needed(c["points"], goal)
            saved = None
            if e_need is not None and e_uni is not None and not bracket.startswith("<="):
                saved = 100.0 * (1 - e_need / e_uni)
            elif e_need is not None and e_uni is not None:
                saved = 100.0 * (1 - e_need / e_uni)  # an upper bound on Ē: a lower bound on the saving
            accs = {eb: self.acc_at(c["points"], eb) for eb in (1, 2, 5, 10)}
            saved_tr = None  # a noise-aware trained allocation against the uniform E trained the same way
            if name.startswith("trained-") and not name.startswith("trained-uniform"):
                ref = self.res["curves"].get("trained-uniform@" + name.split("@")[-1])
                e_ref = self.needed(ref["points"], goal)[0] if ref else None
                if e_need is not None and e_ref is not None:
                    saved_tr = 100.0 * (1 - e_need / e_ref)
            summary[name] = {"ebar_at_goal": e_need, "bracket": bracket, "saved_vs_uniform_pct": saved,
                             "saved_vs_trained_uniform_pct": saved_tr, "acc_at": accs}
            fmt = (lambda v: "-" if v is None else f"{v:.2f}")
            sv = "-" if saved is None else (f">= {saved:.1f} %" if bracket.startswith("<=") else f"{saved:.1f} %")
            en = "-" if e_need is None else f"{e_need:.3g}"
            if bracket.startswith(">"):
                en = bracket
            st = "-" if saved_tr is None else f"{saved_tr:.1f} %"
            rows.append(f"| {name} | {en} | {bracket} | {sv} | {st} | "
                        + " | ".join(fmt(accs[k]) for k in (1, 2, 5, 10)) + " |")
        self.res["summary"] = {"goal": goal, "curves": summary}
        t = self.res["timings_s"]
        lines = [f"FP accuracy {fp:.2f}% on {self.res['eval_images']} test images; fake-quant W8A8 (no noise) "
                 f"{self.res.get('fake_quant_accuracy', float('nan')):.2f}%; goal FP-1 = {goal:.2f}%; "
                 f"{self.a.seeds} noise seeds per point; thermal noise on the analog layers only "
                 f"({'every conv/linear: --all-analog' if self.a.all_analog else 'the target default'}) "
                 f"(digital: {', '.join(self.res.get('digital_layers', []))}).", "",
                 "| curve | Ē at FP-1 | bracketing grid points | energy saved vs uniform (untrained) "
                 "| saved vs uniform trained alike | acc Ē=1 | Ē=2 | Ē=5 | Ē=10 |",
                 "|---|---|---|---|---|---|---|---|---|", *rows, "",
                 "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())]
        chk = self.res["checks"].get("single_layer_loss_increase")
        if chk:
            lines += ["", "Single-layer check (loss increase, predicted GGN / empirical Fisher / repo table vs "
                      "measured):"]
            lines += [f"- {n}: E={v['E']:.3g}: {v['predicted_ggn']:.4f} / {v['predicted_empirical']:.4f} / "
                      f"{v['predicted_repo']:.4f} vs {v['measured']:.4f}" for n, v in chk.items()]
        if self.res["errors"]:
            lines += ["", "Errors in: " + ", ".join(self.res["errors"])]
        text = "\n".join(lines) + "\n"
        with open(os.path.join(self.a.out, "analog_table.md"), "w") as f:
            f.write(text)
        print(text, flush=True)
        self.save()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for name, c in self.res["curves"].items():
            ax.plot([p["ebar"] for p in c["points"]], [p["acc_mean"] for p in c["points"]], marker=".", label=name)
        fp = self.res["fp_accuracy"]
        ax.axhline(fp - 1, color="k", ls="--", lw=1, label=f"FP-1 ({fp - 1:.2f}%)")
        ax.set_xscale("log")
        ax.set_xlabel("MAC-weighted average energy per MAC Ē (a.u.)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(max(0, fp - 40), fp + 2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("ResNet analog thermal noise: accuracy vs Ē")
        fig.tight_layout()
        fig.savefig(os.path.join(self.a.out, "analog.png"), dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    b = Bench(a)
    log(f"device {a.device}, torch {torch.__version__}, grid {b.points} points {a.e_lo}..{a.e_hi}, "
        f"{b.n_eval} eval images, {a.seeds} seeds")
    b.part("setup", b.setup)
    if "setup" in b.res["errors"]:
        return 1
    b.part("sensitivity", b.sensitivity)
    b.part("search", b.build_model)
    if "search" in b.res["errors"] or "sensitivity" in b.res["errors"]:
        return 1
    b.part("sensitivity_channel", b.channel_sensitivity)
    b.part("check", b.check_prediction)
    b.part("uniform", lambda: b.curve("uniform", lambda eb: {n: eb for n in b.analog}))
    b.part("closed-channel", lambda: (lambda p: b.curve("closed-channel", lambda eb: b.scaled(p, eb)))(
        b.profile_channel(b.s_ch)))
    b.part("measure", b.measure_layers)
    b.part("closed-channel-measured", lambda: (lambda p: b.curve(
        "closed-channel-measured", lambda eb: b.scaled(p, eb)))(
        b.profile_channel({n: b.s_ch[n] * b.ratio[n] for n in b.analog})))
    b.part("closed-layer", lambda: (lambda p: b.curve("closed-layer", lambda eb: b.scaled(p, eb)))(
        b.profile_layer(b.s_repo)))

    def ilp_curve(granularity: str):
        t = time.perf_counter()
        target, table = b._wide()
        plans = {}
        for eb in b.grid:
            plan = b.ilp(float(eb), target, table, granularity)
            plans[float(eb)] = {n: plan.emac(n) for n in b.analog}
        key = f"search_{granularity}"
        b.res["timings_s"][key] = b.res["timings_s"].get(key, 0.0) + time.perf_counter() - t
        b.res[f"ilp_plans_{granularity}"] = {repr(k): v for k, v in plans.items()}
        log(f"   {len(plans)} ILP solves ({granularity}) in {time.perf_counter() - t:.1f}s")
        b.curve(f"ilp-{granularity}", lambda eb: plans[eb])

    b.part("ilp-channel", lambda: ilp_curve("channel"))
    b.part("ilp-layer", lambda: ilp_curve("layer"))
    b.part("closed-layer-ggn", lambda: (lambda p: b.curve("closed-layer-ggn", lambda eb: b.scaled(p, eb)))(
        b.profile_layer(b.res["s_channel_sum_ggn"])))
    b.part("learned", b.run_learned)
    for et, prof in getattr(b, "learned", {}).items():
        b.part(f"learned-{et:g}", lambda prof=prof, et=et: b.curve(f"learned-{et:g}", lambda eb: b.scaled(prof, eb)))
    uniform_profile = {n: 1.0 for n in getattr(b, "analog", [])}
    for eb in b.train_ebars:
        b.part(f"trained-uniform@{eb:g}", lambda eb=eb: b.run_trained(f"trained-uniform@{eb:g}", uniform_profile, eb))
        b.part(f"trained-closed-channel@{eb:g}", lambda eb=eb: b.run_trained(
            f"trained-closed-channel@{eb:g}", b.profile_channel(b.s_ch), eb))
    b.part("summary", b.summarize)
    b.part("plot", b.plot)
    log(f"done in {time.perf_counter() - T0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
