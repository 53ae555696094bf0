"""DLRM sizes from the four scaling knobs of Ardalani et al. (arXiv 2208.08489).

* V: rows per embedding table (the hash size), capped by each feature's cardinality;
* H: embedding dimension (also the bottom MLP's last width);
* M: the widths of the top (over) MLP;
* O: a multiplier on the width of every non-embedding layer (bottom and top MLP hidden layers,
  and the DCN's low rank), leaving the fixed widths (H at the bottom's end, 1 logit) alone.

Parameter counts and FLOPs are computed from the layer sizes alone, so they are known before
the (possibly huge) tables are allocated, and tests check them against hand counts and against
the built torchrec modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def table_rows(num_embeddings: int | list[int], cardinalities: list[int] | tuple[int, ...]) -> list[int]:
    """Rows per table: V (one value or one per table) capped by each feature's cardinality."""
    count = len(cardinalities)
    values = [num_embeddings] * count if isinstance(num_embeddings, int) else list(num_embeddings)
    if len(values) != count:
        raise ValueError(f"num_embeddings: got {len(values)} values for {count} sparse features; "
                         f"give one int or one value per feature")
    if any(v < 1 for v in values):
        raise ValueError(f"num_embeddings must be >= 1, got {num_embeddings!r}")
    return [min(v, max(1, c)) for v, c in zip(values, cardinalities)]


def scale_widths(widths: list[int], multiplier: float) -> list[int]:
    """Each width times ``multiplier`` (O), rounded, at least 1."""
    if multiplier <= 0:
        raise ValueError(f"width_multiplier must be > 0, got {multiplier!r}")
    return [max(1, round(w * multiplier)) for w in widths]


@dataclass(frozen=True)
class DLRMShape:
    """The layer sizes a DLRM is built from (the knobs already applied)."""

    rows: tuple[int, ...]            # per table (V)
    embedding_dim: int               # H
    num_dense: int
    bottom: tuple[int, ...]          # bottom MLP widths, ending in H
    top: tuple[int, ...]             # top MLP widths, ending in 1
    interaction: Literal["dot", "dcn"] = "dot"
    dcn_num_layers: int = 0
    dcn_low_rank_dim: int = 0

    @property
    def num_sparse(self) -> int:
        return len(self.rows)

    @property
    def over_in_features(self) -> int:
        """Width of the interaction's output, the top MLP's input."""
        f, d = self.num_sparse, self.embedding_dim
        if self.interaction == "dot":
            return d + f * (f + 1) // 2  # dense vector + strict upper triangle of (F+1)^2 dots
        return (f + 1) * d  # DCN keeps the concatenated F+1 vectors' width

    def embedding_parameters(self) -> int:
        return sum(self.rows) * self.embedding_dim

    def dense_parameters(self) -> int:
        """Every non-embedding parameter: bottom MLP, DCN, top MLP (weights and biases)."""
        total = _mlp_parameters(self.num_dense, self.bottom)
        total += _mlp_parameters(self.over_in_features, self.top)
        if self.interaction == "dcn":
            n, r = self.over_in_features, self.dcn_low_rank_dim
            total += self.dcn_num_layers * (2 * n * r + n)  # W (N x r), V (r x N), bias N
        return total

    def forward_flops(self) -> int:
        """Forward FLOPs per sample (a multiply-add is 2), dense compute only.

        Embedding lookups are memory traffic, not arithmetic, and are left out; training costs
        about 3x the forward.
        """
        flops = _mlp_flops(self.num_dense, self.bottom) + _mlp_flops(self.over_in_features, self.top)
        f1, d = self.num_sparse + 1, self.embedding_dim
        if self.interaction == "dot":
            flops += 2 * f1 * f1 * d  # (F+1, D) @ (D, F+1)
        else:
            n, r = self.over_in_features, self.dcn_low_rank_dim
            flops += self.dcn_num_layers * (4 * n * r + 3 * n)
        return flops


def _mlp_parameters(in_features: int, widths: tuple[int, ...]) -> int:
    total, prev = 0, in_features
    for w in widths:
        total += prev * w + w
        prev = w
    return total


def _mlp_flops(in_features: int, widths: tuple[int, ...]) -> int:
    total, prev = 0, in_features
    for w in widths:
        total += 2 * prev * w
        prev = w
    return total


def dlrm_shape(
    cardinalities: list[int] | tuple[int, ...],
    num_dense: int,
    num_embeddings: int | list[int],
    embedding_dim: int,
    dense_arch_layer_sizes: list[int],
    over_arch_layer_sizes: list[int],
    width_multiplier: float = 1.0,
    interaction: Literal["dot", "dcn"] = "dot",
    dcn_num_layers: int = 3,
    dcn_low_rank_dim: int = 512,
) -> DLRMShape:
    """Apply the knobs V, H, M, O to a feature schema.

    ``dense_arch_layer_sizes`` and ``over_arch_layer_sizes`` are the hidden widths; the bottom
    MLP gets H appended and the top MLP a final 1 (the logit).
    """
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim!r}")
    if num_dense < 1:
        raise ValueError(f"num_dense_features must be >= 1 (DLRM's bottom MLP needs input), got {num_dense!r}")
    if not over_arch_layer_sizes:
        raise ValueError("over_arch_layer_sizes: give at least one hidden width, e.g. [512, 256]")
    if interaction not in ("dot", "dcn"):
        raise ValueError(f"interaction must be 'dot' or 'dcn', got {interaction!r}")
    bottom = tuple(scale_widths(list(dense_arch_layer_sizes), width_multiplier)) + (embedding_dim,)
    top = tuple(scale_widths(list(over_arch_layer_sizes), width_multiplier)) + (1,)
    rank = scale_widths([dcn_low_rank_dim], width_multiplier)[0] if interaction == "dcn" else 0
    return DLRMShape(
        rows=tuple(table_rows(num_embeddings, cardinalities)), embedding_dim=embedding_dim,
        num_dense=num_dense, bottom=bottom, top=top, interaction=interaction,
        dcn_num_layers=dcn_num_layers if interaction == "dcn" else 0, dcn_low_rank_dim=rank,
    )
