"""fit(TrainConfig, run_dir, callbacks): one training run. The notebook, `pneumo train` and every
sweep run call this function; nothing about training lives anywhere else. It wires the parts it
is handed or builds from the config (data, network, module, callbacks) and knows nothing of who
called it: a search trial's process hands in its reporting callback."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pneumo.config import EXECUTION_FIELDS, TrainConfig
from pneumo.errors import ConfigError, RunError
from pneumo.paths import Outputs
from pneumo.training.rundir import RunDir

log = logging.getLogger(__name__)



def default_run_dir(config: TrainConfig) -> Path:
    return Outputs.at().train_run(f"{config.optimizer}-lr{config.learning_rate:g}")


def _check_run_dir(run_dir: RunDir, config: TrainConfig) -> Path | None:
    """The last checkpoint to resume from, None for a fresh run; RunError if run_dir is taken."""
    if run_dir.ended():
        raise RunError(f"{run_dir.path}: a {'finished' if run_dir.finished() else 'pruned'} run; "
                       "choose a new run directory")
    changed = run_dir.changed_parameters(config.to_dict(), EXECUTION_FIELDS)
    if changed:
        raise RunError(f"{run_dir.path}: holds a run with other parameters ({', '.join(changed)}); "
                       f"resume it with its own {run_dir.config_file.name} or choose a new run directory")
    return _resumable_checkpoint(run_dir)


def _resumable_checkpoint(run_dir: RunDir) -> Path | None:
    """last.ckpt, or best.ckpt (an earlier epoch) if last.ckpt is unreadable.

    Lightning writes checkpoints in place: a run killed while saving leaves a truncated file.
    That file is moved aside rather than failing the resume or silently starting over.
    """
    import torch

    for path in (run_dir.last_checkpoint, run_dir.best_checkpoint):
        if not path.is_file():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as exc:  # truncated or garbled: any of torch's unpickling errors
            aside = path.with_name(f"{path.name}.unreadable")
            path.replace(aside)
            log.warning("%s is unreadable (%s); moved to %s", path, type(exc).__name__, aside.name)
    return None


def _precision(config: TrainConfig, accelerator: str) -> str:
    if config.precision != "auto":
        return config.precision
    if accelerator == "gpu":
        import torch

        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def fit(config: TrainConfig, run_dir=None, callbacks=()) -> dict:
    """Train one run into run_dir (resuming from its last checkpoint) and return its metrics.

    callbacks: Lightning callbacks added to the run's own. One that ends the run early says how
    in an `ended_early` attribute ({"status": ..., ...}, merged into metrics.json), None otherwise.
    """
    import lightning as L
    import torch

    from pneumo.data.datamodule import RsnaDataModule
    from pneumo.data.prepare import prepared_for
    from pneumo.models.module import OpacityModule
    from pneumo.models.net import build_net, check_config
    from pneumo.training.callbacks import RunRecorder

    if not isinstance(config, TrainConfig):
        raise ConfigError("fit() takes a TrainConfig")
    check_config(config)
    run_dir = RunDir(run_dir or default_run_dir(config))
    resume_from = _check_run_dir(run_dir, config)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.write_config(config)
    run_dir.write_status("starting", epoch=0, epochs=config.epochs)
    start = time.perf_counter()

    _quiet_lightning()
    if config.threads:
        torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    prepared = prepared_for(config)
    # the encoder's pretrained weights only for a fresh run: a resumed one has them in its checkpoint
    net = build_net(config, pretrained=resume_from is None)
    module = OpacityModule(config.to_dict(), prepared.manifest["fingerprint"], net=net)
    datamodule = RsnaDataModule(prepared, config, box_targets=module.net.box_targets)
    recorder = RunRecorder(run_dir, config.epochs)
    extra = list(callbacks)
    own = _own_callbacks(config, run_dir, recorder)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer, checkpoint = _trainer(config, run_dir, own + extra, accelerator, fresh=resume_from is None)
    if resume_from is not None:
        log.info("resuming %s from %s", run_dir.path, resume_from)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    except BaseException as exc:  # Lightning turns Ctrl-C into SystemExit; both leave a resumable run
        state = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
        run_dir.write_status(state, epoch=trainer.current_epoch, epochs=config.epochs,
                             error=f"{type(exc).__name__}: {exc}")
        raise
    trainer.logger.finalize("success")

    best = _load_state(Path(checkpoint.best_model_path or run_dir.best_checkpoint))
    metrics = _final_metrics(config, recorder.history, best, trainer.current_epoch, datamodule, prepared)
    metrics.update(wall_time_s=round(time.perf_counter() - start, 1), accelerator=accelerator)
    for callback in extra:
        if getattr(callback, "ended_early", None):
            metrics.update(callback.ended_early)
    run_dir.write_metrics(metrics)
    run_dir.write_status("done" if metrics["status"] == "finished" else "pruned", epoch=metrics["epochs_done"],
                         epochs=config.epochs, best_val_map=metrics["best_val_map"])
    return {**metrics, "run_dir": str(run_dir.path)}


def _own_callbacks(config: TrainConfig, run_dir: RunDir, recorder) -> list:
    """What every run does besides learning (pneumo.training.callbacks), and the EMA of its weights."""
    from pneumo.training.callbacks import ThreadShare, ValidationImages

    own = [recorder, ThreadShare(run_dir), ValidationImages(config.n_val_images, run_dir, config.save_images)]
    if config.ema:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        # validation and checkpoints see the average (state_dict); the raw weights travel beside it
        own.append(EMAWeightAveraging(decay=config.ema))
    return own


def _trainer(config: TrainConfig, run_dir: RunDir, callbacks: list, accelerator: str, fresh: bool):
    """The Lightning Trainer of a run (and its checkpoint callback): TensorBoard, best and last
    checkpoints in the run directory, the accelerator and precision of this machine."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.environments import LightningEnvironment

    from pneumo.progress import training_bar_enabled
    from pneumo.training.callbacks import EpochProgressBar, RunLogger

    # TensorBoard names the run after its directory (the events are in it, RunDir.events_dir)
    logger = RunLogger(run_dir.events_dir)
    if fresh:
        # the same keys for every run, so HParams compares the runs of a sweep side by side
        logger.log_session(hparam_values(config), {"hp/val_map": 0.0})
    checkpoint = ModelCheckpoint(dirpath=run_dir.checkpoints, filename=run_dir.best_checkpoint.stem,
                                 monitor="val/map", mode="max", save_last=True, auto_insert_metric_name=False,
                                 enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=accelerator, devices=1, precision=_precision(config, accelerator),
        logger=logger, callbacks=[*callbacks, checkpoint, *[EpochProgressBar()] * training_bar_enabled()],
        deterministic=accelerator == "cpu",
        enable_progress_bar=training_bar_enabled(), enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=10, max_time={"minutes": config.max_time} if config.max_time else None,
        default_root_dir=str(run_dir.path),
        # one process, one device: a SLURM job (a Dask worker's) is the run's host, not its launcher
        plugins=[LightningEnvironment()],
    )
    return trainer, checkpoint


def _final_metrics(config: TrainConfig, history: list[dict], best: dict, epochs_done: int, datamodule,
                   prepared) -> dict:
    best_epoch = max(history, key=lambda h: h["val_map"]) if history else {}
    speeds = [h["train_images_per_s"] for h in history if h.get("train_images_per_s")]
    metrics = {
        "status": "finished",
        "best_val_map": best.get("best_val_map", best_epoch.get("val_map")),
        "best_epoch": best_epoch.get("epoch"),
        "threshold": best.get("threshold", config.threshold),
        "postprocess": best.get("postprocess"),
        "per_threshold": best_epoch.get("per_threshold", {}),
        "epochs_done": epochs_done,
        "train_images_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "n_train": int(len(datamodule.train_rows)),
        "n_val": int(len(datamodule.val_rows)),
        "data_fingerprint": prepared.manifest["fingerprint"],
        "history": history,
    }
    if epochs_done < config.epochs:
        metrics["stopped_early"] = "max_time reached"
    return metrics


def _quiet_lightning() -> None:
    """Lightning's start-up tips and a warning about our (intended) batch hook are noise here."""
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    # on any machine with SLURM's client (a login node, a Dask worker's job) Lightning asks for srun,
    # which launches multi-process runs; a run here is one process (LightningEnvironment, _trainer)
    warnings.filterwarnings("ignore", message="The `srun` command is available")


def hparam_values(config: TrainConfig) -> dict:
    """A run's parameters as TensorBoard's HParams shows them (every run the same keys, each key
    one type): lr is the learning rate used (the optimizer's default when lr is None), booleans
    are "true"/"false" (numbers they would show as 1.0000), any other None is "default"."""
    def shown(key, value):
        if key == "lr":
            return float(config.learning_rate)
        if isinstance(value, bool):
            return "true" if value else "false"
        return "default" if value is None else value

    return {k: shown(k, v) for k, v in config.to_dict().items()}


def _load_state(path: Path) -> dict:
    import torch

    if not path.is_file():
        return {}
    return torch.load(path, map_location="cpu", weights_only=True).get("pneumo", {})


def tensorboard_command(path) -> str:
    return f"tensorboard --logdir {os.fspath(path)}"
