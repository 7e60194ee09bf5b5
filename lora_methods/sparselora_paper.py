"""SparseLoRA with the paper's schedule (Khaki et al., 2025; the reference code's configurations):
the first half of the layers dense, the deep half at high FFN sparsity, output tokens dense, LoRA
dropout 0. Beside the default schedule it answers whether the paper's setting, rather than ours,
is the better trade on a decoder."""

from dataclasses import replace

from . import sparselora

PAPER_SETTINGS = {"layer_sparsity": "deep-half", "ffn_sparsity": 0.9, "dropout": 0.0}

METHOD = replace(
    sparselora.METHOD,
    name="sparselora-paper",
    title="SparseLoRA, paper schedule",
    summary="SparseLoRA as the paper schedules it: the deep half of the layers at FFN sparsity 0.9, "
    "the first half dense, no LoRA dropout.",
    hparams=tuple(replace(h, default=PAPER_SETTINGS.get(h.name, h.default)) for h in sparselora.METHOD.hparams),
)
