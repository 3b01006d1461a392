"""GPU benchmark of the mpqc kernels against PyTorch baselines; prints markdown table rows.

Fake quantization of a [256, 64, 56, 56] tensor, per-channel scale along axis 1, forward and
forward+backward (grad of x and of the scale):
  - mpqc ``fake_quant`` (Triton): per-channel mixed bits in 2..8 + LSQ scale gradient;
  - the same LSQ math written in eager torch (clamp, round-STE, gradient-scaled s), and the
    same function under ``torch.compile``;
  - ``torch.fake_quantize_per_channel_affine`` (8 bit, no scale gradient: the x-STE only);
  - ``torch._fake_quantize_learnable_per_channel_affine`` (8 bit, learnable scale and zero point);
  - a copy-bandwidth floor: forward = one read + one write of the tensor (``copy_``), backward =
    two reads + one write (``torch.add(out=)``), the minimal traffic of each pass.
Analog noise on the same shape (per-channel sigma, seeded Philox) against eager
``y + sigma * torch.randn_like(y)`` and the copy floor.

Usage: python bench/bench_kernels.py [--shape 256,64,56,56] [--dtype float32|bfloat16|float16]
Needs a CUDA device; exits with status 2 and a message otherwise. ``--device cpu`` (with
TRITON_INTERPRET=1 and a tiny --shape) only smoke-tests the script: its timings mean nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="256,64,56,56", help="tensor shape, channel axis is 1")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of the script only")
    return p.parse_args()


def lsq_fake_quant(x, s, qmin, qmax, g):
    """LSQ (Esser et al. 2020) in plain differentiable torch ops, per channel along axis 1."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    s_g = (s - s * g).detach() + s * g  # forward value s, gradient scaled by g
    sb = s_g.view(view)
    v = torch.clamp(x.float() / sb, qmin.view(view), qmax.view(view))
    q = v + (torch.round(v) - v).detach()  # round with a straight-through gradient
    return (q * sb).to(x.dtype)


def main() -> int:
    args = _parse()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_kernels.py: no CUDA device is visible (torch.cuda.is_available() is False); "
            "this benchmark times GPU kernels and has nothing to measure on a CPU-only machine.",
            file=sys.stderr,
        )
        return 2

    import triton
    from triton.testing import do_bench

    from mpqc.kernels import analog_noise, fake_quant, fake_quant_reference, quant_range

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = tuple(int(s) for s in args.shape.split(","))
    n_ch = shape[1]
    numel = math.prod(shape)
    esize = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    x = (torch.randn(shape, device=dev, generator=gen) * 2).to(dtype)
    gy = torch.randn(shape, device=dev, generator=gen).to(dtype)
    scale = torch.rand(n_ch, device=dev, generator=gen) * 0.05 + 0.01
    bits = torch.randint(2, 9, (n_ch,), device=dev, generator=gen)
    qmin, qmax = (t.to(dev) for t in quant_range(bits, signed=True))
    g_lsq = 1.0 / torch.sqrt(qmax * (numel // n_ch))
    zp_int = torch.zeros(n_ch, dtype=torch.int32, device=dev)

    xg = x.detach().clone().requires_grad_()
    sg = scale.detach().clone().requires_grad_()
    zpg = torch.zeros(n_ch, device=dev, requires_grad=True)

    def bench(fn) -> float:
        if dev.type == "cuda":
            return do_bench(fn, rep=args.rep, return_mode="median")
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    def fwd_bwd(make, inputs):
        def run():
            y = make()
            torch.autograd.grad(y, inputs, gy)

        return run

    # sanity: the kernel equals the twin on this device before anything is timed
    y_t = fake_quant(x, scale, bits, axis=1, backend="triton")
    y_r = fake_quant_reference(x, scale, bits, axis=1)
    fwd_equal = torch.equal(y_t, y_r)

    floor_fwd = bench(lambda: torch.empty_like(x).copy_(x))
    gx_buf = torch.empty_like(x)
    floor_bwd = bench(lambda: torch.add(x, gy, out=gx_buf))
    floor = {"fwd": floor_fwd, "fwd+bwd": floor_fwd + floor_bwd}
    traffic = {"fwd": 2 * numel * esize, "fwd+bwd": 5 * numel * esize}

    rows: list[tuple[str, str, float | str]] = [("copy floor", p, floor[p]) for p in ("fwd", "fwd+bwd")]

    def add(name, fwd, bwd):
        for pas, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
            if fn is None:
                continue
            try:
                rows.append((name, pas, bench(fn)))
            except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
                rows.append((name, pas, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"))

    add(
        "mpqc fake_quant (Triton), mixed 2-8 bit + LSQ",
        lambda: fake_quant(x, scale, bits, axis=1, backend="triton"),
        fwd_bwd(lambda: fake_quant(xg, sg, bits, axis=1, backend="triton"), (xg, sg)),
    )
    add(
        "LSQ math, eager torch, mixed bits",
        lambda: lsq_fake_quant(x, scale, qmin, qmax, g_lsq),
        fwd_bwd(lambda: lsq_fake_quant(xg, sg, qmin, qmax, g_lsq), (xg, sg)),
    )
    compiled = torch.compile(lsq_fake_quant)
    add(
        "LSQ math, torch.compile, mixed bits",
        lambda: compiled(x, scale, qmin, qmax, g_lsq),
        fwd_bwd(lambda: compiled(xg, sg, qmin, qmax, g_lsq), (xg, sg)),
    )
    if dtype == torch.float32:  # the ATen fake-quant ops take fp32 only
        add(
            "torch.fake_quantize_per_channel_affine, 8 bit (x grad only)",
            lambda: torch.fake_quantize_per_channel_affine(x, scale, zp_int, 1, -128, 127),
            fwd_bwd(lambda: torch.fake_quantize_per_channel_affine(xg, scale, zp_int, 1, -128, 127), (xg,)),
        )
        add(
            "torch._fake_quantize_learnable_per_channel_affine, 8 bit",
            lambda: torch._fake_quantize_learnable_per_channel_affine(x, scale, zpg.detach(), 1, -128, 127, 1.0),
            fwd_bwd(
                lambda: torch._fake_quantize_learnable_per_channel_affine(xg, sg, zpg, 1, -128, 127, 1.0),
                (xg, sg, zpg),
            ),
        )

    # analog noise: forward reads y and writes out; backward reads grad_out (grad_y is the
    # identity, no traffic) and reduces grad_out * n into sigma's per-channel partials.
    sigma = torch.rand(n_ch, device=dev, generator=gen) * 0.1
    sig_g = sigma.detach().clone().requires_grad_()
    noise_rows: list[tuple[str, str, float | str]] = [
        ("copy floor", "fwd", floor_fwd),
        ("copy floor", "fwd+bwd", floor_fwd + bench(lambda: gy.sum(dim=[d for d in range(gy.dim()) if d != 1]))),
    ]
    start = len(rows)
    add(
        "mpqc analog_noise (Triton, Philox), per-channel sigma",
        lambda: analog_noise(x, sigma, seed=1, axis=1, backend="triton"),
        fwd_bwd(lambda: analog_noise(xg, sig_g, seed=1, axis=1, backend="triton"), (xg, sig_g)),
    )

    def eager_noise(y, s):
        return y + s.view((1, -1) + (1,) * (y.dim() - 2)) * torch.randn_like(y)

    add(
        "eager torch y + sigma * randn_like(y)",
        lambda: eager_noise(x, sigma),
        fwd_bwd(lambda: eager_noise(xg, sig_g), (xg, sig_g)),
    )
    noise_rows += rows[start:]
    del rows[start:]

    name = torch.cuda.get_device_properties(dev).name if dev.type == "cuda" else "CPU smoke test (timings meaningless)"
    print(
        f"<!-- {name}, torch {torch.__version__}, triton {triton.__version__}, "
        f"shape {list(shape)} {args.dtype}, forward Triton == reference bitwise: {fwd_equal} -->"
    )
    print()
    print("### Fake quantization, per-channel along axis 1")
    print()
    print("| implementation | pass | median ms | effective GB/s | x copy floor |")
    print("|---|---|---|---|---|")
    for name, pas, t in rows:
        print(_row(name, pas, t, traffic[pas], floor[pas]))
    print()
    print("### Analog noise, per-channel sigma")
    print()
    print("| implementation | pass | median ms | effective GB/s | x copy floor |")
    print("|---|---|---|---|---|")
    noise_traffic = {"fwd": 2 * numel * esize, "fwd+bwd": 3 * numel * esize}
    noise_floor = {p: t for name, p, t in noise_rows if name == "copy floor"}
    for name, pas, t in noise_rows:
        print(_row(name, pas, t, noise_traffic[pas], noise_floor[pas]))
    return 0


def _row(name: str, pas: str, t: float | str, traffic: int, floor: float) -> str:
    if isinstance(t, str):
        return f"| {name} | {pas} | {t} | | |"
    return f"| {name} | {pas} | {t:.3f} | {traffic / (t * 1e-3) / 1e9:.0f} | {t / floor:.2f} |"


if __name__ == "__main__":
    sys.exit(main())
