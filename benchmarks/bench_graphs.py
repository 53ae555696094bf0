"""Hand-captured CUDA graphs vs ``torch.compile(mode="reduce-overhead")`` vs eager, dense and 2:4, on one GPU.

Every cell runs a random-init transformers ``BertModel`` (bf16, eval, every encoder Linear
pruned 2:4 with ``models.nm_sparsity.nm_mask``) through :class:`models.sparse_inference.BucketedRunner`
on ONE static bucket of unpadded 128-token rows (no attention mask: SDPA's flash kernel on
every path), with ``cuda_graphs`` = ``"eager"``, ``"hand"`` (one ``torch.cuda.CUDAGraph``) or
``"compile"`` (``torch.compile(mode="reduce-overhead", dynamic=False)`` of the same bucket).
"2:4" is the export :class:`callbacks.Sparse24Eval` makes by default: ``prepare_sparse24`` with
cuSPARSELt's algorithm search and the per-layer dense fallback at the bucket's token count.

Columns: median ms per call over CUDA-event-timed replays; ``x best`` = ms / the fastest cell of
the same model and size (1.00x is the fastest way found to run it); ``hand / compile`` > 1 means
the compiled bucket is faster; setup = seconds of the hand capture (warm-up included) or of
the compile (eager warm-up, dynamo, inductor, cudagraph warm-up); max |diff| = largest
deviation of the last hidden state from the eager run of the same weights.

Compiling costs tens of seconds per cell, so compiles run in priority order (BERT-base 4k,
BERT-large 16k, then the others) while ``--compile-budget-s`` and ``--deadline-s`` allow; the
cells skipped are named. A failing cell is reported and the table goes on. ``--out`` gets a
copy of the table, rewritten after every row.

    python benchmarks/bench_graphs.py --out benchmarks/results/bench_graphs.md   # ~3 min, one H200
    python benchmarks/bench_graphs.py --smoke --device cpu                          # plumbing only
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.nm_sparsity import nm_mask, select_linears  # noqa: E402
from models.sparse_inference import BucketedRunner, hf_forward, prepare_sparse24, restore_weights  # noqa: E402

SHAPES = {"base": (768, 12, 12), "large": (1024, 24, 16)}  # hidden, layers, heads
ENCODER = [r"encoder\.layer\.\d+\."]
BACKENDS = ("eager", "hand", "compile")
PRIORITY = [("base", 4096), ("large", 16384), ("base", 16384), ("large", 4096)]  # compile order


class Clock:
    """Wall time since start, the compile seconds spent, and whether one more compile fits."""

    def __init__(self, deadline_s: float, compile_budget_s: float) -> None:
        self.start, self.deadline_s, self.compile_budget_s = time.perf_counter(), deadline_s, compile_budget_s
        self.compile_s = 0.0
        self.seen: dict[int, float] = {}  # encoder layers -> longest compile seen at that depth

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def guess(self, layers: int) -> float:
        """Seconds a compile of ``layers`` layers may take: as long as the longest one of that depth,
        else the longest seen scaled by the square root of the depth ratio (equal layers share
        their kernels, so compile time grows slower than depth); 0 before any (it always runs)."""
        if layers in self.seen:
            return self.seen[layers]
        return max((t * (layers / n) ** 0.5 for n, t in self.seen.items()), default=0.0)

    def compile_refusal(self, layers: int) -> str | None:
        """Why a compile of a ``layers``-layer model would not fit, or ``None``."""
        guess = self.guess(layers)
        if self.compile_s + guess > self.compile_budget_s:
            return f"skipped: compile budget ({self.compile_s:.0f} s spent, ~{guess:.0f} s more)"
        if self.elapsed() + guess > self.deadline_s:
            return f"skipped: deadline ({self.elapsed():.0f} s elapsed, ~{guess:.0f} s more)"
        return None

    def add_compile(self, seconds: float, layers: int) -> None:
        self.compile_s += seconds
        self.seen[layers] = max(self.seen.get(layers, 0.0), seconds)


def time_ms(run, iters: int, cuda: bool) -> float:
    """Median milliseconds of ``run()`` over ``iters`` calls (CUDA events on the GPU)."""
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def build(model_name: str, layers: int, device: str):
    from transformers import BertConfig, BertModel

    hidden, _, heads = SHAPES[model_name]
    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden)
    with torch.device(device):  # random init on the GPU: seconds, not a minute on the host
        model = BertModel(config, add_pooling_layer=False)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        for layer in select_linears(model, ENCODER).values():
            layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    return model


def measure(fn, ids, backend: str, iters: int, cuda: bool) -> dict:
    """One cell: ``{"ms", "setup_s", "out", "note"}`` of ``fn`` through a ``BucketedRunner`` backend."""
    runner = BucketedRunner(fn, [ids.shape[1]], [ids.shape[0]], cuda_graphs=backend)
    try:
        with torch.inference_mode():
            out = runner(ids)  # captures / compiles
            setup = next(iter(runner.setup_s.values()), None)
            for _ in range(2):  # compile: the recording call, then a replay
                runner(ids)
            ms = time_ms(lambda: runner(ids), iters, cuda)
        notes = []
        if backend != "eager" and cuda and not runner.last_call_replayed:
            notes.append(f"{backend}: timed calls did not replay a graph")
        for stats in runner.compile_stats.values():
            if stats["graph_breaks"] or stats["cudagraph_skips"]:
                notes.append(f"compile: {stats['graph_breaks']} graph break(s), "
                             f"{stats['cudagraph_skips']} cudagraph skip(s)")
        if runner.masked_fallback:
            notes.append(f"{backend}: ran WITH a mask ({runner.masked_fallback[:80]})")
        return {"ms": ms, "setup_s": setup, "out": out.float(), "note": "; ".join(notes)}
    finally:
        runner.reset()


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def group_rows(model_name: str, layers: int, model, batch: int, seq: int, args, clock: Clock) -> list[str]:
    """The dense and 2:4 rows of one (model, batch x seq); every failure stays in its cell."""
    cuda = args.device == "cuda"
    ids = torch.randint(1000, 20000, (batch, seq), device=args.device)
    cells: dict[tuple[str, str], dict] = {}
    notes: dict[str, list[str]] = {"dense": [], "2:4": []}
    compile_first = (model_name, batch * seq) in PRIORITY[:2]
    for weights in ("dense", "2:4"):
        plan = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if weights == "2:4":
                    plan = prepare_sparse24(model, ENCODER, tokens=batch * seq, alg_search=True)
                    notes[weights].append(f"2:4 on {len(plan.choice.sparse)}/{len(plan.table) or '?'} layers")
                fn = hf_forward(model, "last_hidden_state")
                for backend in BACKENDS:
                    refusal = clock.compile_refusal(layers) if backend == "compile" else None
                    if refusal is None and backend == "compile" and not compile_first and args.priority_only:
                        refusal = "skipped: --priority-only"
                    if refusal:
                        cells[weights, backend] = {"error": refusal}
                        continue
                    try:
                        iters = max(3, args.iters // 4) if (weights, backend) == ("2:4", "eager") else args.iters
                        cells[weights, backend] = measure(fn, ids, backend, iters, cuda)
                    except Exception as err:  # one cell fails, the row goes on
                        text = " ".join(str(err).split()).replace("|", "/")
                        cells[weights, backend] = {"error": f"{type(err).__name__}: {text[:140]}"}
                    finally:
                        if backend == "compile":
                            setup = cells[weights, backend].get("setup_s")
                            if setup:
                                clock.add_compile(setup, layers)
                            torch.compiler.reset()  # free the compiled code and its cudagraph pool
            except Exception as err:  # the export itself failed: the 2:4 row says so, once
                text = " ".join(str(err).split()).replace("|", "/")
                notes[weights].append(f"export failed: {type(err).__name__}: {text[:160]}")
                for backend in BACKENDS:
                    cells.setdefault((weights, backend), {"error": "-"})
            finally:
                if plan is not None:
                    restore_weights(model, plan)
        for w in caught:
            text = " ".join(str(w.message).split())
            if "prototype stage" not in text and "deprecated" not in text:
                notes[weights].append(f"warning: {text[:120]}")
        if cuda:
            torch.cuda.empty_cache()

    times = [c["ms"] for c in cells.values() if "ms" in c]
    best = min(times) if times else None
    rows = []
    for weights in ("dense", "2:4"):
        row = {b: cells.get((weights, b), {"error": "-"}) for b in BACKENDS}
        ref = row["eager"].get("out")
        ms = [row[b].get("ms") for b in BACKENDS]
        ratios = [fmt(m / best if m and best else None, ".2f") + ("x" if m and best else "") for m in ms]
        hand, comp = row["hand"].get("ms"), row["compile"].get("ms")
        diffs = []
        for b in ("hand", "compile"):
            out = row[b].get("out")
            diffs.append(fmt(float((out - ref).abs().max()) if out is not None and ref is not None else None, ".3g"))
        errors = [f"{b}: {row[b]['error']}" for b in BACKENDS if "error" in row[b] and row[b]["error"] != "-"]
        cell_notes = [row[b]["note"] for b in BACKENDS if row[b].get("note")]
        rows.append(
            f"| BERT-{model_name} ({layers} layers) | {batch} x {seq} | {weights} "
            + "".join(f"| {fmt(m, '.3f')} " for m in ms)
            + "".join(f"| {r} " for r in ratios)
            + f"| {fmt(hand / comp if hand and comp else None, '.2f')} "
            + f"| {fmt(row['hand'].get('setup_s'), '.1f')} | {fmt(row['compile'].get('setup_s'), '.1f')} "
            + f"| {diffs[0]} / {diffs[1]} | {'; '.join(notes[weights] + cell_notes + errors) or '-'} |")
    return rows


HEADER = ("| model | batch x seq | weights | eager ms | hand graph ms | compile ms | eager x best | hand x best "
          "| compile x best | hand / compile | hand setup s | compile setup s | max \\|diff\\| hand / compile "
          "| notes |\n" + "|---" * 14 + "|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["base", "large"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile-budget-s", type=float, default=110.0,
                        help="stop compiling once this many seconds went into compiles")
    parser.add_argument("--deadline-s", type=float, default=165.0,
                        help="no compile starts that would end after this many seconds of wall time")
    parser.add_argument("--priority-only", action="store_true",
                        help="compile only BERT-base 4k and BERT-large 16k")
    parser.add_argument("--smoke", action="store_true", help="2-layer models, 4096 tokens, few repeats")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the plumbing (no graphs, no 2:4: those cells fail)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_graphs: needs a CUDA GPU (or --device cpu for a dry run)")
    layers_override = None
    if args.smoke:
        args.tokens, args.iters, layers_override = [4096 if args.device == "cuda" else 256], 3, 2
    clock = Clock(args.deadline_s, args.compile_budget_s)
    import transformers

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    cslt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else "n/a"
    lines = [f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}, cuSPARSELt {cslt}", "",
             HEADER]
    print("\n".join(lines), flush=True)

    def write() -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")

    order = [(m, t) for m, t in PRIORITY if m in args.models and t in args.tokens]
    order += [(m, t) for m in args.models for t in args.tokens if (m, t) not in order]
    models = {}
    for model_name, tokens in order:
        layers = layers_override or SHAPES[model_name][1]
        batch = max(1, tokens // args.seq)
        try:
            if model_name not in models:
                models[model_name] = build(model_name, layers, args.device)
            rows = group_rows(model_name, layers, models[model_name], batch, args.seq, args, clock)
        except Exception as err:  # a whole group failed (the build, say): one line, then the next
            rows = [f"| BERT-{model_name} ({layers} layers) | {batch} x {args.seq} | - | failed: "
                    f"{type(err).__name__}: {' '.join(str(err).split())[:200]} |" + " |" * 10]
        lines.extend(rows)
        print("\n".join(rows), flush=True)
        write()
    lines += ["", f"wall {clock.elapsed():.0f} s, of which compiling {clock.compile_s:.0f} s"]
    print(lines[-1], flush=True)
    write()


if __name__ == "__main__":
    main()
