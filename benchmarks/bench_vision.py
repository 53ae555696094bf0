"""PatchDropout training throughput: ours (ViT/DeiT slot layer, structured Swin) beside timm's own
``patch_drop_rate`` for DeiT, eager and ``torch.compile``d, in the same run.

    python benchmarks/bench_vision.py                     # one GPU: DeiT-S, DeiT-B, Swin-T, batch 256
    python benchmarks/bench_vision.py --tiny              # CPU smoke check with the 28x28 models
    python benchmarks/bench_vision.py --preset compiled1   # one GPU: torch.compile rows, DeiT-S and DeiT-B
    python benchmarks/bench_vision.py --preset compiled2   # one GPU: compiled Swin-T, random schedule

Each row: train images/s (forward + backward + fused AdamW step, bf16 autocast on CUDA, random
inputs so data loading is excluded) and peak memory. ``vs keep 1`` divides by the keep-1.0 row of
the same model; ``ours/timm`` compares the two implementations at the same keep rate. For Swin
the keep rate picks ``n = int(keep * 7)`` rows and columns per window: keep 0.5 -> 3/7, i.e. 18%
of the tokens. timm's Swin has no PatchDropout to compare with.

Compiled rows (``impl`` ``compiled`` or ``compiled:MODE``) run ours through ``torch.compile``
(:func:`models.image_classifier.compile_backbone`, in place). Their compile time (first steps
until the graphs exist, CUDA-graph recording included) is reported apart from the timed steps,
with the number of graphs Dynamo built and how many it built during the timed steps (0 = no
per-step recompiles). ``vs eager`` divides by ours eager at the same keep rate, ``vs timm`` by
timm's eager ``patch_drop_rate`` at the same keep rate (at keep 1.0 timm's model is ours eager).
A ``random`` keep (``keep`` = ``random``) uses the reference's per-step schedule; its warm-up
runs until every one of the 11 keep rates has been drawn, so that its graphs all exist.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEIT_S, DEIT_B, SWIN_T = "deit_small_patch16_224", "deit_base_patch16_224", "swin_tiny_patch4_window7_224"
TINY_DEIT, TINY_SWIN = "deit_fmnist_tiny_patch4_28", "swin_fmnist_tiny_patch2_window7_28"
# Row sets: (model, impl, keep). impl: ours | timm | compiled | compiled:MODE; keep: float or "random".
PRESETS = {
    "compiled1": [  # DeiT-S and DeiT-B: eager ours, eager timm, compiled (6 compiles)
        (DEIT_S, "ours", 1.0), (DEIT_S, "ours", 0.5), (DEIT_S, "ours", 0.25),
        (DEIT_S, "timm", 0.5), (DEIT_S, "timm", 0.25),
        (DEIT_B, "ours", 1.0), (DEIT_B, "ours", 0.5), (DEIT_B, "timm", 0.5),
        (DEIT_B, "compiled", 0.5), (DEIT_S, "compiled:reduce-overhead", 0.25), (DEIT_S, "compiled", 0.25),
        (DEIT_S, "compiled", 0.5), (DEIT_B, "compiled", 1.0), (DEIT_S, "compiled", 1.0),
        (DEIT_B, "compiled:max-autotune-no-cudagraphs", 0.5),  # long compile: last, if time is left
    ],
    "compiled2": [  # Swin-T structured (2 compiles), then DeiT-S with the random schedule (11 graphs)
        (SWIN_T, "ours", 1.0), (SWIN_T, "ours", 0.5), (SWIN_T, "compiled", 0.5), (SWIN_T, "compiled", 1.0),
        (DEIT_S, "ours", 1.0), (DEIT_S, "ours", "random"), (DEIT_S, "compiled", "random"),
    ],
    "tiny": [  # smoke check: every kind of fixed-keep row on the 28x28 models (3 compiles)
        (TINY_DEIT, "ours", 1.0), (TINY_DEIT, "ours", 0.5), (TINY_DEIT, "timm", 0.5),
        (TINY_DEIT, "compiled", 0.5), (TINY_DEIT, "compiled:reduce-overhead", 0.25),
        (TINY_SWIN, "ours", 1.0), (TINY_SWIN, "ours", 0.5), (TINY_SWIN, "compiled", 0.5),
    ],
    "smoke": [  # the GPU smoke check: eager rows, CUDA graphs on DeiT, structured Swin (2 compiles)
        (TINY_DEIT, "ours", 1.0), (TINY_DEIT, "ours", 0.25), (TINY_DEIT, "timm", 0.25),
        (TINY_DEIT, "compiled:reduce-overhead", 0.25), (TINY_SWIN, "ours", 0.5), (TINY_SWIN, "compiled", 0.5),
    ],
    "tiny-random": [  # the random schedule compiled on a 28x28 model (11 graphs)
        (TINY_DEIT, "ours", 1.0), (TINY_DEIT, "ours", "random"), (TINY_DEIT, "compiled", "random"),
    ],
}


def build(name: str, impl: str, keep: float | str, img_size: int | None, in_chans: int, num_classes: int):
    import timm

    import models.timm_tiny  # noqa: F401
    from models.image_classifier import install_any_patch_dropout

    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if img_size:
        kwargs["img_size"] = img_size
    if impl == "timm" and keep != "random" and keep < 1:
        kwargs["patch_drop_rate"] = 1.0 - keep
    model = timm.create_model(name, **kwargs)
    if impl != "timm" and (keep == "random" or keep < 1):
        install_any_patch_dropout(model, 1.0 if keep == "random" else keep,
                                  "random" if keep == "random" else "fixed", ordered=True)
    return model


def graphs_built() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(model, batch: int, size: int, in_chans: int, steps: int, warmup: int, device: torch.device,
            compile_mode: str | None = None, backend: str = "inductor") -> dict:
    """Train images/s of ``model``; with ``compile_mode`` it is compiled first and the warm-up
    (compile included) is timed apart."""
    from models.image_classifier import compile_backbone, draw_patch_dropout

    model.to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    images = torch.randn(batch, in_chans, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    tokens = []
    layer = getattr(model, "patch_drop", None)
    random_schedule = getattr(layer, "schedule", "fixed") == "random"
    if compile_mode is not None:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()  # graphs of this row only
        compile_backbone(model, True if compile_mode == "default" else compile_mode, backend)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        if compile_mode is not None:  # the keep rate is drawn outside the graph
            draw_patch_dropout(model, (size, size))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    seen, done = set(), 0
    # Warm-up; the random schedule warms up until all 11 keep rates were drawn (capped).
    while done < warmup or (random_schedule and len(seen) < 11 and done < 200):
        step()
        seen.add(getattr(layer, "last_keep_rate", 1.0))
        done += 1
    if cuda:
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - start
    graphs_before = graphs_built()
    start = time.perf_counter()
    for _ in range(steps):
        step()
        tokens.append(getattr(layer, "last_tokens", None))
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    known = [t for t in tokens if t is not None]
    shown = f"{min(known)}-{max(known)}" if random_schedule and known else tokens[-1]
    result = {"images_per_s": batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps, "peak_gib": peak,
              "tokens": shown, "warmup_steps": done}
    if compile_mode is not None:  # warm-up time minus what its steps take once compiled
        result["compile_s"] = max(0.0, warm_s - done * elapsed / steps)
        result["graphs"] = graphs_built()
        result["new_graphs_timed"] = graphs_built() - graphs_before
    return result


def run_row(name: str, impl: str, keep, batch: int, size: int, chans: int, steps: int, warmup: int,
            device: torch.device, backend: str) -> dict:
    from models.patch_dropout import keep_count

    torch.manual_seed(0)
    model = build(name, impl, keep, size, chans, 10)
    mode = (impl.split(":", 1)[1] if ":" in impl else "default") if impl.startswith("compiled") else None
    try:
        result = measure(model, batch, size, chans, steps, warmup, device, mode, backend)
        if impl == "timm" and keep != 1.0:  # timm's layer does not report; same floor rule
            result["tokens"] = keep_count(model.patch_embed.num_patches, keep)
    finally:
        del model
        gc.collect()
        if mode is not None:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def rate_of(rows: list[dict], model: str, impl: str, keep) -> float | None:
    hits = [r["images_per_s"] for r in rows
            if (r["model"], r["impl"], r["keep"]) == (model, impl, keep) and "images_per_s" in r]
    return hits[0] if hits else None


def table(rows: list[dict]) -> str:
    lines = ["| model | impl | keep | tokens kept (first block) | images/s | ms/step | peak GiB | vs eager keep 1 "
             "| vs eager same keep | vs timm eager same keep | compile s | graphs (new while timed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['impl']} | {r['keep']} | {r['error'][:120]} |" + " - |" * 8)
            continue
        ips, model, keep = r["images_per_s"], r["model"], r["keep"]
        timm_rate = rate_of(rows, model, "ours", 1.0) if keep == 1.0 else rate_of(rows, model, "timm", keep)
        compiled = r["impl"].startswith("compiled")
        tokens = r["tokens"] if r["tokens"] is not None else "all"
        tail = f"{r['compile_s']:.1f} | {r['graphs']} ({r['new_graphs_timed']}) |" if compiled else "- | - |"
        lines.append(
            f"| {model} | {r['impl']} | {keep} | {tokens} | {ips:.0f} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | "
            f"{ratio(ips, rate_of(rows, model, 'ours', 1.0))} | "
            f"{ratio(ips, rate_of(rows, model, 'ours', keep)) if compiled else '-'} | "
            f"{ratio(ips, timm_rate) if r['impl'] != 'timm' else '-'} | {tail}")
    return "\n".join(lines)


def goals(rows: list[dict]) -> str:
    """The compiled goals, as ratios within this run."""
    def best_compiled(model: str, keep) -> float | None:
        hits = [r["images_per_s"] for r in rows if r["model"] == model and r["keep"] == keep
                and r["impl"].startswith("compiled") and "images_per_s" in r]
        return max(hits) if hits else None

    checks = [
        ("DeiT-B keep 0.5 compiled / timm eager keep 0.5", best_compiled(DEIT_B, 0.5),
         rate_of(rows, DEIT_B, "timm", 0.5), 1.3),
        ("DeiT-B keep 0.5 compiled / eager keep 1.0", best_compiled(DEIT_B, 0.5), rate_of(rows, DEIT_B, "ours", 1.0), 2.4),
        ("DeiT-S keep 0.25 compiled (best mode) / eager keep 1.0", best_compiled(DEIT_S, 0.25),
         rate_of(rows, DEIT_S, "ours", 1.0), 2.5),
        ("Swin-T keep 0.5 compiled / eager keep 0.5", best_compiled(SWIN_T, 0.5), rate_of(rows, SWIN_T, "ours", 0.5), 1.3),
    ]
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for label, a, b, target in checks:
        if a and b:
            lines.append(f"| {label} | {a / b:.2f}x | >= {target}x | {'yes' if a / b >= target else 'no'} |")
    fixed = [r for r in rows if "compile_s" in r and r["keep"] != "random"]
    slow = [f"{r['model']} {r['impl']} keep {r['keep']}: {r['compile_s']:.0f} s" for r in fixed if r["compile_s"] >= 60]
    if fixed:
        most = max(r["compile_s"] for r in fixed)
        lines.append(f"| compile time per fixed keep (max) | {most:.0f} s{'; ' + '; '.join(slow) if slow else ''} "
                     f"| < 60 s | {'no' if slow else 'yes'} |")
    for r in rows:
        if "compile_s" in r and r["keep"] == "random":
            lines.append(f"| random schedule, {r['model']}: graphs built while timed (of all, compile {r['compile_s']:.0f} s) "
                         f"| {r['new_graphs_timed']} (of {r['graphs']}) | 0 | {'yes' if r['new_graphs_timed'] == 0 else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check with the 28x28 models")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a row set with compiled rows (tiny: the 28x28 models)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the remaining rows once this many seconds have passed")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.tiny or (args.preset or "").startswith("tiny") or args.preset == "smoke":
        device = torch.device(args.device or "cpu")
        batch, steps, warmup, size, chans = args.batch or 16, args.steps or 2, args.warmup or 1, 28, 1
        models = args.models or [TINY_DEIT, TINY_SWIN]
    else:
        device = torch.device(args.device or "cuda")
        batch, steps, warmup, size, chans = args.batch or 256, args.steps or 20, args.warmup or 5, 224, 3
        models = args.models or [DEIT_S, DEIT_B, SWIN_T]
    if args.preset:
        specs = PRESETS[args.preset]
    else:
        specs = [(name, impl, keep) for name in models for keep in args.keeps
                 for impl in ["ours"] + (["timm"] if "swin" not in name and keep < 1 else [])]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, batch {batch}, {steps} timed steps after {warmup}", flush=True)

    rows = []
    began = time.perf_counter()

    def stop(signum, frame):  # a time limit (`timeout`) ends the run: the table of the rows so far
        raise TimeoutError(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    for name, impl, keep in specs:
        row = {"model": name, "impl": impl, "keep": keep}
        if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
            row["error"] = f"skipped: the {args.budget_s:.0f} s budget is spent"
        else:
            try:  # one failing row does not end the table
                row.update(run_row(name, impl, keep, batch, size, chans, steps, warmup, device, args.backend))
            except TimeoutError as err:
                rows.append({**row, "error": str(err)})
                print(f"  {name} {impl} keep {keep}: {err}", flush=True)
                break
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
        rows.append(row)
        detail = row.get("error") or (
            f"{row['images_per_s']:9.1f} img/s  {row['ms_per_step']:8.1f} ms  {row['peak_gib']:6.2f} GiB"
            + (f"  compile {row['compile_s']:.1f} s, {row['graphs']} graphs ({row['new_graphs_timed']} while timed)"
               if "compile_s" in row else ""))
        print(f"  {name:32s} {impl:26s} keep {keep!s:6s} {detail}  [{time.perf_counter() - began:.0f} s]", flush=True)

    text = table(rows)
    if any(r["impl"].startswith("compiled") for r in rows):
        text += "\n\n" + goals(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
