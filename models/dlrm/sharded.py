"""Sparse, fused embedding updates the way torchrec intends them.

:func:`shard_with_fused_optimizer` marks the embedding tables for an optimizer applied inside the
backward pass (``_apply_optimizer_in_backward``) and wraps the model in torchrec's
``DistributedModelParallel`` (DMP), also at world size 1. DMP replaces the tables with fbgemm's
table-batched embedding (TBE) modules, whose backward updates only the rows a batch touched
(row-wise Adagrad by default) instead of materialising a dense gradient for every row; the dense
layers are wrapped in DDP by DMP itself. :class:`FusedDenseOptimizer` is torchrec's
``CombinedOptimizer`` of DMP's fused optimizer and a ``KeyedOptimizerWrapper`` around any torch
optimizer for the dense part; its ``state_dict`` holds plain tensors (sharded ones gathered), so
Lightning checkpoints load with ``torch.load(weights_only=True)`` and resume the fused state.
"""

from __future__ import annotations

import time
import warnings
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.distributed.tensor import DTensor, distribute_tensor
from torchrec import optim as trec_optim
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

EmbeddingOptimizerName = Literal["row_wise_adagrad", "adagrad", "sgd", "adam"]
ShardingTypeName = Literal["table_wise", "row_wise", "column_wise", "table_row_wise"]


EMBEDDING_OPTIMIZERS = {"row_wise_adagrad": trec_optim.RowWiseAdagrad, "adagrad": trec_optim.Adagrad,
                        "sgd": trec_optim.SGD, "adam": trec_optim.Adam}


def ensure_process_group(device: torch.device) -> bool:
    """Initialise a one-process group when none exists (DMP needs one even at world size 1).

    Returns True when this call created it. Lightning's DDP strategies create the group
    themselves before the model is built, so under them this is a no-op.
    """
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # With a process group, Lightning recommends sync_dist=True for every epoch-level tensor it
    # logs, even at world size 1 where there is nothing to accumulate: not for this process.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(")
    return True


def shard_with_fused_optimizer(
    model: nn.Module,
    device: torch.device,
    embedding_optimizer: EmbeddingOptimizerName = "row_wise_adagrad",
    embedding_lr: float = 0.01,
    embedding_eps: float = 1e-8,
    embedding_weight_decay: float = 0.0,
    sharding_types: list[ShardingTypeName] | None = None,
    timings: dict[str, float] | None = None,
) -> nn.Module:
    """Wrap ``model`` (whose ``EmbeddingBagCollection`` lives on the meta device or CPU) in DMP.

    Every table gets the FUSED compute kernel (its optimizer runs in backward); the planner
    picks a sharding among ``sharding_types`` (default: table-, row- or column-wise; never data
    parallel, which would bring back dense gradients). ``timings``, when given, receives the
    seconds of the two parts of the build: ``plan_s`` (the planner) and ``shard_s`` (DMP
    allocating and initialising the tables on ``device``).
    """
    start = time.perf_counter()
    ensure_process_group(device)
    kwargs: dict = {"lr": embedding_lr}
    if embedding_optimizer in ("row_wise_adagrad", "adagrad", "adam"):
        kwargs["eps"] = embedding_eps
    if embedding_weight_decay:
        kwargs["weight_decay"] = embedding_weight_decay
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    if not ebcs:
        raise ValueError("model: no torchrec EmbeddingBagCollection found to shard")
    tables = [cfg.name for ebc in ebcs for cfg in ebc.embedding_bag_configs()]
    for ebc in ebcs:
        _apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[embedding_optimizer],
                                     ebc.parameters(), kwargs)
    types = sharding_types or ["table_wise", "row_wise", "column_wise"]
    constraints = {name: ParameterConstraints(
        sharding_types=list(types), compute_kernels=[EmbeddingComputeKernel.FUSED.value])
        for name in tables}
    world = dist.get_world_size()
    topology = planner_topology(device, world)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = get_default_sharders()
    # One process plans alone (the collective version broadcasts rank 0's plan, which here
    # would only be the first use of a communicator that nothing else needs yet).
    plan = (planner.plan(model, sharders) if world == 1
            else planner.collective_plan(model, sharders, dist.GroupMember.WORLD))
    planned = time.perf_counter()
    # At world size 1 DDP around the dense part only costs time (its first ten iterations are
    # instrumented and slow), so DMP's data-parallel wrapper is used from two processes up.
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders,
                                   init_data_parallel=world > 1)
    if world == 1:
        # Without the data-parallel wrapper DMP leaves the dense layers where they were built
        # (the host); torchrec's own wrapper moves them with ``.to(device)``, so do the same.
        dmp.module.to(device)
    if timings is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the tables' initialisation is asynchronous
        timings["plan_s"] = planned - start
        timings["shard_s"] = time.perf_counter() - planned
    return dmp


def planner_topology(device: torch.device, world: int, hbm_bytes: int | None = None) -> Topology:
    """The planner's view of the machine: ``world`` ranks with ``hbm_bytes`` of GPU memory each.

    torchrec's ``Topology`` assumes 32 GB of HBM per GPU unless told otherwise, so without this
    the planner refuses tables that fit an H200 (141 GB) easily ("insufficient storage").
    ``hbm_bytes`` defaults to the total memory of ``device`` (the planner keeps its own 15%
    reserve).
    """
    if device.type != "cuda":
        return Topology(world_size=world, compute_device=device.type, local_world_size=world)
    if hbm_bytes is None:
        hbm_bytes = torch.cuda.get_device_properties(device).total_memory
    return Topology(world_size=world, compute_device="cuda", hbm_cap=hbm_bytes,
                    local_world_size=min(world, max(1, torch.cuda.device_count())))


def dense_named_parameters(dmp: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters not updated in backward: everything but the fused tables."""
    return dict(in_backward_optimizer_filter(dmp.named_parameters()))


def make_fused_dense_optimizer(dmp: nn.Module, dense_optimizer: torch.optim.Optimizer
                               ) -> "FusedDenseOptimizer":
    """:class:`FusedDenseOptimizer` over DMP's fused optimizer and ``dense_optimizer``.

    ``dense_optimizer`` must have been built over (a grouping of) :func:`dense_named_parameters`.
    """
    return FusedDenseOptimizer(dmp.fused_optimizer, dense_optimizer, dense_named_parameters(dmp))


# --- plain-tensor state -----------------------------------------------------------------------


def to_plain(value):
    """Sharded tensors (ShardedTensor, DTensor) to full ordinary tensors, recursively.

    At world size > 1 this is a collective: call it on every rank (rank 0 gets the data).
    """
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, DTensor):
        return value.full_tensor().detach().cpu()
    if isinstance(value, ShardedTensor):
        local = value.local_shards()
        dtype = local[0].tensor.dtype if local else value.metadata().tensor_properties.dtype
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1:
            full = torch.empty(value.size(), dtype=dtype)
            for shard in local:
                full[_slices(shard.metadata)] = shard.tensor.detach().cpu()
            return full
        # Shards are disjoint: each rank writes its own into zeros and a sum on rank 0 gives the
        # whole tensor (one collective, any backend, ranks without shards included).
        device = _collective_device()
        full = torch.zeros(value.size(), dtype=dtype, device=device)
        for shard in local:
            full[_slices(shard.metadata)] = shard.tensor.detach().to(device)
        dist.reduce(full, dst=0)
        return full.cpu() if dist.get_rank() == 0 else torch.empty(0)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def gather_keyed_state(state: dict[str, dict]) -> dict[str, dict]:
    """Plain full tensors of a keyed optimizer state whose keys differ between ranks.

    A fused optimizer holds state only for the tables with shards on its rank, so the ranks
    first agree on the union of keys (with shapes), then reduce each tensor in the same order.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return to_plain(state)
    shapes = {key: {name: (tuple(v.size()), _dtype_of(v)) for name, v in d.items()
                    if isinstance(v, torch.Tensor)} for key, d in state.items()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, shapes)
    merged: dict[str, dict] = {}
    for part in everyone:
        for key, names in part.items():
            merged.setdefault(key, {}).update(names)
    device, rank = _collective_device(), dist.get_rank()
    out: dict[str, dict] = {}
    for key in sorted(merged):
        for name in sorted(merged[key]):
            size, dtype = merged[key][name]
            full = torch.zeros(size, dtype=dtype, device=device)
            value = state.get(key, {}).get(name)
            if is_sharded(value):
                for shard in value.local_shards():
                    full[_slices(shard.metadata)] = shard.tensor.detach().to(device)
            elif isinstance(value, torch.Tensor) and rank == 0:  # replicated: count it once
                full.copy_(value.detach())
            dist.reduce(full, dst=0)
            out.setdefault(key, {})[name] = full.cpu() if rank == 0 else torch.empty(0)
    return out


def _dtype_of(value) -> torch.dtype:
    if isinstance(value, ShardedTensor):
        return value.metadata().tensor_properties.dtype
    return value.dtype


def copy_plain_into(target, plain: torch.Tensor) -> None:
    """Copy a full tensor into a (possibly sharded) tensor's local part, in place."""
    if tuple(target.size()) != tuple(plain.size()):
        raise ValueError(f"checkpoint tensor of shape {tuple(plain.size())} does not fit "
                         f"{tuple(target.size())}: was it saved with other knobs (V, H)?")
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            shard.tensor.detach().copy_(plain[_slices(shard.metadata)])
    elif isinstance(target, DTensor):
        target.detach().copy_(distribute_tensor(plain.to(target.device), target.device_mesh,
                                                target.placements))
    else:
        target.detach().copy_(plain)


def is_sharded(value) -> bool:
    return isinstance(value, (ShardedTensor, DTensor))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _slices(metadata) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(metadata.shard_offsets, metadata.shard_sizes))


class FusedDenseOptimizer(CombinedOptimizer):
    """torchrec's CombinedOptimizer of the fused (in-backward) and the dense optimizer.

    A scheduler on this optimizer drives the embedding lr as well: the fused optimizer's only
    work in ``zero_grad`` and ``step`` is to push its groups' learning rate to fbgemm (the
    update itself happens in backward, with the lr pushed last). torchrec pushes it on every
    call; here it is pushed when it changed since the last push, by ``zero_grad`` (before the
    backward that uses it, as torchrec's order does) or ``step``, and the dense optimizer is
    called directly: the same updates with less host work per step (tested against torchrec's
    own ``CombinedOptimizer`` with a scheduler changing the lr every step).
    ``state_dict`` is plain tensors:
    ``{"fused": {param: {state: tensor}}, "fused_lr": [...], "dense": torch state_dict}``;
    the dense part uses torch's own format because its state may not exist yet at load time.
    """

    def __init__(self, fused: KeyedOptimizer, dense: torch.optim.Optimizer,
                 dense_params: dict[str, nn.Parameter]) -> None:
        self.dense_optimizer = dense
        self.fused = fused
        wrapper = KeyedOptimizerWrapper(dense_params, lambda _params: dense)
        super().__init__([("fused", fused), ("dense", wrapper)])
        # The same group dicts a scheduler edits (through this optimizer's param_groups). The
        # lists are changed in place only: Lightning's optimizer wrapper shares this __dict__.
        self._fused_groups = list(fused.param_groups)
        self._pushed_lr = [group["lr"] for group in self._fused_groups]

    def _push_fused_lr(self) -> None:
        current = [group["lr"] for group in self._fused_groups]
        if current != self._pushed_lr:
            self.fused.step()  # torchrec's own push of every group's lr
            self._pushed_lr[:] = current

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._push_fused_lr()
        self.dense_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        self._push_fused_lr()
        return self.dense_optimizer.step(closure)

    def state_dict(self) -> dict:
        return {
            "fused": gather_keyed_state(self.fused.state_dict()["state"]),
            "fused_lr": [group["lr"] for group in self.fused.param_groups],
            "dense": self.dense_optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "fused" not in state_dict or "dense" not in state_dict:
            raise ValueError("optimizer state: expected keys 'fused' and 'dense' (a "
                             "checkpoint written by DLRMModule), got "
                             f"{sorted(state_dict)!r}")
        current = self.fused.state_dict()["state"]
        saved = state_dict["fused"]
        if set(current) - set(saved):  # a rank holds only its own tables' state
            raise ValueError(f"optimizer state: embedding tables {sorted(saved)} in the "
                             f"checkpoint, {sorted(current)} in the model")
        for key, states in current.items():
            for name, tensor in states.items():
                if isinstance(tensor, torch.Tensor):
                    copy_plain_into(tensor, saved[key][name])
        for group, lr in zip(self.fused.param_groups, state_dict.get("fused_lr", [])):
            group["lr"] = lr
        self.dense_optimizer.load_state_dict(state_dict["dense"])
        self._push_fused_lr()
