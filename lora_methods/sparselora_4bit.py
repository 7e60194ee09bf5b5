"""SparseLoRA on a 4-bit NF4 base: do sparsity's speed and QLoRA's memory saving combine?"""

from dataclasses import replace

from . import sparselora

METHOD = replace(
    sparselora.METHOD,
    name="sparselora-4bit",
    title="SparseLoRA on 4-bit",
    summary="SparseLoRA's sliced FFNs on a base model stored in 4-bit NF4: fewer FLOPs and a third of the memory.",
    quantize_base=True,
    paged_optimizer=True,
)
