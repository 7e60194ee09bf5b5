"""LoRA Arena: train fine-tuning methods side by side and compare what they buy.

`python app.py` (or `make run`) serves on http://127.0.0.1:7860; GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT change the host and port, LORA_ARENA_RUNS the run store folder, and
LORA_ARENA_STANDBY=0 keeps no training worker ready (it holds about 0.5 GB while it waits).
On a Hugging Face Space this file is the entry point (see the README's front matter).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app works offline

import gradio as gr  # noqa: E402

from training.core.data import MAX_UPLOAD_BYTES  # noqa: E402
from ui import api, compare_tab, guide_tab, playground_tab, train_tab  # noqa: E402
from ui.arena import Arena  # noqa: E402

STYLE = (Path(__file__).resolve().parent / "ui" / "style.css").read_text(encoding="utf-8")
# System fonts: the default theme would fetch Google Fonts, which an offline browser cannot reach.
THEME = gr.themes.Soft(
    primary_hue="indigo",
    font=("ui-sans-serif", "system-ui", "sans-serif"),
    font_mono=("ui-monospace", "SFMono-Regular", "monospace"),
)


def build_app(arena: Arena | None = None) -> gr.Blocks:
    arena = arena or Arena()
    with gr.Blocks(title="LoRA Arena") as demo:
        gr.Markdown(
            "# LoRA Arena\nTrain full fine-tuning, LoRA, QLoRA, DoRA, HiRA and SparseLoRA on the same model and data, "
            "watch them live, and compare what each one buys."
        )
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train_tab.build(demo, arena)
            with gr.Tab("Compare", id="compare") as tab:
                compare_tab.build(demo, arena, tab)
            with gr.Tab("Playground", id="playground") as tab:
                playground_tab.build(demo, arena, tab)
            with gr.Tab("Guide", id="guide") as tab:
                guide_tab.build(demo, arena, tab)
        api.register(arena)
    return demo


def _log_to_stderr() -> None:
    """One line per refused request (ui.arena.user_errors) in the server log, nothing more."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logger = logging.getLogger("lora_arena")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


if __name__ == "__main__":
    _log_to_stderr()
    arena = Arena(standby=os.environ.get("LORA_ARENA_STANDBY", "1") != "0")
    build_app(arena).queue(default_concurrency_limit=1).launch(theme=THEME, css=STYLE, max_file_size=MAX_UPLOAD_BYTES)
