"""`ServerProcess`: a `lorakit serve` child process on 127.0.0.1 and a free port (tests, benchmarks, notebooks).

    with ServerProcess("--adapter-dir", "adapters/") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")

Started with this Python (`python -m lorakit serve …`), waited for until /health answers,
stopped by its own PID (SIGTERM, which drains, then SIGKILL if it lingers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, env: dict | None = None, startup_timeout: float = 120.0, command: str = "serve"):
        """`lorakit COMMAND --port P ARGS…` (`serve`, or `ui`: any command with a /health route)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = command
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"lorakit-{command}-{self.port}.log"
        argv = [sys.executable, "-m", "lorakit", command, "--port", str(self.port), *args]
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lorakit {command} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"lorakit {command} did not come up in {startup_timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
