"""What a training run does besides learning, as Lightning callbacks: the epoch record and
status file (with a line per epoch and TensorBoard's epoch/ scalars), the CPU thread share a sweep
hands over, annotated validation images; and the run's TensorBoard logger. (A search trial's
reports to its study are the sweeps layer's: pneumo.sweeps.trial.)"""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from pneumo.boxes import scale
from pneumo.io import atomic_save_image
from pneumo.models.postprocess import apply
from pneumo.training.rundir import RunDir


class RunLogger(TensorBoardLogger):
    """TensorBoard events written straight into `folder` (RunDir.events_dir), so that TensorBoard
    names the run after its directory ("01-adam", not "01-adam/tensorboard").

    A run logs its HParams session (its parameters) but no HParams experiment: the sweep writes
    one for all its runs (pneumo.sweeps.hparams), which TensorBoard would pick among per-run ones
    at random. Lightning's `epoch` scalar (the epoch against batches) is left out: the epoch/
    scalars plot against epochs. No hparams.yaml: config.yaml beside it holds the parameters.
    """

    def __init__(self, folder):
        super().__init__(save_dir=str(folder), name="", version="", default_hp_metric=False)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def log_session(self, params: dict, metrics: dict) -> None:
        """The HParams session of this run: its parameters, and its metrics' start values at step 0."""
        from torch.utils.tensorboard.summary import hparams

        self.log_metrics(metrics, 0)
        _experiment, start, end = hparams(params, metrics)
        writer = self.experiment._get_file_writer()
        writer.add_summary(start)
        writer.add_summary(end)

    def save(self) -> None:
        self.experiment.flush()


def describe_device(device: torch.device) -> str:
    """cpu (4 threads), cuda:0 (NVIDIA H200): what a run trains on, for people."""
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


class EpochProgressBar(RichProgressBar):
    """Lightning's rich bar, its epochs counted as the run's own lines count them: "Epoch 3/20",
    not Lightning's 0-based "Epoch 2/19" (a one-epoch run read "Epoch 0/0")."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch + 1}" + (f"/{self.trainer.max_epochs}" if self.trainer.max_epochs else "")
        return f"{text:{len(self.validation_description)}}"


def say(trainer, line: str) -> None:
    """A line on stdout (a notebook's output, a sweep run's log.txt), above the progress bar if one is shown."""
    bar = trainer.progress_bar_callback
    if bar is not None and bar.is_enabled:
        bar.print(line)
    else:
        print(line, flush=True)


class RunRecorder(L.Callback):
    """One record per epoch (metrics.json's history) and the live status.json of the run; a line
    per epoch on stdout and the epoch's figures in TensorBoard against the epoch (1-based).

    Validation runs inside the training epoch, before Lightning's epoch aggregate of
    train/loss exists, so the epoch's mean loss and speed are measured here.
    """

    def __init__(self, run_dir: RunDir | None, epochs: int):
        self.run_dir, self.epochs = run_dir, epochs
        self.history: list[dict] = []
        self._samples, self._loss_sum, self._start, self._train_time = 0, 0.0, 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._samples, self._loss_sum, self._start, self._train_time = 0, 0.0, time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = len(batch["images"])
        self._samples += n
        self._loss_sum += float(outputs["loss"]) * n
        self._train_time = time.perf_counter() - self._start

    def on_validation_end(self, trainer, pl_module):
        v = pl_module.validation
        if trainer.sanity_checking or v is None:
            return
        train_loss = self._loss_sum / self._samples if self._samples else None
        record = {"epoch": trainer.current_epoch + 1, "val_map": round(v.score.map, 5), "val_loss": round(v.loss, 5),
                  "threshold": v.settings.threshold, "postprocess": v.settings.to_dict(),
                  "per_threshold": v.score.per_threshold,
                  "train_loss": None if train_loss is None else round(train_loss, 5),
                  "train_images_per_s": round(self._samples / self._train_time, 1) if self._train_time else None,
                  "val_scoring_s": round(v.scoring_s, 3)}
        auc = trainer.callback_metrics.get("val/opacity_auc")
        if auc is not None:
            record["opacity_auc"] = round(float(auc), 4)
        self.history.append(record)
        if self.run_dir is not None:
            self.run_dir.write_status("running", epoch=record["epoch"], epochs=self.epochs,
                                      val_map=round(v.score.map, 4), best_val_map=round(pl_module.best_map, 4))
        self._log_epoch(trainer, record["epoch"], {"val_map": v.score.map, "val_loss": v.loss, "train_loss": train_loss,
                                                   "opacity_auc": None if auc is None else float(auc)})
        loss = "n/a" if train_loss is None else f"{train_loss:.4f}"
        say(trainer, f"epoch {record['epoch']}/{self.epochs}  train loss {loss}  val mAP {v.score.map:.4f}  "
                     f"best {pl_module.best_map:.4f}  {time.perf_counter() - self._start:.1f} s")

    def on_fit_start(self, trainer, pl_module):
        print(f"training on {describe_device(trainer.strategy.root_device)}", flush=True)

    @staticmethod
    def _log_epoch(trainer, epoch: int, values: dict) -> None:
        """epoch/<name> scalars at step = the epoch (1-based): runs of any length line up by epoch."""
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_scalar"):
            return
        if trainer.optimizers:
            values["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        for name, value in values.items():
            if value is not None:
                experiment.add_scalar(f"epoch/{name}", float(value), global_step=epoch)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


class ThreadShare(L.Callback):
    """A CPU sweep hands a run more threads when other runs finish (RunDir.give_threads)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.device.type != "cpu":
            return
        threads = self.run_dir.thread_share()
        if threads and threads != torch.get_num_threads():
            torch.set_num_threads(threads)


class ValidationImages(L.Callback):
    """Annotated validation images (predictions and truth) whenever val/map improves: a grid in
    TensorBoard, and PNGs in the run directory when save is set."""

    def __init__(self, n: int, run_dir: RunDir | None, save: bool):
        self.n, self.run_dir, self.save = n, run_dir, save

    def on_validation_end(self, trainer, pl_module):
        v = pl_module.validation
        if not self.n or trainer.sanity_checking or v is None or not (v.improved or not trainer.training):
            return
        dm = trainer.datamodule
        tiles = []
        for position in display_rows(v.rows, dm.gt_boxes, self.n):
            row = int(v.rows[position])
            opacity = None if v.opacity is None else float(v.opacity[position])
            tile = self._tile(dm, row, v.outputs[position], v.settings, opacity)
            tiles.append(np.asarray(tile.convert("RGB")))
            if self.save and self.run_dir is not None:
                atomic_save_image(self.run_dir.images_dir / f"{dm.features.loc[row, 'patientId']}.png", tile)
        logger = trainer.logger
        if tiles and logger is not None and hasattr(logger.experiment, "add_image"):
            # step: the epoch as the logs count it (1-based), as the epoch/ scalars
            logger.experiment.add_image("val/predictions", tile_grid(tiles), trainer.current_epoch + 1,
                                        dataformats="HWC")

    @staticmethod
    def _tile(dm, row: int, output, settings, opacity):
        from PIL import Image

        from pneumo.render import annotate

        feat = dm.features.loc[row]
        frame = int(feat["rows"]), int(feat["columns"])
        boxes, conf = apply(output, settings, *frame, opacity=opacity)
        image = np.asarray(dm.dataset.images[row])
        # drawn in the cache frame, enlarged to at least 256 px so boxes and labels read well
        side = max(256, image.shape[0])
        big = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
        sx, sy = side / frame[1], side / frame[0]
        return annotate(big, scale(boxes, sx, sy), conf, scale(dm.gt_boxes[row], sx, sy))


def display_rows(rows, gt_boxes: dict, n: int) -> np.ndarray:
    """Positions of up to n validation rows to draw: positives first, then negatives, fixed."""
    positive = [i for i, r in enumerate(rows) if len(gt_boxes[int(r)])]
    negative = [i for i, r in enumerate(rows) if not len(gt_boxes[int(r)])]
    k = min(len(positive), max(n - n // 4, n - len(negative)))
    return np.array(positive[:k] + negative[: n - k], dtype=int)


def tile_grid(tiles: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """Equal-size RGB tiles in rows of `columns`, the last row padded with black."""
    cols = min(columns, len(tiles))
    pad = [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    rows = [np.concatenate((tiles + pad)[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)
