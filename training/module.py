"""The LightningModule that trains a :class:`~stepprobe.probes.features.ProbeModel`.

Loss (``loss``):

- ``bce`` (default): binary cross-entropy on logits, with ``pos_weight = negatives /
  positives`` of the training split when ``imbalance="pos_weight"`` (the STEP paper's weighting);
- ``pairwise``: learns to rank a problem's traces, not problems: over every (correct step,
  wrong step) pair of the **same problem** whose relative positions differ by at most
  ``pair_window``, the logistic loss ``softplus(-(logit_correct - logit_wrong))``; each
  problem weighs the same (its pairs share weight 1). Whatever is constant within a problem
  (its difficulty) cancels. Scores are then ranks, not calibrated probabilities;
- ``mixed``: ``(1 - pair_weight) * bce + pair_weight * pairwise``.

The within-problem losses need batches of whole problems (``ProblemBatchSampler``). Each
validation epoch logs every metric of :mod:`stepprobe.training.metrics` as
``val_<metric>`` (``val_auroc``, ``val_early50_auroc``, ...), which early stopping,
checkpointing and Optuna's pruning callback monitor by name.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F

from stepprobe.probes.features import ProbeModel

from .metrics import VAL, VAL_LOSS, compute_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(probe: ProbeModel, x: np.ndarray | torch.Tensor, batch_size: int = 8192) -> np.ndarray:
    """Probabilities for ``x[n, S, H]`` with the probe in eval mode."""
    was = probe.training
    probe.eval()
    t = torch.as_tensor(x)
    out = [probe(t[i:i + batch_size]).double().numpy() for i in range(0, len(t), batch_size)]
    probe.train(was)
    return np.concatenate(out) if out else np.zeros(0)


LOSSES = ("bce", "pairwise", "mixed")


def pairwise_loss(logits: torch.Tensor, y: torch.Tensor, problem: torch.Tensor, rel_position: torch.Tensor,
                  window: float = 0.25) -> torch.Tensor:
    """Mean over problems of the mean logistic loss of their (correct, wrong) step pairs at
    relative positions at most ``window`` apart; 0 (with a gradient) when the batch has no pair."""
    pos = y > 0.5
    pair = (problem[:, None] == problem[None, :]) & pos[:, None] & ~pos[None, :]
    pair &= (rel_position[:, None] - rel_position[None, :]).abs() <= window + 1e-6
    if not bool(pair.any()):
        return logits.sum() * 0.0
    w = pair.to(logits.dtype)
    per_row = w.sum(1)  # pairs of each correct step
    _, pidx = torch.unique(problem, return_inverse=True)
    per_problem = torch.zeros(int(pidx.max()) + 1, dtype=logits.dtype, device=logits.device).index_add_(0, pidx, per_row)
    w = w / per_problem[pidx].clamp_min(1)[:, None]  # each problem with pairs sums to 1
    diff = logits[:, None] - logits[None, :]
    return (F.softplus(-diff) * w).sum() / (per_problem > 0).sum()


class ProbeLightningModule(L.LightningModule):
    def __init__(self, probe: ProbeModel, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 pos_weight: float | None = None, optimizer: str = "adamw", loss: str = "bce",
                 pair_weight: float = 0.5, pair_window: float = 0.25):
        super().__init__()
        self.probe = probe
        self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay, "pos_weight": pos_weight,
                                   "optimizer": optimizer, "loss": loss, "pair_weight": pair_weight,
                                   "pair_window": pair_window,
                                   **{f"probe_{k}": v for k, v in probe.describe().items()}})
        self.loss_name, self.pair_weight, self.pair_window = loss, float(pair_weight), float(pair_window)
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight) if pos_weight else 1.0))
        self._val_scores: list[torch.Tensor] = []
        self._val_loss: list[torch.Tensor] = []
        self._warned: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight)

    def training_step(self, batch, batch_idx):
        x, y, *group = batch
        logits = self.probe.logits(x)
        if self.loss_name == "bce":
            loss = self._loss(logits, y)
        else:
            problem, rel = group
            pair = pairwise_loss(logits, y, problem, rel, self.pair_window)
            loss = pair if self.loss_name == "pairwise" else (
                (1 - self.pair_weight) * self._loss(logits, y) + self.pair_weight * pair)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.probe.logits(x)
        self._val_loss.append(self._loss(logits, y).detach() * len(y))
        self._val_scores.append(torch.sigmoid(logits).detach())

    def on_validation_epoch_start(self) -> None:
        self._val_scores.clear()
        self._val_loss.clear()

    def on_validation_epoch_end(self) -> None:
        if not self._val_scores:
            return
        dm = self.trainer.datamodule
        arr = dm.arrays[VAL]
        scores = torch.cat(self._val_scores).double().cpu().numpy()
        metrics = compute_metrics(scores, arr.y, trace=arr.trace, rel_position=arr.rel_position, prefix=VAL,
                                  problem=arr.problem)
        metrics[VAL_LOSS] = float(torch.stack(self._val_loss).sum().item() / max(len(scores), 1))
        logged = {}
        for name, value in metrics.items():
            if not math.isfinite(value):
                # One class only in this subset (tiny data): log chance so monitors keep working.
                if name not in self._warned:
                    log.warning("%s is undefined on this validation split (one class only); logging 0.5", name)
                    self._warned.add(name)
                value = 0.5
            logged[name] = value
        self.log_dict(logged, prog_bar=False)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
