"""A throwaway PostgreSQL server for tests: the real engine, in a temporary directory.

``initdb`` and ``postgres`` come from Debian's ``postgresql`` package (``.ci/run`` installs
it). PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres``
user (``runuser``). It listens on 127.0.0.1 on a free port with trust authentication and no
fsync (a test server, thrown away afterwards). Tests may stop and start it to simulate an
outage; each test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from support.ports import free_port


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise RuntimeError(
            f"PostgreSQL's {name} was not found: install Debian's postgresql package"
        )
    return candidates[-1]


class PGServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="callboard-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "callboard"
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(
            _bin("initdb"),
            "--no-sync",
            "-A",
            "trust",
            "-U",
            self.user,
            "-E",
            "UTF8",
            "-D",
            str(self.data),
        )

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            [*self._as, *argv], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            _bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn(), autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {name}".encode())
                return self.dsn(name)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(RuntimeError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
