"""Named API endpoints (see the README's `gradio_client` example), typed so Gradio documents them.

Each endpoint validates its input and answers a mistake with a readable error that changes
nothing (models and datasets are checked by `Arena.start`).
"""

from __future__ import annotations

import secrets
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from training.core.config import ConfigError, TrainConfig, command_line
from training.research.leaderboard import leaderboard
from training.serving.playground import classify_side_by_side, generate_side_by_side

from .arena import Arena, user_errors


def register(arena: Arena) -> None:
    """Add the endpoints to the Blocks being built."""

    def start_run(
        task: str,
        method: str,
        hparams: dict | None = None,
        model: str | None = None,
        dataset: str | None = None,
        max_steps: int | None = None,
        batch_size: int | None = None,
        seq_len: int | None = None,
        seed: int = 0,
        eval_steps: int | None = None,
        eval_samples: int | None = None,
        eval_subsample: int | None = None,
        checkpoint_steps: int | None = None,
        owner_token: str | None = None,
    ) -> dict:
        """Queue a training run. Returns its run id, state, queue position, the equivalent CLI command
        and the owner token (given, or made up) that stop_run, resume_run and delete_run need."""
        with user_errors():
            if not isinstance(hparams, dict | None):
                raise ConfigError("hparams must be a JSON object of hyperparameter names and values")
            config = TrainConfig(
                task=task,
                method=method,
                model=model or None,
                dataset=dataset or None,
                hparams=hparams or {},
                max_steps=max_steps,
                batch_size=batch_size,
                seq_len=seq_len,
                seed=seed,
                eval_steps=eval_steps,
                eval_samples=eval_samples,
                eval_subsample=eval_subsample,
                checkpoint_steps=checkpoint_steps,
            )
            owner_token = owner_token or secrets.token_urlsafe(16)
            run_id = arena.start(config, owner_token)
            return {
                **run_status(run_id, metrics_from_step=None),
                "command": command_line(config),
                "owner_token": owner_token,
            }

    def run_status(run_id: str, metrics_from_step: int | None = 0) -> dict:
        """State of a run (queued, starting, running, finished, failed, cancelled), its summary and,
        unless metrics_from_step is null, its metrics records from that step on."""
        with user_errors():
            state = arena.describe(run_id)
            if metrics_from_step is not None and state["summary"]:
                state["metrics"] = [r for r in arena.records(run_id) if r.get("step", 0) >= metrics_from_step]
            return state

    def stop_run(run_id: str, owner_token: str | None = None) -> str:
        """Cancel a queued run, or stop a running one at the end of its current step (its adapter is kept)."""
        with user_errors():
            return arena.stop(run_id, owner_token)

    def resume_run(run_id: str, owner_token: str | None = None) -> dict:
        """Queue a stopped, interrupted or failed run to continue from its latest checkpoint."""
        with user_errors():
            arena.resume(run_id, owner_token)
            return run_status(run_id, metrics_from_step=None)

    def delete_run(run_id: str, owner_token: str | None = None) -> str:
        """Delete a finished run (adapter, metrics, checkpoints) from the store."""
        with user_errors():
            return arena.delete(run_id, owner_token)

    def list_runs(task: str | None = None) -> list[dict[str, Any]]:
        """Every run in the store as leaderboard rows (optionally of one task)."""
        with user_errors():
            if task and task not in ("sentiment", "generation"):
                raise ConfigError(f"unknown task {task!r}; choose sentiment or generation")
            frame = leaderboard(arena.store, task or None)
            return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")

    def classify(text: str, run_ids: list[str], include_base: bool = True) -> list[dict]:
        """Classify one text with each sentiment run (and the base model) side by side."""
        with user_errors(), arena.inference_threads():
            return classify_side_by_side(arena.pool, arena.store, run_ids, text, include_base)

    def generate(
        prompt: str,
        run_ids: list[str],
        include_base: bool = True,
        max_new_tokens: int = 48,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
    ) -> list[dict]:
        """Continue one prompt with each generation run (and the base model) side by side."""
        with user_errors(), arena.inference_threads():
            return generate_side_by_side(
                arena.pool, arena.store, run_ids, prompt, include_base, False, max_new_tokens, temperature, top_p, seed
            )

    def download_run(run_id: str, merged: bool = False, owner_token: str | None = None) -> FileData:
        """A finished or stopped run as one .zip: its PEFT adapter (full fine-tuning: the model) with the
        tokenizer, a model card (README.md) and run/config.json, run/summary.json. Anyone may download a
        run; merged=true (the adapter merged into its base, LoRA/HiRA/SparseLoRA on a full-precision
        base) needs the run's owner_token."""
        with user_errors(), arena.inference_threads():
            path = arena.download(run_id, merged, owner_token)
            return FileData(path=str(path), orig_name=path.name).model_dump()

    def push_run(run_id: str, repo_id: str, token: str, merged: bool = False, owner_token: str | None = None) -> dict:
        """Upload the run's export and model card to the private Hub repository repo_id (owner/name),
        with a Hugging Face write token used for this upload only. Needs the run's owner_token."""
        with user_errors(), arena.inference_threads():
            return arena.push(run_id, repo_id, token, merged, owner_token)

    endpoints = (start_run, run_status, stop_run, resume_run, delete_run, list_runs, classify, generate)
    for endpoint in (*endpoints, download_run, push_run):
        gr.api(endpoint, api_name=endpoint.__name__)
