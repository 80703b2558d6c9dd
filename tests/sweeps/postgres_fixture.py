"""A PostgreSQL server for the tests, from Debian's postgresql: initdb and pg_ctl in a temporary
directory, listening on 127.0.0.1 only (no Unix socket), on a free port, with a password
(scram-sha-256) for its one user. initdb refuses root: as root the server runs as `nobody`.
Without the server's binaries or the driver (pneumo[postgres]) the tests skip; in CI they fail."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slurm_fixture import require

USER, DATABASE = "pneumo", "optuna"


def _server_bin() -> Path | None:
    """The directory of initdb and pg_ctl: Debian keeps them off the PATH, by major version."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    root: Path
    bin: Path
    port: int
    password: str
    as_user: list[str]

    def url(self, password: str | None = None, host: str = "127.0.0.1", port: int | None = None) -> str:
        return f"postgresql://{USER}:{password or self.password}@{host}:{port or self.port}/{DATABASE}"

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def stop(self) -> None:
        self.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    server = _server_bin()
    require(server is not None, "no PostgreSQL server (apt-get install postgresql)")
    require(importlib.util.find_spec("psycopg") is not None, "no psycopg (pip install -e '.[postgres]')")
    as_user = []
    if os.geteuid() == 0:
        require(shutil.which("runuser") is not None, "initdb refuses root and there is no runuser")
        as_user = ["runuser", "-u", "nobody", "--"]
    root = Path(tempfile.mkdtemp(prefix="pneumo-pg-"))
    root.chmod(0o755)  # the server's user must reach its data directory
    (root / "data").mkdir(mode=0o700)
    password = secrets.token_urlsafe(12)
    (root / "pw").write_text(password + "\n")
    for path in (root / "data", root / "pw", root / "log"):
        path.touch(exist_ok=True)
        if as_user:
            shutil.chown(path, "nobody")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = Postgres(root, server, port, password, as_user)
    init = subprocess.run(
        [
            *as_user,
            str(server / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            USER,
            f"--pwfile={root / 'pw'}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
    started = pg.pg_ctl("-l", str(root / "log"), "-w", "-t", "60", "-o", options, "start")
    if started.returncode != 0:
        log = (root / "log").read_text()
        pg.stop()
        raise AssertionError(started.stdout + started.stderr + log)
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=port, user=USER, password=password, dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    return pg
