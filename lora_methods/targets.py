"""Which layers an adapter targets, per architecture, and which head layers train in full.

Defaults follow the LoRA paper (query and value projections). A user may name modules instead;
names are checked against the model so a typo is an error, not a silently untrained model.
"""

from __future__ import annotations

import torch

from .base import HParamError, Task

# model_type -> attention projections adapted by default (LoRA paper: q and v).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],  # GPT-2 fuses q, k and v into one Conv1D
    "llama": ["q_proj", "v_proj"],
}

# Classification layers that are new (randomly initialised) for a sentiment head and must train in
# full beside the adapter. PEFT adds `classifier`/`score` for SEQ_CLS itself; DistilBERT's
# pre_classifier is new as well.
EXTRA_HEAD_MODULES: dict[str, list[str]] = {"distilbert": ["pre_classifier"]}


def adaptable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Full names of the linear-like layers an adapter can wrap (Linear, GPT-2 Conv1D, 4-bit Linear)."""
    return {
        name: module
        for name, module in model.named_modules()
        if _weight_shape(module) is not None and not name.endswith(("classifier", "score", "lm_head"))
    }


def _weight_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    kind = type(module).__name__
    if kind in ("Linear", "Linear4bit", "Linear8bitLt"):
        return module.out_features, module.in_features
    if kind == "Conv1D":  # GPT-2: weight is (in, out)
        return module.weight.shape[1], module.weight.shape[0]
    return None


def resolve_targets(model: torch.nn.Module, spec: str) -> list[str] | str:
    """Turn the `target_modules` hyperparameter into what PEFT expects, or raise a clear error."""
    spec = spec.strip()
    model_type = model.config.model_type
    if spec == "all-linear":
        return "all-linear"
    if spec == "auto":
        if model_type not in DEFAULT_TARGETS:
            raise HParamError(
                f"no default target modules for architecture {model_type!r}; pass target_modules as "
                f"'all-linear' or module names such as {_example_names(model)}"
            )
        return DEFAULT_TARGETS[model_type]
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    if not wanted:
        raise HParamError(
            f"target_modules names no module (got {spec!r}); give 'auto', 'all-linear' or names such as "
            f"{_example_names(model)}"
        )
    short_names = {full.rsplit(".", 1)[-1] for full in adaptable_layers(model)}
    unknown = [name for name in wanted if name not in short_names]
    if unknown:
        raise HParamError(
            f"target_modules {', '.join(unknown)} not found in this {model_type} model; "
            f"available: {', '.join(sorted(short_names))}"
        )
    return wanted


def check_rank(model: torch.nn.Module, targets: list[str] | str, rank: int) -> None:
    """A rank above a layer's smaller dimension adds parameters but no expressiveness: refuse it."""
    for name, module in adaptable_layers(model).items():
        if targets != "all-linear" and name.rsplit(".", 1)[-1] not in targets:
            continue
        out_features, in_features = _weight_shape(module)
        if rank > min(out_features, in_features):
            raise HParamError(
                f"rank {rank} is larger than layer {name} ({out_features}x{in_features}); "
                f"choose a rank of at most {min(out_features, in_features)}"
            )


def head_modules(model: torch.nn.Module, task: Task) -> list[str] | None:
    if task != "sentiment":
        return None
    return EXTRA_HEAD_MODULES.get(model.config.model_type)


def _example_names(model: torch.nn.Module) -> str:
    names = sorted({full.rsplit(".", 1)[-1] for full in adaptable_layers(model)})
    return ", ".join(names[:6])
