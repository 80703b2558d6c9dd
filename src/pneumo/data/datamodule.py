"""The LightningDataModule: batches of prepare's cache, split as prepare wrote it, and their
augmentation.

Batches are whole index lists read from prepare's cache (prepare.CacheRows) at once, and augmented
as tensors on the training device, so the loader never becomes the bottleneck.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from pneumo.boxes import boxes_to_mask, scale
from pneumo.config import TrainConfig
from pneumo.data.layout import CLASSES
from pneumo.errors import DataError
from pneumo.models.unet import metadata_vector


class CacheBatches(torch.utils.data.Dataset):
    """Dataset whose items are whole batches: a list of cache rows in, a Batch of tensors out."""

    def __init__(self, images: np.ndarray, boxes_by_row: dict[int, np.ndarray], classes: np.ndarray,
                 metadata: np.ndarray, box_channels: int = 0):
        self.images = images
        # 0: masks is one channel, the union of the boxes; K: one channel per box (K at least the
        # most boxes of any image), so augmentation moves each box and its centre can be found again
        self.box_channels = box_channels
        self.boxes_by_row = boxes_by_row
        self.classes = classes  # cache row -> index into CLASSES
        self.metadata = metadata  # cache row -> metadata_vector
        self.size = images.shape[-1]

    def __len__(self):
        return len(self.images)

    def _masks(self, boxes: np.ndarray) -> np.ndarray:
        if not self.box_channels:
            return boxes_to_mask(boxes, self.size, self.size)[None]
        masks = np.zeros((self.box_channels, self.size, self.size), dtype=np.float32)
        for k, box in enumerate(boxes[: self.box_channels]):
            masks[k] = boxes_to_mask(box[None], self.size, self.size)
        return masks

    def __getitem__(self, rows) -> dict:
        rows = np.sort(np.asarray(rows))  # sorted: consecutive rows are one read
        images = torch.from_numpy(np.ascontiguousarray(self.images[rows]))[:, None]
        masks = np.stack([self._masks(self.boxes_by_row.get(int(r), np.zeros((0, 4)))) for r in rows])
        return {"images": images, "masks": torch.from_numpy(masks.astype(np.uint8)),
                "rows": torch.from_numpy(rows), "classes": torch.from_numpy(self.classes[rows]),
                "metadata": torch.from_numpy(self.metadata[rows])}


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
        all_rows = prepared.features
        classes, metadata = np.zeros(len(all_rows), dtype=np.int64), np.zeros((len(all_rows), 3), dtype=np.float32)
        for index, klass, target, view, sex, age in zip(
                all_rows["index"], all_rows["class"], all_rows["Target"], all_rows["ViewPosition"],
                all_rows["PatientSex"], all_rows["PatientAge"]):
            # a class the labels do not name counts as its Target says
            klass = klass if klass in CLASSES else CLASSES[0 if target else 2]
            classes[index] = CLASSES.index(klass)
            metadata[index] = metadata_vector(view, sex, age)
        channels = max(1, max(len(b) for b in self.model_boxes.values())) if config.head == "centre" else 0
        self.dataset = CacheBatches(prepared.images(), self.model_boxes, classes, metadata, channels)

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
