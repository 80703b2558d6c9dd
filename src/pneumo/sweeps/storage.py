"""Where a search's study lives: Optuna's RDB storage at a SQLAlchemy URL (SQLite by default,
PostgreSQL when several machines share one study), opened with the heartbeats that let a killed
sweep's trials go stale and run again. A URL that cannot be used is one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from pathlib import Path

from pneumo.errors import SweepError, shown

HEARTBEAT_S, GRACE_S = 5, 15  # a trial silent for GRACE_S belongs to a sweep that is gone
RETRIES = 3  # times a trial of a killed sweep is enqueued again
CONNECT_TIMEOUT_S = 10  # a database host that does not answer: an error after this, not a hang
SCHEMA_ATTEMPTS = 5  # tries at opening a new database that other sweeps are setting up at the same moment


def default_storage(sweeps_root: Path, name: str) -> str:
    path = (sweeps_root / name / "study.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def shown_url(url: str) -> str:
    """The storage URL without its password (it is printed and logged)."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def _engine_kwargs(url: str) -> dict | None:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}  # writers from many processes
    if url.startswith("postgres") and "connect_timeout" not in url:  # the URL's own value wins
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return None


def open_storage(url: str, heartbeat: bool = True):
    """RDB storage; the sweep records the heartbeats, so a trial of a killed sweep goes stale.
    A URL that cannot be opened is one SweepError line, its password hidden."""
    import sqlalchemy.exc

    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            return _rdb_storage(url, heartbeat)
        except sqlalchemy.exc.DBAPIError as exc:
            # sweeps started together on a new database race to create Optuna's tables (optuna
            # issue 1092): the loser's CREATE fails; once the winner is done, the tables are there
            if attempt == SCHEMA_ATTEMPTS or not re.search(r"already exists|duplicate key", str(exc)):
                raise SweepError(f"--storage {shown_url(url)}: {_storage_problem(url, exc)}") from None
            time.sleep(attempt)
        except (ImportError, ValueError, RuntimeError, sqlalchemy.exc.SQLAlchemyError) as exc:
            raise SweepError(f"--storage {shown_url(url)}: {_storage_problem(url, exc)}") from None


def _rdb_storage(url: str, heartbeat: bool):
    import optuna

    # postgresql:// is psycopg 3 (pneumo[postgres]) whichever driver this SQLAlchemy defaults to
    driver_url = re.sub(r"^postgresql://", "postgresql+psycopg://", url)
    engine = _engine_kwargs(url)
    beats = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
    with _quiet_experimental():
        if not heartbeat:
            return optuna.storages.RDBStorage(driver_url, engine_kwargs=engine)
        try:  # Optuna >= 5 names the callback for what it does
            return optuna.storages.RDBStorage(
                driver_url, engine_kwargs=engine, heartbeat_stale_trial_callback=retry_callback(), **beats
            )
        except TypeError:
            return optuna.storages.RDBStorage(
                driver_url, engine_kwargs=engine, failed_trial_callback=retry_callback(), **beats
            )


def _storage_problem(url: str, exc: Exception) -> str:
    """What is wrong with a storage URL, on one line, without its password."""
    import sqlalchemy.exc as sa

    example = "give a SQLAlchemy URL: postgresql://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:////PATH/study.db"
    if isinstance(exc, sa.NoSuchModuleError):
        problem = f"SQLAlchemy knows no database {shown(url.split(':', 1)[0])}; {example}"
    elif isinstance(exc, sa.ArgumentError):
        problem = f"not a database URL; {example}"
    elif isinstance(exc, ImportError):
        problem = (
            f"its driver is not installed ({exc.__cause__ or exc}); postgresql:// URLs need "
            "pip install 'pneumo[postgres]'"
        )
    else:
        problem = f"cannot open the database: {getattr(exc, 'orig', None) or exc}"
        if url.startswith("sqlite") and "unable to open" in problem:
            problem += " (does its directory exist?)"
    password = re.match(r"[^:/]+://[^:/@]*:([^@/]+)@", url)
    problem = problem.replace(password.group(1), "***") if password else problem
    return " ".join(problem.split())


def retry_callback():
    import optuna.storages as s

    cls = getattr(s, "RetryHeartbeatStaleTrialCallback", None) or s.RetryFailedTrialCallback
    with _quiet_experimental():
        return cls(max_retry=RETRIES, inherit_intermediate_values=True)


def original_number(frozen) -> int:
    """The trial a retried trial repeats (its run directory), else its own number."""
    with _quiet_experimental():
        number = retry_callback().retried_trial_number(frozen)
    return frozen.number if number is None else number


@contextlib.contextmanager
def _quiet_experimental():
    """Heartbeats and their retries are "experimental" since Optuna 2.8, and what --resume relies on."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
