"""The LightningModule: the network, its loss, the official metric on validation, optimizers.

Side effects (status files, thread shares, annotated images, the epoch record) are callbacks
in pneumo.training.callbacks; the post-processing search is the pure pneumo.models.postprocess.search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from pneumo.config import TrainConfig
from pneumo.data.datamodule import augment
from pneumo.errors import TrainingDiverged
from pneumo.metrics import Score
from pneumo.models.heads.centre import centre_loss, image_outputs
from pneumo.models.postprocess import PostProcess
from pneumo.models.scoring import SearchScores
from pneumo.models.unet import NetOutput, UNet, opacity_probability


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float):
    """Optimizers by name, each with the settings that suit it."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamax":
        return torch.optim.Adamax(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name}")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1 - (2 * inter + 1) / (denom + 1)).mean()


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

    def add(self, rows, outputs, opacity, loss: float, gt_boxes: dict, frames: dict) -> None:
        truth = [gt_boxes[int(r)] for r in rows]
        start = time.perf_counter()
        self.scores.add(outputs, [frames[int(r)] for r in rows], truth, opacity)
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
    """UNet opacity maps (and an image-level opacity classifier); official mAP on validation."""

    def __init__(self, config: dict, data_fingerprint: str = ""):
        super().__init__()
        # logger=False: hyperparameters go to TensorBoard once, with hp/val_map, from fit()
        self.save_hyperparameters(logger=False)
        self.config = TrainConfig.from_dict(config)
        c = self.config
        self.net = UNet(c.width, c.depth, classifier=c.classifier, metadata=c.metadata, centre=c.head == "centre")
        self.postprocess = PostProcess(threshold=c.threshold, min_box_area=c.min_box_area)
        self.best_map = -1.0
        self.validation: ValidationResult | None = None
        self._validation: _Validation | None = None

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> NetOutput:
        return self.net(images, metadata)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        batch = dict(batch, images=batch["images"].float() / 255.0, masks=batch["masks"].float())
        if self.training and self.config.augment and self.trainer is not None and self.trainer.training:
            # seeded by step, not by the global RNG, so a resumed run augments as the original did
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.global_step)
            batch["images"], batch["masks"] = augment(batch["images"], batch["masks"], generator)
        return batch

    def _loss(self, out: NetOutput, batch) -> torch.Tensor:
        # masks has one channel per box for the centre head: the map learns their union
        logits, masks = out.mask, batch["masks"].amax(dim=1, keepdim=True)
        loss = F.binary_cross_entropy_with_logits(logits, masks)
        if self.config.loss != "bce":
            dice = soft_dice_loss(logits, masks)
            loss = dice if self.config.loss == "dice" else loss + dice
        if out.classes is not None and self.config.class_weight:
            loss = loss + self.config.class_weight * F.cross_entropy(out.classes.float(), batch["classes"])
        if out.centre is not None:
            loss = loss + centre_loss(out.centre, batch["masks"])
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(self(batch["images"], batch["metadata"]), batch)
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
        loss = self._loss(out, batch).item()
        opacity = opacity_probability(out.classes).cpu().numpy() if out.classes is not None else None
        # scored now and dropped: nothing the size of the validation split is held (pneumo.models.scoring);
        # float16 maps as before, so the search chooses as it did
        dm = self.trainer.datamodule
        self._validation.add(batch["rows"].cpu().numpy(), image_outputs(out, np.float16), opacity, loss,
                             dm.gt_boxes, dm.frame)

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
        optimizer = build_optimizer(c.optimizer, self.parameters(), c.learning_rate, c.weight_decay, c.momentum)
        if c.scheduler == "none":
            return optimizer
        steps = max(1, self.trainer.estimated_stepping_batches)
        if c.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=c.learning_rate * 0.01)
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=c.learning_rate, total_steps=steps)
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
