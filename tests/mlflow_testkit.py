"""A real ``mlflow server`` on 127.0.0.1 for tests: started, stopped (its whole process group, as an outage
would) and restarted on the same port and store. Not a test module.

The server runs without MLflow's job execution (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``): since MLflow 3.x
it otherwise starts a job runner and eight huey consumer processes beside the web worker, for GenAI jobs that
no test here uses; they doubled each start's CPU time.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``with MlflowServer(folder) as uri:`` ... ; ``stop()`` and ``start()`` again keep the port and the store."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> str:
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        log.close()
        deadline = time.time() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return self.uri
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError((self.folder / "server.log").read_text()[-2000:])
            time.sleep(0.3)

    def stop(self) -> None:
        """Kill the server and its workers (its own process group): killing the parent alone leaves them serving."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
