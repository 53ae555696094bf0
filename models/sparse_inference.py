"""Fast 2:4 inference: static-shape buckets, CUDA graphs, and a per-layer dense fallback.

An eager ``F.linear`` with a ``SparseSemiStructuredTensor`` weight pays a fixed host-side cost
(cuSPARSELt set-up inside torch's wrapper, about 0.5 ms per call on one H200), larger than the
whole GEMM at BERT sizes. Replaying a CUDA graph skips that host work and leaves the sparse
kernel, which is faster than cuBLAS's dense one for most BERT-base/large GEMMs. The dense and
the 2:4 model go through the same runner, so their comparison is fair. Three modules:

* :mod:`models.bucketed_runner`: buckets and padding (:func:`bucket_for`, :func:`pad_to_bucket`),
  :func:`hf_forward`, and :class:`BucketedRunner` (one graph per bucket: hand-captured or
  ``torch.compile(mode="reduce-overhead")``, the default set by ``DEFAULT_GRAPHS``);
* :mod:`models.sparse24_export`: the direct cuSPARSELt call, its algorithm search, the timing
  table, :func:`prepare_sparse24` with its per-layer fallback, :func:`keep_if_faster`;
* :mod:`models.private_hooks`: every private torch / transformers API the two use, one function
  each, each checked by ``tests/models/test_private_hooks.py``.

This module re-exports their public names (the import path of callbacks and benchmarks).
"""

from models.bucketed_runner import (DEFAULT_BATCH_BUCKETS, DEFAULT_GRAPHS, DEFAULT_SEQ_BUCKETS, BucketedRunner,
                                    bucket_for, bucket_ms, cap_buckets, check_buckets, compile_bucket, graphed_ms,
                                    hf_forward, logits_runner, pad_to_bucket, timed_forward,
                                    warm_up_for_capture)
from models.private_hooks import DEFAULT_CONFIG, additive_mask, no_mask_while_capturing
from models.sparse24_export import (FallbackChoice, LayerTiming, Sparse24Plan, choose_sparse_layers,
                                    direct_matches_torch, install_direct_forward, keep_if_faster,
                                    linear_timing_table, prepare_sparse24, restore_weights, search_alg_id,
                                    sparse24_linear)

__all__ = ["DEFAULT_SEQ_BUCKETS", "DEFAULT_BATCH_BUCKETS", "DEFAULT_GRAPHS", "DEFAULT_CONFIG", "check_buckets",
           "cap_buckets", "bucket_for", "pad_to_bucket", "LayerTiming", "FallbackChoice", "choose_sparse_layers",
           "graphed_ms", "sparse24_linear", "install_direct_forward", "direct_matches_torch", "search_alg_id",
           "linear_timing_table", "Sparse24Plan", "prepare_sparse24", "restore_weights", "keep_if_faster",
           "bucket_ms", "additive_mask", "no_mask_while_capturing", "hf_forward", "compile_bucket",
           "BucketedRunner", "logits_runner", "timed_forward", "warm_up_for_capture"]
