"""A search trial's side of training: the Lightning callback that reports each epoch to the
trial's Optuna study and stops the run when the pruner says so. The sweep's notebook hands it
to pneumo.training.fit (`fit(config, run_dir, callbacks=trial_callbacks())`); training itself
knows nothing of the search."""

from __future__ import annotations

import lightning as L

from pneumo.sweeps.study import trial_from_environment
from pneumo.training.callbacks import RunRecorder


def trial_callbacks() -> list:
    """[TrialReport] in a search trial's process (pneumo.sweeps.study.TRIAL_ENV set), else []."""
    trial = trial_from_environment()
    return [TrialReport(trial)] if trial is not None else []


class TrialReport(L.Callback):
    """A search trial (pneumo.sweeps.study): each epoch's val/map goes to the Optuna study, and when
    its pruner says so the run stops at this epoch's end, keeping its checkpoints and logs.

    Listed after the RunRecorder, whose epoch record it reports.
    """

    def __init__(self, trial):
        self.trial = trial
        self.recorder: RunRecorder | None = None
        self.ended_early: dict | None = None  # fit() merges it into metrics.json

    def on_train_start(self, trainer, pl_module):
        self.recorder = next(c for c in trainer.callbacks if isinstance(c, RunRecorder))
        # A trial run again after its sweep was killed resumes from a checkpoint: the epochs it
        # holds are reported to the new trial (Optuna ignores, with a warning, steps it has).
        import warnings

        if trainer.current_epoch:  # restored from a checkpoint: say so where the study shows it
            self.trial.set_user_attr("resumed_at_epoch", trainer.current_epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for record in self.recorder.history:
                self.trial.report(record["val_map"], record["epoch"])

    def on_validation_end(self, trainer, pl_module):
        history = self.recorder.history if self.recorder is not None else []
        if trainer.sanity_checking or not history or history[-1]["epoch"] != trainer.current_epoch + 1:
            return
        self.trial.report(history[-1]["val_map"], history[-1]["epoch"])
        # pruning after the last epoch saves nothing and would hide a finished trial from the sampler
        last_epoch = trainer.max_epochs is not None and history[-1]["epoch"] >= trainer.max_epochs
        if not last_epoch and self.trial.should_prune():
            self.ended_early = {"status": "pruned", "pruned_at_epoch": history[-1]["epoch"],
                                "stopped_early": "pruned by the search"}
            trainer.should_stop = True  # Lightning ends the run after this epoch, checkpoints saved
