"""The DLRM network: torchrec's ``DLRM`` / ``DLRM_DCN`` built from a :class:`DLRMShape`.

Notation: B batch, F sparse features, H (= D in torchrec) embedding dimension. The loss lives
in :class:`models.dlrm.module.DLRMModule`, outside the network.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.dlrm.sizing import DLRMShape


def build_dlrm(shape: DLRMShape, sparse_names: list[str] | tuple[str, ...],
               embedding_device: torch.device | str = "meta") -> nn.Module:
    """torchrec ``DLRM`` / ``DLRM_DCN`` of the given shape; one table per sparse feature.

    Tables are created on ``embedding_device`` ("meta" by default: DMP allocates them where
    they are sharded, so a 100-GB table never exists on the host first).
    """
    if len(sparse_names) != shape.num_sparse:
        raise ValueError(f"build_dlrm: {len(sparse_names)} sparse_names for a shape with "
                         f"{shape.num_sparse} tables")
    tables = [EmbeddingBagConfig(name=f"t_{name}", embedding_dim=shape.embedding_dim,
                                 num_embeddings=rows, feature_names=[name])
              for name, rows in zip(sparse_names, shape.rows)]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device(embedding_device))
    if shape.interaction == "dot":
        return DLRM(ebc, shape.num_dense, list(shape.bottom), list(shape.top))
    return DLRM_DCN(ebc, shape.num_dense, list(shape.bottom), list(shape.top),
                    dcn_num_layers=shape.dcn_num_layers, dcn_low_rank_dim=shape.dcn_low_rank_dim)


def fold_ids(kjt, rows: torch.Tensor):
    """Hash each feature's ids into its table by modulo: ``id % rows[feature]`` (V < cardinality).

    ``rows`` is ``(F,)`` int64 on the KJT's device. No host sync: sizes are passed explicitly.
    """
    values, lengths = kjt.values(), kjt.lengths()
    rows_per_bag = rows.repeat_interleave(kjt.stride())  # (F * B,) feature-major
    rows_per_value = rows_per_bag.repeat_interleave(lengths.long(), output_size=values.numel())
    return KeyedJaggedTensor(keys=kjt.keys(), values=values % rows_per_value, lengths=lengths,
                             offsets=kjt.offsets_or_none(), stride=kjt.stride(),
                             length_per_key=kjt.length_per_key_or_none(),
                             offset_per_key=kjt.offset_per_key_or_none())
