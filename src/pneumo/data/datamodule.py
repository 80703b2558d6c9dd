"""The LightningDataModule: batches of prepare's cache, split as prepare wrote it, and their
augmentation.

Batches are whole index lists read from prepare's cache (prepare.CacheRows) at once, and augmented
as tensors on the training device, so the loader never becomes the bottleneck.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from pneumo.boxes import boxes_to_mask, scale
from pneumo.config import TrainConfig
from pneumo.data.augment import augment
from pneumo.data.layout import CLASSES
from pneumo.data.metadata import N_METADATA, metadata_vector
from pneumo.errors import DataError
from pneumo.processes import child_initializer


class CacheBatches(torch.utils.data.Dataset):
    """Dataset whose items are whole batches: a list of cache rows in, a Batch of tensors out."""

    def __init__(self, images: np.ndarray, boxes_by_row: dict[int, np.ndarray], classes: np.ndarray,
                 metadata: np.ndarray, box_channels: int = 0, gt_boxes: dict | None = None,
                 frames: np.ndarray | None = None):
        self.images = images
        # the truth in the original frame and that frame (rows, columns), what validation scores
        self.gt_boxes, self.frames = gt_boxes or {}, frames
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
        batch = {"images": images, "masks": torch.from_numpy(masks.astype(np.uint8)),
                 "rows": torch.from_numpy(rows), "classes": torch.from_numpy(self.classes[rows]),
                 "metadata": torch.from_numpy(self.metadata[rows])}
        if self.frames is not None:
            batch["frames"] = torch.from_numpy(self.frames[rows])
            batch["gt_boxes"] = [self.gt_boxes.get(int(r), np.zeros((0, 4))) for r in rows]
        return batch


class RsnaDataModule(L.LightningDataModule):
    """Train/val batches from a Prepared cache, split as prepare wrote it, normalised and (in
    training) augmented once on the training device.

    box_targets is what the model's losses need drawn from the boxes (pneumo.models.net.Net.
    box_targets): "union", one mask channel, or "per_box", one channel per box.
    """

    def __init__(self, prepared, config: TrainConfig, box_targets: str = "union"):
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
        classes = np.zeros(len(all_rows), dtype=np.int64)
        metadata = np.zeros((len(all_rows), N_METADATA), dtype=np.float32)
        frames = np.zeros((len(all_rows), 2), dtype=np.int64)
        for row, frame in self.frame.items():
            frames[row] = frame
        for index, klass, target, view, sex, age in zip(
                all_rows["index"], all_rows["class"], all_rows["Target"], all_rows["ViewPosition"],
                all_rows["PatientSex"], all_rows["PatientAge"]):
            # a class the labels do not name counts as its Target says
            klass = klass if klass in CLASSES else CLASSES[0 if target else 2]
            classes[index] = CLASSES.index(klass)
            metadata[index] = metadata_vector(view, sex, age)
        channels = max(1, max(len(b) for b in self.model_boxes.values())) if box_targets == "per_box" else 0
        self.dataset = CacheBatches(prepared.images(), self.model_boxes, classes, metadata, channels,
                                    self.gt_boxes, frames)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        batch = dict(batch, images=batch["images"].float() / 255.0, masks=batch["masks"].float())
        trainer = self.trainer
        if self.config.augment and trainer is not None and trainer.training:
            # seeded by step, not by the global RNG, so a resumed run augments as the original did
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + trainer.global_step)
            batch["images"], batch["masks"] = augment(batch["images"], batch["masks"], generator)
        return batch

    def _workers(self) -> int:
        if self.config.num_workers >= 0:
            return self.config.num_workers
        return 0 if not torch.cuda.is_available() else min(4, max(1, (torch.get_num_threads() or 2) // 2))

    def _loader(self, rows, shuffle: bool):
        workers = self._workers()
        sampler = RowBatches(rows, self.config.batch_size, shuffle, self.config.seed)
        return torch.utils.data.DataLoader(
            self.dataset, sampler=sampler, batch_size=None, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            worker_init_fn=child_initializer() if workers else None)

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
