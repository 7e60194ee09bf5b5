"""SparseLoRA: sliced FFNs compute exactly the dense FFN on the kept channels, gradients match
LoRA's when nothing is skipped, telemetry is reported, and the adapter is a plain LoRA adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_sentiment_config

from lora_methods import HParamError, get_method, sparselora
from lora_methods.sparselora import layer_schedule
from lora_methods.sparselora.controller import IGNORE_INDEX, output_positions, routing
from lora_methods.sparselora.estimator import SparseAttention, SparseLayer, svd_factors
from lora_methods.sparselora.layouts import ATTENTION_LAYOUTS, FFN_LAYOUTS, resolve
from lora_methods.sparselora.slicing import output_columns
from training.core import compute, inference
from training.core.config import TrainConfig
from training.core.models import load_model, load_tokenizer
from training.core.runs import RunStore
from training.engine import train

ARCH_TASK = {"bert": "sentiment", "distilbert": "sentiment", "gpt2": "generation", "llama": "generation"}


TEXTS = ("a fine, moving film indeed", "dull")  # a padded batch: the second row is mostly padding


def _pair(
    path: str,
    task: str,
    layer_sparsity: str,
    padding_side: str = "right",
    method: str = "sparselora",
    texts: tuple[str, str] = TEXTS,
    **extra,
):
    """A LoRA model and a SparseLoRA model with identical (non-zero) adapter weights (QLoRA and
    SparseLoRA-4bit for `method="sparselora-4bit"`), and a batch of `texts`."""
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = padding_side
    sparse_method = get_method(method)
    base = load_model(path, task, tokenizer, quantize_4bit=sparse_method.quantize_base)
    settings = {"dropout": 0.0, "target_modules": "all-linear"}  # LoRA inside the FFN too
    lora = get_method("qlora" if sparse_method.quantize_base else "lora")
    dense = lora.apply(copy.deepcopy(base), task, lora.resolve_hparams(settings))
    torch.manual_seed(1)
    for param in dense.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.02)
    hparams = sparse_method.resolve_hparams({**settings, "layer_sparsity": layer_sparsity, **extra})
    sparse = sparse_method.apply(copy.deepcopy(base), task, hparams)
    trained = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        if param.requires_grad:
            param.data.copy_(trained[name])
    for module in [*dense.modules(), *sparse.modules()]:  # skipped tokens would shift the dropout draws
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs = dict(tokenizer(list(texts), return_tensors="pt", padding=True))
    if task == "sentiment":
        labels = torch.tensor([1, 0])
    else:  # as the collator labels a batch: padding is never a target
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    return dense.train(), sparse.train(), {**inputs, "labels": labels}


def _run(model, inputs):
    """The logits the loss reads (a classifier's, or a causal LM's where the next token is a
    target) and every trainable parameter's gradient."""
    torch.manual_seed(5)  # the same dropout draws for both models
    output = model(**inputs)
    output.loss.backward()
    logits = output.logits
    if logits.dim() == 3:
        logits = logits[output_positions(inputs["labels"], inputs["input_ids"], "last", None)]
    return logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", list(ARCH_TASK))
def test_nothing_skipped_means_exactly_lora(tiny_models, arch):
    dense, sparse, inputs = _pair(tiny_models[arch], ARCH_TASK[arch], "1e-9,1e-9", output_tokens="sparse")
    dense_logits, dense_grads = _run(dense, inputs)
    sparse_logits, sparse_grads = _run(sparse, inputs)
    assert sparselora.controller(sparse).recall == 1.0  # the sliced path ran (it measures recall), keeping all
    assert torch.allclose(dense_logits, sparse_logits, atol=1e-6)
    for name, grad in dense_grads.items():
        assert torch.allclose(grad, sparse_grads[name], atol=1e-7), name


@pytest.mark.parametrize("arch", list(ARCH_TASK))
def test_sliced_ffn_equals_the_dense_ffn_on_the_kept_channels(tiny_models, arch, monkeypatch):
    dense, sparse, inputs = _pair(tiny_models[arch], ARCH_TASK[arch], "0.5,0.5", output_tokens="sparse")
    layout = FFN_LAYOUTS[dense.get_base_model().config.model_type]
    width = sparselora.controller(sparse).layers[0].width
    keep = torch.arange(0, width, 2)  # every other channel
    monkeypatch.setattr(SparseLayer, "choose", lambda self, context, sample_tokens, rows: keep)
    mask = torch.zeros(width)
    mask[keep] = 1.0
    for block in resolve(dense.get_base_model(), layout.layers):  # reference: dense, then masked
        resolve(block, layout.output).register_forward_pre_hook(lambda module, args: (args[0] * mask,))
    dense_logits, dense_grads = _run(dense, inputs)
    sparse_logits, sparse_grads = _run(sparse, inputs)
    assert torch.allclose(dense_logits, sparse_logits, atol=1e-5)
    for name, grad in dense_grads.items():
        assert torch.allclose(grad, sparse_grads[name], atol=1e-6), name
    assert sparselora.controller(sparse).flops_ratio < 1.0


@pytest.mark.parametrize("arch", list(ARCH_TASK))
def test_the_last_layer_skipping_its_context_tokens_changes_nothing_the_loss_reads(tiny_models, arch):
    lora_model, outputs_only, inputs = _pair(tiny_models[arch], ARCH_TASK[arch], "0,0")  # no sparse layer
    if ARCH_TASK[arch] == "generation":
        inputs["labels"][:, :3] = IGNORE_INDEX  # a prompt
    lora_logits, lora_grads = _run(lora_model, inputs)
    logits, grads = _run(outputs_only, inputs)
    controller = sparselora.controller(outputs_only)
    assert controller.outputs_only_layer == 1 and controller.flops_ratio < 1.0  # the FFN ran for outputs only
    if ARCH_TASK[arch] == "generation":  # the prompt's predictions are not read
        assert lora_logits.shape[0] < inputs["attention_mask"].sum()
    assert torch.allclose(lora_logits, logits, atol=1e-5)
    for name, grad in lora_grads.items():
        assert torch.allclose(grad, grads[name], atol=1e-6), name


# Multiply-adds per token of one layer of the tiny models (conftest): FFN, attention projections.
# llama: gate, up, down 64x128; q, o 64x64 and k, v 64x32 (2 of 4 heads). gpt2: c_fc, c_proj 32x128;
# c_attn 32x96, c_proj 32x32.
PER_LAYER_MACS = {"llama": (3 * 64 * 128, 2 * 64 * 64 + 2 * 64 * 32), "gpt2": (2 * 32 * 128, 32 * 96 + 32 * 32)}


# Multiply-adds per token of the tiny encoders' layers (conftest): bert q, k, v, o 64x64 and FFN
# 64x128 twice; distilbert the same at 32 and 64; and of the head after them, a pooler (bert) or
# pre-classifier (distilbert) and the classifier, which run at each row's first token only.
ENCODER_MACS = {
    "bert": (4 * 64 * 64 + 2 * 64 * 128, 64 * 64 + 2 * 64),
    "distilbert": (4 * 32 * 32 + 2 * 32 * 64, 32 * 32 + 2 * 32),
}


@pytest.mark.parametrize("arch", list(ARCH_TASK))
def test_lora_flops_count_frozen_projections_and_the_head_where_it_runs(tiny_models, arch):
    """The dense count behind `flops_ratio_vs_lora`: every frozen projection of the layers at every
    token (not the adapters' A and B), and the head after them where it runs: an encoder's pooler
    and classifier at each row's first token, a decoder classifier's score at every position (as
    transformers runs it; counted once though PEFT keeps a trained copy), an LM head where logits
    are asked for: every position, or the labelled positions alone when training asks for those."""
    cases = []
    _, classifier, inputs = _pair(tiny_models[arch], "sentiment", "0,0")
    rows, positions = inputs["input_ids"].shape
    if arch in ENCODER_MACS:
        layer, head = ENCODER_MACS[arch]
        cases.append((classifier, inputs, rows * positions * 2 * layer + rows * head))
    else:
        layers = 2 * sum(PER_LAYER_MACS[arch])
        config = classifier.get_base_model().config
        cases.append((classifier, inputs, rows * positions * (layers + config.num_labels * config.hidden_size)))
        _, causal_lm, inputs = _pair(tiny_models[arch], "generation", "0,0")
        inputs["labels"][:, :3] = IGNORE_INDEX  # a prompt: its predictions are not read
        config = causal_lm.get_base_model().config
        head = config.vocab_size * config.hidden_size
        rows, positions = inputs["input_ids"].shape
        cases.append((causal_lm, inputs, rows * positions * (layers + head)))
        read = compute.logits_where_read(inputs)
        labelled = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        assert int(read["logits_to_keep"].sum()) == labelled < rows * (positions - 3)
        cases.append((causal_lm, read, rows * positions * layers + labelled * head))
    for model, batch, macs in cases:
        controller = sparselora.controller(model)
        before = controller.dense_flops
        model(**batch)
        assert controller.dense_flops - before == 2 * macs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("layer_sparsity", ["0,0", "1e-9,0"])  # no sparse layer; layer 0 keeping every channel
def test_a_decoder_classifier_with_its_exact_skips_is_exactly_lora(tiny_models, arch, padding_side, layer_sparsity):
    """The read token runs dense in every layer, padding skips every FFN, and the last layer runs
    its FFN for the read token alone: the logits and every gradient are plain LoRA's."""
    lora_model, sparse, inputs = _pair(tiny_models[arch], "sentiment", layer_sparsity, padding_side)
    assert (inputs["attention_mask"] == 0).any()  # the batch is padded
    lora_logits, lora_grads = _run(lora_model, inputs)
    logits, grads = _run(sparse, inputs)
    routed = sparselora.controller(sparse).routing
    assert routed.dense == 2 and routed.skipped == int((inputs["attention_mask"] == 0).sum())
    controller = sparselora.controller(sparse)
    if layer_sparsity == "0,0":  # nothing contextual: every FLOP saved is an exact skip
        assert controller.flops_ratio == pytest.approx(1.0 - controller.exact_skip_share)
        # Padding skips every layer's FFN and attention projections; the last FFN, the context too.
        ffn, attention = PER_LAYER_MACS[arch]
        skipped_macs = routed.skipped * 2 * (ffn + attention) + routed.sparse * ffn
        assert controller.exactly_skipped_flops == 2 * skipped_macs
    assert controller.flops_ratio < 1.0
    assert torch.allclose(lora_logits, logits, atol=1e-5)
    for name, grad in lora_grads.items():
        assert torch.allclose(grad, grads[name], atol=1e-6), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("pad_tokens", ["auto", "skip"])
@pytest.mark.parametrize("layer_sparsity", ["0,0", "1e-9,0"])  # layer 0 dense, or sparse keeping every channel
def test_a_little_padding_is_skipped_only_where_it_is_gathered_anyway(tiny_models, arch, pad_tokens, layer_sparsity):
    """On a batch with less than `PAD_SKIP_SHARE` padding, `auto` computes it in FFNs that run dense
    and in the attention projections (no gather) and still leaves it out of a sliced FFN; `skip`
    skips it everywhere. Both are exactly LoRA's."""
    texts = ("a fine, moving film indeed", "a fine, moving film")
    lora_model, sparse, inputs = _pair(
        tiny_models[arch], "sentiment", layer_sparsity, "left", texts=texts, pad_tokens=pad_tokens
    )
    padding = float((inputs["attention_mask"] == 0).float().mean())
    assert 0 < padding < sparselora.PAD_SKIP_SHARE
    lora_logits, lora_grads = _run(lora_model, inputs)
    logits, grads = _run(sparse, inputs)
    controller, routed = sparselora.controller(sparse), sparselora.controller(sparse).routing
    ffn, attention = PER_LAYER_MACS[arch]
    skips_everywhere = pad_tokens == "skip"
    first_ffn = routed.skipped * ffn if skips_everywhere or layer_sparsity != "0,0" else 0
    attentions = 2 * routed.skipped * attention if skips_everywhere else 0
    last_ffn = (routed.skipped + routed.sparse) * ffn  # its context is skipped too, whatever the padding
    assert controller.exactly_skipped_flops == 2 * (first_ffn + attentions + last_ffn)
    assert torch.allclose(lora_logits, logits, atol=1e-5)
    for name, grad in lora_grads.items():
        assert torch.allclose(grad, grads[name], atol=1e-6), name


def test_sliced_value_and_output_projections_count_the_padding_they_leave_out(tiny_models):
    """Slicing the attention's value channels (here keeping all of them) leaves padding out of the
    value and output projections just as the unsliced, padding-skipping projections do."""
    skipped = []
    for attention_sparsity in (0.0, 1e-9):
        _, sparse, inputs = _pair(
            tiny_models["llama"], "sentiment", "1e-9,0", "left", attention_sparsity=attention_sparsity
        )
        sparse(**inputs).loss.backward()
        assert len(sparselora.controller(sparse).attention) == (1 if attention_sparsity else 0)
        skipped.append(sparselora.controller(sparse).exactly_skipped_flops)
    assert skipped[0] == skipped[1] > 0


def test_padding_never_enters_the_estimators_sample(tiny_models, monkeypatch):
    seen = []
    choose = SparseLayer.choose
    monkeypatch.setattr(
        SparseLayer,
        "choose",
        lambda self, context, *rest: seen.append(context.shape[0]) or choose(self, context, *rest),
    )
    for pad_tokens in ("auto", "skip", "compute"):
        _, sparse, inputs = _pair(tiny_models["llama"], "sentiment", "0.5,0", "left", pad_tokens=pad_tokens)
        sparse(**inputs).loss.backward()
        routed = sparselora.controller(sparse).routing
        real, padding = int(inputs["attention_mask"].sum()), int((inputs["attention_mask"] == 0).sum())
        assert seen[-1] == routed.sampled == real - 2  # every real token but the two that are read
        assert routed.sparse == real - 2 + (padding if pad_tokens == "compute" else 0)
        assert all(inputs["attention_mask"].reshape(-1)[routed.order[: routed.sampled]] == 1)


def test_on_a_4bit_base_keeping_every_channel_is_exactly_qlora(tiny_models):
    """Both token paths read the one weight dequantized per forward: the same logits and gradients
    as QLoRA's, whose layers dequantize on their own."""
    qlora_model, sparse, inputs = _pair(tiny_models["llama"], "generation", "1e-9,0", method="sparselora-4bit")
    inputs["labels"][:, :3] = IGNORE_INDEX  # a prompt: outputs and context both present
    qlora_logits, qlora_grads = _run(qlora_model, inputs)
    logits, grads = _run(sparse, inputs)
    assert sparselora.controller(sparse).weights  # the dequantized weights of this forward
    assert torch.allclose(qlora_logits, logits, atol=1e-4)
    for name, grad in qlora_grads.items():
        assert torch.allclose(grad, grads[name], atol=1e-5), name
    (schedule,) = sparselora.callbacks(sparse, {"dense_warmup": 0.05})
    schedule.on_step_end(None, None, None)
    assert not sparselora.controller(sparse).weights  # not held between steps


def test_the_reference_estimator_scores_each_sequences_mean_token():
    torch.manual_seed(0)
    width, channels = 8, 16
    gate, up, down = (
        torch.nn.Linear(width, channels),
        torch.nn.Linear(width, channels),
        torch.nn.Linear(channels, width),
    )
    estimator = [(m.weight.t().detach(), None, m.bias.detach()) for m in (gate, up)]  # exact (full rank)
    layer = SparseLayer(0, 0.75, [gate, up], down, torch.nn.functional.silu, estimator, "sequence-mean")
    context, rows = torch.randn(7, width), torch.tensor([0, 0, 0, 2, 2, 2, 2])  # row 1: no context
    means = torch.stack([context[:3].mean(0), context[3:].mean(0)])
    with torch.no_grad():
        expected = (torch.nn.functional.silu(gate(means)) * up(means)).norm(dim=0).topk(4).indices.sort().values
    assert torch.equal(layer.choose(context, 128, rows), expected)


def test_a_value_channel_feeds_every_query_head_of_its_group():
    # 4 query heads share 2 kv heads of 4 dimensions: heads 0-1 read kv head 0, heads 2-3 kv head 1.
    columns = output_columns(torch.tensor([1, 6]), head_dim=4, heads=4, kv_heads=2)
    assert columns.tolist() == [1, 5, 10, 14]  # (kv 0, d 1) -> heads 0, 1; (kv 1, d 2) -> heads 2, 3
    plain = output_columns(torch.tensor([0, 5, 7]), head_dim=4, heads=2, kv_heads=2)
    assert plain.tolist() == [0, 5, 7]  # without grouping a value channel is its own column


@pytest.mark.parametrize("arch", ["llama", "bert", "distilbert"])  # llama: grouped-query (4 heads, 2 kv)
def test_sliced_attention_equals_dense_attention_on_the_kept_value_channels(tiny_models, arch, monkeypatch):
    dense, sparse, inputs = _pair(
        tiny_models[arch], ARCH_TASK[arch], "1e-9,1e-9", output_tokens="sparse", attention_sparsity=0.5
    )
    attention = sparselora.controller(sparse).attention[0]
    assert len(sparselora.controller(sparse).attention) == 2 and attention.kept == attention.width // 2
    keep = torch.arange(1, attention.width, 2)  # every other value channel, across heads
    monkeypatch.setattr(SparseAttention, "choose", lambda self, context, sample_tokens, rows: keep)
    mask = torch.zeros(attention.width)
    mask[keep] = 1.0
    value_path = ATTENTION_LAYOUTS[dense.get_base_model().config.model_type][0]
    layers = resolve(dense.get_base_model(), FFN_LAYOUTS[arch].layers)
    for block in layers:  # reference: dense attention over values whose skipped channels are zero
        resolve(block, value_path).register_forward_hook(lambda module, args, out: out * mask)
    dense_logits, dense_grads = _run(dense, inputs)
    sparse_logits, sparse_grads = _run(sparse, inputs)
    assert torch.allclose(dense_logits, sparse_logits, atol=1e-5)
    for name, grad in dense_grads.items():
        assert torch.allclose(grad, sparse_grads[name], atol=1e-6), name


def test_attention_sparsity_is_refused_where_q_k_and_v_are_fused(tiny_models):
    with pytest.raises(HParamError, match="attention_sparsity must be 0 for 'gpt2'"):
        _pair(tiny_models["gpt2"], "generation", "0.5,0.5", attention_sparsity=0.5)


def test_evaluation_is_dense(tiny_models):
    dense, sparse, inputs = _pair(tiny_models["llama"], "generation", "0.9,0.9")
    dense.eval(), sparse.eval()
    with torch.no_grad():
        assert torch.allclose(dense(**inputs).logits, sparse(**inputs).logits, atol=1e-6)


def test_each_rows_prompt_runs_sparse_its_outputs_dense_and_its_padding_nowhere():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, -100, -100, -100, 7, 8]])
    ids = torch.ones_like(labels)
    outputs = output_positions(labels, ids, "last", 0)
    # position t predicts token t + 1: row 0's outputs come from positions 2-3, row 1's from 3-4
    assert outputs.tolist() == [[False, False, True, True, False, False], [False, False, False, True, True, False]]
    padding = torch.tensor([[False] * 5 + [True], [True] + [False] * 5])  # row 0 ends, row 1 starts, with a pad
    routed = routing(outputs, padding, True, labels.shape)
    assert (routed.sampled, routed.sparse, routed.dense, routed.skipped) == (6, 6, 4, 2)
    assert routed.order[: routed.sampled].tolist() == [0, 1, 4, 7, 8, 11]  # context: no pad, no output
    assert routed.order[routed.sparse + routed.dense :].tolist() == [5, 6]  # the pads, last
    assert routed.rows.tolist() == [0, 0, 0, 1, 1, 1]
    computed = routing(outputs, padding, False, labels.shape)  # pads run sparse, but are never sampled
    assert (computed.sampled, computed.sparse, computed.skipped) == (6, 8, 0)
    assert computed.order[6:8].tolist() == [5, 6]


def test_a_classifier_reads_its_first_token_or_a_decoders_last_real_one():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])  # right-, left-, un-padded; pad 0
    labels = torch.tensor([1, 0, 1])
    assert output_positions(labels, ids, "first", 0).nonzero().tolist() == [[0, 0], [1, 0], [2, 0]]
    assert output_positions(labels, ids, "last", 0).nonzero().tolist() == [[0, 2], [1, 4], [2, 4]]
    assert output_positions(None, ids, "last", 0) is None


def test_layer_schedule_and_its_errors():
    hparams = {"layer_sparsity": "auto", "dense_first_layers": 1, "ffn_sparsity": 0.9}
    assert layer_schedule(6, hparams) == [0.0, 0.9, 0.9, 0.9, 0.9, 0.0]
    assert layer_schedule(3, {**hparams, "layer_sparsity": "0,0.5,0"}) == [0.0, 0.5, 0.0]
    deep_half = layer_schedule(30, {**hparams, "layer_sparsity": "deep-half"})  # the paper's: 0-14 dense
    assert deep_half == [0.0] * 15 + [0.9] * 14 + [0.0]
    default = get_method("sparselora").resolve_hparams()  # the paper's schedule, chosen by measurement
    assert (default["layer_sparsity"], default["ffn_sparsity"], default["dropout"]) == ("deep-half", 0.9, 0.0)
    assert get_method("sparselora-paper") is get_method("sparselora")  # runs recorded under the old name load
    with pytest.raises(HParamError, match="needs 3 numbers"):
        layer_schedule(3, {**hparams, "layer_sparsity": "0.5,0.5"})
    with pytest.raises(HParamError, match="nothing would be sparse"):
        layer_schedule(2, hparams)
    with pytest.raises(HParamError, match="'deep-half' leaves no sparse layer in this 2-layer model.*'0.9,0'"):
        layer_schedule(2, {**hparams, "layer_sparsity": "deep-half"})
    with pytest.raises(HParamError, match="dense_first_layers applies with layer_sparsity 'auto' only"):
        layer_schedule(
            6, {**hparams, "layer_sparsity": "deep-half", "dense_first_layers": 0}
        )  # silently ignored before
    with pytest.raises(HParamError, match="ffn_sparsity must satisfy"):
        get_method("sparselora").resolve_hparams({"ffn_sparsity": 1.0})
    with pytest.raises(HParamError, match="output_tokens must be one of dense, sparse"):
        get_method("sparselora").resolve_hparams({"output_tokens": "some"})


def test_estimator_factors_are_cached(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_ARENA_CACHE", str(tmp_path))
    _pair(tiny_models["gpt2"], "generation", "0.5,0.5")
    (cached,) = (tmp_path / "svd").iterdir()
    calls, locations = [], []
    monkeypatch.setattr("lora_methods.sparselora.estimator.svd_factors", lambda *a: calls.append(a))
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: locations.append(k.get("map_location")) or load(*a, **k))
    _pair(tiny_models["gpt2"], "generation", "0.5,0.5")
    assert calls == [] and list((tmp_path / "svd").iterdir()) == [cached]
    assert locations == ["cpu"]  # a cache written on a GPU machine loads on a CPU-only one


@pytest.mark.parametrize("method", ["sparselora", "sparselora-4bit"])
def test_a_sparselora_run_reports_flops_and_recall_and_saves_a_lora_adapter(tmp_path, tiny_models, method):
    store = RunStore(tmp_path)
    config = TrainConfig(
        task="generation",
        method=method,
        model=tiny_models["llama"],
        dataset="bundled/review-writing",
        max_steps=6,
        batch_size=4,
        seq_len=48,
        eval_samples=8,
        control_samples=0,
        offline=True,
        hparams={"layer_sparsity": "0.5,0.5", "dense_warmup": 0.2},
    )
    summary = train(config, store)
    telemetry = summary["sparsity"]
    assert telemetry["dense_warmup_steps"] == 2 and telemetry["sparse_layers"] == [0]
    assert telemetry["outputs_only_layer"] == 1  # the last layer: its FFN for the output tokens only
    assert 0.5 < telemetry["flops_ratio_vs_lora"] < 1.0
    assert telemetry["estimator_recall"] > 0.5, telemetry  # better than keeping half the channels at random
    (run,) = store.runs()
    logged = [r for r in run.metrics() if r["kind"] == "train"]
    # the dense warm-up step saves only the exact skips (padding, the last layer's context)
    assert logged[-1]["flops_ratio_vs_lora"] < logged[0]["flops_ratio_vs_lora"] < 1.0
    assert json.loads((run.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    (generated,) = inference.generate(inference.load_run(run), ["To be"], max_new_tokens=3)
    assert generated["text"].strip(), generated


def test_svd_estimator_is_the_best_rank_r_map_and_exact_at_full_rank():
    torch.manual_seed(0)
    weight = torch.randn(48, 16)  # (out, in), as a Linear stores it
    a, b = svd_factors(weight, 4)
    tail = torch.linalg.svdvals(weight)[4:]
    assert torch.linalg.norm(a @ b - weight.t()) == pytest.approx(float(tail.norm()), rel=1e-4)  # Eckart-Young
    exact, none = svd_factors(weight, 16)  # rank = input width: nothing to gain by factoring
    assert none is None and torch.equal(exact, weight.t())


def test_an_exact_estimator_scoring_every_token_picks_the_oracle_channels(tiny_models):
    _, sparse, inputs = _pair(tiny_models["llama"], "generation", "0.5,0.5", output_tokens="sparse")
    sparse(**inputs).loss.backward()  # rank 384 >= width 64 and 128 sampled >= tokens: exact scores
    assert sparselora.controller(sparse).recall == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_the_probe_measures_what_each_ffn_loses_to_channel_sparsity(tiny_models, review_csv, arch, capsys):
    from training.cli import main

    task = ARCH_TASK[arch]
    arguments = ["probe", "--task", task, "--model", tiny_models[arch], "--dataset", str(review_csv)]
    shape = ["--batches", "2", "--batch-size", "4", "--seq-len", "16"]
    assert main([*arguments, "--sparsities", "0,0.5,0.9", *shape, "--offline"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["layer"], r["sparsity"]) for r in records] == [(i, s) for i in (0, 1) for s in (0.0, 0.5, 0.9)]
    for layer in (0, 1):
        errors = [r["oracle_error"] for r in records if r["layer"] == layer]
        assert errors[0] == pytest.approx(0.0, abs=1e-6) and 0 < errors[1] < errors[2] <= 1.0
    # An exact-rank estimator scoring every token of these short batches (under 128) is the oracle.
    assert all(r["estimator_recall"] == 1.0 for r in records)
    assert all(r["estimator_error"] == pytest.approx(r["oracle_error"], abs=1e-6) for r in records)
    # A set of its own per token keeps what matters to each token: on these batches it loses less
    # than the batch's shared set (not a theorem: the largest activation is not always the one
    # whose output matters most); at sparsity 0 nothing is lost at any granularity.
    for r in records:
        if r["sparsity"] == 0:
            assert r["sequence_oracle_error"] == pytest.approx(0.0, abs=1e-6)
            assert r["token_oracle_error"] == pytest.approx(0.0, abs=1e-6)
        else:
            assert r["token_oracle_error"] < r["oracle_error"]
    # With one sequence per batch, a set per sequence is the batch's set.
    assert main([*arguments, "--sparsities", "0.5", "--batches", "2", "--batch-size", "1", "--offline"]) == 0
    single = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["sequence_oracle_error"] == pytest.approx(r["oracle_error"], abs=1e-6) for r in single)

    assert main([*arguments, "--sparsities", "0.5,1.5", "--offline"]) == 2
    assert "sparsities must be numbers in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("arch", list(ARCH_TASK))
def test_a_trained_sparselora_model_is_freed_without_the_cyclic_garbage_collector(tiny_models, arch):
    import gc
    import weakref

    _, sparse, inputs = _pair(
        tiny_models[arch], ARCH_TASK[arch], "0.5,0.5", attention_sparsity=0.0 if arch == "gpt2" else 0.5
    )
    _run(sparse, inputs)
    layout = FFN_LAYOUTS[arch]
    patched = weakref.ref(resolve(resolve(sparse.get_base_model(), layout.layers)[0], layout.output))
    controller = weakref.ref(sparselora.controller(sparse))
    gc.collect()
    gc.disable()  # reference counting alone must free it, as it frees a LoRA model
    try:
        del sparse
        assert patched() is None and controller() is None
    finally:
        gc.enable()


def test_a_decoder_sentiment_run_under_sparselora_is_served_and_reloads_to_its_scores(
    tmp_path, tiny_models, review_csv
):
    """A Llama classifier trained with SparseLoRA (the paper's schedule): the Playground answers with
    what the run's own adapter, loaded alone, answers, and its test accuracy reproduces."""
    from training.core import data, evaluation
    from training.serving.playground import classify_side_by_side
    from training.serving.pool import AdapterPool

    store = RunStore(tmp_path)
    config = tiny_sentiment_config(
        tiny_models,
        review_csv,
        method="sparselora",
        model=tiny_models["llama"],
        max_steps=6,
        eval_samples=None,  # the whole test split, as re-evaluated below
        hparams={"layer_sparsity": "0.9,0", "dense_warmup": 0.2, "learning_rate": 5e-3},  # 2 layers: no deep half
    )
    summary = train(config, store)
    assert summary["status"] == "completed" and summary["sparsity"]["flops_ratio_vs_lora"] < 1.0
    (run,) = store.runs()
    review = "A gripping, beautifully acted film."
    (served,) = classify_side_by_side(AdapterPool(), store, [run.id], review, include_base=False)
    alone = inference.load_run(run)
    expected = inference.class_probabilities(alone.model, alone.tokenizer, [review], alone.precision)[0]
    assert torch.allclose(torch.tensor(list(served["probabilities"].values())), expected, atol=1e-5)
    splits = data.load_splits(str(review_csv), "sentiment", offline=True)
    test = data.tokenize(splits.test, alone.tokenizer, "sentiment", 48)
    again = evaluation.evaluate(
        alone.model, test, data.collator(alone.tokenizer, "sentiment"), "sentiment", alone.precision
    )
    assert again["accuracy"] == summary["metrics"]["test"]["accuracy"]

    # Recorded under the retired preset name `sparselora-paper` (same settings): it still serves, its
    # config resolves to SparseLoRA's, and its model card's command runs.
    from training.serving import export

    recorded = json.loads((run.dir / "config.json").read_text())
    (run.dir / "config.json").write_text(json.dumps({**recorded, "method": "sparselora-paper"}))
    (old,) = store.runs()
    assert old.config["method"] == "sparselora-paper"
    (again_served,) = classify_side_by_side(AdapterPool(), store, [old.id], review, include_base=False)
    assert again_served["probabilities"] == served["probabilities"]
    assert TrainConfig.from_record(old.config).resolved().method == "sparselora"
    assert "--method sparselora " in export.model_card(old)
