"""The dependency rule: imports point down the layers, never up or sideways between siblings.

app.py
training.cli, ui                                  (top: nothing imports them)
training.serving, training.jobs, training.research
training.engine
training.core
lora_methods
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (prefix, rank): a module belongs to the longest prefix that names it.
LAYERS = {
    "lora_methods": 0,
    "training": 1,  # the package itself: logging set-up only
    "training.core": 1,
    "training.engine": 2,
    "training.serving": 3,
    "training.jobs": 3,
    "training.research": 3,
    "training.cli": 4,
    "ui": 4,
    "app": 5,
}


def layer_of(module: str) -> str | None:
    if module == "training.__main__":  # `python -m training` is the CLI
        return "training.cli"
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=len, default=None)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every project module `path` imports, anywhere in the file (function-level imports too)."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from training import core` imports the subpackage training.core
            found += [
                (node.lineno, f"{base}.{alias.name}" if layer_of(f"{base}.{alias.name}") else base)
                for alias in node.names
            ]
    return [(line, name) for line, name in found if layer_of(name) is not None]


def violations(path: Path) -> list[str]:
    own = layer_of(module_name(path))
    wrong = []
    for line, target in imported_modules(path):
        layer = layer_of(target)
        if layer == own or LAYERS[layer] < LAYERS[own] or (layer == "training" and LAYERS[own] >= 1):
            continue
        wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target} ({layer})")
    return wrong


SOURCES = sorted(
    [
        ROOT / "app.py",
        *(ROOT / "lora_methods").rglob("*.py"),
        *(ROOT / "training").rglob("*.py"),
        *(ROOT / "ui").rglob("*.py"),
    ]
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_point_down(path):
    assert violations(path) == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an engine module importing the job service, or a job service module
    importing the CLI, is reported."""
    for relative, source in {
        "training/engine/bad.py": "from training.jobs import JobManager\n",
        "training/jobs/bad.py": "def f():\n    from training.cli import main\n",
        "training/serving/bad.py": "from training.research import bench\n",
        "training/core/fine.py": "from lora_methods import get_method\nfrom training.core import runs\n",
    }.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert len(violations(tmp_path / "training/engine/bad.py")) == 1
    assert len(violations(tmp_path / "training/jobs/bad.py")) == 1
    assert len(violations(tmp_path / "training/serving/bad.py")) == 1
    assert violations(tmp_path / "training/core/fine.py") == []
