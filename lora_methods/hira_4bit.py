"""HiRA on a 4-bit NF4 base: does the high-rank update keep its benefit when W0 is quantized?"""

from dataclasses import replace

from . import hira

METHOD = replace(
    hira.METHOD,
    name="hira-4bit",
    title="HiRA on 4-bit",
    summary="HiRA's Hadamard update on a base model stored in 4-bit NF4: HiRA's expressiveness, QLoRA's memory.",
    quantize_base=True,
    paged_optimizer=True,
)
