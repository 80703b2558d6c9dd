"""Sessions of pneumo: `nox -s tests` (the test suite), `nox -s sweep` (the main job), and more."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

# Installed before anything that depends on torch: on a CPU machine this picks the local CPU
# wheel; resolved later (as lightning's dependency) it would pull a multi-GB CUDA build.
TORCH = os.environ.get("PNEUMO_TORCH", "torch==2.13.0")


def install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (CPU only; pass pytest arguments after --, e.g. -m 'not slow')."""
    install(session)
    session.run("pytest", *session.posargs, env={"PNEUMO_NO_PROGRESS": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """Synthetic data -> validate -> prepare -> score a baseline submission."""
    install(session, extras="")
    data = "outputs/synth"
    if not os.path.isdir(f"{data}/stage_2_train_images"):
        session.run("pneumo", "synth", data)
    session.run("pneumo", "validate", data)
    session.run("pneumo", "prepare", data)
    session.run("pneumo", "score", f"{data}/stage_2_sample_submission.csv", f"{data}/stage_2_test_labels.csv")


@nox.session
def lab(session: nox.Session) -> None:
    """Start JupyterLab on the notebooks (the package is installed in the kernel's venv)."""
    install(session, extras="")
    session.run("jupyter", "lab", "--notebook-dir=notebooks", *session.posargs)


@nox.session
def tensorboard(session: nox.Session) -> None:
    """Start TensorBoard on everything under outputs/ (runs of every sweep, marathon models)."""
    session.install("tensorboard")
    session.run("tensorboard", "--logdir", "outputs", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks; results go to outputs/bench/*.json."""
    install(session)
    session.run("python", "benchmarks/run.py", *session.posargs, env={"PNEUMO_NO_PROGRESS": "1"})
