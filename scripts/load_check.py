"""Load check: while a run trains, N clients send M Playground requests each through gradio_client.

    .venv/bin/python scripts/load_check.py                 # starts its own app on a temporary store
    .venv/bin/python scripts/load_check.py --url http://127.0.0.1:7860

Trains a short LoRA run to classify with, starts a long one, then fires the requests while it
trains. Prints every figure as one JSON line; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from gradio_client import Client
from served_app import served_app

ROOT = Path(__file__).resolve().parent.parent
REVIEWS = ["A warm, funny, beautifully acted film.", "Tedious and overlong.", "Not bad at all.", "A mess."]


@contextmanager
def own_app() -> Iterator[str]:
    runs = tempfile.mkdtemp(prefix="lora-arena-load-")
    environment = {**os.environ, "LORA_ARENA_RUNS": runs, "HF_HUB_OFFLINE": "1"}
    with served_app(environment, Path(runs) / "app.log") as server:
        yield server.url


def wait_for(client: Client, run_id: str, states: tuple[str, ...]) -> dict:
    while True:
        state = client.predict(run_id=run_id, metrics_from_step=None, api_name="/run_status")
        if state["state"] in states:
            return state
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an app that is already running (default: start one)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    args = parser.parse_args()
    with own_app() if args.url is None else _given(args.url) as url:
        client = Client(url, verbose=False)
        adapter = client.predict(task="sentiment", method="lora", max_steps=30, api_name="/start_run")
        if wait_for(client, adapter["id"], ("finished", "failed", "cancelled"))["status"] != "completed":
            raise SystemExit(f"the adapter run {adapter['id']} did not complete")
        training = client.predict(task="sentiment", method="lora", max_steps=2000, api_name="/start_run")
        wait_for(client, training["id"], ("running",))

        def one_client(index: int) -> list[tuple[float, bool]]:
            own = Client(url, verbose=False)
            timings = []
            for request in range(args.requests):
                start = time.perf_counter()
                try:
                    own.predict(
                        text=REVIEWS[(index + request) % len(REVIEWS)], run_ids=[adapter["id"]], api_name="/classify"
                    )
                    ok = True
                except Exception:  # noqa: BLE001 - every failure counts, whatever it is
                    ok = False
                timings.append((time.perf_counter() - start, ok))
            return timings

        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [t for timings in pool.map(one_client, range(args.clients)) for t in timings]
        wall = time.perf_counter() - started
        still_training = client.predict(run_id=training["id"], metrics_from_step=None, api_name="/run_status")
        client.predict(run_id=training["id"], owner_token=training["owner_token"], api_name="/stop_run")
    latencies = sorted(latency for latency, _ in results)
    failures = sum(not ok for _, ok in results)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "requests": len(results),
                "failed": failures,
                "median_latency_s": round(statistics.median(latencies), 3),
                "p95_latency_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
                "requests_per_s": round(len(results) / wall, 2),
                "training_state_during_check": still_training["state"],
            }
        )
    )
    return 1 if failures else 0


@contextmanager
def _given(url: str):
    yield url


if __name__ == "__main__":
    sys.exit(main())
