"""Adan step time vs torch AdamW, and vs the memory-traffic floor, in one run.

A step of Adan moves 11 x 4 bytes per fp32 parameter (reads p, g, g_prev, m, v, n; writes p,
m, v, n, g_prev), AdamW 7 x 4. The floor is those bytes at the copy bandwidth measured here.
Parameters are laid out like a transformer (d x d, d x 4d matrices, biases and norms), with
fixed random grads.

    python benchmarks/bench_adan.py --device cpu     # 10M params: Adan foreach/single vs AdamW
                                                     # foreach, interleaved (load-robust)
    python benchmarks/bench_adan.py --device cuda    # 100M params: + fused paths, floor, block sweep
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit.optim import Adan  # noqa: E402

BYTES_PER_PARAM = {"Adan": 44, "Adan+clip": 48, "AdamW": 28}


def transformer_shapes(total: int, d: int) -> list[tuple[int, ...]]:
    """Shapes of d-wide transformer blocks (qkv, proj, mlp, biases, 2 norms) + a remainder."""
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,),
             (d,), (d,), (d,), (d,)]
    per_block = sum(torch.Size(s).numel() for s in block)
    shapes = block * (total // per_block)
    rest = total - per_block * (total // per_block)
    return shapes + [(rest,)] if rest else shapes


def transformer_like(total: int, d: int, device: str) -> list[torch.nn.Parameter]:
    """``total`` fp32 params shaped by :func:`transformer_shapes`, with random grads."""
    shapes = transformer_shapes(total, d)
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(s, device=device, generator=gen) * 1e-3
        params.append(p)
    return params


def time_steps(step, device: str, iters: int, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean ms per call of ``step``, after a warm-up."""
    for _ in range(3):
        step()
    results = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            results.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            results.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(results)


def copy_bandwidth(device: str, numel: int = 1 << 28) -> float:
    """Device copy bandwidth in bytes/s (read + write counted) for a 1 GiB fp32 buffer."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_steps(lambda: dst.copy_(src), device, iters=20 if device == "cuda" else 3)
    del src, dst
    return 2 * 4 * numel / (ms / 1e3)


def bench(name: str, make_opt, total: int, d: int, device: str, iters: int) -> float:
    params = transformer_like(total, d, device)
    opt = make_opt(params)
    ms = time_steps(opt.step, device, iters)
    del opt, params
    if device == "cuda":
        torch.cuda.empty_cache()
    return ms


def interleaved_cpu(cases, total: int, d: int, iters: int, repeats: int):
    """CPU timings taken round-robin (case 1, 2, 3, 1, 2, 3, ...), median per case, so that a
    change in machine load hits every case alike."""
    opts = [make(transformer_like(total, d, "cpu")) for _, _, make in cases]
    for opt in opts:
        opt.step()
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, opt in enumerate(opts):
            times[i].append(time_steps(opt.step, "cpu", iters, repeats=1))
    return [(name, key, statistics.median(t)) for (name, key, _), t in zip(cases, times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--params", type=float, default=None,
                        help="number of parameters (default 10M on cpu, 100M on cuda)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the fused block sweep")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device == "cuda"
    total = int(args.params or (100e6 if cuda else 10e6))
    d = 1024 if cuda else 512
    iters = 50 if cuda else 3
    n_tensors = len(transformer_shapes(total, d))

    rows: list[tuple[str, str, float]] = []  # (name, bytes key, ms)
    cases = [
        ("AdamW foreach (torch)", "AdamW", lambda ps: torch.optim.AdamW(ps, 1e-3, foreach=True)),
        ("Adan foreach (ours)", "Adan", lambda ps: Adan(ps, weight_decay=0.02, foreach=True)),
        ("Adan single-tensor (ours)", "Adan", lambda ps: Adan(ps, weight_decay=0.02, foreach=False)),
    ]
    if cuda:
        cases = [
            ("AdamW fused (torch)", "AdamW", lambda ps: torch.optim.AdamW(ps, 1e-3, fused=True)),
            ("Adan fused (ours)", "Adan", lambda ps: Adan(ps, weight_decay=0.02, fused=True)),
            ("Adan fused + clip (ours)", "Adan+clip",
             lambda ps: Adan(ps, weight_decay=0.02, max_grad_norm=1.0, fused=True)),
            *cases,
        ]
    if cuda:
        for name, key, make in cases:
            rows.append((name, key, bench(name, make, total, d, device, iters)))
    else:
        rows = interleaved_cpu(cases, total, d, iters, repeats=5)

    sweep = []
    if cuda and not args.no_sweep:
        from lit.optim import adan_triton

        default = (adan_triton.BLOCK, adan_triton.NUM_WARPS)
        for block, warps in [(1024, 4), (1024, 8), (2048, 8), (4096, 8)]:
            adan_triton.BLOCK, adan_triton.NUM_WARPS = block, warps
            ms = bench("sweep", lambda ps: Adan(ps, weight_decay=0.02, fused=True), total, d,
                       device, iters)
            sweep.append((block, warps, ms))
        adan_triton.BLOCK, adan_triton.NUM_WARPS = default

    bandwidth = copy_bandwidth(device)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nAdan step time, {total / 1e6:.1f}M fp32 params in {n_tensors} tensors "
          f"(transformer blocks, d={d}), {where}, torch {torch.__version__}")
    print(f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s -> floors: "
          + ", ".join(f"{k} {v} B/param = {v * total / bandwidth * 1e3:.3f} ms"
                      for k, v in BYTES_PER_PARAM.items()))
    base_name, _, base_ms = rows[0]
    print(f"{'optimizer':<28}{'ms/step':>10}{'vs ' + base_name.split(' (')[0]:>22}"
          f"{'vs its floor':>14}{'GB/s eff.':>11}")
    for name, key, ms in rows:
        floor = BYTES_PER_PARAM[key] * total / bandwidth * 1e3
        print(f"{name:<28}{ms:>10.3f}{ms / base_ms:>21.2f}x{ms / floor:>13.2f}x"
              f"{BYTES_PER_PARAM[key] * total / ms / 1e6:>11.1f}")
    if sweep:
        floor = BYTES_PER_PARAM["Adan"] * total / bandwidth * 1e3
        print("\nfused kernel block sweep (BLOCK, num_warps): "
              + ", ".join(f"({b}, {w}) {ms:.3f} ms = {ms / floor:.2f}x floor" for b, w, ms in sweep))


if __name__ == "__main__":
    main()
