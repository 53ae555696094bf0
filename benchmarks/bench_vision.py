"""PatchDropout training throughput: ours (ViT/DeiT slot layer, structured Swin) beside timm's own
``patch_drop_rate`` for DeiT, eager and ``torch.compile``d, in the same run.

    python benchmarks/bench_vision.py                     # one GPU: DeiT-S, DeiT-B, Swin-T, batch 256
    python benchmarks/bench_vision.py --tiny              # CPU smoke check with the 28x28 models
    python benchmarks/bench_vision.py --preset plan26 --isolate --budget-s 360   # one GPU: compile rows
    python benchmarks/bench_vision.py --preset tiny-plan26 --isolate --backend aot_eager  # its CPU check

Each row: train images/s (forward + backward + fused AdamW step, bf16 autocast on CUDA, random
inputs so data loading is excluded) and peak memory. For Swin the keep rate picks
``n = int(keep * 7)`` rows and columns per window: keep 0.5 -> 3/7, i.e. 18% of the tokens.
timm's Swin has no PatchDropout to compare with.

``impl`` is ``ours`` | ``timm`` (eager) or ``compiled[:MODE[:SCOPE[:warm]]]``: ours through
:func:`models.compile_backbone.compile_backbone` (in place) with a ``torch.compile`` mode and a
scope (``model``: the whole backbone; ``blocks``: each transformer block, one shared graph).
Compiled rows report their compile seconds apart from the timed steps (warm-up time minus what
its steps take once compiled, CUDA-graph recording included), the FX graph / AOTAutograd cache
hits and misses, the graphs Dynamo built and how many it built while timed (0 = no recompiles).
With ``--isolate`` every compiled row runs in a process of its own with an empty inductor cache
directory, so each first compile is cold; a ``:warm`` row is a second process on the cache its
cold twin (the same impl without ``:warm``) left: what a second run of the same config pays.
A ``random`` keep uses the reference's per-step schedule; its warm-up runs until every one of
the 11 keep rates has been drawn, so that its graphs all exist.

Ratios: ``vs eager keep 1`` divides by ours eager at keep 1.0 of the same model, ``vs eager same
keep`` by ours eager at the row's keep, ``vs timm`` by timm's eager ``patch_drop_rate`` at the
same keep (at keep 1.0 timm's model is ours). ``--budget-s``: no row starts later than that, and
rows still running ``--overrun-s`` after it are stopped ("skipped (time)" / "stopped (time)").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEIT_S, DEIT_B, SWIN_T = "deit_small_patch16_224", "deit_base_patch16_224", "swin_tiny_patch4_window7_224"
TINY_DEIT, TINY_SWIN = "deit_fmnist_tiny_patch4_28", "swin_fmnist_tiny_patch2_window7_28"
# Row sets: (model, impl, keep). impl: ours | timm | compiled[:MODE[:SCOPE[:warm]]]; keep: float or "random".
PRESETS = {
    "plan26": [  # one H200, about 7 min with --isolate; most wanted first (the budget may cut the tail)
        (DEIT_B, "timm", 0.5), (DEIT_B, "ours", 0.5), (DEIT_B, "ours", 1.0),
        (DEIT_B, "compiled:default:blocks", 0.5), (DEIT_B, "compiled:default:blocks:warm", 0.5),
        (DEIT_B, "compiled:reduce-overhead:blocks", 0.5), (DEIT_B, "compiled:default:model", 0.5),
        (DEIT_S, "ours", 1.0), (DEIT_S, "ours", "random"), (DEIT_S, "compiled:default:blocks", "random"),
        (SWIN_T, "ours", 1.0), (SWIN_T, "ours", 0.5), (SWIN_T, "compiled:default:model", 0.5),
        (DEIT_B, "compiled:max-autotune-no-cudagraphs:blocks", 0.5),  # long compile: last, if time is left
    ],
    "tiny-plan26": [  # the plan26 row kinds on the 28x28 models (CPU check of the row machinery)
        (TINY_DEIT, "timm", 0.5), (TINY_DEIT, "ours", 0.5), (TINY_DEIT, "ours", 1.0),
        (TINY_DEIT, "compiled:default:blocks", 0.5), (TINY_DEIT, "compiled:default:blocks:warm", 0.5),
        (TINY_DEIT, "compiled:default:model", 0.5),
        (TINY_DEIT, "ours", "random"), (TINY_DEIT, "compiled:default:blocks", "random"),
    ],
    "compiled1": [  # DeiT-S and DeiT-B: eager ours, eager timm, compiled whole (6 compiles)
        (DEIT_S, "ours", 1.0), (DEIT_S, "ours", 0.5), (DEIT_S, "ours", 0.25),
        (DEIT_S, "timm", 0.5), (DEIT_S, "timm", 0.25),
        (DEIT_B, "ours", 1.0), (DEIT_B, "ours", 0.5), (DEIT_B, "timm", 0.5),
        (DEIT_B, "compiled", 0.5), (DEIT_S, "compiled:reduce-overhead", 0.25), (DEIT_S, "compiled", 0.25),
        (DEIT_S, "compiled", 0.5), (DEIT_B, "compiled", 1.0), (DEIT_S, "compiled", 1.0),
        (DEIT_B, "compiled:max-autotune-no-cudagraphs", 0.5),  # long compile: last, if time is left
    ],
    "compiled2": [  # Swin-T structured (2 compiles), then DeiT-S with the random schedule (11 graphs)
        (SWIN_T, "ours", 1.0), (SWIN_T, "ours", 0.5), (SWIN_T, "compiled", 0.5), (SWIN_T, "compiled", 1.0),
        (DEIT_S, "ours", 1.0), (DEIT_S, "ours", "random"), (DEIT_S, "compiled:default:blocks", "random"),
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
RESULT_PREFIX = "ROW_RESULT "


def parse_impl(impl: str) -> dict | None:
    """``compiled[:MODE[:SCOPE[:warm]]]`` -> ``{"mode", "scope", "warm"}``; ``None`` for eager."""
    if not impl.startswith("compiled"):
        return None
    parts = impl.split(":")
    return {"mode": parts[1] if len(parts) > 1 else "default", "scope": parts[2] if len(parts) > 2 else "model",
            "warm": "warm" in parts[3:]}


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
            compiled: dict | None = None, backend: str = "inductor") -> dict:
    """Train images/s of ``model``; when ``compiled`` it is compiled first and the warm-up
    (compile included) is timed apart."""
    from models.compile_backbone import cache_counters, compile_backbone
    from models.image_classifier import draw_patch_dropout

    model.to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    images = torch.randn(batch, in_chans, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    tokens = []
    layer = getattr(model, "patch_drop", None)
    random_schedule = getattr(layer, "schedule", "fixed") == "random"
    if compiled is not None:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()  # graphs and cache counters of this row only
        mode = True if compiled["mode"] == "default" else compiled["mode"]
        compile_backbone(model, mode, backend, scope=compiled["scope"])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        if compiled is not None:  # the keep rate is drawn outside the graph
            draw_patch_dropout(model, (size, size))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    seen, done = set(), 0
    # Warm-up; the random schedule warms up until all 11 keep rates were drawn (capped).
    while done < warmup or (random_schedule and len(seen) < 11 and done < 300):
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
    if compiled is not None:  # warm-up time minus what its steps take once compiled
        result["compile_s"] = max(0.0, warm_s - done * elapsed / steps)
        result["graphs"] = graphs_built()
        result["new_graphs_timed"] = graphs_built() - graphs_before
        result["cache"] = cache_counters()
    return result


def run_row(name: str, impl: str, keep, settings: dict) -> dict:
    """One row in this process (``settings``: batch, size, chans, steps, warmup, device, backend)."""
    from models.patch_dropout import keep_count

    device = torch.device(settings["device"])
    torch.manual_seed(0)
    model = build(name, impl, keep, settings["size"], settings["chans"], 10)
    compiled = parse_impl(impl)
    if compiled is not None and settings.get("cache_dir") and settings["backend"] == "inductor":
        from models.compile_backbone import configure_compile_cache

        configure_compile_cache(settings["cache_dir"])
    try:
        result = measure(model, settings["batch"], settings["size"], settings["chans"], settings["steps"],
                         settings["warmup"], device, compiled, settings["backend"])
        if impl == "timm" and keep != 1.0:  # timm's layer does not report; same floor rule
            result["tokens"] = keep_count(model.patch_embed.num_patches, keep)
    finally:
        del model
        gc.collect()
        if compiled is not None:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def run_isolated(name: str, impl: str, keep, settings: dict, cache_dir: Path, timeout_s: float) -> dict:
    """One row in a child process with ``cache_dir`` as its inductor cache; its stderr goes to a
    log file whose tail is the error of a failed row."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir.parent / slug_of(name, impl, keep)
    result_file, log_file = Path(f"{stem}.result.json"), Path(f"{stem}.stderr.log")
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    env.pop("TRITON_CACHE_DIR", None)  # Triton's kernels go under the row's cache dir too
    spec = json.dumps({"row": [name, impl, keep], "settings": {**settings, "cache_dir": str(cache_dir)},
                       "result_file": str(result_file)})
    began = time.perf_counter()
    with open(log_file, "w") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child-row", spec],
                                 stderr=log, env=env, start_new_session=True)
        try:
            code = child.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            return {"error": f"stopped (time) after {time.perf_counter() - began:.0f} s"}
        finally:
            if child.poll() is None:  # timed out, or this process is being stopped
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    if code != 0 or not result_file.exists():
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"child exited with {code}: {' '.join(tail)[-300:]}"}
    result = json.loads(result_file.read_text())
    result["process_s"] = time.perf_counter() - began
    return result


def slug_of(name: str, impl: str, keep) -> str:
    return f"{name}-{impl}-keep{keep}".replace(":", "-").replace("/", "-")


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    name, impl, keep = spec["row"]
    settings = spec["settings"]
    apply_backend_flags()
    try:
        result = run_row(name, impl, keep, settings)
    except Exception as err:  # noqa: BLE001  (reported as the row's error)
        result = {"error": f"{type(err).__name__}: {err}"}
    Path(spec["result_file"]).write_text(json.dumps(result))


def apply_backend_flags() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def rate_of(rows: list[dict], model: str, impl: str, keep) -> float | None:
    hits = [r["images_per_s"] for r in rows
            if (r["model"], r["impl"], r["keep"]) == (model, impl, keep) and "images_per_s" in r]
    return hits[0] if hits else None


def cache_text(cache: dict | None) -> str:
    if not cache:
        return "-"
    return (f"{cache['fxgraph_cache_hit']}/{cache['fxgraph_cache_miss']}, "
            f"{cache['autograd_cache_hit']}/{cache['autograd_cache_miss']}")


def table(rows: list[dict]) -> str:
    lines = ["| model | impl | keep | tokens kept (first block) | images/s | ms/step | peak GiB | vs eager keep 1 "
             "| vs eager same keep | vs timm eager same keep | compile s | process s | cache hit/miss (FX, AOT) "
             "| graphs (new while timed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['impl']} | {r['keep']} | {r['error'][:160]} |" + " - |" * 10)
            continue
        ips, model, keep = r["images_per_s"], r["model"], r["keep"]
        timm_rate = rate_of(rows, model, "ours", 1.0) if keep == 1.0 else \
            None if keep == "random" else rate_of(rows, model, "timm", keep)  # timm has no random schedule
        compiled = r["impl"].startswith("compiled")
        tokens = r["tokens"] if r["tokens"] is not None else "all"
        process = f"{r['process_s']:.0f}" if "process_s" in r else "-"
        tail = (f"{r['compile_s']:.1f} | {process} | {cache_text(r.get('cache'))} | "
                f"{r['graphs']} ({r['new_graphs_timed']}) |" if compiled else "- | - | - | - |")
        lines.append(
            f"| {model} | {r['impl']} | {keep} | {tokens} | {ips:.0f} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | "
            f"{ratio(ips, rate_of(rows, model, 'ours', 1.0))} | "
            f"{ratio(ips, rate_of(rows, model, 'ours', keep)) if compiled else '-'} | "
            f"{ratio(ips, timm_rate) if r['impl'] != 'timm' else '-'} | {tail}")
    return "\n".join(lines)


def goals(rows: list[dict]) -> str:
    """The compiled goals, as ratios within this run."""
    def compiled_rows(model: str, keep, scope: str | None = None, warm: bool = False) -> list[dict]:
        return [r for r in rows if r["model"] == model and r["keep"] == keep and "images_per_s" in r
                and (c := parse_impl(r["impl"])) is not None and c["warm"] == warm
                and (scope is None or c["scope"] == scope)]

    def best(model: str, keep) -> float | None:
        hits = [r["images_per_s"] for r in compiled_rows(model, keep)]
        return max(hits) if hits else None

    deit_b = [rate for rate in (best(DEIT_B, 0.5), best(TINY_DEIT, 0.5)) if rate]
    model = DEIT_B if best(DEIT_B, 0.5) else TINY_DEIT
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    checks = [(f"{model} keep 0.5 compiled (best) / timm eager keep 0.5", deit_b[0] if deit_b else None,
               rate_of(rows, model, "timm", 0.5), 1.5),
              (f"{model} keep 0.5 compiled (best) / eager keep 1.0", deit_b[0] if deit_b else None,
               rate_of(rows, model, "ours", 1.0), 2.4),
              ("DeiT-S keep 0.25 compiled (best mode) / eager keep 1.0", best(DEIT_S, 0.25),
               rate_of(rows, DEIT_S, "ours", 1.0), 2.5),
              ("Swin-T keep 0.5 compiled / eager keep 0.5", best(SWIN_T, 0.5), rate_of(rows, SWIN_T, "ours", 0.5), 1.3)]
    for label, a, b, target in checks:
        if a and b:
            lines.append(f"| {label} | {a / b:.2f}x | >= {target}x | {'yes' if a / b >= target else 'no'} |")
    for scope in ("blocks", "model"):
        for r in compiled_rows(model, 0.5, scope):
            if parse_impl(r["impl"])["mode"] == "default":
                met = "yes" if r["compile_s"] <= 30 else "no"
                lines.append(f"| {model} first compile, scope {scope} (cold cache) | {r['compile_s']:.0f} s | <= 30 s "
                             f"| {met if scope == 'blocks' else '-'} |")
    for r in compiled_rows(model, 0.5, "blocks", warm=True):
        cache = r.get("cache") or {}
        hits, misses = cache.get("fxgraph_cache_hit", 0), cache.get("fxgraph_cache_miss", 0)
        lines.append(f"| {model} second process, same cache dir: compile s (FX graph cache) | {r['compile_s']:.0f} s "
                     f"({hits} hits, {misses} misses) | hits, no misses | {'yes' if hits and not misses else 'no'} |")
    for r in rows:
        if "compile_s" in r and r["keep"] == "random":
            ok = r["new_graphs_timed"] == 0 and r["graphs"] <= 11
            lines.append(f"| random schedule, {r['model']} {r['impl']}: graphs (built while timed), compile "
                         f"| {r['graphs']} ({r['new_graphs_timed']}), {r['compile_s']:.0f} s | <= 11 (0) | "
                         f"{'yes' if ok else 'no'} |")
    return "\n".join(lines)


def header(device: torch.device, batch: int, steps: int, warmup: int) -> str:
    import timm
    from timm.layers import use_fused_attn

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sdpa = (f", SDPA flash {torch.backends.cuda.flash_sdp_enabled()} mem-efficient "
            f"{torch.backends.cuda.mem_efficient_sdp_enabled()}") if device.type == "cuda" else ""
    return (f"device {name}, torch {torch.__version__}, timm {timm.__version__} (fused attention "
            f"{use_fused_attn()}{sdpa}), batch {batch}, {steps} timed steps after {warmup}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check with the 28x28 models")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a row set with compiled rows (tiny*: the 28x28 models)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--isolate", action="store_true",
                        help="run each compiled row in its own process with an empty inductor cache")
    parser.add_argument("--cache-root", default=None,
                        help="with --isolate: where the rows' cache dirs go (default: a new temporary dir)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--overrun-s", type=float, default=45.0,
                        help="with --budget-s and --isolate: stop a row still running this long after the budget")
    parser.add_argument("--min-left-s", type=float, default=30.0,
                        help="with --budget-s and --isolate: start a compiled row only with this much time left")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--child-row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_row:
        child_main(args.child_row)
        return
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
    apply_backend_flags()
    print(header(device, batch, steps, warmup), flush=True)
    settings = {"batch": batch, "size": size, "chans": chans, "steps": steps, "warmup": warmup,
                "device": str(device), "backend": args.backend}
    cache_root = Path(args.cache_root or tempfile.mkdtemp(prefix="bench_vision_cache_"))
    if args.isolate:
        print(f"compiled rows: one process each, inductor caches under {cache_root}", flush=True)

    rows = []
    began = time.perf_counter()
    deadline = None if args.budget_s is None else began + args.budget_s + args.overrun_s

    def stop(signum, frame):  # a time limit (`timeout`) ends the run: the table of the rows so far
        raise TimeoutError(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    for name, impl, keep in specs:
        row = {"model": name, "impl": impl, "keep": keep}
        compiled = parse_impl(impl)
        isolated = args.isolate and compiled is not None
        now = time.perf_counter()
        if args.budget_s is not None and (now - began > args.budget_s
                                          or (isolated and deadline - now < args.min_left_s)):
            row["error"] = "skipped (time)"
        else:
            try:  # one failing row does not end the table
                if isolated:
                    twin = impl.removesuffix(":warm")  # a warm row reuses its cold twin's cache
                    timeout = (deadline - now) if deadline is not None else 3600.0
                    row.update(run_isolated(name, impl, keep, settings, cache_root / slug_of(name, twin, keep),
                                            timeout))
                else:
                    row.update(run_row(name, impl, keep, settings))
            except TimeoutError as err:
                rows.append({**row, "error": str(err)})
                print(f"  {name} {impl} keep {keep}: {err}", flush=True)
                break
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {err}"
        if "error" in row:
            row["error"] = row["error"].replace("\n", " ").replace("|", "/")
        rows.append(row)
        detail = row.get("error") or (
            f"{row['images_per_s']:9.1f} img/s  {row['ms_per_step']:8.1f} ms  {row['peak_gib']:6.2f} GiB"
            + (f"  compile {row['compile_s']:.1f} s, cache {cache_text(row.get('cache'))}, {row['graphs']} graphs "
               f"({row['new_graphs_timed']} while timed)" if "compile_s" in row else ""))
        print(f"  {name:32s} {impl:42s} keep {keep!s:6s} {detail}  [{time.perf_counter() - began:.0f} s]", flush=True)

    text = table(rows)
    if any(r["impl"].startswith("compiled") for r in rows):
        text += "\n\n" + goals(rows)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(header(device, batch, steps, warmup) + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
