"""``torch.compile`` for timm backbones with PatchDropout: what is compiled (the whole model or
each repeated block), where inductor keeps its caches, and how long each first compile took.

Two scopes (``compile_scope``):

* ``"model"``: the whole backbone is one graph per keep count, PatchDropout inside it.
* ``"blocks"``: regional compilation (torch's recipe "Reducing torch.compile cold start
  compilation time with regional compilation"). Each transformer block of ``model.blocks`` is
  compiled in place (``nn.Module.compile``); the blocks are instances of one class with one
  structure, and Dynamo treats their parameters as graph inputs (``inline_inbuilt_nn_modules``,
  torch's default), so the graph traced for the first block serves all of them: one
  graph per keep count (the sequence length) instead of one per block, and a whole-model compile
  cut roughly by the depth. The patch embedding, PatchDropout, final norm and head stay eager;
  the keep count is then drawn and applied outside any graph by construction. Backbones without
  a ``blocks`` sequence (timm's Swin, whose dropped forward calls the block internals) compile
  whole.

Stochastic depth gives every block a different ``DropPath`` rate, a Python float that Dynamo
bakes into the graph: one graph per block again. Under ``"blocks"`` those layers become
:class:`RateBufferDropPath`, the same computation with the rate in a (non-persistent) buffer, so
the blocks share a graph and the state dict does not change.

Caches: inductor's FX graph cache (``torch._inductor.config.fx_graph_cache``) and the
AOTAutograd cache (``torch._functorch.config.enable_autograd_cache``) are switched on; both are
torch's defaults, kept unless the user forced them off through their environment variables.
They live in ``TORCHINDUCTOR_CACHE_DIR`` (torch's default: ``<tmp>/torchinductor_<user>``), or in
the ``cache_dir`` given here. A later process that builds the same graphs loads the compiled
code instead of generating it (Dynamo still traces, a few seconds). :class:`CompileWatch` times
the first step of each graph and reads torch's hit / miss counters, so the log says whether a
compile was served from the cache.
"""

from __future__ import annotations

import os
import time
from typing import Literal

import torch
from timm.layers import DropPath
from torch import nn
from typing_extensions import override

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CompileScope = Literal["model", "blocks"]
COMPILE_SCOPES = ("model", "blocks")
# The one switch for the default scope of ImageClassifier, the CLI and compile_backbone. Measured
# on one H200 (DeiT-B keep 0.5, batch 256, bf16): "blocks" compiled in 5.3 s at 6494 img/s,
# "model" in 36.1 s at 6648 img/s (1.28x / 1.31x timm eager): 7x less compile for 2% less speed.
DEFAULT_COMPILE_SCOPE: CompileScope = "blocks"
# Modes that capture CUDA graphs. A graph per block does not hold: the one compiled block runs
# depth times per step and its cudagraph-tree outputs are overwritten by the next block's run
# before backward reads them ("accessing tensor output of CUDAGraphs that has been overwritten",
# seen on one H200), so these modes compile the whole backbone into one graph.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# Graphs one compiled code object may hold: the random schedule's 11 keep counts, eval, a last
# partial batch in each; torch's default (8) would send the rest back to eager.
RECOMPILE_LIMIT = 32
# torch's counters of the two caches (torch._dynamo.utils.counters[group][name]).
CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                  ("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_hit"),
                  ("aot_autograd", "autograd_cache_miss"), ("aot_autograd", "autograd_cache_bypass"))


class RateBufferDropPath(nn.Module):
    """timm's ``DropPath`` (per-sample stochastic depth) with its keep probability in a float64
    buffer rather than a Python float, so that blocks with different rates trace to one graph.

    Same random draw as timm's ``drop_path`` (``bernoulli_`` with the same double probability,
    then divided by it), so eager results are identical for the same seed; the buffer is not
    persistent (state dicts are timm's) and stays float64 when the module is cast.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob!r}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.register_buffer("keep_prob", torch.tensor(1.0 - self.drop_prob, dtype=torch.float64), persistent=False)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(self.keep_prob)
        if self.scale_by_keep:  # keep 0 leaves the all-zero mask as it is, like timm
            mask = mask.div_(self.keep_prob.clamp_min(1e-12))
        return x * mask

    @override
    def _apply(self, fn, recurse: bool = True):
        # `.to(bfloat16)` would round the probability; rebuild it in float64 on the new device
        module = super()._apply(fn, recurse)
        self.keep_prob = torch.full((), 1.0 - self.drop_prob, dtype=torch.float64, device=self.keep_prob.device)
        return module

    @override
    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def repeated_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The blocks ``"blocks"`` compiles: ``model.blocks`` (timm ViT / DeiT), or ``None``."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
        return list(blocks)
    return None


def share_drop_paths(blocks: list[nn.Module]) -> int:
    """Replace each block's ``DropPath`` (and the ``Identity`` standing in for rate 0 at the same
    name in other blocks) by :class:`RateBufferDropPath`; returns how many layers were replaced."""
    names = {name for block in blocks for name, child in block.named_children() if isinstance(child, DropPath)}
    replaced = 0
    for block in blocks:
        for name in names:
            child = getattr(block, name, None)
            if isinstance(child, DropPath):
                setattr(block, name, RateBufferDropPath(child.drop_prob, child.scale_by_keep))
            elif isinstance(child, nn.Identity):
                setattr(block, name, RateBufferDropPath(0.0))
            else:
                continue
            replaced += 1
    return replaced


def compile_backbone(model: nn.Module, mode: bool | str = True, backend: str = "inductor",
                     dynamic: bool = False, scope: str = DEFAULT_COMPILE_SCOPE) -> nn.Module:
    """``torch.compile`` ``model`` in place (``nn.Module.compile``) and return it.

    In place, so the state dict keeps its keys (no ``_orig_mod.`` prefix) and checkpoints load
    with and without compile. Under ``scope="model"`` PatchDropout traces as part of the graph:
    its keep rate must be a plain number drawn before the call (``layer.draw()``, as
    :class:`models.ImageClassifier` does), so each distinct keep count is one specialised graph
    (``dynamic=False``, the default). Under ``scope="blocks"`` each of ``model.blocks`` is compiled
    and they share one graph per keep count (see the module docstring); a backbone without such
    blocks compiles whole. Either way a fixed keep rate builds one training graph, the random
    schedule at most 11, eval (every patch) one more; the recompile limit is raised to hold them.

    Args:
        mode: ``True`` or a ``torch.compile`` mode (``"reduce-overhead"``: CUDA graphs).
        backend: ``"inductor"``, or ``"aot_eager"`` / ``"eager"`` to check tracing without code
            generation (fast on a CPU).
        dynamic: ``torch.compile(dynamic=...)``.
        scope: ``"model"`` or ``"blocks"`` (the CUDA-graph modes always compile the whole
            backbone: see ``CUDA_GRAPH_MODES``).
    """
    if mode is False:
        return model
    if mode is not True and mode not in COMPILE_MODES:
        raise ValueError(f"compile must be false, true or one of {COMPILE_MODES}, got {mode!r}")
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    kwargs: dict = {"backend": backend, "dynamic": dynamic}
    if mode is not True and mode != "default" and backend == "inductor":
        kwargs["mode"] = mode
    blocks = repeated_blocks(model) if effective_scope(mode, scope) == "blocks" else None
    if blocks is None:
        model.compile(**kwargs)
        return model
    share_drop_paths(blocks)
    for block in blocks:
        block.compile(**kwargs)
    return model


def effective_scope(mode: bool | str, scope: str) -> str:
    """The scope ``compile_backbone`` uses: ``"model"`` for the CUDA-graph modes (see
    ``CUDA_GRAPH_MODES``), else ``scope``."""
    return "model" if mode in CUDA_GRAPH_MODES else scope


def compiled_scope(model: nn.Module, scope: str, mode: bool | str = True) -> str:
    """What ``compile_backbone(model, mode, scope=scope)`` compiles, in words (for the log)."""
    if scope == "blocks" and effective_scope(mode, scope) == "model":
        return f"the whole backbone (mode {mode!r} captures CUDA graphs, which need one graph per step)"
    blocks = repeated_blocks(model) if scope == "blocks" else None
    if blocks is None:
        return "the whole backbone" + (" (no `blocks` sequence to compile regionally)" if scope == "blocks" else "")
    return f"each of its {len(blocks)} blocks (one shared graph per keep count)"


def configure_compile_cache(cache_dir: str | None = None) -> dict:
    """Switch on inductor's FX graph cache and the AOTAutograd cache and put them in
    ``cache_dir`` (``None``: ``TORCHINDUCTOR_CACHE_DIR`` or torch's default); returns the state.

    The directory is process-wide (torch reads ``TORCHINDUCTOR_CACHE_DIR``): call this before the
    first compile. A cache forced off through ``TORCHINDUCTOR_FX_GRAPH_CACHE=0`` or
    ``TORCHINDUCTOR_AUTOGRAD_CACHE=0`` stays off.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir
    except ImportError:  # older torch: the same function in codecache
        from torch._inductor.codecache import cache_dir as inductor_cache_dir

    if cache_dir is not None:
        if not isinstance(cache_dir, str) or not cache_dir.strip():
            raise ValueError(f"compile_cache_dir must be a directory path or null (torch's default), got {cache_dir!r}")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(os.path.expanduser(cache_dir))
    if os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE") is None:
        inductor_config.fx_graph_cache = True
    if os.environ.get("TORCHINDUCTOR_AUTOGRAD_CACHE") is None:
        functorch_config.enable_autograd_cache = True
    return {"dir": inductor_cache_dir(), "fx_graph_cache": bool(inductor_config.fx_graph_cache),
            "autograd_cache": bool(functorch_config.enable_autograd_cache)}


def cache_counters() -> dict[str, int]:
    """torch's cumulative FX graph / AOTAutograd cache counters (hit, miss, bypass) in this process."""
    from torch._dynamo.utils import counters

    return {name: int(counters[group][name]) for group, name in CACHE_COUNTERS}


def describe_cache(delta: dict[str, int]) -> str:
    """``FX graph cache 2 hit / 0 miss, AOTAutograd cache 1 hit / 0 miss`` (bypasses if any)."""
    parts = []
    for label, prefix in (("FX graph cache", "fxgraph_cache"), ("AOTAutograd cache", "autograd_cache")):
        text = f"{label} {delta.get(prefix + '_hit', 0)} hit / {delta.get(prefix + '_miss', 0)} miss"
        if delta.get(prefix + "_bypass"):
            text += f" / {delta[prefix + '_bypass']} bypass"
        parts.append(text)
    return ", ".join(parts)


class CompileWatch:
    """Times the first step of every graph key (training keep count and batch size, eval batch
    size) and records the cache counters it moved: the compile (or cache load) of that graph.

    States: idle -> ``start(key)`` on a new key -> open -> ``finish()`` -> idle (a record added).
    ``start`` on a key seen before, or while open, does nothing; ``finish`` while idle returns
    ``None``. The caller finishes an open record before starting a new key (``needs_finish``).
    """

    def __init__(self) -> None:
        self.seen: set[tuple] = set()
        self.records: list[dict] = []
        self._open: tuple[tuple, float, dict[str, int]] | None = None

    def needs_finish(self, key: tuple) -> bool:
        """Open, and ``key`` would start a new record."""
        return self._open is not None and key not in self.seen

    def start(self, key: tuple, device: torch.device) -> bool:
        if key in self.seen or self._open is not None:
            return False
        self.seen.add(key)
        synchronize(device)
        self._open = (key, time.perf_counter(), cache_counters())
        return True

    def finish(self, device: torch.device) -> dict | None:
        if self._open is None:
            return None
        key, began, before = self._open
        synchronize(device)
        after = cache_counters()
        self._open = None
        record = {"key": key, "seconds": time.perf_counter() - began,
                  **{name: after[name] - before[name] for name in after}}
        self.records.append(record)
        return record


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
