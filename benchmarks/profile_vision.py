"""Where a PatchDropout training step's GPU time goes: a torch.profiler window of DeiT with
PatchDropout, timm eager vs ours compiled (the default scope), kernels grouped into matrix
products, attention, optimizer, and the rest (normalisation, activations, copies, PatchDropout's
gather), with each group's share of the step and of the kernel time.

    python benchmarks/profile_vision.py                       # DeiT-B keep 0.5, batch 256, bf16
    python benchmarks/profile_vision.py --model deit_small_patch16_224 --keep 0.25 --steps 5

Same step as benchmarks/bench_vision.py (bf16 autocast, fused AdamW, random images).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_vision import build  # noqa: E402

GROUPS = (  # first match wins; kernel names of cuBLAS(Lt), CUTLASS, flash attention, inductor
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|matmul|_mm_|sm90_|wgmma", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
)


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return "other"


def profile(model_name: str, impl: str, keep: float, batch: int, steps: int, warmup: int) -> str:
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from models.compile_backbone import DEFAULT_COMPILE_SCOPE, compile_backbone
    from models.image_classifier import draw_patch_dropout

    device = torch.device("cuda")
    model = build(model_name, "timm" if impl == "timm" else "ours", keep, None, 3, 1000).to(device).train()
    compiled = impl == "compiled"
    if compiled:
        torch._dynamo.reset()
        compile_backbone(model, True, "inductor", scope=DEFAULT_COMPILE_SCOPE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        if compiled:
            draw_patch_dropout(model, (224, 224))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    step_ms = 1e3 * (time.perf_counter() - start) / steps
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] = kernels.get(event.key, 0.0) + device_us / 1e3 / steps
    total = sum(kernels.values())
    groups: dict[str, float] = {}
    for name, ms in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    lines = [f"### {model_name} keep {keep} batch {batch}: {impl} (step {step_ms:.1f} ms under the "
             f"profiler, GPU kernels {total:.1f} ms, {100 * total / step_ms:.0f}% busy)", "",
             "| group | ms / step | share of kernel time |", "|---|---|---|"]
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {ms:.2f} | {100 * ms / total:.0f}% |")
    lines += ["", "| top kernels | group | ms / step |", "|---|---|---|"]
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| `{name[:90]}` | {group_of(name)} | {ms:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_base_patch16_224")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--impls", nargs="+", default=["timm", "compiled"], choices=["timm", "ours", "compiled"])
    p.add_argument("--out", help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    parts = []
    for impl in args.impls:
        try:
            parts.append(profile(args.model, impl, args.keep, args.batch, args.steps, args.warmup))
        except Exception as err:  # one failing row must not lose the others
            parts.append(f"### {impl}: failed: {type(err).__name__}: {str(err)[:300]}")
        print(parts[-1], "\n", flush=True)
    if args.out:
        Path(args.out).write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
