"""Outlier feature analysis of LLM.int8() (Dettmers et al., arXiv 2208.07339, section 4).

During ``validate`` and ``test`` (and the validation passes of ``fit``) the inputs of the
selected ``nn.Linear`` layers are hooked (:class:`models.int8.OutlierCounter`): for every layer
and hidden dimension, the number of token positions where ``|x| >= threshold`` and the largest
``|x|``. Memory is ``O(layers x hidden)`` whatever the amount of data; padding positions are
not counted (the batch's ``attention_mask``, when there is one).

The paper calls a hidden dimension a *systematic outlier* when its magnitude reaches 6 in at
least 25% of the layers and at least 6% of the sequence positions. Our reading: dimension ``d``
*affects* layer ``l`` when ``|x_d| >= threshold`` in at least ``min_positions`` of ``l``'s
positions; ``d`` is systematic when it affects at least ``min_layers`` of the layers. Dimensions
are only comparable between layers that read the same space, so layers are grouped by input
width and the default selection follows the paper: the inputs of the attention projection
(``query``; key and value read the same tensor) and of the FFN expansion (``intermediate``),
i.e. the residual stream after each LayerNorm.

At the end of each epoch it writes ``outlier_features_<stage>.csv`` (every dimension that
affects at least one layer) and ``.md`` (the systematic ones and the consistency figures) in
``save_dir`` (default: the logger's directory), logs a TensorBoard heatmap image (layer x
dimension, fraction of positions) and ``outliers/<stage>/systematic_dims``, and keeps the result
in :attr:`OutlierFeatures.summary`. Consistency across layers is the mean Jaccard similarity of
the per-layer sets of affecting dimensions (1.0: every layer has the same outlier dimensions).
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from models.int8 import OutlierCounter, check_threshold

# The residual stream as the paper tracks it: attention projection and FFN expansion inputs.
DEFAULT_INCLUDE = [r"encoder\.layer\.\d+\.attention\.self\.query$", r"encoder\.layer\.\d+\.intermediate\.dense$"]


def systematic_outliers(fractions: dict[str, torch.Tensor], min_layers: float = 0.25,
                        min_positions: float = 0.06) -> list[dict]:
    """The systematic outlier dimensions of each group of layers of equal width.

    Args:
        fractions: per layer (in model order), ``(H,)`` fraction of positions with ``|x| >= threshold``.
        min_layers: fraction of the group's layers a dimension must affect.
        min_positions: fraction of a layer's positions at which a dimension affects it.

    Returns:
        One dict per systematic dimension: ``width``, ``dim``, ``layers`` (affected),
        ``group_layers``, ``mean_fraction`` (over the affected layers), ``max_fraction``.
    """
    rows = []
    for width, names in _groups(fractions).items():
        table = torch.stack([fractions[n].double() for n in names])  # (L, H)
        affected = table >= min_positions
        n_aff = affected.sum(dim=0)  # (H,)
        for d in torch.nonzero(n_aff >= max(1, math.ceil(min_layers * len(names) - 1e-9))).squeeze(1).tolist():
            col = table[:, d]
            rows.append({"width": width, "dim": d, "layers": int(n_aff[d]), "group_layers": len(names),
                         "mean_fraction": float(col[affected[:, d]].mean()), "max_fraction": float(col.max())})
    return rows


def layer_consistency(fractions: dict[str, torch.Tensor], min_positions: float = 0.06) -> dict[int, float]:
    """Per width group, mean pairwise Jaccard similarity of the layers' affecting-dimension sets
    (pairs where both sets are empty are left out; ``nan`` when no pair is left)."""
    out = {}
    for width, names in _groups(fractions).items():
        sets = [set(torch.nonzero(fractions[n] >= min_positions).squeeze(1).tolist()) for n in names]
        scores = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2) if a | b]
        out[width] = sum(scores) / len(scores) if scores else float("nan")
    return out


def _groups(fractions: dict[str, torch.Tensor]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, frac in fractions.items():
        groups.setdefault(int(frac.numel()), []).append(name)
    return groups


class OutlierFeatures(Callback):
    """Record which hidden dimensions reach the outlier threshold (see module docstring).

    Args:
        threshold: magnitude that makes a value an outlier (the paper: 6.0).
        include: regexes (``re.search``) over module names selecting the hooked ``nn.Linear`` layers.
        exclude: regexes removing layers from the selection.
        min_layers: a systematic dimension affects at least this fraction of its group's layers.
        min_positions: a dimension affects a layer at this fraction of its positions or more.
        save_dir: folder of the CSV/markdown tables; default the logger's ``log_dir`` (or the
            trainer's ``default_root_dir`` without a logger).
    """

    def __init__(
        self,
        threshold: float = 6.0,
        include: list[str] = DEFAULT_INCLUDE,  # noqa: B006 (YAML default, never mutated)
        exclude: list[str] = [],  # noqa: B006
        min_layers: float = 0.25,
        min_positions: float = 0.06,
        save_dir: str | None = None,
    ) -> None:
        self.threshold = check_threshold(threshold)
        if not include:
            raise ValueError("include: need at least one regex selecting layers, e.g. 'intermediate\\.dense'")
        for name, value in (("min_layers", min_layers), ("min_positions", min_positions)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: must be a fraction in (0, 1], got {value!r}")
        self.include, self.exclude = list(include), list(exclude)
        self.min_layers, self.min_positions = min_layers, min_positions
        self.save_dir = save_dir
        self.counter: OutlierCounter | None = None
        self.summary: dict = {}
        self.fractions: dict[str, torch.Tensor] = {}  # per layer (H,), of the last epoch

    # -- hooks: one counter per evaluation epoch ---------------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start(pl_module)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._mask(batch)

    @override
    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._mask(batch)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "validate")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._pause()

    @override
    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._pause()

    def _pause(self) -> None:
        # Only the loop's own batches count: not the forwards other callbacks run between
        # batches or at epoch end. (Evaluation variants, e.g. Int8Eval's int8 pass, run inside
        # the batch on copies of the network, whose layers are not hooked.)
        if self.counter is not None:
            self.counter.paused = True

    def _start(self, pl_module: LightningModule) -> None:
        from models.nm_sparsity import select_linears

        layers = select_linears(pl_module, self.include, self.exclude)
        if not layers:
            raise ValueError(f"include: no nn.Linear matches {self.include!r} (minus {self.exclude!r})")
        self.counter = OutlierCounter(layers, self.threshold).attach()
        self.counter.paused = True  # until the first batch starts

    def _mask(self, batch: object) -> None:
        if self.counter is not None:
            self.counter.paused = False
            self.counter.set_mask(batch.get("attention_mask") if isinstance(batch, dict) else None)

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        counter, self.counter = self.counter, None
        if counter is None:
            return
        counter.detach()
        counter.set_mask(None)
        for name in counter.counts:  # sum the counts of every rank
            counter.counts[name] = trainer.strategy.reduce(counter.counts[name], reduce_op="sum")
            counter.tokens[name] = int(trainer.strategy.reduce(
                torch.tensor(counter.tokens[name], device=counter.counts[name].device), reduce_op="sum"))
        fractions = self.fractions = counter.fractions()
        rows = systematic_outliers(fractions, self.min_layers, self.min_positions)
        consistency = layer_consistency(fractions, self.min_positions)
        self.summary = {
            "stage": stage, "layers": len(fractions), "tokens": max(counter.tokens.values()),
            "systematic_dims": sorted({r["dim"] for r in rows}), "systematic": rows,
            "consistency": consistency, "markdown": self._markdown(rows, consistency, fractions),
        }
        pl_module.log(f"outliers/{stage}/systematic_dims", float(len(rows)))
        self._write(trainer, counter, fractions, stage)
        rank_zero_info(f"[outliers] {stage}: {len(fractions)} layers, {self.summary['tokens']} positions per "
                       f"layer; systematic dims {self.summary['systematic_dims']}\n{self.summary['markdown']}")

    def _markdown(self, rows: list[dict], consistency: dict[int, float], fractions: dict) -> str:
        lines = [f"threshold {self.threshold}, a dim affects a layer at >= {self.min_positions:.0%} of its "
                 f"positions, systematic at >= {self.min_layers:.0%} of the layers", "",
                 "| width | dim | layers affected | mean fraction of positions | max fraction |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['width']} | {r['dim']} | {r['layers']}/{r['group_layers']} | {r['mean_fraction']:.3f} | "
                  f"{r['max_fraction']:.3f} |" for r in rows]
        if not rows:
            lines.append("| - | none | - | - | - |")
        groups = _groups(fractions)
        lines += [""] + [f"width {w}: {len(groups[w])} layers, layer-to-layer consistency (mean Jaccard of "
                         f"affecting-dim sets) {c:.2f}" for w, c in consistency.items()]
        return "\n".join(lines)

    @rank_zero_only
    def _write(self, trainer: Trainer, counter: OutlierCounter, fractions: dict, stage: str) -> None:
        logger = trainer.logger
        folder = Path(self.save_dir or (getattr(logger, "log_dir", None) if logger else None)
                      or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"outlier_features_{stage}.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["layer", "dim", "fraction_of_positions", "positions", "max_abs"])
            for name, frac in fractions.items():
                for d in torch.nonzero(frac > 0).squeeze(1).tolist():
                    out.writerow([name, d, f"{float(frac[d]):.6f}", int(counter.counts[name][d]),
                                  f"{float(counter.absmax[name][d]):.4f}"])
        (folder / f"outlier_features_{stage}.md").write_text(self.summary["markdown"] + "\n")
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            for width, names in _groups(fractions).items():
                experiment.add_image(f"outliers/{stage}/heatmap_width{width}", heatmap(
                    torch.stack([fractions[n] for n in names])), trainer.global_step, dataformats="HWC")


def heatmap(table: torch.Tensor, row_height: int = 8) -> torch.Tensor:
    """``(L, H)`` fractions in [0, 1] -> ``(L * row_height, H, 3)`` uint8 image (viridis)."""
    from matplotlib import colormaps

    rgb = colormaps["viridis"](table.double().clamp(0, 1).numpy())[..., :3]  # (L, H, 3)
    img = torch.from_numpy((rgb * 255).round().astype("uint8"))
    return img.repeat_interleave(row_height, dim=0)
