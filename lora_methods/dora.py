"""DoRA (Liu et al., ICML 2024): weight-decomposed LoRA. The adapted weight is
m * (W0 + (alpha / r) B A) / ||W0 + (alpha / r) B A||, column-wise: LoRA's low-rank update steers the
direction while a trained magnitude vector m (initialised to ||W0||) sets each column's length, so
it starts as the identity on the base like LoRA. PEFT implements it as LoRA with `use_dora=True`."""

from dataclasses import replace

from . import lora

METHOD = replace(
    lora.METHOD,
    name="dora",
    title="DoRA",
    summary="LoRA split into direction and magnitude: a low-rank update turns each weight column, a trained "
    "scale sets its length; merges away at inference.",
    apply=lora.apply_with(use_dora=True),
)
