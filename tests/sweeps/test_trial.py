"""pneumo.sweeps.trial: what the per-epoch trial report decides (a real Optuna trial; a trainer's state as
plain values)."""

from types import SimpleNamespace

import optuna
import pytest

from pneumo.sweeps.trial import TrialReport


@pytest.mark.parametrize(("epoch", "max_epochs", "stops"), [(1, 3, True), (2, 3, True), (3, 3, False)])
def test_a_trial_is_pruned_before_its_last_epoch_never_after_it(epoch, max_epochs, stops):
    """Pruning after the last epoch saves nothing and would hide a finished trial from the sampler."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    recorder = SimpleNamespace(history=[{"epoch": e, "val_map": 0.1} for e in range(1, epoch + 1)])
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=epoch - 1, max_epochs=max_epochs, should_stop=False)
    report = TrialReport(trial)
    report.recorder = recorder
    report.on_validation_end(trainer, None)
    assert trainer.should_stop is stops and \
        (report.ended_early or {}).get("pruned_at_epoch") == (epoch if stops else None)
    assert study.trials[0].intermediate_values == {epoch: 0.1}  # reported either way
