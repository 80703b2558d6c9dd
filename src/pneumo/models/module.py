"""The LightningModule: the network's loss, the official metric on validation, optimizers.

It is handed batches the data layer made (normalised and augmented there) and a network built
by pneumo.models.net; side effects (status files, thread shares, annotated images, the epoch
record) are callbacks in pneumo.training.callbacks; the choice of post-processing settings is
pneumo.models.scoring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from pneumo.config import TrainConfig
from pneumo.errors import TrainingDiverged
from pneumo.metrics import Score
from pneumo.models.net import Net, build_net
from pneumo.models.postprocess import PostProcess
from pneumo.models.scoring import SearchScores
from pneumo.optimizers import SCHEDULERS, build_optimizer


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class ValidationResult:
    """One validation epoch's score and choice, and the few outputs the callbacks draw.

    Outputs are scored batch by batch (pneumo.models.scoring) and dropped: only those of the first
    positive and negative images, as many as ValidationImages may draw, are kept."""

    rows: np.ndarray  # cache rows of the kept outputs, in validation order
    outputs: list  # per kept row: an (S, S) float16 opacity map (mask head) or Candidates (centre head)
    opacity: np.ndarray | None  # per kept row: P(opacity) from the classifier
    score: Score
    settings: PostProcess
    loss: float
    improved: bool
    opacity_auc: float | None = None  # over the whole split
    scoring_s: float = 0.0  # seconds spent scoring the search's candidates this epoch


class _Validation:
    """What one validation epoch accumulates: the search's sums, the loss, and per image only
    its row and opacity probability (for the AUC); outputs for drawing up to `keep` of each kind."""

    def __init__(self, scores: SearchScores, keep: int):
        self.scores, self.keep = scores, keep
        self.rows, self.opacity, self.positive = [], [], []
        self.kept_rows, self.kept_outputs, self.kept_opacity = [], [], []
        self.kept = {True: 0, False: 0}
        self.loss_sum, self.n, self.scoring_s = 0.0, 0, 0.0

    def add(self, rows, outputs, opacity, loss: float, truth: list, frames: list) -> None:
        start = time.perf_counter()
        self.scores.add(outputs, frames, truth, opacity)
        self.scoring_s += time.perf_counter() - start
        self.loss_sum, self.n = self.loss_sum + loss * len(rows), self.n + len(rows)
        positive = [len(t) > 0 for t in truth]
        self.rows.append(rows)
        self.positive += positive
        if opacity is not None:
            self.opacity.append(opacity)
        for i, (row, is_positive) in enumerate(zip(rows, positive)):
            if self.kept[is_positive] < self.keep:
                self.kept[is_positive] += 1
                self.kept_rows.append(int(row))
                self.kept_outputs.append(outputs[i])
                self.kept_opacity.append(None if opacity is None else float(opacity[i]))


class OpacityModule(L.LightningModule):
    """Any network of pneumo.models.net (its heads' losses summed); official mAP on validation."""

    def __init__(self, config: dict, data_fingerprint: str = "", net: Net | None = None):
        super().__init__()
        # logger=False: hyperparameters go to TensorBoard once, with hp/val_map, from fit();
        # the net is rebuilt from the config, so a checkpoint holds no pickled module
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.config = TrainConfig.from_dict(config)
        c = self.config
        self.net = net if net is not None else build_net(c)
        self.postprocess = PostProcess(threshold=c.threshold, min_box_area=c.min_box_area)
        self.best_map = -1.0
        self.validation: ValidationResult | None = None
        self._validation: _Validation | None = None

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> dict:
        return self.net(images, metadata)

    def training_step(self, batch, batch_idx):
        loss = self.net.loss(self(batch["images"], batch["metadata"]), batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged at epoch {self.current_epoch} (loss {loss.item()}); "
                                   f"lower lr (now {self.config.learning_rate:g} for {self.config.optimizer})")
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def on_train_epoch_start(self):
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_epoch=True, on_step=False)

    def on_validation_epoch_start(self):
        c = self.config
        start = PostProcess(threshold=c.threshold, min_box_area=c.min_box_area)
        self._validation = _Validation(SearchScores(start, c.postprocess, gated=c.classifier), keep=c.n_val_images)

    def validation_step(self, batch, batch_idx):
        out = self(batch["images"], batch["metadata"])
        loss = self.net.loss(out, batch).item()
        opacity = self.net.opacity(out)
        opacity = None if opacity is None else opacity.cpu().numpy()
        # scored now and dropped: nothing the size of the validation split is held (pneumo.models.scoring);
        # float16 maps as before, so the search chooses as it did
        frames = [tuple(int(v) for v in frame) for frame in batch["frames"].cpu()]
        self._validation.add(batch["rows"].cpu().numpy(), self.net.decode(out, np.float16), opacity, loss,
                             batch["gt_boxes"], frames)

    def on_validation_epoch_end(self):
        v, self._validation = self._validation, None
        if self.trainer.sanity_checking or v is None or not v.n:
            return
        start = time.perf_counter()
        result = v.scores.result()
        scoring_s = v.scoring_s + time.perf_counter() - start
        improved = result.score.map > self.best_map
        self.best_map = max(self.best_map, result.score.map)
        if improved:
            self.postprocess = result.settings
        auc = rank_auc(np.concatenate(v.opacity), np.array(v.positive)) if v.opacity else None
        kept_opacity = np.array(v.kept_opacity, dtype=np.float64) if v.opacity else None
        self.validation = ValidationResult(np.array(v.kept_rows, dtype=np.int64), v.kept_outputs, kept_opacity,
                                           result.score, result.settings, v.loss_sum / v.n, improved, auc, scoring_s)
        self._log_validation(self.validation)

    def _log_validation(self, v: ValidationResult) -> None:
        self.log("val/loss", v.loss)
        self.log("val/map", v.score.map)
        self.log("val/threshold", v.settings.threshold)
        self.log("val/gate", v.settings.gate)
        for t, value in v.score.per_threshold.items():
            self.log(f"val/map@{t}", value)
        if v.opacity_auc is not None:
            self.log("val/opacity_auc", v.opacity_auc)
        self.log("hp/val_map", self.best_map)

    def configure_optimizers(self):
        c = self.config
        optimizer = build_optimizer(c.optimizer, self.parameters(), c.learning_rate,
                                    weight_decay=c.weight_decay, momentum=c.momentum)
        make_scheduler = SCHEDULERS[c.scheduler]
        if make_scheduler is None:
            return optimizer
        scheduler = make_scheduler(optimizer, max(1, self.trainer.estimated_stepping_batches), c.learning_rate)
        # one optimizer and one scheduler for the whole run: their state (Adam's moments, the
        # schedule's position) carries across epochs and into resumed runs via the checkpoint
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        # what predict and serve need besides the weights; plain types (weights_only loading)
        checkpoint["pneumo"] = {"postprocess": self.postprocess.to_dict(), "threshold": self.postprocess.threshold,
                                "best_val_map": self.best_map, "image_size": self.config.image_size,
                                "min_box_area": self.postprocess.min_box_area,
                                "data_fingerprint": self.hparams.data_fingerprint}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("pneumo", {})
        if "postprocess" in state:
            self.postprocess = PostProcess.from_dict(state["postprocess"])
        self.best_map = state.get("best_val_map", self.best_map)
