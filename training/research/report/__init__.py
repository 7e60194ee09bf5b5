"""The suite's results as the presentation needs them, in four parts: `queries` (results.json or
a run store as rows), `answers` (the seed's five questions in prose and tables, from rows),
`markdown` (the report) and `figures` (plotly). The report is computed from results.json alone,
so its numbers are the JSON's (`python -m training bench --report` rewrites it without training).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from training.core.runs import write_json_atomic

from .answers import QUESTIONS, answers, headlines, question_table
from .figures import FIGURES
from .markdown import headline_tables, markdown, probe_table
from .queries import Results, Row, rows, store_rows

__all__ = [
    "FIGURES",
    "QUESTIONS",
    "Row",
    "answers",
    "headline_tables",
    "headlines",
    "probe_table",
    "question_table",
    "read",
    "report_path",
    "rows",
    "store_rows",
    "write",
]


def write(results: Results, out: Path | str) -> Path:
    """results.json (with the answers), report.md and figures/*.json in `out`."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    results = {**results, "answers": answers(rows(results))}
    (out / "report.md").write_text(markdown(results), encoding="utf-8")
    for name, build in FIGURES.items():
        (out / "figures" / f"{name}.json").write_text(build(results).to_json(), encoding="utf-8")
    write_json_atomic(out / "results.json", results)  # last: the app shows results once all of them exist
    return out / "report.md"


def report_path(out: Path | str) -> str:
    """The report's path as someone in the app's folder finds it."""
    return os.path.relpath(Path(out) / "report.md")


def read(out: Path | str) -> dict[str, Any] | None:
    """The results `write` saved, or None when there are none."""
    path = Path(out) / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
