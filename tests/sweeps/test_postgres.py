"""`--storage postgresql://...`: a search's Optuna study in a real PostgreSQL server that the
tests start (postgres_fixture), shared by two sweeps and resumed after a SIGKILL; and every
storage URL that cannot be used (a wrong password, a host that does not answer, an unknown kind
of database, a text file, a missing directory or driver) is one line, its password hidden."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from postgres_fixture import start_postgres

from pneumo.cli import main
from pneumo.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = str(ROOT / "notebooks" / "02-train.ipynb")
TINY = {"image_size": 64, "depth": 3, "width": 4, "batch_size": 8, "n_val_images": 0, "save_images": False}


@pytest.fixture(scope="module")
def postgres():
    server = start_postgres()
    yield server
    server.stop()


def _search_file(tmp_path, synth_dir, trials: int, epochs: int) -> Path:
    path = tmp_path / "search.yaml"
    search = {"params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, "trials": trials, "sampler": "random"}
    spec = {
        "name": "shared",
        "notebook": NOTEBOOK,
        "base": {"data_dir": str(synth_dir), "epochs": epochs, **TINY},
        "search": search,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _one_line_error(capsys, *argv) -> str:
    """`pneumo ARGV` in this process: exit 1 and one line on stderr, which is returned."""
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("pneumo: error: --storage "), err
    return err[0]


@pytest.mark.parametrize(
    "storage, message",
    [
        ("nonsense", "--storage nonsense: not a database URL; give a SQLAlchemy URL: postgresql://USER:PASSWORD@"),
        ("foo://bar", "--storage foo://bar: SQLAlchemy knows no database 'foo'"),
        ("{tmp}/notes.txt", "notes.txt: not a database URL"),
        ("sqlite:///{tmp}/notes.txt", "notes.txt: cannot open the database: file is not a database"),
        (
            "sqlite:///{tmp}/no-such-dir/study.db",
            "cannot open the database: unable to open database file (does its directory exist?)",
        ),
        (
            "mysql://me:s3cr3t-pw@127.0.0.1/x",
            "--storage mysql://me:***@127.0.0.1/x: its driver is not installed (No module named 'MySQLdb')",
        ),
    ],
    ids=["nonsense", "unknown-dialect", "text-file", "text-file-as-sqlite", "missing-directory", "missing-driver"],
)
def test_a_storage_url_that_cannot_be_used_is_one_line(synth_dir, tmp_path, capsys, storage, message):
    if "mysql" in storage and importlib.util.find_spec("MySQLdb"):
        pytest.skip("a MySQL driver is installed here")
    (tmp_path / "notes.txt").write_text("not a database\n")
    path = _search_file(tmp_path, synth_dir, trials=1, epochs=1)
    line = _one_line_error(capsys, "sweep", path, "--out", tmp_path / "out", "--storage", storage.format(tmp=tmp_path))
    assert message in line and "s3cr3t-pw" not in line


def test_postgres_urls_are_psycopg_with_a_connect_timeout():
    from pneumo.sweeps.storage import CONNECT_TIMEOUT_S, _engine_kwargs

    assert _engine_kwargs("postgresql://u:p@db/x") == {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    assert _engine_kwargs("postgresql://u:p@db/x?connect_timeout=3") is None  # the URL's own value wins


def test_a_server_that_refuses_or_does_not_answer_is_one_line_hiding_the_password(
    postgres, synth_dir, tmp_path, capsys
):
    path = _search_file(tmp_path, synth_dir, trials=1, epochs=1)
    out = tmp_path / "out"
    wrong = _one_line_error(capsys, "sweep", path, "--out", out, "--storage", postgres.url(password="Wr0ng-pw"))
    assert 'password authentication failed for user "pneumo"' in wrong and "Wr0ng-pw" not in wrong
    assert "postgresql://pneumo:***@127.0.0.1" in wrong
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        url = postgres.url(port=silent.getsockname()[1]) + "?connect_timeout=2"
        mute = _one_line_error(capsys, "sweep", path, "--out", out, "--storage", url)
    assert "cannot open the database: connection timeout expired" in mute and time.monotonic() - start < 30
    unknown = _one_line_error(
        capsys, "sweep", path, "--out", out, "--storage", postgres.url().replace("postgresql://", "postgres://")
    )
    assert "SQLAlchemy knows no database 'postgres'" in unknown
    for line in (wrong, mute, unknown):
        assert postgres.password not in line


def _trial_of(pid: int) -> str | None:
    """The run directory name of the papermill process the sweep with this pid is running now."""
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"papermill" in argv[:3]:
            notebook = next(Path(a.decode()) for a in argv if a.endswith(b"notebook.ipynb"))
            return notebook.parent.name
    return None


def _sweep_command(path, out, url) -> list[str]:
    # --resume on both: whichever comes first creates the study, the other joins it
    return [
        sys.executable,
        "-m",
        "pneumo",
        "sweep",
        str(path),
        "--out",
        str(out),
        "--storage",
        url,
        "--resume",
        "--max-parallel",
        "1",
    ]


def _start_sweep(path, out, url) -> subprocess.Popen:
    env = {**os.environ, "PNEUMO_NO_PROGRESS": "1"}
    return subprocess.Popen(
        _sweep_command(path, out, url),
        cwd=path.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


EPOCHS = 8  # enough that a trial killed at epoch 2-4 is still training, even on a fast machine


def _kill_when_checkpointed(proc, out: Path, timeout: float = 240) -> str:
    """SIGKILL the sweep once its trial has a checkpoint and two epochs; the trial's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        name = _trial_of(proc.pid)
        run = RunDir(out / "runs" / "shared" / name) if name else None
        if run and run.last_checkpoint.is_file() and (run.status() or {}).get("epoch", 0) in (2, 3, 4):
            proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: the study still says it runs
            proc.wait()
            return name
        time.sleep(0.2)
    raise AssertionError(proc.communicate(timeout=10)[0][-3000:])


@pytest.mark.slow
def test_two_sweeps_share_one_study_and_a_killed_one_resumes_from_the_database(postgres, synth_dir, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from pneumo.config import TrainConfig
    from pneumo.data.prepare import prepared_for

    out = tmp_path / "outputs"  # one --out, as on a cluster's shared filesystem
    path = _search_file(tmp_path, synth_dir, trials=3, epochs=EPOCHS)
    prepared_for(TrainConfig(data_dir=str(synth_dir), **TINY), outputs=out)  # the two never race to build it
    url = postgres.url()
    first, second = _start_sweep(path, out, url), _start_sweep(path, out, url)
    killed = _kill_when_checkpointed(first, out)
    output, _ = second.communicate(timeout=400)
    if second.returncode != 0:
        # the other sweep ran the rest and left the killed sweep's trial alone, still running in the study
        assert second.returncode == 1 and f"1 run(s) not finished: {killed};" in output, output[-3000:]
        assert not [line for line in output.splitlines() if line.startswith(f"  {killed} ")]
        study = optuna.load_study(study_name="shared", storage=url)
        assert [t.state for t in study.trials].count(TrialState.RUNNING) == 1 and len(study.trials) == 3
    # else it was still waiting for the study's running trial when the kill made that trial stale:
    # it failed it and ran it again itself (which sweep finishes it depends on the machine's speed)
    again = subprocess.run(
        _sweep_command(path, out, url),
        cwd=tmp_path,
        env={**os.environ, "PNEUMO_NO_PROGRESS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    trials = optuna.load_study(study_name="shared", storage=url).trials
    number = int(killed.split("-")[1])
    # the killed trial went stale and was enqueued again with its parameters; the rest ran once. The
    # copy's number depends on when the staleness was noticed: by the live sweep while it still asked
    # for trials (then the copy came before the last new trial), or by the resumed one (the copy is last)
    assert [t.state for t in trials] == [
        TrialState.FAIL if t.number == number else TrialState.COMPLETE for t in trials
    ] and len(trials) == 4
    copies = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert len(copies) == 1 and copies[0].params == trials[number].params
    runs = out / "runs" / "shared"  # a copy continues in its original's run directory
    originals = sorted(t.number for t in trials if t is not copies[0])
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [f"trial-{n:03d}" for n in originals]
    for run in map(RunDir, sorted(p for p in runs.iterdir() if p.is_dir())):
        assert run.log.read_text().count(f"papermill {run.path.name}") == (2 if run.path.name == killed else 1)
        assert [h["epoch"] for h in run.metrics()["history"]] == list(range(1, EPOCHS + 1))  # every epoch once
    resumed = RunDir(runs / killed).log.read_text().split(f"papermill {killed}")[2]
    assert f"epoch 1/{EPOCHS} " not in resumed and f"epoch {EPOCHS}/{EPOCHS} " in resumed  # from its checkpoint
    assert "study postgresql://pneumo:***@127.0.0.1" in output + again.stdout
    assert postgres.password not in output + again.stdout + again.stderr
