"""A throwaway PostgreSQL server for the registry tests: `initdb` + `pg_ctl` in a temp folder, on a free
loopback port, stopped by its own pg_ctl. As root (CI), the server runs as the `postgres` user that
Debian's package creates (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from lorakit.http.process import free_port


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def unavailable() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None."""
    if not (_binary("initdb") and _binary("pg_ctl")):
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does this)"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser, so PostgreSQL cannot be started as another user"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    return None


class Postgres:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="lorakit-pg-"))
        self.root.chmod(0o755)
        self.data, self.port = self.root / "data", free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres")
        self._run(_binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", "lorakit", "-E", "UTF8", "--no-sync")
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                  "start")
        self.url = f"postgresql+psycopg://lorakit@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self._as, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stdout}\n{done.stderr}")

    def database(self, name: str) -> str:
        """A fresh database on this server; its URL."""
        import psycopg

        with psycopg.connect(f"postgresql://lorakit@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://lorakit@127.0.0.1:{self.port}/{name}"

    def stop_server(self) -> None:
        """Stop the server, keeping its files (an outage)."""
        if (self.data / "postmaster.pid").exists():
            self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        try:
            self.stop_server()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
