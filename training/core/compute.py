"""How a run computes: in which precision, with which attention kernel, and which logits.

Precision. `bf16` is mixed precision as fine-tuning tools run it: the frozen base weights are
stored in bfloat16 (so no step casts them again), the weights that train and their optimizer state
stay float32 (master weights), and the matrix products run under autocast. `fp16` is the same on
GPUs without bf16, with the Trainer's loss scaling. `auto` picks bf16 where the hardware computes it
fast (environment.fast_bf16: a CUDA GPU that has it, a CPU with AMX-BF16 or AVX512-BF16) and fp32
elsewhere. Training, evaluation and the Playground compute in the run's precision.

Attention. PyTorch's fused CPU attention kernel (`scaled_dot_product_attention`, transformers'
`sdpa`) is slower in bf16 than transformers' `eager` attention (its two products and softmax as
plain operations) on short sequences, and faster on long ones, where it also saves memory: eager
keeps each layer's token-by-token probabilities for the backward pass. `auto` takes eager for bf16
on a CPU with fast bf16 up to EAGER_ATTENTION_MAX_TOKENS tokens, and the model's own default
elsewhere (the fused kernel where its architecture has one). Both compute the same function; only
rounding differs.

Logits. A causal LM's loss reads the logits only at positions whose next token is labelled (the
review, not its prompt; the continuation, not the passage), yet the model computes a
vocabulary-wide row of them at every position. Asking for the read columns only is exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from lora_methods.base import IGNORE_INDEX
from training.core import environment

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTIONS = ("auto", "sdpa", "eager")
Attention = Literal["sdpa", "eager"]
# Where eager attention stops paying, measured one attention call's forward and backward at
# SmolLM2's shape in bf16 on 2 cores of an AMD EPYC with AVX512-BF16: 48 tokens 3.3 ms eager
# against 10.8 ms fused, 128 tokens 8.6 against 16.0, 192 tokens 11.1 against 17.4, 256 tokens 31.3
# against 26.0, 1024 tokens 189 against 73 (in fp32 the fused kernel is as fast or faster). Whole
# steps at 128 tokens gain on MiniLM too (README, Precision); CPUs with AMX-BF16 are not measured.
EAGER_ATTENTION_MAX_TOKENS = 192
Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[Precision, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_refusal(requested: str) -> str | None:
    """Why this machine cannot train at `requested` precision, in words; None when it can."""
    if requested == "fp16" and not environment.has_cuda():
        return "fp16 needs a CUDA GPU (its loss scaling is CUDA's); choose bf16, fp32 or auto"
    if requested == "bf16" and environment.has_cuda() and environment.fast_bf16() is None:
        return "this GPU does not compute bf16; choose fp16, fp32 or auto"
    return None


def resolve_precision(requested: str) -> tuple[Precision, str]:
    """(precision, why): `auto` made concrete for this machine, with the reason in words."""
    if requested != "auto":
        return requested, "given"
    hardware = environment.fast_bf16()
    if hardware:
        return "bf16", f"auto: {hardware}"
    return "fp32", "auto: no fast bf16 on this machine (no CUDA bf16, no AMX-BF16 or AVX512-BF16 CPU)"


def resolve_attention(requested: str, precision: Precision, max_tokens: int | None) -> tuple[Attention | None, str]:
    """(implementation, why): the transformers attention implementation to load a model with,
    `auto` made concrete for this machine, `precision` and sequences of up to `max_tokens` tokens
    (None: any length), with the reason in words. None is the model's default: the fused kernel
    where its architecture has one, eager where it has not (asking for `sdpa` would refuse those)."""
    if requested != "auto":
        return requested, "given"
    if environment.has_cuda():
        return None, "auto: the model's default on a GPU"
    if precision != "bf16":
        return None, f"auto: the model's default at {precision}"
    if environment.fast_bf16() is None:
        return None, "auto: the model's default where bf16 is emulated"
    if max_tokens is None or max_tokens > EAGER_ATTENTION_MAX_TOKENS:
        return None, f"auto: the model's default for sequences over {EAGER_ATTENTION_MAX_TOKENS} tokens"
    return "eager", f"auto: faster than the fused kernel in bf16 on this CPU up to {EAGER_ATTENTION_MAX_TOKENS} tokens"


def store_frozen_weights(model: torch.nn.Module, precision: Precision) -> None:
    """Store every frozen float32 weight in the compute dtype; weights that train stay float32.

    Autocast would otherwise cast each frozen weight to bf16 again in every forward pass. 4-bit
    weights (integers) are left as they are."""
    dtype = DTYPES[precision]
    if dtype is torch.float32:
        return
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype == torch.float32:
            parameter.data = parameter.data.to(dtype)


def prepare_for_inference(model: torch.nn.Module, precision: Precision) -> None:
    """A base model for inference as training kept it: frozen, in eval mode, its weights stored in
    the compute dtype (adapters attached later stay float32, as they trained)."""
    model.requires_grad_(False)
    store_frozen_weights(model, precision)
    model.eval()


def autocast(precision: Precision, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The context `model` computes in at `precision` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


@contextlib.contextmanager
def inference(precision: Precision, model: torch.nn.Module) -> Iterator[None]:
    """Inference mode (no autograd bookkeeping) in the run's precision."""
    with torch.inference_mode(), autocast(precision, model):
        yield


def read_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets) for a causal LM batch: a (rows, length) mask of the positions whose
    next token is labelled (position t predicts token t + 1), and the labels they predict, one per
    True position in the mask's row-major order."""
    following = labels[:, 1:] != IGNORE_INDEX
    positions = torch.nn.functional.pad(following, (0, 1), value=False)
    return positions, labels[:, 1:][following]


def logits_where_read(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A causal LM training batch that asks the model for logits at the read positions only (a
    prompt's and padding's logits, a 49k-way softmax each, are never read): the model's own loss
    then gives the same value and gradients for a fraction of the LM head's work. The labels still
    go in (SparseLoRA routes the labelled tokens dense by them)."""
    positions, targets = read_positions(batch["labels"])
    return {**batch, "logits_to_keep": positions, "shift_labels": targets}
