"""Where SparseLoRA is sparse: the channel sparsity of each layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..base import HParamError

DENSE_FIRST_LAYERS = 1  # dense_first_layers' default: the first layer, where the FFN loses most


def layer_schedule(layers: int, hparams: Mapping[str, Any]) -> list[float]:
    """Channel sparsity per layer: none in the first `dense_first_layers` (`deep-half`: the first
    half, the paper's schedule) and the last layer (whose FFN `last_layer` may instead run for
    output tokens only), `ffn_sparsity` in the rest; or the explicit comma-separated list."""
    if hparams["layer_sparsity"] != "auto" and hparams["dense_first_layers"] != DENSE_FIRST_LAYERS:
        raise HParamError(
            f"dense_first_layers applies with layer_sparsity 'auto' only (it is {hparams['layer_sparsity']!r}); "
            "give --layer-sparsity auto with it, or leave it out"
        )
    if hparams["layer_sparsity"] not in ("auto", "deep-half"):
        try:
            ratios = [float(part) for part in hparams["layer_sparsity"].split(",")]
        except ValueError:
            raise HParamError("layer_sparsity must be 'auto', 'deep-half' or comma-separated numbers") from None
        if len(ratios) != layers:
            raise HParamError(f"layer_sparsity needs {layers} numbers in [0, 1), one per layer (got {len(ratios)})")
        outside = [
            part.strip() for part, ratio in zip(hparams["layer_sparsity"].split(","), ratios) if not 0 <= ratio < 1
        ]
        if outside:
            raise HParamError(f"layer_sparsity takes numbers in [0, 1) (got {', '.join(outside)})")
        return ratios
    deep_half = hparams["layer_sparsity"] == "deep-half"
    first = layers // 2 if deep_half else hparams["dense_first_layers"]
    if deep_half and first >= layers - 1:
        raise HParamError(
            f"layer_sparsity 'deep-half' leaves no sparse layer in this {layers}-layer model (the first half "
            "is dense, the last layer is not channel-sparse): give one sparsity per layer instead, e.g. "
            f"'{','.join([format(hparams['ffn_sparsity'], 'g')] * (layers - 1) + ['0'])}'"
        )
    if first >= layers - 1:
        raise HParamError(
            f"dense_first_layers must be below {layers - 1} for this {layers}-layer model "
            "(the last layer is not channel-sparse either), or nothing would be sparse"
        )
    return [0.0] * first + [hparams["ffn_sparsity"]] * (layers - first - 1) + [0.0]
