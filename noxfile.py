"""Sessions of pneumo: `nox -s tests` (the test suite), `nox -s sweep` (the main job), and more."""

from __future__ import annotations

import os
import subprocess
import sys

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
# uv installs several times faster than pip (parallel downloads, no per-package resolver
# rounds); where it is missing, nox falls back to virtualenv and pip.
nox.options.default_venv_backend = "uv|virtualenv"

# Installed before anything that depends on torch: resolved later (as lightning's or timm's
# dependency) torch would be whatever the registry has newest, a multi-GB download. torch 2.14.1
# and torchvision 0.29.1 are the pair that import together (PyPI's torchvision fails beside the
# 2.13.0 CPU wheel: "operator torchvision::nms does not exist"); timm needs torchvision.
TORCH = os.environ.get("PNEUMO_TORCH", "torch==2.14.1 torchvision==0.29.1").split()


def _pip_config() -> list[tuple[str, str]]:
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    pairs = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        pairs += [(key, v) for v in value.strip().strip("'\"").split()]
    return pairs


def _pip_local_folders() -> list[str]:
    """The local wheel folders pip is configured with (find-links, and the `files` folder beside a
    file:// index's `simple` folder; PIP_FIND_LINKS too): uv reads none of pip's configuration."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    for key, value in _pip_config():
        if key.endswith("find-links"):
            folders.append(value)
        elif key.endswith("index-url") and value.startswith("file://") and value.rstrip("/").endswith("/simple"):
            folders.append(value.rstrip("/")[: -len("simple")] + "files")
    folders = [f.removeprefix("file://") for f in folders]
    return [f for f in dict.fromkeys(folders) if os.path.isdir(f)]


def _torch_install_args(session: nox.Session) -> list[str]:
    """TORCH, and under uv pip's local wheel folders: without them uv downloads the same versions
    (several GB) that lie on the machine's disk."""
    if session.venv_backend != "uv":
        return TORCH
    links = [arg for folder in _pip_local_folders() for arg in ("--find-links", folder)]
    return [*links, *TORCH]


# uv, unlike pip, does not compile bytecode when it installs. Where PYTHONDONTWRITEBYTECODE is set
# (CI images, containers) Python then compiles every module from source in every process: each
# sweep run's papermill process and kernel paid ~9 s more to import lightning and papermill.
COMPILE_BYTECODE = {"UV_COMPILE_BYTECODE": "1"}


def install(session: nox.Session, extras: str = "dev") -> None:
    session.install(*_torch_install_args(session), env=COMPILE_BYTECODE)
    session.install("-e", f".[{extras}]" if extras else ".", env=COMPILE_BYTECODE)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (CPU only; pass pytest arguments after --, e.g. -m 'not slow')."""
    install(session, extras="dev,postgres")  # postgres: the PostgreSQL study tests (tests/sweeps/test_postgres.py)
    session.run("pytest", *session.posargs, env={"PNEUMO_NO_PROGRESS": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def sweep(session: nox.Session) -> None:
    """The main job: data (synthetic unless --data-dir), optimizer sweep, marathon, predictions."""
    install(session, extras="")
    args = list(session.posargs)
    params = args.pop(0) if args and not args[0].startswith("-") else "params/optimizers.yaml"
    data = _option(args, "--data-dir")
    out = _option(args, "--out", keep=True) or "outputs"
    if data is None:
        data = "outputs/synth"
        if not os.path.isdir(f"{data}/stage_2_train_images"):
            session.run("pneumo", "synth", data, "--n-train", "400", "--n-test", "60")
    session.run("pneumo", "validate", data)
    # the package's own rule for the sweep's name (the directory its outputs go under; other data than
    # the file's is another sweep, `<name>-<folder>`); stdout only
    name = session.run("pneumo", "sweep", params, "--data-dir", data, "--print-name", silent=True, stderr=None).strip()
    session.run("pneumo", "sweep", params, "--data-dir", data, "--resume", "--marathon", *args)
    predictions = f"{out}/predictions/{name}"
    predict = ["pneumo", "predict", f"{out}/models/{name}", f"{data}/stage_2_test_images", "--out", predictions,
               "--dicom-sr", "--dicom-gsps"]
    labelled = os.path.isfile(f"{data}/stage_2_test_labels.csv")
    if labelled:
        predict += ["--labels", f"{data}/stage_2_test_labels.csv"]
    session.run(*predict)
    if labelled:  # the model card now holds the test score: summary.md's marathon row shows it (all runs done)
        session.run("pneumo", "sweep", params, "--data-dir", data, "--resume", *args, silent=True)
    session.log(f"summary:     {out}/sweeps/{name}/summary.md")
    session.log(f"tensorboard: nox -s tensorboard   (or: tensorboard --logdir {out}/runs/{name})")
    session.log(f"model:       {out}/models/{name}/ (latest vN: model.ckpt, model.json, model.md, model.onnx)")
    session.log(f"predictions: {predictions}/ (submission.csv, annotations.json, images/, errors.csv, "
                "sr/ and gsps/ (DICOM), warnings.csv)")


def _option(args: list[str], name: str, keep: bool = False) -> str | None:
    """The value of `name VALUE` or `name=VALUE` in args (removed from them unless keep)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
            if not keep:
                del args[i : i + 2]
            return value
        if arg.startswith(name + "="):
            if not keep:
                del args[i]
            return arg.split("=", 1)[1]
    return None


@nox.session
def lab(session: nox.Session) -> None:
    """Start JupyterLab on the notebooks (open 01-explore first); writes outputs/synth if there is no data."""
    install(session, extras="")
    # the notebooks' default data_dir; the same dataset nox -s sweep makes and reuses
    if not os.path.isdir("outputs/synth/stage_2_train_images"):
        session.run("pneumo", "synth", "outputs/synth", "--n-train", "400", "--n-test", "60")
    # JUPYTER_PREFER_ENV_PATH: this venv's python3 kernel (with pneumo) before a user's own python3 kernelspec
    session.run("jupyter", "lab", "--notebook-dir=notebooks", *session.posargs, env={"JUPYTER_PREFER_ENV_PATH": "1"})


@nox.session
def tensorboard(session: nox.Session) -> None:
    """Start TensorBoard on everything under outputs/ (runs of every sweep, marathon models)."""
    session.install("tensorboard")
    session.run("tensorboard", "--logdir", "outputs", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks (JSON in outputs/bench/); `-- real [--data-dir DIR]` (real data) never runs by default."""
    install(session)
    session.run("python", "benchmarks/run.py", *session.posargs, env={"PNEUMO_NO_PROGRESS": "1"})
