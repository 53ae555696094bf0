"""Inference time of 2:4 sparse vs dense BERT layers on the GPU (cuSPARSELt via torch).

Baseline: the same layer, dense bf16 ``F.linear`` (cuBLAS), in the same run. Weights are
random (no trained BERT-base/large exists offline), pruned 2:4 along the input dimension with
``models.nm_sparsity.nm_mask`` and compressed with ``torch.sparse.to_sparse_semi_structured``.

* per layer: the four GEMMs of a BERT encoder layer, ``(out, in)`` = fused QKV ``(3H, H)``,
  attention output ``(H, H)``, FFN in ``(4H, H)``, FFN out ``(H, 4H)``, at 4096 and 16384 tokens;
* end to end: a randomly initialised ``BertModel`` (base: 12 x 768, large: 24 x 1024) in bf16,
  every encoder Linear pruned 2:4 and exported with :func:`models.nm_sparsity.export_sparse_24`,
  batches of 128-token sequences (32 x 128 = 4096 tokens, 128 x 128 = 16384 tokens).

    python benchmarks/bench_sparse24.py            # needs a CUDA GPU (sm80+, cuSPARSELt)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.nm_sparsity import export_sparse_24, nm_mask, select_linears  # noqa: E402

SHAPES = {"base": (768, 12, 12), "large": (1024, 24, 16)}  # hidden, layers, heads


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


def per_layer(tokens_list: list[int]) -> None:
    from torch.sparse import to_sparse_semi_structured

    print("\n## Per layer (bf16, one H200): dense cuBLAS vs 2:4 cuSPARSELt\n")
    print("| model | GEMM | (out, in) | tokens | dense ms | 2:4 ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for model, (h, _, _) in SHAPES.items():
        gemms = {"QKV": (3 * h, h), "attn out": (h, h), "FFN in": (4 * h, h), "FFN out": (h, 4 * h)}
        for name, (out_f, in_f) in gemms.items():
            w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) / in_f ** 0.5
            w = w * nm_mask(w, 2, 4)
            ws = to_sparse_semi_structured(w)
            b = torch.zeros(out_f, device="cuda", dtype=torch.bfloat16)
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
                diff = float((F.linear(x, ws, b) - F.linear(x, w, b)).abs().max())
                dense = time_ms(lambda: F.linear(x, w, b))
                sparse = time_ms(lambda: F.linear(x, ws, b))
                print(f"| BERT-{model} | {name} | ({out_f}, {in_f}) | {tokens} | {dense:.4f} | {sparse:.4f} "
                      f"| {dense / sparse:.2f}x | {diff:.3g} |", flush=True)


def end_to_end(batches: list[int], seq: int) -> None:
    from transformers import BertConfig, BertModel

    print("\n## End to end (random-init BertModel, bf16, eval, one H200)\n")
    print("| model | batch x seq | tokens | dense ms | 2:4 ms | speed-up | max abs diff (last hidden) |")
    print("|---|---|---|---|---|---|---|")
    for model_name, (h, layers, heads) in SHAPES.items():
        torch.manual_seed(0)
        config = BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * h)
        model = BertModel(config).to("cuda", torch.bfloat16).eval()
        linears = select_linears(model, [r"encoder\.layer\.\d+\."])
        with torch.no_grad():
            for layer in linears.values():
                layer.weight.mul_(nm_mask(layer.weight, 2, 4))
        inputs = {b: torch.randint(1000, 20000, (b, seq), device="cuda") for b in batches}
        dense_ms, ref = {}, {}
        with torch.inference_mode():
            for b, ids in inputs.items():
                ref[b] = model(input_ids=ids).last_hidden_state
                dense_ms[b] = time_ms(lambda: model(input_ids=ids), iters=20, warmup=5)
        export_sparse_24(model, [r"encoder\.layer\.\d+\."])
        with torch.inference_mode():
            for b, ids in inputs.items():
                diff = float((model(input_ids=ids).last_hidden_state - ref[b]).abs().max())
                sparse = time_ms(lambda: model(input_ids=ids), iters=20, warmup=5)
                print(f"| BERT-{model_name} | {b} x {seq} | {b * seq} | {dense_ms[b]:.3f} | {sparse:.3f} "
                      f"| {dense_ms[b] / sparse:.2f}x | {diff:.3g} |", flush=True)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse24: needs a CUDA GPU (2:4 kernels are GPU-only)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"cuSPARSELt {torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else 'n/a'}")
    per_layer(args.tokens)
    end_to_end(args.batches, args.seq)


if __name__ == "__main__":
    main()
