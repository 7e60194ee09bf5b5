"""Named API endpoints (see the README's `gradio_client` example), typed so Gradio documents them.

Each endpoint validates its input and answers a mistake with a readable error that changes
nothing (models and datasets are checked by `Arena.start`).
"""

from __future__ import annotations

import functools
import inspect
import secrets
import types
import typing
from collections.abc import Callable
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from training.core.config import ConfigError, command_line, config_from, shown_on

from .arena import Arena, user_errors


def register(arena: Arena) -> None:
    """Add the endpoints to the Blocks being built."""
    for endpoint in (*_run_endpoints(arena), *_use_endpoints(arena)):
        gr.api(_typed(endpoint), api_name=endpoint.__name__)


def _typed(endpoint: Callable) -> Callable:
    """The endpoint, refusing an argument whose JSON type its annotation does not allow with a
    message naming the parameter: Gradio passes JSON values through as they came."""
    signature, hints = inspect.signature(endpoint), typing.get_type_hints(endpoint)

    @functools.wraps(endpoint)
    def typed(*arguments: Any, **named: Any) -> Any:
        with user_errors():
            for name, value in signature.bind(*arguments, **named).arguments.items():
                if name in hints and not _has_type(value, hints[name]):
                    raise ConfigError(f"{name} must be {_type_name(hints[name])} (got {value!r})")
        return endpoint(*arguments, **named)

    return typed


JSON_NAMES = {
    str: "a string",
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    dict: "an object",
    list[str]: "a list of strings",
}


def _has_type(value: Any, annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_has_type(element, item) for element in value)
    if annotation in (int, float) and isinstance(value, bool):
        return False  # JSON's true is not a number, though Python's bool is an int
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return JSON_NAMES[annotation]


KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _start_run_signature() -> inspect.Signature:
    """`start_run`'s parameters: the API's run settings as TrainConfig declares them, then the owner
    token. A setting left out by default (None, or no hyperparameters) is optional and None here."""
    parameters = []
    for field in shown_on("api"):
        if field.required:
            annotation, default = field.kind, inspect.Parameter.empty
        elif field.default is None or field.kind is dict:
            annotation, default = field.kind | None, None
        else:
            annotation, default = field.kind, field.default
        parameters.append(inspect.Parameter(field.name, KEYWORD, default=default, annotation=annotation))
    parameters.append(inspect.Parameter("owner_token", KEYWORD, default=None, annotation=str | None))
    return inspect.Signature(parameters, return_annotation=dict)


START_RUN = _start_run_signature()


def _run_endpoints(arena: Arena) -> tuple[Callable, ...]:
    """Start a run, follow it, and stop, resume or delete it."""

    def start_run(*arguments: Any, **named: Any) -> dict:
        """Queue a training run. Returns its run id, state, queue position, the equivalent CLI command
        and the owner token (given, or made up) that stop_run, resume_run and delete_run need."""
        with user_errors():
            request = START_RUN.bind(*arguments, **named)
            request.apply_defaults()
            values = dict(request.arguments)
            owner_token = values.pop("owner_token") or secrets.token_urlsafe(16)
            config = config_from(values)
            run_id = arena.start(config, owner_token)
            return {
                **run_status(run_id, metrics_from_step=None),
                # As given: a rate left out is the tuned default for the model, chosen where the run trains.
                "command": command_line(config),
                "owner_token": owner_token,
            }

    # Gradio reads an endpoint's parameters from its signature and their JSON types from its annotations.
    start_run.__signature__ = START_RUN
    start_run.__annotations__ = {p.name: p.annotation for p in START_RUN.parameters.values()} | {"return": dict}

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

    return start_run, run_status, stop_run, resume_run, delete_run


def _use_endpoints(arena: Arena) -> tuple[Callable, ...]:
    """List the catalog and the runs, and use finished ones: classify, generate, download, push to the Hub."""

    def catalog(task: str | None = None) -> dict:
        """The models and datasets start_run can take (optionally of one task): whether the server
        is offline, a message naming the models it can train, and each catalog entry with `usable`
        and, where not, `unusable_because` (the Hub is not reachable, or a bundled package is not
        installed)."""
        with user_errors():
            if task and task not in ("sentiment", "generation"):
                raise ConfigError(f"unknown task {task!r}; choose sentiment or generation")
            return arena.catalog(task or None)

    def list_runs(task: str | None = None) -> list[dict[str, Any]]:
        """Every run in the store as leaderboard rows (optionally of one task)."""
        with user_errors():
            if task and task not in ("sentiment", "generation"):
                raise ConfigError(f"unknown task {task!r}; choose sentiment or generation")
            frame = arena.leaderboard(task or None)
            return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")

    def classify(text: str, run_ids: list[str], include_base: bool = True) -> list[dict]:
        """Classify one text with each sentiment run (and the base model) side by side."""
        with user_errors(), arena.inference_threads():
            return arena.classify(run_ids, text, include_base)

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
            return arena.generate(
                run_ids,
                prompt,
                include_base,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
            )

    def download_run(run_id: str, merged: bool = False, owner_token: str | None = None) -> FileData:
        """A finished or stopped run as one .zip: its PEFT adapter (full fine-tuning: the model) with the
        tokenizer, a model card (README.md) and run/config.json, run/summary.json. Anyone may download a
        run; merged=true (the adapter merged into its base, LoRA/DoRA/HiRA/SparseLoRA on a full-precision
        base) needs the run's owner_token."""
        with user_errors(), arena.inference_threads():
            path = arena.download(run_id, merged, owner_token)
            return FileData(path=str(path), orig_name=path.name).model_dump()

    def push_run(run_id: str, repo_id: str, token: str, merged: bool = False, owner_token: str | None = None) -> dict:
        """Upload the run's export and model card to the private Hub repository repo_id (owner/name),
        with a Hugging Face write token used for this upload only. Needs the run's owner_token."""
        with user_errors(), arena.inference_threads():
            return arena.push(run_id, repo_id, token, merged, owner_token)

    return catalog, list_runs, classify, generate, download_run, push_run
