"""LLM.int8() inference speed and weight memory against bf16 on one GPU (random weights).

    python benchmarks/bench_int8.py --out benchmarks/results/int8.json   # full: <= 6 minutes
    python benchmarks/bench_int8.py --quick                               # about a minute

1. Per layer (``S x H -> O``): bf16 ``F.linear`` eager and CUDA-graphed; :class:`models.int8.Int8Linear`
   on its default fused path (dynamic outliers, and calibrated), graphed and eager, with the
   GEMM variant chosen per shape (``auto``) and forced to the Triton GEMM or to ``torch._int_mm``
   + fused dequantize; ``torch._int_mm`` alone; torchao ``Int8DynamicActivationInt8WeightConfig``
   + ``torch.compile`` and bitsandbytes ``Linear8bitLt(threshold=6.0, has_fp16_weights=False)``
   where they import.
2. End to end: transformers ``BertModel`` (BERT-base, BERT-large, a 6-layer hidden-4096 stack),
   4k and 16k tokens of 128, bf16: eager, unmasked CUDA graph (``hf_forward`` + ``BucketedRunner``)
   and ``torch.compile`` (default mode, each encoder layer compiled: one compilation reused by
   every layer); the best of the three is 1.00x. Ours: dynamic (the default ``Int8Linear``
   path) eager and graphed, calibrated graphed; torchao + compile; bitsandbytes (eager).

Outliers are planted as the paper observes them: every LayerNorm scales the same 6 hidden
dimensions by ``--plant-gain`` (2.0), so the attention and FFN-expansion inputs carry 6
systematic outlier columns (``|x|`` up to ~50, at ~80% of positions); a gain of 8 made those
dimensions dominate every LayerNorm (``|x|`` ~90) and pushed hundreds of FFN-output columns of
random weights past 6. Per layer, 6 input columns are scaled by 8. 16-bit weight columns are
kept for the dimensions found by :class:`models.int8.OutlierCounter` on the batch (as
``callbacks.Int8Eval`` does on calibration batches). Times: CUDA events, warm-up, median of
``--repeats`` windows. Every row is caught on its own: a failing one prints its error and the
run goes on; optional rows past the time budget print ``skipped (time)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import models.int8 as int8  # noqa: E402
from models.int8 import Int8Linear, OutlierCounter, absmax_quantize, quantize_model, weight_bytes  # noqa: E402
from models.sparse_inference import BucketedRunner, hf_forward, warm_up_for_capture  # noqa: E402

warnings.filterwarnings("ignore", module="bitsandbytes")  # one per call otherwise (bf16 -> fp16 cast)
warnings.filterwarnings("ignore", module="torchao")

LAYERS = (  # model, GEMM, tokens, in, out
    ("BERT-base", "FFN in", 4096, 768, 3072), ("BERT-base", "FFN out", 4096, 3072, 768),
    ("BERT-large", "FFN in", 16384, 1024, 4096), ("BERT-large", "FFN out", 16384, 4096, 1024),
    ("hidden-4096", "attention", 16384, 4096, 4096), ("hidden-4096", "FFN in", 16384, 4096, 16384),
)
QUICK_LAYERS = (0, 4)
MODELS = {"BERT-base": (12, 768, 12, 3072), "BERT-large": (24, 1024, 16, 4096), "hidden-4096": (6, 4096, 32, 16384)}
BATCHES = (32, 128)
SEQ = 128
PLANTED = 6
# --device cpu: a run of this script itself on tiny shapes (float32; with TRITON_INTERPRET=1 the
# fused kernels run in Triton's interpreter), to check every row before a GPU run.
DEVICE, DTYPE = "cuda", torch.bfloat16
CPU_LAYERS = (("tiny", "FFN in", 64, 64, 128),)
CPU_MODELS = {"tiny": (2, 64, 2, 128)}


def use_cpu() -> None:
    global DEVICE, DTYPE, LAYERS, QUICK_LAYERS, MODELS, BATCHES, SEQ
    DEVICE, DTYPE, LAYERS, QUICK_LAYERS, MODELS, BATCHES, SEQ = "cpu", torch.float32, CPU_LAYERS, (0,), CPU_MODELS, (2, 4), 16


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Seconds left of the run's budget; optional rows run only when their cost fits."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def allows(self, cost_s: float) -> bool:
        return self.left() >= cost_s


def timed(fn, iters: int, repeats: int, graph: bool = False) -> float:
    """Median milliseconds per ``fn()`` over ``repeats`` windows of ``iters`` calls (one CUDA graph
    of ``iters`` calls when ``graph``)."""
    graph_obj = None
    if graph and DEVICE == "cuda":
        warm_up_for_capture(fn)
        torch.cuda.synchronize()
        graph_obj = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph_obj, capture_error_mode="thread_local"):
            for _ in range(iters):
                fn()
        run = graph_obj.replay
    else:
        for _ in range(3):
            fn()

        def run():
            for _ in range(iters):
                fn()
    run()
    sync()
    times = []
    for _ in range(repeats):
        if DEVICE != "cuda":
            start_s = time.perf_counter()
            run()
            times.append((time.perf_counter() - start_s) * 1e3 / iters)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    del graph_obj
    return statistics.median(times)


def attempt(row: dict, key: str, fn):
    """``row[key] = fn()``; on failure ``row[key + '_error']`` and one printed line, never a crash."""
    try:
        row[key] = fn()
    except Exception as err:  # one failing row must not end the run
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:240]
        row[f"{key}_error"] = msg
        print(f"  ERROR {row.get('model', '')} {row.get('tokens', '')} {key}: {msg}", flush=True)
        with contextlib.suppress(Exception):
            sync()
            torch.cuda.empty_cache()
    return row.get(key)


@contextlib.contextmanager
def gemm_backend(name: str):
    old, int8.GEMM = int8.GEMM, name
    try:
        yield
    finally:
        int8.GEMM = old


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def optional_imports() -> dict:
    found = {}
    for name in ("torchao", "bitsandbytes"):
        try:
            found[name] = __import__(name).__version__
        except Exception as err:  # not installed, or built for another torch
            found[name] = f"unavailable ({type(err).__name__}: {str(err)[:80]})"
    return found


def torchao_quantize(module: nn.Module) -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    include = re.compile(int8.DEFAULT_INCLUDE)
    quantize_(module, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and (include.search(fqn) or fqn == "0"))


class SameDtype(nn.Module):
    """A layer whose output is cast back to its input's dtype (bitsandbytes may compute in fp16)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def bnb_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict({k: v.detach().cpu() for k, v in linear.state_dict().items()})
    return SameDtype(layer.to(linear.weight.device))  # .to(cuda) quantizes the weight


def first_call_s(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ layers


def layer_inputs(s: int, h: int, o: int) -> tuple[nn.Linear, torch.Tensor, list[int], torch.Tensor]:
    """The seeded layer, its planted input (6 columns scaled by 8), those columns, the fp32 product."""
    torch.manual_seed(0)
    lin = nn.Linear(h, o, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    dims = list(range(0, h, h // PLANTED))[:PLANTED]
    x = torch.randn(s, h, device=DEVICE, dtype=DTYPE)
    x[:, dims] *= 8.0  # |x| >= 6 at about 45% of positions in these columns
    return lin, x, dims, F.linear(x.float(), lin.weight.float(), lin.bias.float())


def bench_layer(args, found: dict, model: str, gemm: str, s: int, h: int, o: int) -> dict:
    from models import int8_triton

    lin, x, dims, ref = layer_inputs(s, h, o)
    n, r = args.iters, args.repeats
    row = {"model": model, "gemm": gemm, "tokens": s, "in": h, "out": o,
           "outlier_columns": int((x.abs().amax(0) >= 6).sum())}
    attempt(row, "bf16_eager_ms", lambda: timed(lambda: F.linear(x, lin.weight, lin.bias), n, r))
    attempt(row, "bf16_graph_ms", lambda: timed(lambda: F.linear(x, lin.weight, lin.bias), n, r, True))
    dynamic = Int8Linear.from_linear(lin, 6.0, fp16_dims=dims)
    calibrated = Int8Linear.from_linear(lin, 6.0, fp16_dims=dims, outliers="calibrated")
    with torch.no_grad():
        attempt(row, "first_call_s", lambda: first_call_s(lambda: dynamic(x)))  # Triton compile + GEMM timing
        attempt(row, "int8_dynamic_graph_ms", lambda: timed(lambda: dynamic(x), n, r, True))
        attempt(row, "int8_calibrated_graph_ms", lambda: timed(lambda: calibrated(x), n, r, True))
        attempt(row, "int8_dynamic_eager_ms", lambda: timed(lambda: dynamic(x), n, r))
        attempt(row, "rel_err", lambda: rel_err(dynamic(x), ref))
        key = (int8_triton._pow2(s), o, h, x.dtype, True, True, "auto", x.device)
        row["chosen"] = str(int8_triton.CHOSEN.get(key))
        for backend in ("triton", "int_mm"):
            with gemm_backend(backend):
                attempt(row, f"int8_{backend}_graph_ms", lambda: timed(lambda: dynamic(x), n, r, True))
        q, _ = absmax_quantize(x)
        attempt(row, "int_mm_alone_ms", lambda: timed(lambda: torch._int_mm(q, dynamic.weight_int8.t()), n, r, True))
    if not found["bitsandbytes"][0].isdigit():
        row["bnb_ms_error"] = "bitsandbytes " + found["bitsandbytes"]
    else:
        def bnb_row():
            layer = bnb_linear(lin)
            with torch.no_grad():
                row["bnb_rel_err"] = rel_err(layer(x), ref)
                return timed(lambda: layer(x), max(2, n // 4), r)
        attempt(row, "bnb_ms", bnb_row)
    print(json.dumps(row), flush=True)
    return row


def layer_torchao(args, row: dict) -> float:
    """torchao int8 dynamic-activation / int8-weight layer under torch.compile (ms; compile s in row)."""
    lin, x, _, ref = layer_inputs(row["tokens"], row["in"], row["out"])
    torch._dynamo.reset()
    mod = nn.Sequential(lin)
    torchao_quantize(mod)
    compiled = torch.compile(mod)
    with torch.no_grad():
        row["torchao_compile_s"] = first_call_s(lambda: compiled(x))
        row["torchao_rel_err"] = rel_err(compiled(x), ref)
        return timed(lambda: compiled(x), args.iters, args.repeats)


# ------------------------------------------------------------------------------------------ models


def build(name: str, gain: float) -> nn.Module:
    from transformers import BertConfig, BertModel

    layers, h, heads, ffn = MODELS[name]
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                     max_position_embeddings=512, attn_implementation="sdpa")
    net = BertModel(cfg, add_pooling_layer=False).to(DEVICE, DTYPE).eval().requires_grad_(False)
    dims = list(range(0, h, h // PLANTED))[:PLANTED]
    with torch.no_grad():
        for mod_name, module in net.named_modules():
            if mod_name.endswith("LayerNorm"):
                module.weight[dims] = gain
    return net


def batch_ids(batch: int) -> torch.Tensor:
    return torch.randint(1000, 20000, (batch, SEQ), device=DEVICE)


def runner_for(fn, batch: int) -> BucketedRunner:
    return BucketedRunner(fn, seq_buckets=(SEQ,), batch_buckets=(batch,))


@contextlib.contextmanager
def compiled_encoder_layers(net: nn.Module):
    """Each encoder layer under ``torch.compile`` (default mode); one compilation serves all."""
    layers = net.encoder.layer
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):  # room for one graph per layer if need be
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            break
    net.encoder.layer = nn.ModuleList([torch.compile(layer, dynamic=False) for layer in layers])
    try:
        with unmasked_while_tracing():
            yield
    finally:
        net.encoder.layer = layers


@contextlib.contextmanager
def unmasked_while_tracing():
    """transformers may build an all-true mask while dynamo traces an unmasked call: keep SDPA
    mask-free (the flash kernel), as ``hf_forward`` does under graph capture."""
    try:
        from models.sparse_inference import no_mask_while_capturing
    except ImportError:
        yield
        return
    with no_mask_while_capturing(active=True):
        yield


KINDS = {"attention.self.query": "qkv", "attention.output.dense": "attn-out", "intermediate.dense": "ffn-in",
         "output.dense": "ffn-out"}


def outlier_columns(counter: OutlierCounter) -> str:
    """Mean number of input columns with max |x| >= 6, per Linear kind (q, k, v share an input)."""
    kinds: dict[str, list[int]] = {}
    for name, peak in counter.absmax.items():
        kind = KINDS.get(name.split(".layer.")[-1].split(".", 1)[-1])
        if kind:
            kinds.setdefault(kind, []).append(int((peak >= counter.threshold).sum()))
    return ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in kinds.items())


def bench_model_core(args, name: str, batch: int) -> dict:
    """bf16 eager and graphed, ours dynamic eager/graphed and calibrated graphed, memory."""
    n, r = args.model_iters, args.repeats
    row = {"model": name, "tokens": batch * SEQ}
    net = build(name, args.plant_gain)
    ids = batch_ids(batch)
    fn = hf_forward(net, "last_hidden_state")
    with torch.no_grad():
        ref = fn(ids, None).float()
        attempt(row, "bf16_eager_ms", lambda: timed(lambda: fn(ids, None), n, r))
        runner = runner_for(fn, batch)
        attempt(row, "bf16_graph_ms", lambda: timed(lambda: runner(ids), n, r))
        runner.reset()
        mem16 = weight_bytes(net)
        linears = {k: m for k, m in net.named_modules() if isinstance(m, nn.Linear) and "encoder" in k}
        counter = OutlierCounter(linears, 6.0)
        with counter:
            fn(ids[: min(batch, 8)], None)  # calibration, as Int8Eval does on validation batches
        row["outlier_columns"] = outlier_columns(counter)
        report = quantize_model(net, 6.0, fp16_dims=counter.outlier_dims())
        row["kept_fp16_columns"] = sum(m.fp16_dims.numel() for m in net.modules() if isinstance(m, Int8Linear))
        row["weight_ratio"] = weight_bytes(net) / mem16
        row["linear_weight_ratio"] = report.bytes_after / report.bytes_before
        attempt(row, "first_call_s", lambda: first_call_s(lambda: fn(ids, None)))
        attempt(row, "int8_dynamic_eager_ms", lambda: timed(lambda: fn(ids, None), n, r))
        attempt(row, "rel_err_dynamic", lambda: rel_err(fn(ids, None), ref))
        runner = runner_for(fn, batch)
        attempt(row, "int8_dynamic_graph_ms", lambda: timed(lambda: runner(ids), n, r))
        runner.reset()
        for m in net.modules():
            if isinstance(m, Int8Linear):
                m.outliers = "calibrated"
        attempt(row, "rel_err_calibrated", lambda: rel_err(fn(ids, None), ref))
        runner = runner_for(fn, batch)
        attempt(row, "int8_calibrated_graph_ms", lambda: timed(lambda: runner(ids), n, r))
        runner.reset()
    del net, runner
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def bench_model_compiled(args, row: dict, name: str, batch: int, kind: str) -> float:
    """Milliseconds of the bf16 (``kind="bf16_compiled"``) or torchao model with its encoder layers
    compiled; compile seconds and the error against bf16 eager go into ``row``."""
    n, r = args.model_iters, args.repeats
    net = build(name, args.plant_gain)
    ids = batch_ids(batch)
    fn = hf_forward(net, "last_hidden_state")
    with torch.no_grad():
        ref = fn(ids, None).float()
        if kind == "torchao":
            torchao_quantize(net)
        with compiled_encoder_layers(net):
            row[f"{kind}_compile_s"] = first_call_s(lambda: fn(ids, None))
            with contextlib.suppress(Exception):
                row[f"{kind}_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            row[f"{kind}_rel_err"] = rel_err(fn(ids, None), ref)
            ms = timed(lambda: fn(ids, None), n, r)
    del net
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return ms


def bench_model_bnb(args, row: dict, name: str, batch: int) -> float:
    net = build(name, args.plant_gain)
    ids = batch_ids(batch)
    fn = hf_forward(net, "last_hidden_state")
    include = re.compile(int8.DEFAULT_INCLUDE)
    with torch.no_grad():
        ref = fn(ids, None).float()
        for mod_name, module in list(net.named_modules()):
            if isinstance(module, nn.Linear) and include.search(mod_name):
                net.set_submodule(mod_name, bnb_linear(module))
        row["bnb_rel_err"] = rel_err(fn(ids, None), ref)
        ms = timed(lambda: fn(ids, None), max(2, args.model_iters // 3), args.repeats)
    del net
    torch.cuda.empty_cache()
    return ms


# ------------------------------------------------------------------------------------------ tables


def cell(row: dict, key: str, best: float | None) -> str:
    if key in row and isinstance(row[key], (int, float)):
        ms = row[key]
        extra = f" ({best / ms:.2f}x)" if best else ""
        for suffix in ("compile_s",):
            k = key.replace("_ms", f"_{suffix}")
            if k in row:
                extra += f", compile {row[k]:.0f} s"
        return f"{ms:.4f}{extra}" if ms < 1 else f"{ms:.3f}{extra}"
    err = row.get(f"{key}_error")
    if not err:
        return "-"
    if err.startswith(("skipped", "not run")):
        return err
    if err.startswith(("torchao ", "bitsandbytes ")):
        return "unavailable"
    return f"error ({err[:60]})"


def best_bf16(row: dict) -> float | None:
    vals = [row[k] for k in ("bf16_eager_ms", "bf16_graph_ms", "bf16_compiled_ms") if isinstance(row.get(k), float)]
    return min(vals) if vals else None


LAYER_COLUMNS = (("bf16 eager", "bf16_eager_ms"), ("bf16 graph", "bf16_graph_ms"),
                 ("ours dynamic, graph", "int8_dynamic_graph_ms"), ("ours calibrated, graph", "int8_calibrated_graph_ms"),
                 ("ours dynamic, eager", "int8_dynamic_eager_ms"), ("ours, Triton GEMM", "int8_triton_graph_ms"),
                 ("ours, _int_mm + dequant", "int8_int_mm_graph_ms"), ("_int_mm alone", "int_mm_alone_ms"),
                 ("torchao + compile", "torchao_ms"), ("bitsandbytes", "bnb_ms"))
MODEL_COLUMNS = (("bf16 eager", "bf16_eager_ms"), ("bf16 graph", "bf16_graph_ms"), ("bf16 compiled", "bf16_compiled_ms"),
                 ("ours dynamic, eager (default call)", "int8_dynamic_eager_ms"),
                 ("ours dynamic, graph", "int8_dynamic_graph_ms"), ("ours calibrated, graph", "int8_calibrated_graph_ms"),
                 ("torchao + compile", "torchao_ms"), ("bitsandbytes", "bnb_ms"))


def tables(result: dict) -> str:
    lines = []
    if result.get("layers"):
        lines += ["## Per layer (ms; ratio = best bf16 / ms)", "",
                  "| model | GEMM | S x H -> O | outlier cols | " + " | ".join(c for c, _ in LAYER_COLUMNS)
                  + " | chosen GEMM | first call s | rel. err (ours / torchao / bnb) |",
                  "|" + "---|" * (len(LAYER_COLUMNS) + 7)]
        for r in result["layers"]:
            best = min([r[k] for k in ("bf16_eager_ms", "bf16_graph_ms") if isinstance(r.get(k), float)] or [0]) or None
            errs = " / ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else "-"
                              for k in ("rel_err", "torchao_rel_err", "bnb_rel_err"))
            lines.append(f"| {r['model']} | {r['gemm']} | {r['tokens']} x {r['in']} -> {r['out']} | {r['outlier_columns']} | "
                         + " | ".join(cell(r, k, best) for _, k in LAYER_COLUMNS)
                         + f" | {r.get('chosen', '-')} | {r.get('first_call_s', float('nan')):.1f} | {errs} |")
    if result.get("models"):
        lines += ["", "## End to end, BertModel bf16, seq 128 (ms; ratio = best bf16 / ms)", "",
                  "| model | tokens | " + " | ".join(c for c, _ in MODEL_COLUMNS)
                  + " | weights int8/bf16 (encoder Linear) | kept 16-bit cols | outlier cols per Linear | rel. err dyn / cal |",
                  "|" + "---|" * (len(MODEL_COLUMNS) + 6)]
        for r in result["models"]:
            best = best_bf16(r)
            lines.append(f"| {r['model']} | {r['tokens']} | " + " | ".join(cell(r, k, best) for _, k in MODEL_COLUMNS)
                         + f" | {r.get('weight_ratio', float('nan')):.2f} ({r.get('linear_weight_ratio', float('nan')):.2f})"
                         f" | {r.get('kept_fp16_columns', '-')} | {r.get('outlier_columns', '-')} | "
                         f"{r.get('rel_err_dynamic', float('nan')):.4f} / {r.get('rel_err_calibrated', float('nan')):.4f} |")
    return "\n".join(lines)


def optional_tasks(args, found: dict, rows: dict, combos: list, layer_rows: list) -> list[tuple]:
    """``(label, estimated seconds, row, key, fn)`` of the rows run only while the budget lasts,
    most useful first: the compiled bf16 baseline at 16k tokens (it may be the best bf16),
    bitsandbytes end to end (eager, cheap), torchao end to end at BERT-base 16k, the compiled
    baseline at 4k, torchao at BERT-large 16k, torchao per layer."""
    compile_s = {"BERT-base": 30, "BERT-large": 40, "hidden-4096": 30, "tiny": 5}
    tasks = []

    def compiled(name, batch, kind, cost):
        row = rows[(name, batch)]
        key = "bf16_compiled_ms" if kind == "bf16_compiled" else "torchao_ms"
        tasks.append((f"{kind} {name} {batch * SEQ}", cost, row, key,
                      lambda: bench_model_compiled(args, row, name, batch, kind)))

    def bnb(name, batch):
        row = rows[(name, batch)]
        tasks.append((f"bitsandbytes {name} {batch * SEQ}", 15, row, "bnb_ms", lambda: bench_model_bnb(args, row, name, batch)))

    big, small = BATCHES[-1], BATCHES[0]
    for name, batch in combos:
        if batch == big:
            compiled(name, batch, "bf16_compiled", compile_s[name])
    if args.quick:
        bnb(*combos[0])
        return tasks
    for name, batch in combos:
        bnb(name, batch)
    if ("BERT-base", big) in rows:
        compiled("BERT-base", big, "torchao", 90)
    for name, batch in combos:
        if batch == small:
            compiled(name, batch, "bf16_compiled", compile_s[name])
    if ("BERT-large", big) in rows:
        compiled("BERT-large", big, "torchao", 120)
    for row in layer_rows:
        tasks.append((f"torchao layer {row['tokens']}x{row['in']}->{row['out']}", 25, row, "torchao_ms",
                      lambda row=row: layer_torchao(args, row)))
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layer shapes, BERT-base only: about a minute")
    parser.add_argument("--out", default=None, help="JSON path; the markdown tables go next to it (.md)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (330 full, 70 quick)")
    parser.add_argument("--reserve-s", type=float, default=10.0, help="seconds kept for the end of the run")
    parser.add_argument("--iters", type=int, default=20, help="calls per timing window (layers)")
    parser.add_argument("--model-iters", type=int, default=6, help="calls per timing window (models)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plant-gain", type=float, default=2.0, help="LayerNorm gain of the 6 planted dimensions")
    parser.add_argument("--models", nargs="*", default=None, choices=list(MODELS) + list(CPU_MODELS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: tiny shapes, to check the script itself (TRITON_INTERPRET=1: fused kernels too)")
    args = parser.parse_args()
    if args.device == "cpu":
        use_cpu()
    elif not torch.cuda.is_available():
        raise SystemExit("bench_int8 needs a CUDA GPU (or --device cpu for a check of the script)")
    clock = Clock(args.budget_s if args.budget_s is not None else (70.0 if args.quick else 330.0))
    found = optional_imports()
    import transformers
    import triton

    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{device_name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"transformers {transformers.__version__} | torchao {found['torchao']} | bitsandbytes {found['bitsandbytes']}")
    print("default path: Int8Linear on CUDA = the fused Triton kernels (models.int8.FUSED=True, GEMM='auto'), "
          "outliers='dynamic', as called (eager); graphed rows run hf_forward + BucketedRunner", flush=True)
    result = {"args": vars(args), "device": device_name, "torch": torch.__version__,
              "triton": triton.__version__, "optional": found, "layers": [], "models": []}
    out = Path(args.out) if args.out else None

    def save() -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2, default=str))
            out.with_suffix(".md").write_text(tables(result) + "\n")

    print("\n# per layer", flush=True)
    for spec in [LAYERS[i] for i in QUICK_LAYERS] if args.quick else LAYERS:
        try:
            result["layers"].append(bench_layer(args, found, *spec))
        except Exception as err:  # e.g. out of memory building the layer
            print(f"  ERROR layer {spec}: {type(err).__name__}: {str(err)[:200]}", flush=True)
        save()
    models = args.models or (list(MODELS)[:1] if args.quick else list(MODELS))
    combos = [(m, b) for m in models for b in BATCHES]
    print(f"\n# end to end ({clock.left():.0f} s left)", flush=True)
    rows = {}
    for name, batch in combos:
        try:
            rows[(name, batch)] = bench_model_core(args, name, batch)
        except Exception as err:
            rows[(name, batch)] = {"model": name, "tokens": batch * SEQ, "error": str(err)[:200]}
            print(f"  ERROR {name} {batch * SEQ}: {type(err).__name__}: {str(err)[:200]}", flush=True)
        result["models"] = list(rows.values())
        save()
    print(f"\n# optional rows, most useful first, while the budget lasts ({clock.left():.0f} s left)", flush=True)
    for label, cost_s, row, key, fn in optional_tasks(args, found, rows, combos, result["layers"]):
        if key in row:
            continue
        package = {"torchao_ms": "torchao", "bnb_ms": "bitsandbytes"}.get(key)
        if package and not found[package][0].isdigit():
            row[f"{key}_error"] = f"{package} {found[package]}"
        elif clock.allows(args.reserve_s + cost_s):
            start = time.perf_counter()
            attempt(row, key, fn)
            compile_s = row.get(key.replace("_ms", "_compile_s"))
            print(f"  {label}: {row.get(key, row.get(key + '_error'))} ms, {time.perf_counter() - start:.0f} s"
                  + (f" (compile {compile_s:.0f} s)" if compile_s is not None else "")
                  + f"; {clock.left():.0f} s left", flush=True)
        else:
            row[f"{key}_error"] = "skipped (time)"
        save()
    for row in rows.values():  # rows this mode does not run
        for key in ("bf16_compiled_ms", "torchao_ms", "bnb_ms"):
            if key not in row and f"{key}_error" not in row:
                row[f"{key}_error"] = "skipped (quick)" if args.quick else "not run (16k tokens only)"
    for row in result["layers"]:
        if "torchao_ms" not in row and "torchao_ms_error" not in row:
            row["torchao_ms_error"] = "skipped (quick)" if args.quick else "not run"
    save()
    print("\n" + tables(result))
    print(f"\ntotal {time.perf_counter() - clock.start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
