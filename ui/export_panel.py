"""Take a run home from the page. Every tab offers a finished run's archive (anyone may download a
run: the leaderboard is public); the Train tab adds, for this browser's own runs, the merged model
and a push to the Hub. The work is training/export.py's, reached through `Arena`.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from training.core.memory import MB
from training.serving.export import OFFLINE_PUSH, RUN_FOLDER

from .arena import USER_ERRORS, Arena, user_errors

DOWNLOAD = "Download .zip"
MERGED = "Download merged .zip"
CONTENTS = (
    "The archive holds the PEFT adapter (full fine-tuning: the whole model) with its tokenizer, a model card "
    f"(`README.md`: how it was trained, its figures, how to load it) and the run's `{RUN_FOLDER}/config.json` "
    f"and `{RUN_FOLDER}/summary.json`. Finished and stopped runs only."
)
ELSEWHERE = CONTENTS + " The merged model and the push to the Hub: Train tab, for your own runs."
PUSH_NOTE = (
    "Pushes this run's export and model card to a **private** repository (created if new). The token needs "
    "write access; it serves this upload only and is kept nowhere, not even in this page."
)
# Building an archive is file work: it need not wait behind a training start or a Playground request.
FILE_WORK = {"api_visibility": "private", "show_progress": "hidden", "concurrency_limit": None}


def _ready(path: Path, label: str) -> Any:
    return gr.update(value=str(path), interactive=True, label=f"{label} ({path.stat().st_size / MB:,.1f} MB)")


def _idle(label: str) -> Any:
    return gr.update(value=None, interactive=False, label=label)


def download_view(arena: Arena, run_id: str | None) -> tuple[Any, str]:
    """The download button for `run_id`, its archive built once and ready to save, or disabled with
    the reason beside it (still training, failed...)."""
    if not run_id:
        return _idle(DOWNLOAD), ""
    try:
        path = arena.download(run_id)
    except USER_ERRORS as error:
        return _idle(DOWNLOAD), f"Download: {html.escape(str(error))}"
    return _ready(path, DOWNLOAD), ""


def download_button(elem_id: str | None = None, scale: int = 1) -> gr.DownloadButton:
    return gr.DownloadButton(DOWNLOAD, value=None, interactive=False, elem_id=elem_id, scale=scale)


@dataclass
class DownloadRow:
    """A run chooser with its download button and the note beside it; the tab fills the choices."""

    arena: Arena
    chooser: gr.Dropdown
    button: gr.DownloadButton
    note: gr.Markdown

    def follow(self, event: Any) -> None:
        """After `event` (a refresh that may keep the same run picked, which fires no change) the
        button shows the picked run as it is now: one that has finished since becomes downloadable."""
        event.then(functools.partial(_chosen, self.arena), self.chooser, [self.button, self.note], **FILE_WORK)


def download_row(arena: Arena, label: str, elem_id: str) -> DownloadRow:
    with gr.Row(equal_height=True):
        chooser = gr.Dropdown([], value=None, label=label, scale=4, elem_id=elem_id)
        button = download_button(f"{elem_id}-download")
    note = gr.Markdown(ELSEWHERE)
    chooser.change(functools.partial(_chosen, arena), chooser, [button, note], **FILE_WORK)
    return DownloadRow(arena, chooser, button, note)


def _chosen(arena: Arena, run_id: str | None) -> tuple[Any, str]:
    button, reason = download_view(arena, run_id)
    return button, reason or ELSEWHERE


@dataclass
class OwnerPanel:
    """The Train tab's part for the picked run of this browser: merged model and Hub push."""

    merge_note: gr.Markdown
    merge: gr.Button
    merged: gr.DownloadButton
    repo: gr.Textbox
    token: gr.Textbox
    push_merged: gr.Checkbox
    push: gr.Button
    pushed: gr.Markdown


def owner_panel(offline: bool) -> OwnerPanel:
    with gr.Accordion("Take it home: merged model and push to the Hub", open=False, elem_id="take-home"):
        gr.Markdown(CONTENTS)
        merge_note = gr.Markdown("**Merged model**: pick one of your finished runs above.", elem_id="merge-note")
        with gr.Row(equal_height=True):
            merge = gr.Button("Build the merged model", interactive=False, elem_id="merge-button")
            merged = gr.DownloadButton(MERGED, value=None, interactive=False, elem_id="merged-download")
        gr.Markdown(f"**Push unavailable**: {OFFLINE_PUSH}." if offline else PUSH_NOTE, elem_id="push-note")
        with gr.Row(equal_height=True):
            repo = gr.Textbox(
                label="Hub repository", placeholder="your-name/model-name", scale=3, interactive=not offline
            )
            token = gr.Textbox(
                label="Access token", type="password", placeholder="hf_...", scale=3, interactive=not offline
            )
            push_merged = gr.Checkbox(False, label="merged model", scale=1, interactive=not offline)
            push = gr.Button("Push to the Hub", interactive=not offline, scale=1, elem_id="push-button")
        pushed = gr.Markdown(elem_id="push-result")
    return OwnerPanel(merge_note, merge, merged, repo, token, push_merged, push, pushed)


def _owner_view(arena: Arena, run_id: str | None) -> tuple:
    """Download button, its note, the merge note, the merge button and a fresh merged download, for
    the picked run (each status change: a pick, a run finishing)."""
    button, note = download_view(arena, run_id)
    try:
        blocker = arena.merge_note(run_id) if run_id else "pick one of your runs"
    except USER_ERRORS as error:
        blocker = str(error)
    ready = blocker is None and not note
    merge_note = (
        f"**Merged model**: not for this run: {html.escape(blocker)}."
        if blocker
        else "**Merged model**: the adapter folded into the base weights (PEFT's `merge_and_unload`), saved as "
        "safetensors: plain `transformers` loads it, with the adapter's predictions and no PEFT at inference."
    )
    return button, note, merge_note, gr.update(interactive=ready), _idle(MERGED)


def _picked(run_id: str | None) -> str:
    if not run_id:
        raise gr.Error("Pick one of your runs first.")
    return run_id


def _merge(arena: Arena, run_id: str | None, owner_token: str) -> tuple[Any, str]:
    """The merged archive of the picked run, and which run it is."""
    with user_errors(), arena.inference_threads():
        return _ready(arena.download(_picked(run_id), merged=True, owner_token=owner_token), MERGED), run_id


def _merged_if_still_picked(built_for: str | None, run_id: str | None) -> Any:
    """A build takes a while: if another run was picked meanwhile, its button must not offer this one's model."""
    return gr.skip() if built_for == run_id else _idle(MERGED)


def _push(arena: Arena, run_id: str | None, repo_id: str, token: str, merged: bool, owner_token: str) -> str:
    with user_errors(), arena.inference_threads():
        result = arena.push(_picked(run_id), repo_id, token, merged, owner_token)
    return f"Pushed {len(result['files'])} files to [{html.escape(result['repo_id'])}]({result['url']}) (private)."


def wire(
    arena: Arena,
    panel: OwnerPanel,
    download: gr.DownloadButton,
    note: gr.Markdown,
    status: gr.Markdown,
    run_id: gr.BrowserState,
    owner: gr.BrowserState,
) -> None:
    """Refresh the download button, its note and this panel whenever the Train tab's status line
    changes (a pick, a run finishing); merge and push act on the picked run with this browser's token."""
    view = [download, note, panel.merge_note, panel.merge, panel.merged]
    status.change(functools.partial(_owner_view, arena), run_id, view, **FILE_WORK)
    built_for = gr.State()
    panel.merge.click(
        functools.partial(_merge, arena), [run_id, owner], [panel.merged, built_for], api_visibility="private"
    ).then(_merged_if_still_picked, [built_for, run_id], panel.merged, **FILE_WORK)
    inputs = [run_id, panel.repo, panel.token, panel.push_merged, owner]
    # `.then` runs whether the push worked or not: the token leaves the page either way.
    panel.push.click(functools.partial(_push, arena), inputs, panel.pushed, api_visibility="private").then(
        lambda: "", None, panel.token, **FILE_WORK
    )
