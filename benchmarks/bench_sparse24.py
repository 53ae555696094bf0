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
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.nm_sparsity import nm_mask, select_linears  # noqa: E402
from models.sparse_inference import (BucketedRunner, search_alg_id, graphed_ms, hf_forward,  # noqa: E402
                                     prepare_sparse24, restore_weights)

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


def per_layer(models: list[str], tokens_list: list[int], iters: int) -> None:
    from torch.sparse import to_sparse_semi_structured

    print("\n## Per layer (bf16): dense cuBLAS vs 2:4 cuSPARSELt, eager and CUDA-graphed\n")
    print("| model | GEMM | (out, in) | tokens | dense eager ms | 2:4 eager ms | dense graph ms "
          "| 2:4 graph ms | 2:4 graph + alg search ms (alg) | graphed speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        h = SHAPES[model][0]
        gemms = {"Q, K, V, attn out": (h, h), "FFN in": (4 * h, h), "FFN out": (h, 4 * h)}
        for name, (out_f, in_f) in gemms.items():
            for tokens in tokens_list:
                try:
                    with torch.inference_mode():
                        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) / in_f ** 0.5
                        w = w * nm_mask(w, 2, 4)
                        ws = to_sparse_semi_structured(w)
                        b = torch.zeros(out_f, device="cuda", dtype=torch.bfloat16)
                        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
                        diff = float((F.linear(x, ws, b) - F.linear(x, w, b)).abs().max())
                        dense_e = time_ms(lambda: F.linear(x, w, b), iters)
                        sparse_e = time_ms(lambda: F.linear(x, ws, b), iters)
                        dense_g = graphed_ms(lambda: F.linear(x, w, b))
                        sparse_g = graphed_ms(lambda: F.linear(x, ws, b))
                        alg = search_alg_id(ws, x, b)
                        ws.alg_id_cusparselt = alg
                        searched = graphed_ms(lambda: F.linear(x, ws, b))
                    best = min(sparse_g, searched)
                    print(f"| BERT-{model} | {name} | ({out_f}, {in_f}) | {tokens} | {dense_e:.4f} | {sparse_e:.4f} "
                          f"| {dense_g:.4f} | {sparse_g:.4f} | {searched:.4f} ({alg}) | {dense_g / best:.2f}x "
                          f"| {diff:.3g} |", flush=True)
                except Exception as err:  # one failing row never kills the table
                    print(f"| BERT-{model} | {name} | ({out_f}, {in_f}) | {tokens} | error: "
                          f"{type(err).__name__}: {str(err)[:200]} |||||||", flush=True)


def end_to_end(models: list[str], batches: list[int], seq: int, iters: int, layers_override: int | None,
               min_speedup: float) -> None:
    from transformers import BertConfig, BertModel

    print("\n## End to end (random-init BertModel, bf16, eval): dense vs 2:4, eager and CUDA-graphed\n")
    print("| model | batch x seq | tokens | dense eager ms | 2:4 eager ms | dense graph ms | 2:4 graph ms "
          "| 2:4 graphed speed-up | auto graph ms | auto speed-up | auto vs best dense | layers dense in auto "
          "| auto + alg search ms | max abs diff (2:4 vs dense) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in models:
        h, layers, heads = SHAPES[model_name]
        layers = layers_override or layers
        try:
            torch.manual_seed(0)
            config = BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * h)
            model = BertModel(config, add_pooling_layer=False).to("cuda", torch.bfloat16).eval()
            with torch.no_grad():
                for layer in select_linears(model, ENCODER).values():
                    layer.weight.mul_(nm_mask(layer.weight, 2, 4))
        except Exception as err:
            print(f"| BERT-{model_name} | model build failed: {type(err).__name__}: {err} |", flush=True)
            continue

        fn = hf_forward(model, "last_hidden_state")

        for b in batches:
            row = f"| BERT-{model_name} ({layers} layers) | {b} x {seq} | {b * seq} "
            try:
                ids = torch.randint(1000, 20000, (b, seq), device="cuda")
                mask = None  # no padding: every path runs without a mask (SDPA's flash kernel)
                with torch.inference_mode():
                    dense_e = time_ms(lambda: fn(ids, mask), iters, 3)
                    dense_runner = BucketedRunner(fn, [seq], [b])
                    ref = dense_runner(ids, mask)
                    dense_g = time_ms(lambda: dense_runner(ids, mask), iters, 3)
                    dense_runner.reset()
                    plan = prepare_sparse24(model, ENCODER, fallback=False)
                    try:
                        sparse_e = time_ms(lambda: fn(ids, mask), max(3, iters // 4), 2)
                        sparse_runner = BucketedRunner(fn, [seq], [b])
                        diff = float((sparse_runner(ids, mask) - ref).abs().max())
                        sparse_g = time_ms(lambda: sparse_runner(ids, mask), iters, 3)
                        sparse_runner.reset()
                    finally:
                        restore_weights(model, plan)
                    auto = prepare_sparse24(model, ENCODER, tokens=b * seq, min_speedup=min_speedup)
                    try:
                        auto_runner = BucketedRunner(fn, [seq], [b])
                        auto_g = time_ms(lambda: auto_runner(ids, mask), iters, 3)
                        auto_runner.reset()
                    finally:
                        restore_weights(model, auto)
                    fell_back = sorted({n.split(".", 3)[-1] for n in auto.choice.dense})
                    note = f"{len(auto.choice.dense)}/{len(auto.table)}: {', '.join(fell_back) or '-'}"
                    if auto_g >= dense_g:  # the automatic path never runs slower than dense
                        auto_g, note = dense_g, f"all (whole model not faster: {note})"
                    search = "-"
                    try:  # auto again with cuSPARSELt's alg-id search per shape (own cell: may fail alone)
                        searched = prepare_sparse24(model, ENCODER, tokens=b * seq, min_speedup=min_speedup,
                                                    alg_search=True)
                        try:
                            search_runner = BucketedRunner(fn, [seq], [b])
                            search_g = time_ms(lambda: search_runner(ids, mask), iters, 3)
                            search_runner.reset()
                        finally:
                            restore_weights(model, searched)
                        algs = sorted({t.alg_id for t in searched.table.values()})
                        search = f"{search_g:.3f} ({dense_g / search_g:.2f}x, algs {algs})"
                    except Exception as err:
                        search = f"error: {type(err).__name__}: {str(err)[:80]}"
                best_dense = min(dense_e, dense_g)
                print(row + f"| {dense_e:.3f} | {sparse_e:.3f} | {dense_g:.3f} | {sparse_g:.3f} "
                      f"| {dense_g / sparse_g:.2f}x | {auto_g:.3f} | {dense_g / auto_g:.2f}x "
                      f"| {best_dense / auto_g:.2f}x | {note} | {search} | {diff:.3g} |", flush=True)
            except Exception as err:  # one failing row never kills the table
                print(row + f"| error: {type(err).__name__}: {str(err)[:300]} |", flush=True)
                traceback.print_exc(limit=3)
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["base", "large"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--min-speedup", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true", help="2-layer models, 4096 tokens, few repeats")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse24: needs a CUDA GPU (2:4 kernels are GPU-only)")
    layers = None
    if args.smoke:
        args.tokens, args.batches, args.iters, layers = [4096], [32], 5, 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cuSPARSELt "
          f"{torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else 'n/a'}")
    per_layer(args.models, args.tokens, args.iters)
    end_to_end(args.models, args.batches, args.seq, args.iters, layers, args.min_speedup)


if __name__ == "__main__":
    main()
