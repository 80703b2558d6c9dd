"""The LightningDataModule (reads prepare's cache) and LightningModule (loss, metric, optimizers).

Batches are whole index lists read from the memory-mapped cache in one slice, and augmented
as tensors on the training device, so the loader never becomes the bottleneck.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from pneumo.boxes import boxes_from_probability, boxes_to_mask, scale
from pneumo.config import TrainConfig
from pneumo.errors import DataError, TrainingDiverged
from pneumo.io import atomic_write_json
from pneumo.metrics import THRESHOLDS, mean_average_precision
from pneumo.model import UNet

THRESHOLD_GRID = tuple(np.round(np.arange(0.2, 0.96, 0.05), 2))


# ---------------------------------------------------------------- data


class CacheBatches(torch.utils.data.Dataset):
    """Dataset whose items are whole batches: a list of cache rows in, (images, masks, rows) out."""

    def __init__(self, images: np.ndarray, boxes_by_row: dict[int, np.ndarray]):
        self.images = images
        self.boxes_by_row = boxes_by_row
        self.size = images.shape[-1]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, rows):
        rows = np.sort(np.asarray(rows))  # sorted rows read the memory map sequentially
        images = torch.from_numpy(np.ascontiguousarray(self.images[rows]))[:, None]
        masks = np.stack([boxes_to_mask(self.boxes_by_row.get(int(r), ()), self.size, self.size) for r in rows])
        return images, torch.from_numpy(masks.astype(np.uint8))[:, None], torch.from_numpy(rows)


class RsnaDataModule(L.LightningDataModule):
    """Train/val batches from a Prepared cache, split as prepare wrote it."""

    def __init__(self, prepared, config: TrainConfig):
        super().__init__()
        self.prepared = prepared
        self.config = config
        features = prepared.features
        if config.max_images:
            features = _stratified_subset(features, config.max_images, config.seed)
        self.features = features.set_index("index", drop=False)
        self.train_rows = features.loc[features["split"] == "train", "index"].to_numpy()
        self.val_rows = features.loc[features["split"] == "val", "index"].to_numpy()
        if len(self.train_rows) == 0 or len(self.val_rows) == 0:
            raise DataError(f"{prepared.root}: {len(self.train_rows)} train and {len(self.val_rows)} "
                            "validation images; both splits need at least one")
        size = prepared.image_size
        self.gt_boxes = {}  # cache row -> boxes in the original image frame
        self.model_boxes = {}  # cache row -> boxes in the cache frame (size x size)
        self.frame = {}  # cache row -> (rows, columns) of the original image
        by_patient = prepared.boxes_by_patient()
        for row in features.itertuples():
            self.frame[row.index] = (row.rows, row.columns)
            boxes = by_patient.get(row.patientId, np.zeros((0, 4)))
            self.gt_boxes[row.index] = boxes
            self.model_boxes[row.index] = scale(boxes, size / row.columns, size / row.rows)
        self.dataset = CacheBatches(prepared.images(), self.model_boxes)

    def _workers(self) -> int:
        if self.config.num_workers >= 0:
            return self.config.num_workers
        return 0 if not torch.cuda.is_available() else min(4, max(1, (torch.get_num_threads() or 2) // 2))

    def _loader(self, rows, shuffle: bool):
        workers = self._workers()
        sampler = RowBatches(rows, self.config.batch_size, shuffle, self.config.seed)
        return torch.utils.data.DataLoader(
            self.dataset, sampler=sampler, batch_size=None, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_rows, shuffle=False)


class RowBatches(torch.utils.data.Sampler):
    """Batches of cache rows; shuffled from (seed, epoch) so a resumed run sees the same order.

    Lightning calls set_epoch before each epoch.
    """

    def __init__(self, rows, batch_size: int, shuffle: bool, seed: int):
        self.rows, self.batch_size, self.shuffle, self.seed = np.asarray(rows), batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rows = np.random.default_rng([self.seed, self.epoch]).permutation(self.rows) if self.shuffle else self.rows
        for start in range(0, len(rows), self.batch_size):
            yield rows[start:start + self.batch_size].tolist()

    def __len__(self):
        return -(-len(self.rows) // self.batch_size)


def _stratified_subset(features, n: int, seed: int):
    if n >= len(features):
        return features
    frac = n / len(features)
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in features.groupby(["class", "split"]):
        k = max(1, int(round(len(group) * frac)))
        keep.extend(rng.choice(group.index.to_numpy(), size=min(k, len(group)), replace=False))
    return features.loc[sorted(keep)]


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, ..., align_corners=False), computed at the four corner pixel centres
    and expanded bilinearly: exact for an affine map, and about 3x faster on the CPU."""
    xs = (1 - width) / width, (width - 1) / width
    ys = (1 - height) / height, (height - 1) / height
    corners = torch.tensor([[x, y, 1.0] for y in ys for x in xs], dtype=theta.dtype, device=theta.device)
    points = torch.einsum("pk,bjk->bjp", corners, theta).reshape(-1, 2, 2, 2)  # (B, xy, y, x)
    grid = F.interpolate(points, size=(height, width), mode="bilinear", align_corners=True)
    return grid.permute(0, 2, 3, 1)


def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None):
    """Random flips, small affine (rotation, scale, shift) and brightness/contrast, batched."""
    b = images.shape[0]
    dev = images.device

    def u(lo, hi):
        return torch.rand(b, generator=generator).to(dev) * (hi - lo) + lo

    flip = torch.where(torch.rand(b, generator=generator).to(dev) < 0.5, -1.0, 1.0)
    angle = u(-7, 7) * math.pi / 180
    zoom = u(0.9, 1.1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, u(-0.06, 0.06)], 1),
                         torch.stack([sin * flip, cos, u(-0.06, 0.06)], 1)], 1)
    grid = _affine_grid(theta, images.shape[-2], images.shape[-1])
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    contrast, brightness = u(0.8, 1.2).view(b, 1, 1, 1), u(-0.08, 0.08).view(b, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean + brightness).clamp(0, 1)
    return images, masks


# ---------------------------------------------------------------- model


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


class OpacityModule(L.LightningModule):
    """UNet opacity segmentation; boxes from connected components; official mAP on validation."""

    def __init__(self, config: dict, data_fingerprint: str = "", run_dir: str = ""):
        super().__init__()
        # logger=False: hyperparameters go to TensorBoard once, with hp/val_map, from fit()
        self.save_hyperparameters(logger=False)
        self.config = TrainConfig.from_dict(config)
        self.net = UNet(self.config.width, self.config.depth)
        self.threshold = self.config.threshold
        self.best_map = -1.0
        self.history: list[dict] = []
        self._val_probs, self._val_rows, self._val_losses = [], [], []
        self._samples, self._epoch_start, self._train_time = 0, 0.0, 0.0
        self._loss_sum = 0.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, masks, rows = batch
        images, masks = images.float() / 255.0, masks.float()
        if self.training and self.config.augment and self.trainer is not None and self.trainer.training:
            # seeded by step, not by the global RNG, so a resumed run augments as the original did
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.global_step)
            images, masks = augment(images, masks, generator)
        return images, masks, rows

    def _loss(self, logits, masks):
        bce = F.binary_cross_entropy_with_logits(logits, masks)
        if self.config.loss == "bce":
            return bce
        dice = soft_dice_loss(logits, masks)
        return dice if self.config.loss == "dice" else bce + dice

    def on_train_epoch_start(self):
        self._follow_thread_share()
        self._epoch_start = time.perf_counter()
        self._samples, self._loss_sum = 0, 0.0
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_epoch=True, on_step=False)

    def _follow_thread_share(self):
        """A CPU sweep hands a run more threads when other runs finish (run_dir/threads)."""
        if not self.hparams.run_dir or self.device.type != "cpu":
            return
        try:
            threads = int((Path(self.hparams.run_dir) / "threads").read_text())
        except (OSError, ValueError):
            return
        if threads > 0 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def training_step(self, batch, batch_idx):
        images, masks, _ = batch
        loss = self._loss(self(images), masks)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged at epoch {self.current_epoch} (loss {loss.item()}); "
                                   f"lower lr (now {self.config.learning_rate:g} for {self.config.optimizer})")
        self._samples += images.shape[0]
        self._loss_sum += loss.item() * images.shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # validation runs before on_train_epoch_end, so the epoch's training time is taken here
        self._train_time = time.perf_counter() - self._epoch_start

    def validation_step(self, batch, batch_idx):
        images, masks, rows = batch
        logits = self(images)
        loss = self._loss(logits, masks)
        self._val_losses.append((loss.item(), images.shape[0]))
        # float16: the whole validation split is held until epoch end (5,000+ maps on RSNA)
        self._val_probs.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy().astype(np.float16))
        self._val_rows.append(rows.cpu().numpy())

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or not self._val_probs:
            self._val_probs, self._val_rows, self._val_losses = [], [], []
            return
        probs = np.concatenate(self._val_probs)
        rows = np.concatenate(self._val_rows)
        losses = np.array(self._val_losses)
        self._val_probs, self._val_rows, self._val_losses = [], [], []
        dm = self.trainer.datamodule
        grid = THRESHOLD_GRID if self.config.train_threshold else (self.config.threshold,)
        scores = [self._score(probs, rows, dm, t) for t in grid]
        maps = np.array([s.map for s in scores])
        # Prefer the middle of a plateau: a threshold whose neighbours also score well is the
        # one that holds on new data; an isolated peak is noise of a small validation set.
        smooth = np.convolve(np.pad(maps, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
        best = int(np.argmax(smooth))
        score, self.threshold = scores[best], float(grid[best])
        val_loss = float((losses[:, 0] * losses[:, 1]).sum() / losses[:, 1].sum())
        self.log("val/loss", val_loss)
        self.log("val/map", score.map)
        self.log("val/threshold", self.threshold)
        for t, v in score.per_threshold.items():
            self.log(f"val/map@{t}", v)
        improved = score.map > self.best_map
        self.best_map = max(self.best_map, score.map)
        self.log("hp/val_map", self.best_map)
        epoch_record = {"epoch": self.current_epoch + 1, "val_map": round(score.map, 5), "val_loss": round(val_loss, 5),
                        "threshold": self.threshold, "per_threshold": score.per_threshold,
                        # validation runs inside the training epoch, before Lightning's epoch
                        # aggregate of train/loss exists: the mean is kept here instead
                        "train_loss": round(self._loss_sum / self._samples, 5) if self._samples else None,
                        "train_images_per_s": round(self._samples / self._train_time, 1) if self._train_time else None}
        self.history.append(epoch_record)
        if self.config.n_val_images and (improved or not self.trainer.training):
            self._log_images(probs, rows, dm, save=improved and self.config.save_images)
        if self.hparams.run_dir:
            atomic_write_json(f"{self.hparams.run_dir}/status.json", {
                "state": "running", "epoch": self.current_epoch + 1, "epochs": self.config.epochs,
                "val_map": round(score.map, 4), "best_val_map": round(self.best_map, 4)})

    def _predict_rows(self, probs, rows, dm, threshold):
        size = self.config.image_size
        out = {}
        for prob, row in zip(probs, rows):
            rows_px, columns_px = dm.frame[int(row)]
            sx, sy = columns_px / size, rows_px / size
            min_area = self.config.min_box_area / (sx * sy)
            out[int(row)] = boxes_from_probability(prob, threshold, min_area, sx, sy)
        return out

    def _score(self, probs, rows, dm, threshold):
        preds = self._predict_rows(probs, rows, dm, threshold)
        return mean_average_precision({int(r): dm.gt_boxes[int(r)] for r in rows}, preds, THRESHOLDS)

    def _log_images(self, probs, rows, dm, save: bool):
        from pneumo.render import annotate

        pick = _display_rows(rows, dm, self.config.n_val_images)
        preds = self._predict_rows(probs[pick], rows[pick], dm, self.threshold)
        tiles = []
        out_dir = Path(self.hparams.run_dir) / "val_images" if save and self.hparams.run_dir else None
        for row in rows[pick]:
            row = int(row)
            feat = dm.features.loc[row]
            image = np.asarray(dm.dataset.images[row])
            # draw in the cache frame, enlarged to at least 256 px so boxes and labels read well
            side = max(256, image.shape[0])
            from PIL import Image

            big = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
            sx, sy = side / feat["columns"], side / feat["rows"]
            boxes, conf = preds[row]
            tile = annotate(big, scale(boxes, sx, sy), conf, scale(dm.gt_boxes[row], sx, sy))
            tiles.append(np.asarray(tile.convert("RGB")))
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = out_dir / f".{feat['patientId']}.png.tmp"
                tile.save(tmp, format="PNG")
                tmp.replace(out_dir / f"{feat['patientId']}.png")
        if tiles and self.logger is not None and hasattr(self.logger.experiment, "add_image"):
            cols = min(4, len(tiles))
            pad = [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
            grid_rows = [np.concatenate((tiles + pad)[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
            self.logger.experiment.add_image("val/predictions", np.concatenate(grid_rows, axis=0),
                                             self.current_epoch, dataformats="HWC")

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
        checkpoint["pneumo"] = {"threshold": self.threshold, "best_val_map": self.best_map,
                                "history": self.history, "image_size": self.config.image_size,
                                "min_box_area": self.config.min_box_area,
                                "data_fingerprint": self.hparams.data_fingerprint}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("pneumo", {})
        self.threshold = state.get("threshold", self.threshold)
        self.best_map = state.get("best_val_map", self.best_map)
        self.history = list(state.get("history", []))


def _display_rows(rows, dm, n):
    """Positions of up to n validation rows to draw: positives first, then negatives, fixed."""
    positive = [i for i, r in enumerate(rows) if len(dm.gt_boxes[int(r)])]
    negative = [i for i, r in enumerate(rows) if not len(dm.gt_boxes[int(r)])]
    k = min(len(positive), max(n - n // 4, n - len(negative)))
    return np.array(positive[:k] + negative[: n - k], dtype=int)
