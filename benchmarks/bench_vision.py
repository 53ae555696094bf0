"""PatchDropout training throughput: ours (ViT/DeiT slot layer, structured Swin) beside timm's own
``patch_drop_rate`` for DeiT, in the same run.

    python benchmarks/bench_vision.py                     # one GPU: DeiT-S, DeiT-B, Swin-T, batch 256
    python benchmarks/bench_vision.py --tiny              # CPU smoke check with the 28x28 models

Each row: train images/s (forward + backward + fused AdamW step, bf16 autocast on CUDA, random
inputs so data loading is excluded) and peak memory. ``vs keep 1`` divides by the keep-1.0 row of
the same model; ``ours/timm`` compares the two implementations at the same keep rate. For Swin
the keep rate picks ``n = int(keep * 7)`` rows and columns per window: keep 0.5 -> 3/7, i.e. 18%
of the tokens. timm's Swin has no PatchDropout to compare with.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(name: str, impl: str, keep: float, img_size: int | None, in_chans: int, num_classes: int):
    import timm

    import models.timm_tiny  # noqa: F401
    from models.image_classifier import install_any_patch_dropout

    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if img_size:
        kwargs["img_size"] = img_size
    if impl == "timm" and keep < 1:
        kwargs["patch_drop_rate"] = 1.0 - keep
    model = timm.create_model(name, **kwargs)
    if impl == "ours" and keep < 1:
        install_any_patch_dropout(model, keep, "fixed", ordered=True)
    return model


def measure(model, batch: int, size: int, in_chans: int, steps: int, warmup: int, device: torch.device) -> dict:
    model.to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    images = torch.randn(batch, in_chans, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    tokens = []
    layer = getattr(model, "patch_drop", None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
        tokens.append(getattr(layer, "last_tokens", None))
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return {"images_per_s": batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps, "peak_gib": peak,
            "tokens": tokens[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check with the 28x28 models")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.tiny:
        models = args.models or ["deit_fmnist_tiny_patch4_28", "swin_fmnist_tiny_patch2_window7_28"]
        device = torch.device(args.device or "cpu")
        batch, steps, warmup, size, chans = args.batch or 16, args.steps or 2, args.warmup or 1, 28, 1
    else:
        models = args.models or ["deit_small_patch16_224", "deit_base_patch16_224", "swin_tiny_patch4_window7_224"]
        device = torch.device(args.device or "cuda")
        batch, steps, warmup, size, chans = args.batch or 256, args.steps or 20, args.warmup or 5, 224, 3
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, batch {batch}, {steps} timed steps after {warmup}", flush=True)

    rows = []
    for name in models:
        base: dict[str, float] = {}
        for keep in args.keeps:
            impls = ["ours"] + (["timm"] if "swin" not in name and keep < 1 else [])
            for impl in impls:
                torch.manual_seed(0)
                model = build(name, impl, keep, size, chans, 10)
                result = measure(model, batch, size, chans, steps, warmup, device)
                if impl == "timm":  # timm's layer does not report; its count is the same floor rule
                    from models.patch_dropout import keep_count

                    result["tokens"] = keep_count(model.patch_embed.num_patches, keep)
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if keep == 1.0:
                    base[name] = result["images_per_s"]
                row = {"model": name, "impl": impl, "keep": keep, **result,
                       "vs_keep1": result["images_per_s"] / base.get(name, float("nan"))}
                rows.append(row)
                print(f"  {name:32s} {impl:5s} keep {keep:4.2f}  {result['images_per_s']:9.1f} img/s  "
                      f"{result['ms_per_step']:8.1f} ms  {result['peak_gib']:6.2f} GiB", flush=True)
    for row in rows:
        twin = [r for r in rows if r["model"] == row["model"] and r["keep"] == row["keep"] and r["impl"] == "timm"]
        row["ours_vs_timm"] = row["images_per_s"] / twin[0]["images_per_s"] if twin and row["impl"] == "ours" else None

    lines = ["| model | impl | keep | tokens kept (first block) | images/s | ms/step | peak GiB | vs keep 1 | ours/timm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ours_vs_timm']:.3f}" if r["ours_vs_timm"] else "-"
        lines.append(f"| {r['model']} | {r['impl']} | {r['keep']} | {r['tokens'] if r['tokens'] is not None else 'all'} | "
                     f"{r['images_per_s']:.0f} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | "
                     f"{r['vs_keep1']:.2f}x | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
