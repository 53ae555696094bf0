"""Inference time of 2:4 sparse vs dense BERT layers and models on the GPU, eager and CUDA-graphed.

Baseline: the same layer or model, dense bf16 (cuBLAS), in the same run, through the same path
(eager or :class:`models.sparse_inference.BucketedRunner`'s CUDA graphs). Weights are random (no
trained BERT-base/large exists offline), pruned 2:4 along the input dimension with
``models.nm_sparsity.nm_mask`` and compressed with ``torch.sparse.to_sparse_semi_structured``.

* per layer: the GEMM shapes of a BERT encoder layer as transformers runs them, ``(out, in)`` =
  ``(H, H)`` (Q, K, V and attention output), FFN in ``(4H, H)``, FFN out ``(H, 4H)``, at
  4096 and 16384 tokens: eager, graphed, and graphed with cuSPARSELt's algorithm search;
* end to end: a randomly initialised ``BertModel`` (base: 12 x 768, large: 24 x 1024) in bf16,
  every encoder Linear pruned 2:4, batches of 128-token sequences (32 x 128 = 4096 tokens,
  128 x 128 = 16384 tokens): dense and all-2:4, eager and graphed, and "auto" (graphed, 2:4 only
  on layers whose graphed GEMM timing beat dense at that token count, the others dense; if the
  whole model is then still not faster than dense, auto uses the dense model), also with
  cuSPARSELt's algorithm search per shape. Batches are unpadded, so every path runs without an
  attention mask (SDPA's flash kernel, the fastest dense baseline); speed-ups are over the dense
  graph, and "auto vs best dense" over the faster of dense eager and dense graphed.

    python benchmarks/bench_sparse24.py            # needs a CUDA GPU (sm80+, cuSPARSELt)
    python benchmarks/bench_sparse24.py --smoke    # seconds: 2-layer models, fewer repeats
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.nm_sparsity import nm_mask, select_linears  # noqa: E402
from models.sparse_inference import (BucketedRunner, graphed_ms, hf_forward, prepare_sparse24,  # noqa: E402
                                     restore_weights, search_alg_id, sparse24_linear)

DEVICE = "cuda"
SHAPES = {"base": (768, 12, 12), "large": (1024, 24, 16)}  # hidden, layers, heads
ENCODER = [r"encoder\.layer\.\d+\."]


def time_ms(fn, iters: int = 50, warmup: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def layout_note() -> str:
    """Whether torch's own ``F.linear`` on a 2:4 weight returns a row-major output for a 3-D input."""
    from torch.sparse import to_sparse_semi_structured

    try:
        with torch.inference_mode():
            w = torch.randn(256, 128, device=DEVICE, dtype=torch.bfloat16)
            ws = to_sparse_semi_structured(w * nm_mask(w, 2, 4))
            x = torch.randn(4, 64, 128, device=DEVICE, dtype=torch.bfloat16)
            out = F.linear(x, ws, torch.zeros(256, device=DEVICE, dtype=torch.bfloat16))
            direct = sparse24_linear(x, ws, torch.zeros(256, device=DEVICE, dtype=torch.bfloat16))
        return (f"torch's F.linear(x (4, 64, 128), 2:4 weight): output strides {tuple(out.stride())}, "
                f"contiguous {out.is_contiguous()}; direct call: strides {tuple(direct.stride())}, "
                f"contiguous {direct.is_contiguous()}")
    except Exception as err:
        return f"layout check failed: {type(err).__name__}: {str(err)[:200]}"


def per_layer(models: list[str], tokens_list: list[int], iters: int) -> None:
    from torch.sparse import to_sparse_semi_structured

    print("\n## Per layer (bf16): dense cuBLAS vs 2:4 cuSPARSELt, eager and CUDA-graphed\n")
    print("2:4 torch = `F.linear` on the `SparseSemiStructuredTensor` (torch's path); 2:4 direct = one "
          "`torch._cslt_sparse_mm` call (`models.sparse_inference.sparse24_linear`, what exported layers run); "
          "config = (alg id, split_k, split_k mode) of cuSPARSELt's search on the direct call.\n")
    print("| model | GEMM | (out, in) | tokens | dense eager ms | 2:4 torch eager ms | dense graph ms "
          "| 2:4 torch graph ms | 2:4 direct graph ms | 2:4 direct + search graph ms (config) "
          "| graphed speed-up (best 2:4) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        h = SHAPES[model][0]
        gemms = {"Q, K, V, attn out": (h, h), "FFN in": (4 * h, h), "FFN out": (h, 4 * h)}
        for name, (out_f, in_f) in gemms.items():
            for tokens in tokens_list:
                try:
                    with torch.inference_mode():
                        w = torch.randn(out_f, in_f, device=DEVICE, dtype=torch.bfloat16) / in_f ** 0.5
                        w = w * nm_mask(w, 2, 4)
                        ws = to_sparse_semi_structured(w)
                        b = torch.zeros(out_f, device=DEVICE, dtype=torch.bfloat16)
                        x = torch.randn(tokens, in_f, device=DEVICE, dtype=torch.bfloat16)
                        diff = float((sparse24_linear(x, ws, b) - F.linear(x, w, b)).abs().max())
                        dense_e = time_ms(lambda: F.linear(x, w, b), iters)
                        sparse_e = time_ms(lambda: F.linear(x, ws, b), iters)
                        dense_g = graphed_ms(lambda: F.linear(x, w, b))
                        sparse_g = graphed_ms(lambda: F.linear(x, ws, b))
                        direct_g = graphed_ms(lambda: sparse24_linear(x, ws, b))
                        config = search_alg_id(ws, x, b)
                        try:
                            searched = graphed_ms(lambda: sparse24_linear(x, ws, b, config))
                        except Exception:
                            searched = float("inf")
                    best = min(sparse_g, direct_g, searched)
                    print(f"| BERT-{model} | {name} | ({out_f}, {in_f}) | {tokens} | {dense_e:.4f} | {sparse_e:.4f} "
                          f"| {dense_g:.4f} | {sparse_g:.4f} | {direct_g:.4f} | {searched:.4f} {config} "
                          f"| {dense_g / best:.2f}x | {diff:.3g} |", flush=True)
                except Exception as err:  # one failing row never kills the table
                    print(f"| BERT-{model} | {name} | ({out_f}, {in_f}) | {tokens} | error: "
                          f"{type(err).__name__}: {str(err)[:200]} ||||||||", flush=True)


def top_kernels(fn, n: int = 6) -> str:
    """The ``n`` GPU kernels with the most device time in one ``fn()`` call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()

    def device_us(e) -> float:
        return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0) or 0.0)

    events = [e for e in prof.key_averages() if device_us(e) > 0 and not e.key.startswith(("aten::", "cuda"))]
    events = sorted(events, key=device_us, reverse=True)[:n]
    total = sum(device_us(e) for e in prof.key_averages() if not e.key.startswith(("aten::", "cuda")))
    return f"{total / 1e3:.2f} ms in kernels; " + "; ".join(
        f"`{e.key[:70]}` {device_us(e) / 1e3:.2f} ms x{e.count}" for e in events)


def end_to_end(models: list[str], batches: list[int], seq: int, iters: int, layers_override: int | None,
               min_speedup: float) -> None:
    from transformers import BertConfig, BertModel

    print("\n## End to end (random-init BertModel, bf16, eval, no padding, no mask): dense vs 2:4\n")
    print("graph = `BucketedRunner` (one CUDA graph per bucket); 2:4 torch = exported weights through torch's "
          "`F.linear`; 2:4 direct = exported layers calling cuSPARSELt directly (the default); auto = 2:4 only "
          "on layers whose graphed GEMM beat dense at this token count, then the faster of its graph and eager "
          "(`cuda_graphs='auto'`), and dense (the faster of eager and graph) unless that is faster still; "
          "speed-ups are over the dense graph, 'auto vs best dense' over the faster of dense eager and graph.\n")
    print("| model | batch x seq | tokens | dense eager ms | dense graph ms | 2:4 torch eager ms | 2:4 torch graph ms "
          "| 2:4 direct graph ms | 2:4 direct graphed speed-up | auto 2:4 ms (mode) | layers dense in auto "
          "| auto + alg search 2:4 ms (mode) | auto runs | auto ms | auto vs best dense "
          "| max abs diff (2:4 vs dense) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for model_name in models:
        h, layers, heads = SHAPES[model_name]
        layers = layers_override or layers
        try:
            torch.manual_seed(0)
            config = BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * h)
            model = BertModel(config, add_pooling_layer=False).to(DEVICE, torch.bfloat16).eval()
            with torch.no_grad():
                for layer in select_linears(model, ENCODER).values():
                    layer.weight.mul_(nm_mask(layer.weight, 2, 4))
        except Exception as err:
            print(f"| BERT-{model_name} | model build failed: {type(err).__name__}: {err} |", flush=True)
            continue

        fn = hf_forward(model, "last_hidden_state")

        for b in batches:
            label = f"BERT-{model_name} ({layers} layers) {b} x {seq}"
            row = f"| BERT-{model_name} ({layers} layers) | {b} x {seq} | {b * seq} "
            cells: dict[str, str] = {}

            def cell(key: str, run) -> float | None:
                """Run one measurement; an error fills its cell only (and restores the dense weights)."""
                try:
                    return run()
                except Exception as err:
                    text = " ".join(str(err).split()).replace("|", "/")
                    cells[key] = f"error: {type(err).__name__}: {text[:100]}"
                    return None

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ids = torch.randint(1000, 20000, (b, seq), device=DEVICE)
                mask = None  # no padding: every path runs without a mask (SDPA's flash kernel)
                with torch.inference_mode():
                    ref = fn(ids, mask)
                    dense_e = cell("dense_e", lambda: time_ms(lambda: fn(ids, mask), iters, 3))

                    def graphed(runner_kwargs=None):
                        runner = BucketedRunner(fn, [seq], [b], **(runner_kwargs or {}))
                        try:
                            ms = time_ms(lambda: runner(ids, mask), iters, 3)
                            out = runner(ids, mask)
                            if runner.masked_fallback:
                                notes.append(f"{label}: a graph ran WITH a mask ({runner.masked_fallback[:120]})")
                            mode = "/".join(sorted(set(runner.modes.values()))) or "graph"
                            if runner.timings:
                                g, e = next(iter(runner.timings.values()))
                                mode += f"; graph {g:.2f} vs eager {e:.2f} ms"
                            return ms, out, mode
                        finally:
                            runner.reset()

                    dense_graph = cell("dense_g", graphed)

                    def sparse(direct: bool, eager: bool):
                        plan = prepare_sparse24(model, ENCODER, fallback=False, direct=direct)
                        try:
                            e_ms = time_ms(lambda: fn(ids, mask), max(3, iters // 4), 2) if eager else None
                            g_ms, out, _ = graphed()
                            return e_ms, g_ms, float((out - ref).abs().max())
                        finally:
                            restore_weights(model, plan)

                    torch_path = cell("torch", lambda: sparse(False, True))
                    direct_path = cell("direct", lambda: sparse(True, False))

                    def auto(alg_search: bool):
                        plan = prepare_sparse24(model, ENCODER, tokens=b * seq, min_speedup=min_speedup,
                                                alg_search=alg_search)
                        try:
                            if not plan.choice.sparse:
                                return None, plan, "no layer faster"
                            ms, _, mode = graphed({"cuda_graphs": "auto"})
                            return ms, plan, mode
                        finally:
                            restore_weights(model, plan)

                    auto_plain = cell("auto", lambda: auto(False))
                    auto_search = cell("search", lambda: auto(True))

            for w in caught:
                text = " ".join(str(w.message).split())[:160]
                if "prototype stage" not in text and "deprecated" not in text:
                    notes.append(f"{label}: warning: {text}")

            try:  # a formatting error costs this row only
                def fmt(v, key, digits=3):
                    return cells.get(key) or ("-" if v is None else f"{v:.{digits}f}")

                dense_g = dense_graph[0] if dense_graph else None
                best_dense = min([v for v in (dense_e, dense_g) if v is not None], default=None)
                dense_kind = "dense eager" if best_dense is not None and best_dense == dense_e else "dense graph"
                t_e, t_g, diff = torch_path if torch_path else (None, None, None)
                d_g = direct_path[1] if direct_path else None
                diff = direct_path[2] if direct_path else diff
                speedup = f"{dense_g / d_g:.2f}x" if dense_g and d_g else "-"
                candidates = []  # (ms, what runs); dense first: 2:4 must be strictly faster to be chosen
                auto_cells = []
                fell = "-"
                for key, result in (("auto", auto_plain), ("search", auto_search)):
                    if result is None:
                        auto_cells.append(cells.get(key, "-"))
                        continue
                    ms, plan, mode = result
                    if key == "auto":
                        names = sorted({n.split(".", 3)[-1] for n in plan.choice.dense})
                        fell = f"{len(plan.choice.dense)}/{len(plan.table)}: {', '.join(names) or '-'}"
                    if ms is None:
                        auto_cells.append(mode)
                        continue
                    configs = sorted({t.config for n, t in plan.table.items() if n in plan.choice.sparse})
                    auto_cells.append(f"{ms:.3f} ({mode})" + (f", configs {configs}" if key == "search" else ""))
                    candidates.append((ms, "2:4 " + ("+ search " if key == "search" else "") + mode.split(";")[0]))
                if best_dense is not None:
                    candidates.insert(0, (best_dense, dense_kind))
                chosen = min(candidates, key=lambda c: c[0]) if candidates else None
                print(row + f"| {fmt(dense_e, 'dense_e')} | {fmt(dense_g, 'dense_g')} | {fmt(t_e, 'torch')} "
                      f"| {fmt(t_g, 'torch')} | {fmt(d_g, 'direct')} | {speedup} | {auto_cells[0]} | {fell} "
                      f"| {auto_cells[1]} | {chosen[1] if chosen else '-'} | {fmt(chosen[0] if chosen else None, '')} "
                      f"| {(best_dense / chosen[0]) if chosen and best_dense else float('nan'):.2f}x "
                      f"| {'-' if diff is None else f'{diff:.3g}'} |", flush=True)
            except Exception as err:
                print(row + f"| row failed: {type(err).__name__}: {str(err)[:200]} |", flush=True)
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    if notes:
        print("\nNotes:\n" + "\n".join(f"* {n}" for n in dict.fromkeys(notes)))


def profile_dense(models: list[str], batch: int, seq: int, layers_override: int | None) -> None:
    """Kernels of the dense model, eager vs CUDA graph, at one batch (a separate run: see --profile)."""
    from transformers import BertConfig, BertModel

    print(f"\n### Where the GPU time goes: dense model, {batch} x {seq}, torch.profiler over one call\n")
    for model_name in models:
        h, layers, heads = SHAPES[model_name]
        layers = layers_override or layers
        try:
            torch.manual_seed(0)
            config = BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * h)
            model = BertModel(config, add_pooling_layer=False).to(DEVICE, torch.bfloat16).eval()
            fn = hf_forward(model, "last_hidden_state")
            ids = torch.randint(1000, 20000, (batch, seq), device=DEVICE)
            with torch.inference_mode():
                print(f"* BERT-{model_name}, dense eager: {top_kernels(lambda: fn(ids, None))}", flush=True)
                runner = BucketedRunner(fn, [seq], [batch])
                runner(ids)
                print(f"* BERT-{model_name}, dense graph (masked: {runner.masked_fallback is not None}): "
                      f"{top_kernels(lambda: runner(ids))}", flush=True)
                runner.reset()
            del model
            torch.cuda.empty_cache()
        except Exception as err:
            print(f"* BERT-{model_name}: profile failed: {type(err).__name__}: {str(err)[:200]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["base", "large"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--min-speedup", type=float, default=1.0)
    parser.add_argument("--profile", type=int, default=None, metavar="BATCH",
                        help="only list the dense model's top kernels, eager vs graph, at this batch size")
    parser.add_argument("--smoke", action="store_true", help="2-layer models, 4096 tokens, few repeats")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse24: needs a CUDA GPU (2:4 kernels are GPU-only)")
    layers = None
    if args.smoke:
        args.tokens, args.batches, args.iters, layers = [4096], [32], 5, 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cuSPARSELt "
          f"{torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else 'n/a'}")
    if args.profile:
        profile_dense(args.models, args.profile, args.seq, layers)
        return
    print(layout_note())
    per_layer(args.models, args.tokens, args.iters)
    end_to_end(args.models, args.batches, args.seq, args.iters, layers, args.min_speedup)


if __name__ == "__main__":
    main()
