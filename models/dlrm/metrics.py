"""Click-through-rate metrics: log loss, normalized entropy, AUROC, calibration.

Normalized entropy (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook",
ADKDD 2014) is the log loss divided by the entropy of the base rate p:
``NE = logloss / -(p log p + (1 - p) log(1 - p))``; 1.0 is what predicting the base rate for
every sample scores, lower is better. Calibration is mean prediction / base rate (1.0 = calibrated).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC


def binary_entropy(p: float) -> float:
    """Entropy in nats of a Bernoulli(p); 0 at p in {0, 1}."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


def normalized_entropy(log_loss: float, base_rate: float) -> float:
    """Log loss over the entropy of the base rate (``inf`` when all labels agree)."""
    entropy = binary_entropy(base_rate)
    return log_loss / entropy if entropy > 0 else math.inf


class CTRMetrics(Metric):
    """Streaming log loss, NE, AUROC and calibration of logits against 0/1 labels.

    Args:
        auroc_thresholds: ``None`` keeps every prediction for the exact AUROC; an int bins
            predictions into that many thresholds (constant memory for very large eval sets).

    ``update`` never waits for the GPU: torchmetrics' argument checks (``validate_args``) look at
    the labels' unique values on the host, a sync per batch that would make evaluation run at
    the pace of the host's round trips; the labels here are 0/1 floats by construction.
    """

    full_state_update = False

    def __init__(self, auroc_thresholds: int | None = None) -> None:
        super().__init__()
        for name in ("loss_sum", "pred_sum", "label_sum", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self.auroc = BinaryAUROC(thresholds=auroc_thresholds, validate_args=False)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float(), labels.detach().float()
        prob = torch.sigmoid(logits)
        self.loss_sum += F.binary_cross_entropy_with_logits(logits, labels, reduction="sum").double()
        self.pred_sum += prob.sum().double()
        self.label_sum += labels.sum().double()
        self.count += labels.numel()
        self.auroc.update(prob, labels.long())

    def compute(self) -> dict[str, torch.Tensor]:
        """Every value a 0-dim float32 tensor on the states' device (so that a distributed
        backend that only handles its own device, such as NCCL, can reduce what is logged)."""
        count = self.count.clamp_min(1.0)
        log_loss = self.loss_sum / count
        base_rate = self.label_sum / count
        mean_pred = self.pred_sum / count
        entropy = -(base_rate * torch.log(base_rate) + (1.0 - base_rate) * torch.log1p(-base_rate))
        # All labels alike: entropy 0 (log of 0 gives nan above), NE infinite.
        degenerate = (base_rate <= 0.0) | (base_rate >= 1.0)
        ne = torch.where(degenerate, torch.full_like(log_loss, math.inf),
                         log_loss / torch.where(degenerate, torch.ones_like(entropy), entropy))
        return {
            "logloss": log_loss.float(),
            "ne": ne.float(),
            "auroc": self.auroc.compute().float().to(log_loss.device),
            "calibration": (mean_pred / base_rate.clamp_min(1e-12)).float(),
            "base_rate": base_rate.float(),
        }

    def reset(self) -> None:
        super().reset()
        self.auroc.reset()
