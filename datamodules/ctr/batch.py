"""The batch format of the CTR datamodules and the feature schema they give the model.

Batches are torchrec ``Batch`` objects (dense ``(B, num_dense)`` float32, sparse features as a
``KeyedJaggedTensor`` whose bags may hold any number of ids, labels ``(B,)`` float32) with one
extra field: ``indices``, the global sample index of each row. Indices let tests prove that a
single-epoch run saw every sample exactly once; the model ignores them.

File readers hand over :class:`PackedBatch` es instead: the same single-valued batch in ONE
int32 tensor. A DataLoader worker passes each tensor of a batch to the main process as its own
shared-memory file (a file descriptor sent over a socket), the pin-memory thread copies each
into pinned memory and the training loop issues one host-to-device copy per tensor, all on the
main process, which is also the one that runs the training step: with a torchrec batch's eight
or so tensors that per-tensor work, not the workers, bounded ``.npy`` loading. One tensor makes
it one of each; the batch is unpacked (views, the ids widened to int64) where it arrives, on
the GPU when it is copied there (:meth:`PackedBatch.to`). It reads like a batch too (its
``dense_features``, ``sparse_features``, ``labels`` and ``indices`` unpack on first use).
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


#: Sparse ids travel as int32: hash sizes (rows per table) must stay below this.
MAX_PACKED_ID = 2**31 - 1


class PackedBatch:
    """A batch of single-valued sparse features in one int32 tensor (see the module docstring).

    Layout in int32 words, for B samples, D dense and F sparse features: dense float32 bits
    ``(B, D)`` | ids feature-major ``(F, B)`` | labels float32 bits ``(B,)`` | one word of
    padding when needed | indices int64 ``(B,)`` (2 words each, 8-byte aligned).

    Args:
        data: the packed words (1-D int32, on any device).
        batch_size, num_dense: B and D.
        names: the F sparse feature names.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, num_dense: int,
                 names: tuple[str, ...]) -> None:
        self.data, self.batch_size, self.num_dense, self.names = data, batch_size, num_dense, names
        self._unpacked: IndexedBatch | None = None

    @staticmethod
    def words(batch_size: int, num_dense: int, num_sparse: int) -> tuple[int, int, int, int]:
        """Start of the ids, labels and indices, and the total, in int32 words."""
        ids = batch_size * num_dense
        labels = ids + batch_size * num_sparse
        indices = labels + batch_size
        indices += indices % 2  # int64 view: 8-byte aligned
        return ids, labels, indices, indices + 2 * batch_size

    @classmethod
    def empty(cls, batch_size: int, num_dense: int, names: tuple[str, ...],
              shared: bool = False) -> tuple["PackedBatch", dict[str, np.ndarray]]:
        """A batch to fill, and numpy views of its parts: ``dense`` ``(B, D)`` float32, ``ids``
        ``(F, B)`` int32, ``labels`` ``(B,)`` float32, ``indices`` ``(B,)`` int64. ``shared``:
        allocate it in shared memory (in a DataLoader worker: sent without another copy)."""
        ids, labels, indices, total = cls.words(batch_size, num_dense, len(names))
        data = torch.empty(total, dtype=torch.int32)
        if shared:
            data.share_memory_()
        words = data.numpy()
        views = {"dense": words[:ids].view(np.float32).reshape(batch_size, num_dense),
                 "ids": words[ids:labels].reshape(len(names), batch_size),
                 "labels": words[labels:labels + batch_size].view(np.float32),
                 "indices": words[indices:total].view(np.int64)}
        return cls(data, batch_size, num_dense, tuple(names)), views

    def pin_memory(self) -> "PackedBatch":
        return PackedBatch(self.data.pin_memory(), self.batch_size, self.num_dense, self.names)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> IndexedBatch:
        """The batch on ``device`` (one copy of the packed words), unpacked there."""
        data = self.data.to(device=device, non_blocking=non_blocking)
        if data is self.data:
            return self.unpack()
        return PackedBatch(data, self.batch_size, self.num_dense, self.names).unpack()

    def unpack(self) -> IndexedBatch:
        """The :class:`IndexedBatch` where the words are (views; the ids widened to int64)."""
        if self._unpacked is None:
            b, f = self.batch_size, len(self.names)
            ids, labels, indices, total = self.words(b, self.num_dense, f)
            words = self.data
            values = words[ids:labels].long()  # (F * B,) feature-major, as a KJT keeps them
            lengths = torch.ones(f * b, dtype=torch.int32, device=words.device)
            kjt = KeyedJaggedTensor(keys=list(self.names), values=values, lengths=lengths,
                                    stride=b, length_per_key=[b] * f,
                                    offset_per_key=[b * k for k in range(f + 1)])
            self._unpacked = IndexedBatch(
                dense_features=words[:ids].view(torch.float32).view(b, self.num_dense),
                sparse_features=kjt, labels=words[labels:labels + b].view(torch.float32),
                indices=words[indices:total].view(torch.int64))
        return self._unpacked

    @property
    def dense_features(self) -> torch.Tensor:
        return self.unpack().dense_features

    @property
    def sparse_features(self) -> KeyedJaggedTensor:
        return self.unpack().sparse_features

    @property
    def labels(self) -> torch.Tensor:
        return self.unpack().labels

    @property
    def indices(self) -> torch.Tensor:
        return self.unpack().indices

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_unpacked": None}  # workers send the words only


def pack_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray, indices: np.ndarray,
               names: tuple[str, ...] | list[str], shared: bool = False) -> PackedBatch:
    """:func:`make_batch` as a :class:`PackedBatch` (``sparse`` ids must lie in
    ``[0, MAX_PACKED_ID]``); ``shared`` as in :meth:`PackedBatch.empty`."""
    batch_size, num_features = sparse.shape
    assert num_features == len(names)
    batch, views = PackedBatch.empty(batch_size, dense.shape[1], tuple(names), shared)
    views["dense"][:] = dense
    views["ids"][:] = sparse.T
    views["labels"][:] = labels
    views["indices"][:] = indices
    return batch


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
