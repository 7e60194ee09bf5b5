"""QLoRA (Dettmers et al., 2023): LoRA on a frozen base stored in 4-bit NormalFloat with double
quantization; paged 8-bit AdamW where CUDA is present."""

from dataclasses import replace

from . import lora

METHOD = replace(
    lora.METHOD,
    name="qlora",
    title="QLoRA",
    summary="LoRA on a base model stored in 4-bit NF4 (double-quantized): 0.41-0.64x the bf16 base's weight memory.",
    quantize_base=True,
    paged_optimizer=True,
)
