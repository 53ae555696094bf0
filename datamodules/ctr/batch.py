"""The batch format of the CTR datamodules and the feature schema they give the model.

Batches are torchrec ``Batch`` objects (dense ``(B, num_dense)`` float32, sparse features as a
``KeyedJaggedTensor`` whose bags may hold any number of ids, labels ``(B,)`` float32) with one
extra field: ``indices``, the global sample index of each row. Indices let tests prove that a
single-epoch run saw every sample exactly once; the model ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass(frozen=True)
class CTRSchema:
    """What a CTR datamodule tells the model about its features.

    Args:
        num_dense: number of dense (float) features.
        sparse_names: names of the sparse features, in KeyedJaggedTensor key order.
        cardinalities: per sparse feature, ids lie in ``[0, cardinality)``; the model caps its
            rows per table (V) at this.
    """

    num_dense: int
    sparse_names: tuple[str, ...]
    cardinalities: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.sparse_names) != len(self.cardinalities):
            raise ValueError(f"CTRSchema: {len(self.cardinalities)} cardinalities for "
                             f"{len(self.sparse_names)} sparse features")


@dataclass
class IndexedBatch(Batch):
    """torchrec's ``Batch`` plus ``indices``: the ``(B,)`` int64 global sample index of each row."""

    indices: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "IndexedBatch":
        return IndexedBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            indices=self.indices.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream) -> None:
        super().record_stream(stream)
        self.indices.record_stream(stream)

    def pin_memory(self) -> "IndexedBatch":
        return IndexedBatch(self.dense_features.pin_memory(), self.sparse_features.pin_memory(),
                            self.labels.pin_memory(), self.indices.pin_memory())


def make_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray, indices: np.ndarray,
               names: tuple[str, ...] | list[str]):
    """A batch of single-valued sparse features.

    Args:
        dense: ``(B, num_dense)`` float32.
        sparse: ``(B, F)`` int64 ids, one per feature and sample.
        labels: ``(B,)`` 0/1.
        indices: ``(B,)`` global sample indices.
        names: the F feature names.
    """
    batch_size, num_features = sparse.shape
    assert num_features == len(names)
    # KJT order is feature-major: all of feature 0's bags, then feature 1's, ...
    values = torch.from_numpy(np.ascontiguousarray(sparse.T, dtype=np.int64)).reshape(-1)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(names), values=values,
        lengths=torch.ones(batch_size * num_features, dtype=torch.int32))
    return IndexedBatch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.asarray(labels, dtype=np.float32)),
        indices=torch.from_numpy(np.asarray(indices, dtype=np.int64)),
    )


def make_tensor_batch(dense: torch.Tensor, sparse: torch.Tensor, labels: torch.Tensor,
                      indices: torch.Tensor, names: tuple[str, ...] | list[str]):
    """:func:`make_batch` from tensors already on their device (e.g. generated on the GPU): the
    KJT's per-key sizes are known on the host (one id per bag), so nothing syncs."""
    batch_size, num_features = sparse.shape
    assert num_features == len(names)
    lengths = torch.ones(batch_size * num_features, dtype=torch.int32, device=sparse.device)
    kjt = KeyedJaggedTensor(keys=list(names), values=sparse.t().reshape(-1), lengths=lengths,
                            stride=batch_size, length_per_key=[batch_size] * num_features,
                            offset_per_key=[batch_size * f for f in range(num_features + 1)])
    return IndexedBatch(dense_features=dense.float().contiguous(), sparse_features=kjt,
                        labels=labels.float(), indices=indices.long())


def make_bag_batch(dense: np.ndarray, bags: list[tuple[np.ndarray, np.ndarray]],
                   labels: np.ndarray, indices: np.ndarray, names: tuple[str, ...] | list[str]):
    """A batch whose sparse features are bags of any length (e.g. a movie's genres).

    Args:
        bags: per feature, ``(values, lengths)`` with ``lengths`` of shape ``(B,)`` and
            ``values`` the ids of all B bags concatenated.
        dense, labels, indices, names: as in :func:`make_batch`.
    """
    assert len(bags) == len(names)
    values = torch.from_numpy(np.concatenate([v for v, _ in bags]).astype(np.int64))
    lengths = torch.from_numpy(np.concatenate([n for _, n in bags]).astype(np.int32))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(names), values=values, lengths=lengths)
    return IndexedBatch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.asarray(labels, dtype=np.float32)),
        indices=torch.from_numpy(np.asarray(indices, dtype=np.int64)),
    )
