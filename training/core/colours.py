"""One colour per method, the same in every figure: the report's, the Guide's, Compare's.

A suite variant (lora-r32, sparselora-s50, ...) is a shade of its method's colour, so a reader
sees the family at a glance and the variant beside it. Plain hex strings: no plotting import.
"""

from __future__ import annotations

METHOD_COLOURS = {
    "full": "#4d4d4d",
    "lora": "#1f77b4",
    "qlora": "#17becf",
    "dora": "#8c564b",
    "hira": "#ff7f0e",
    "hira-4bit": "#d62728",
    "sparselora": "#2ca02c",
    "sparselora-4bit": "#9467bd",
}
# The results suite's variants (training/research/suite.py): darker for a larger or deeper setting,
# lighter for a sparser or narrower one.
VARIANT_COLOURS = {
    "lora-r32": "#0b4f80",
    "hira-r32": "#b35600",
    "sparselora-s50": "#98df8a",
    "sparselora-s90": "#1a661a",
    "sparselora-deep": "#5cc35c",
    "sparselora-all-layers": "#0d3d0d",
    "sparselora-last-all": "#bcbd22",
    "sparselora-attn50": "#7f9f3f",
    "sparselora-pads-computed": "#8fbc8f",
    "sparselora-most-layers": "#a6d854",
    "sparselora-reference": "#005a3c",
    "sparselora-deep-s50": "#c7e9c0",
    "sparselora-deep-s99": "#006d2c",
    "sparselora-dense-first10": "#74c476",
    "lora-nodrop": "#6baed6",
}
OTHER = "#7f7f7f"  # a name that is no method (a typo'd label, a future method)


def family(name: str) -> str | None:
    """The method a variant label belongs to: the longest method name it is, or starts with then '-'."""
    matches = [method for method in METHOD_COLOURS if name == method or name.startswith(method + "-")]
    return max(matches, key=len, default=None)


def method_colour(name: str) -> str:
    """The colour of a method or suite variant, the same in every figure of the app and report."""
    if name in VARIANT_COLOURS:
        return VARIANT_COLOURS[name]
    method = family(name)
    return METHOD_COLOURS[method] if method else OTHER
