"""What the model and dataset catalogs list: one entry type for both, so that the UI and the CLI
describe a model and a dataset the same way."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lora_methods import Task


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    task: Task
    description: str
    bundled: bool  # ships with the install; works offline
    hub_id: str | None = None  # the Hub model a bundled copy comes from: what an exported model card names


def for_task(entries: Iterable[CatalogEntry], task: Task) -> list[CatalogEntry]:
    return [entry for entry in entries if entry.task == task]
