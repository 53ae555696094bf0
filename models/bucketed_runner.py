"""Static-shape buckets and one CUDA graph per bucket, hand-captured or by ``torch.compile``.

A batch ``(B, T)`` is padded to the smallest ``(B*, T*)`` bucket that holds it
(:func:`bucket_for`, :func:`pad_to_bucket`): padded key positions get ``attention_mask = 0`` so
the real tokens' outputs are those of the unpadded batch; padded rows are dropped from the
output. :class:`BucketedRunner` runs each bucket through one of three backends:

* ``"hand"``: a ``torch.cuda.CUDAGraph`` captured on the bucket's first use and replayed after;
* ``"compile"``: ``torch.compile(mode="reduce-overhead", dynamic=False)``, one compiled callable
  per bucket (inductor's kernels, recorded into CUDA graphs by its cudagraph trees);
* ``"eager"``: the padded batch as it is (what the CPU always runs).

``cuda_graphs=True`` means :data:`DEFAULT_GRAPHS`: the one switch to flip once
``benchmarks/bench_graphs.py`` has said which backend wins (docs/bert.md).

Shapes: ``B`` batch rows, ``T`` tokens per row; buckets ``(B*, T*)`` with ``B* >= B``, ``T* >= T``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from models.private_hooks import additive_mask, capture_graph, compile_counters, no_mask_while_capturing, \
    raise_recompile_limit

DEFAULT_SEQ_BUCKETS = (32, 64, 128, 256, 512)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# What ``cuda_graphs=True`` runs. "hand" until bench_graphs.py measures "compile" faster.
DEFAULT_GRAPHS: Literal["hand", "compile"] = "hand"
BACKENDS = ("hand", "compile", "eager", "auto")

Forward = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

__all__ = ["DEFAULT_SEQ_BUCKETS", "DEFAULT_BATCH_BUCKETS", "DEFAULT_GRAPHS", "check_buckets", "cap_buckets",
           "bucket_for", "pad_to_bucket", "warm_up_for_capture", "graphed_ms", "hf_forward", "compile_bucket",
           "BucketedRunner", "bucket_ms", "timed_forward"]


def check_buckets(values: Iterable[int], field_name: str) -> tuple[int, ...]:
    """Sorted, de-duplicated positive bucket sizes; ``ValueError`` naming ``field_name`` otherwise."""
    try:
        buckets = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field_name}: expected a list of positive integers, got {values!r}") from err
    if not buckets or buckets[0] < 1:
        raise ValueError(f"{field_name}: expected a non-empty list of positive integers, got {values!r}")
    return buckets


def cap_buckets(buckets: Sequence[int], limit: int) -> tuple[int, ...]:
    """Buckets above ``limit`` (e.g. a model's ``max_position_embeddings``) replaced by ``limit``."""
    return tuple(sorted({min(b, limit) for b in buckets}))


def bucket_for(size: int, buckets: Sequence[int], field_name: str = "buckets") -> int:
    """The smallest bucket ``>= size``; ``ValueError`` when ``size`` exceeds the largest one."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"{field_name}: {size} is larger than the largest bucket {max(buckets)}; "
                     f"add a bucket >= {size} (or truncate the inputs)")


def pad_to_bucket(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch: int, seq: int,
                  pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` ids and mask -> ``(batch, seq)`` ones, padded on the right and at the bottom.

    Padded positions of real rows get mask 0 (attention ignores them, so real outputs do not
    change); padded rows are pad tokens with only their first position unmasked (a fully
    masked row would be a softmax over nothing), and their outputs are to be dropped.
    """
    b, t = input_ids.shape
    if b > batch or t > seq:
        raise ValueError(f"pad_to_bucket: batch {tuple(input_ids.shape)} does not fit the bucket ({batch}, {seq})")
    ids = input_ids.new_full((batch, seq), pad_token_id)
    ids[:b, :t] = input_ids
    mask = input_ids.new_zeros((batch, seq))
    mask[:b, :t] = 1 if attention_mask is None else attention_mask.to(mask.dtype)
    mask[b:, 0] = 1
    return ids, mask


def warm_up_for_capture(fn: Callable[[], object], calls: int = 3, device=None) -> None:
    """Run ``fn()`` ``calls`` times on a side stream, as CUDA graph capture requires (library
    handles, plans and workspaces are created outside the capture)."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def graphed_ms(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Median milliseconds of one ``fn()`` call, replayed from a CUDA graph of ``calls`` calls
    (the graph removes the host-side cost of each call, as :class:`BucketedRunner` does)."""
    warm_up_for_capture(fn)
    graph, _ = capture_graph(lambda: [fn() for _ in range(calls)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def hf_forward(net: nn.Module, output: str = "logits") -> Forward:
    """``fn(input_ids, attention_mask)`` -> ``net(...).<output>`` of a transformers encoder.

    The mask goes in as :func:`additive_mask` in the dtype of ``net``'s embeddings. ``None``
    means every position attends: SDPA gets no mask (and may take its flash kernel), also inside
    a CUDA graph capture (:func:`no_mask_while_capturing`). Under ``torch.compile`` the unmasked
    path is traced without that context: :func:`compile_bucket` holds it around the compiled
    call, so dynamo traces transformers with the hook in place.
    """
    dtype = net.get_input_embeddings().weight.dtype

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None:
            return getattr(net(input_ids=input_ids, attention_mask=additive_mask(attention_mask, dtype)), output)
        if torch.compiler.is_compiling():  # the hook is held by compile_bucket, outside the trace
            return getattr(net(input_ids=input_ids), output)
        with no_mask_while_capturing():
            return getattr(net(input_ids=input_ids), output)

    return fn


def compile_bucket(fn: Forward, mode: str | None = "reduce-overhead", backend: str | Callable = "inductor"
                   ) -> Forward:
    """``torch.compile(fn, mode, dynamic=False)`` for ONE bucket shape, called with the mask hook held.

    Each call starts a new cudagraph-trees step (``torch.compiler.cudagraph_mark_step_begin``:
    the previous call's outputs may be overwritten, so callers copy what they keep) and runs
    inside ``no_mask_while_capturing(active=True)``, so that dynamo traces transformers' unmasked
    path without a materialised mask, and the hook's replacement stays the same object for
    dynamo's guards from call to call. ``backend`` is for CPU tests (a recording backend).
    """
    compiled = torch.compile(fn, mode=mode, dynamic=False, backend=backend)

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        with no_mask_while_capturing(active=True):
            return compiled(input_ids, attention_mask)

    return run


class BucketedRunner:
    """Run ``fn(input_ids, attention_mask)`` on static-shape buckets, from CUDA graphs on the GPU.

    A batch of ``(B, T)`` is padded to the smallest ``(batch bucket, seq bucket)`` that holds it
    (batches above the largest batch bucket are split); the output's first ``B`` rows are
    returned (a copy). On the CPU every backend runs the padded batch eagerly: same numbers, no
    graph. A graph holds the addresses of the weights it was made with: after changing weights
    (e.g. :func:`models.sparse24_export.prepare_sparse24`), call :meth:`reset` or use a new runner.

    Args:
        fn: returns a tensor whose first dimension is the batch (e.g. logits ``(B, C)``).
        seq_buckets, batch_buckets: bucket sizes (sorted and de-duplicated here).
        pad_token_id: id written into padded positions.
        cuda_graphs: the backend on CUDA inputs. ``True``: :data:`DEFAULT_GRAPHS`; ``"hand"``: a
            ``torch.cuda.CUDAGraph`` per bucket, captured on first use (after two warm-up calls)
            and replayed after; ``"compile"``: :func:`compile_bucket` per bucket (compiled on first
            use after one eager warm-up call; inductor's cudagraphs warm up on that call, record
            on the second and replay from the third); ``False`` or ``"eager"``: no graph;
            ``"auto"``: a hand graph, then a few replays timed against as many eager calls of the
            bucket, the faster kept (:attr:`modes`, :attr:`timings`).
        drop_full_mask: call ``fn(ids, None)`` when the batch fills its bucket and its mask (if
            any) is all ones (a graph of its own; transformers then passes no mask to SDPA,
            which may use its faster flash kernel). ``fn`` must accept ``None`` as the mask.

    Attributes:
        backend: ``"hand"``, ``"compile"``, ``"eager"`` or ``"auto"`` (``cuda_graphs`` resolved).
        last_call_replayed: whether every bucket of the last call replayed a graph made by an
            earlier call (no capture, compile, warm-up or eager run in it): time only those.
        setup_s: bucket key -> seconds of its capture (warm-up included) or compile.
    """

    def __init__(self, fn: Forward, seq_buckets: Iterable[int] = DEFAULT_SEQ_BUCKETS,
                 batch_buckets: Iterable[int] = DEFAULT_BATCH_BUCKETS, pad_token_id: int = 0,
                 cuda_graphs: bool | Literal["auto", "hand", "compile", "eager"] = True,
                 drop_full_mask: bool = True) -> None:
        if cuda_graphs not in (True, False) + BACKENDS:
            raise ValueError(f"cuda_graphs: expected true, false, 'hand', 'compile', 'eager' or 'auto', "
                             f"got {cuda_graphs!r}")
        self.fn = fn
        self.seq_buckets = check_buckets(seq_buckets, "seq_buckets")
        self.batch_buckets = check_buckets(batch_buckets, "batch_buckets")
        self.pad_token_id = pad_token_id
        self.cuda_graphs = cuda_graphs
        self.backend = {True: DEFAULT_GRAPHS, False: "eager"}.get(cuda_graphs, cuda_graphs)
        self.drop_full_mask = drop_full_mask
        self._graphs: dict[tuple, tuple] = {}  # (batch, seq, full, device) -> (graph, ids, mask, out)
        self._compiled: dict[tuple, Forward] = {}  # same keys -> compile_bucket(fn)
        self._calls: dict[tuple, int] = {}  # same keys -> calls of the compiled bucket so far
        self.modes: dict[tuple, str] = {}  # same keys -> "graph" | "eager" (auto only)
        self.timings: dict[tuple, tuple[float, float]] = {}  # same keys -> (graph ms, eager ms) (auto only)
        self.setup_s: dict[tuple, float] = {}
        self.compile_stats: dict[tuple, dict[str, int]] = {}  # same keys -> compile_counters() differences
        self.masked_fallback: str | None = None  # why full buckets run with their mask, if they do
        self.last_call_replayed = False

    @property
    def last_call_captured(self) -> bool:
        """Same as :attr:`last_call_replayed`: the last call ran from graphs captured before it."""
        return self.last_call_replayed

    def reset(self) -> None:
        """Drop every graph and compiled bucket (dynamo keeps its code until ``torch.compiler.reset()``)."""
        self._graphs.clear()
        self._compiled.clear()
        self._calls.clear()
        self.modes.clear()

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The ``(batch, seq)`` buckets with a graph (hand-captured or compiled)."""
        return [(b, t) for b, t, _, _ in (*self._graphs, *self._compiled)]

    def bucket(self, batch: int, seq: int) -> tuple[int, int]:
        return (bucket_for(batch, self.batch_buckets, "batch_buckets"),
                bucket_for(seq, self.seq_buckets, "seq_buckets"))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected (batch, tokens), got shape {tuple(input_ids.shape)}")
        step = self.batch_buckets[-1]
        outputs, replayed = [], []
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], step):
                ids = input_ids[start:start + step]
                mask = None if attention_mask is None else attention_mask[start:start + step]
                out, was_replay = self._run(ids, mask)
                outputs.append(out)
                replayed.append(was_replay)
        self.last_call_replayed = all(replayed)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
        """``(rows of the output, whether they came from replaying an earlier graph)``."""
        b, t = input_ids.shape
        batch, seq = self.bucket(b, t)
        ids, mask = pad_to_bucket(input_ids, attention_mask, batch, seq, self.pad_token_id)
        if self.drop_full_mask:
            # Nothing padded: no mask at all (SDPA may then take its flash kernel). Only a given
            # mask needs a look at its values (one host synchronisation).
            exact = (b, t) == (batch, seq)
            full = exact if attention_mask is None else exact and bool(attention_mask.all())
            mask = None if full else mask
        key = (batch, seq, mask is None, ids.device)
        if self.backend == "eager" or not ids.is_cuda or self.modes.get(key) == "eager":
            return self.fn(ids, mask)[:b], False
        if self.backend == "compile":
            return self._run_compiled(key, ids, mask, b)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(key, ids, mask)
            except RuntimeError as err:
                if mask is not None:
                    raise
                # Some transformers versions look at the ids when no mask is given (a padding
                # warning): a host synchronisation that a graph cannot capture. Masked graphs only.
                warnings.warn(f"BucketedRunner: the model cannot be captured without a mask ({err}); "
                              f"running every batch with its mask (drop_full_mask=False)", stacklevel=2)
                self.drop_full_mask, self.masked_fallback = False, str(err)[:200]
                torch.cuda.synchronize(ids.device)
                return self._run(input_ids, attention_mask)
            replay = False
        else:
            replay = True
        if self.backend == "auto" and key not in self.modes:
            self.modes[key] = self._pick(key, ids, mask)
            if self.modes[key] == "eager":
                return self.fn(ids, mask)[:b], False
        graph, static_ids, static_mask, out = self._graphs[key]
        static_ids.copy_(ids)
        if static_mask is not None:
            static_mask.copy_(mask)
        graph.replay()
        return out[:b].clone(), replay

    def _run_compiled(self, key: tuple, ids: torch.Tensor, mask: torch.Tensor | None, b: int
                      ) -> tuple[torch.Tensor, bool]:
        if key not in self._compiled:
            # One eager call first: cuSPARSELt plans, and a per-layer config that fails falls back
            # (models.sparse24_export) before dynamo reads the layers' state.
            start = time.perf_counter()
            warm_up_for_capture(lambda: self.fn(ids, mask), 1, ids.device)
            raise_recompile_limit(8 + 2 * len(self.batch_buckets) * len(self.seq_buckets))
            before = compile_counters()
            compiled = compile_bucket(self.fn)
            out = compiled(ids, mask)[:b].clone()  # dynamo + inductor, then inductor's cudagraph warm-up
            torch.cuda.synchronize(ids.device)
            self._compiled[key], self._calls[key] = compiled, 0  # only once it ran
            self.setup_s[key] = time.perf_counter() - start
            after = compile_counters()
            self.compile_stats[key] = {k: after[k] - before[k] for k in after}
        else:
            out = self._compiled[key](ids, mask)[:b].clone()
        self._calls[key] += 1
        return out, self._calls[key] > 2  # the 3rd call on replays the recorded graph

    def _pick(self, key: tuple, ids: torch.Tensor, mask: torch.Tensor | None, calls: int = 5) -> str:
        """``"graph"`` or ``"eager"``: the faster, host time included, over ``calls`` runs of each."""
        graph, static_ids, static_mask, _ = self._graphs[key]
        static_ids.copy_(ids)
        if static_mask is not None:
            static_mask.copy_(mask)

        def ms(run: Callable[[], object]) -> float:
            run()
            torch.cuda.synchronize(ids.device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            torch.cuda.synchronize(ids.device)
            return (time.perf_counter() - start) * 1e3 / calls

        graph_ms, eager_ms = ms(graph.replay), ms(lambda: self.fn(ids, mask))
        self.timings[key] = (graph_ms, eager_ms)
        if eager_ms < graph_ms:
            del self._graphs[key]  # its memory back; this bucket runs eagerly from now on
            return "eager"
        return "graph"

    def _capture(self, key: tuple, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple:
        start = time.perf_counter()
        static_ids, static_mask = ids.clone(), None if mask is None else mask.clone()
        warm_up_for_capture(lambda: self.fn(static_ids, static_mask), 2, ids.device)
        graph, out = capture_graph(lambda: self.fn(static_ids, static_mask))
        torch.cuda.synchronize(ids.device)
        self.setup_s[key] = time.perf_counter() - start
        return graph, static_ids, static_mask, out


def logits_runner(net: nn.Module, seq_buckets: Iterable[int] = DEFAULT_SEQ_BUCKETS,
                  batch_buckets: Iterable[int] = DEFAULT_BATCH_BUCKETS,
                  cuda_graphs: bool | Literal["auto", "hand", "compile", "eager"] = True) -> BucketedRunner:
    """A :class:`BucketedRunner` of a transformers classifier's logits (:func:`hf_forward`), its
    sequence buckets capped at the model's ``max_position_embeddings`` and padded with its pad
    token: the runner of :class:`callbacks.Int8Eval` and :class:`callbacks.Sparse24Eval`."""
    config = net.config
    return BucketedRunner(hf_forward(net), cap_buckets(seq_buckets, config.max_position_embeddings),
                          batch_buckets, getattr(config, "pad_token_id", 0) or 0, cuda_graphs)


def bucket_ms(runner: BucketedRunner, batch: int, seq: int, vocab_size: int, device: torch.device | str,
              iters: int = 10) -> float:
    """Median milliseconds of ``runner`` on a random unpadded ``(batch, seq)`` batch (graphs made first)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (batch, seq), generator=gen).to(device)
    for _ in range(3):
        runner(ids)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner(ids)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def timed_forward(runner: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, float]:
    """``(runner(ids, mask), seconds)`` with the device synchronised before and after."""
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = runner(input_ids, attention_mask)
    sync()
    return out, time.perf_counter() - start
