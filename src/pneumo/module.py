"""The LightningModule: the network, its loss, the official metric on validation, optimizers.

Side effects (status files, thread shares, annotated images, the epoch record) are callbacks
in pneumo.callbacks; the post-processing search is the pure pneumo.postprocess.search.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from pneumo.centres import centre_loss, image_outputs
from pneumo.config import TrainConfig
from pneumo.datamodule import augment
from pneumo.errors import TrainingDiverged
from pneumo.metrics import Score, mean_average_precision
from pneumo.model import NetOutput, UNet, opacity_probability
from pneumo.postprocess import PostProcess, SearchResult, apply, search


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
    """One validation epoch's outputs, kept for the callbacks that draw and record them."""

    rows: np.ndarray  # cache rows, in the order of outputs
    outputs: list  # per image: an (S, S) float16 opacity map (mask head) or Candidates (centre head)
    opacity: np.ndarray | None  # (N,) P(opacity) from the classifier
    score: Score
    settings: PostProcess
    loss: float
    improved: bool


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
        self._outputs: list[tuple] = []

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

    def validation_step(self, batch, batch_idx):
        out = self(batch["images"], batch["metadata"])
        loss = self._loss(out, batch).item()
        opacity = opacity_probability(out.classes).cpu().numpy() if out.classes is not None else None
        # float16 maps: a whole validation split is held until the epoch ends (5,000+ maps on RSNA);
        # predict keeps float32, as before
        outs = image_outputs(out, np.float16)
        self._outputs.append((batch["rows"].cpu().numpy(), outs, opacity, loss, len(batch["rows"])))

    def on_validation_epoch_end(self):
        outputs, self._outputs = self._outputs, []
        if self.trainer.sanity_checking or not outputs:
            return
        rows = np.concatenate([o[0] for o in outputs])
        image_outs = [item for o in outputs for item in o[1]]
        opacity = np.concatenate([o[2] for o in outputs]) if outputs[0][2] is not None else None
        loss = float(sum(o[3] * o[4] for o in outputs) / sum(o[4] for o in outputs))
        result = self._search(rows, image_outs, opacity)
        improved = result.score.map > self.best_map
        self.best_map = max(self.best_map, result.score.map)
        if improved:
            self.postprocess = result.settings
        self.validation = ValidationResult(rows, image_outs, opacity, result.score, result.settings, loss, improved)
        self._log_validation(self.validation)

    def _search(self, rows, image_outs, opacity):
        dm = self.trainer.datamodule
        keys = [int(r) for r in rows]
        truth = {k: dm.gt_boxes[k] for k in keys}
        start = PostProcess(threshold=self.config.threshold, min_box_area=self.config.min_box_area)
        if self.config.postprocess == "fixed":
            preds = {k: apply(p, start, *dm.frame[k]) for k, p in zip(keys, image_outs)}
            return SearchResult(start, mean_average_precision(truth, preds), 1)
        return search(dict(zip(keys, image_outs)), {k: dm.frame[k] for k in keys}, truth,
                      dict(zip(keys, opacity)) if opacity is not None else None, start,
                      mode=self.config.postprocess)

    def _log_validation(self, v: ValidationResult) -> None:
        self.log("val/loss", v.loss)
        self.log("val/map", v.score.map)
        self.log("val/threshold", v.settings.threshold)
        self.log("val/gate", v.settings.gate)
        for t, value in v.score.per_threshold.items():
            self.log(f"val/map@{t}", value)
        if v.opacity is not None:
            dm = self.trainer.datamodule
            auc = rank_auc(v.opacity, [len(dm.gt_boxes[int(r)]) > 0 for r in v.rows])
            if auc is not None:
                self.log("val/opacity_auc", auc)
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
