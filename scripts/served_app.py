"""`python app.py` served on a free local port, started as a user starts it: what the browser and API
tests, the load check and the Space check all talk to."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppServer:
    url: str
    process: subprocess.Popen


@contextmanager
def served_app(
    environment: dict[str, str], log_path: Path, python: str = sys.executable, timeout_s: float = 180
) -> Iterator[AppServer]:
    """app.py run by `python` with `environment` (GRADIO_SERVER_PORT chosen here), its output in
    `log_path`; yielded once it answers HTTP, stopped afterwards. RuntimeError with the log's end
    if it exits or does not answer within `timeout_s`."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [python, "app.py"], cwd=ROOT, env={**environment, "GRADIO_SERVER_PORT": str(port)}, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not start:\n{log_path.read_text()[-4000:]}") from None
                time.sleep(0.5)
        yield AppServer(url, process)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
