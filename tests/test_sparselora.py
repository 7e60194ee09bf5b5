"""SparseLoRA: sliced FFNs compute exactly the dense FFN on the kept channels, gradients match
LoRA's when nothing is skipped, telemetry is reported, and the adapter is a plain LoRA adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_methods import HParamError, get_method, sparselora
from lora_methods.sparselora import layer_schedule
from lora_methods.sparselora.controller import IGNORE_INDEX, dense_positions, routing
from lora_methods.sparselora.estimator import SparseAttention, SparseLayer, svd_factors
from lora_methods.sparselora.layouts import ATTENTION_LAYOUTS, FFN_LAYOUTS, resolve
from lora_methods.sparselora.slicing import output_columns
from training.core import inference
from training.core.config import TrainConfig
from training.core.models import load_model, load_tokenizer
from training.core.runs import RunStore
from training.engine import train

ARCH_TASK = {"bert": "sentiment", "distilbert": "sentiment", "gpt2": "generation", "llama": "generation"}


def _pair(path: str, task: str, layer_sparsity: str, **extra):
    """A LoRA model and a SparseLoRA model with identical (non-zero) adapter weights."""
    tokenizer = load_tokenizer(path)
    base = load_model(path, task, tokenizer)
    settings = {"dropout": 0.0, "target_modules": "all-linear"}  # LoRA inside the FFN too
    lora = get_method("lora")
    dense = lora.apply(copy.deepcopy(base), task, lora.resolve_hparams(settings))
    torch.manual_seed(1)
    for param in dense.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.02)
    sparse_method = get_method("sparselora")
    hparams = sparse_method.resolve_hparams({**settings, "layer_sparsity": layer_sparsity, **extra})
    sparse = sparse_method.apply(copy.deepcopy(base), task, hparams)
    sparse.load_state_dict(dense.state_dict())
    inputs = dict(tokenizer(["a fine, moving film indeed", "dull"], return_tensors="pt", padding=True))
    labels = torch.tensor([1, 0]) if task == "sentiment" else inputs["input_ids"].clone()
    return dense.train(), sparse.train(), {**inputs, "labels": labels}


def _run(model, inputs):
    torch.manual_seed(5)  # the same dropout draws for both models
    output = model(**inputs)
    output.loss.backward()
    return output.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


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
    monkeypatch.setattr(SparseLayer, "choose", lambda self, context, sample_tokens: keep)
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
    for module in [*lora_model.modules(), *outputs_only.modules()]:  # fewer tokens, other dropout draws
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    lora_logits, lora_grads = _run(lora_model, inputs)
    logits, grads = _run(outputs_only, inputs)
    controller = sparselora.controller(outputs_only)
    assert controller.outputs_only_layer == 1 and controller.flops_ratio < 1.0  # the FFN ran for outputs only
    if ARCH_TASK[arch] == "generation":  # the positions that predict a label; the prompt's are not read
        read = dense_positions(inputs["labels"], inputs["input_ids"].shape)
        lora_logits, logits = lora_logits[read], logits[read]
        assert read.sum() < read.numel()
    assert torch.allclose(lora_logits, logits, atol=1e-5)
    for name, grad in lora_grads.items():
        assert torch.allclose(grad, grads[name], atol=1e-6), name


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
    monkeypatch.setattr(SparseAttention, "choose", lambda self, context, sample_tokens: keep)
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


def test_each_rows_prompt_runs_sparse_and_its_output_positions_dense():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, -100, -100, -100, 7, 8]])
    dense = dense_positions(labels, labels.shape)
    # position t predicts token t + 1: row 0's outputs come from positions 2-3, row 1's from 3-4
    assert dense.tolist() == [[False, False, True, True, False, False], [False, False, False, True, True, False]]
    order, restore, sparse_count = routing(dense)
    assert sparse_count == 8 and order[:sparse_count].tolist() == [0, 1, 4, 5, 6, 7, 8, 11]
    assert torch.equal(order[restore], torch.arange(12))
    classifier = dense_positions(torch.tensor([1, 0]), torch.Size([2, 5]))
    assert classifier[:, 0].all() and not classifier[:, 1:].any()  # [CLS] dense, the rest sparse


def test_layer_schedule_and_its_errors():
    hparams = {"layer_sparsity": "auto", "dense_first_layers": 1, "ffn_sparsity": 0.9}
    assert layer_schedule(6, hparams) == [0.0, 0.9, 0.9, 0.9, 0.9, 0.0]
    assert layer_schedule(3, {**hparams, "layer_sparsity": "0,0.5,0"}) == [0.0, 0.5, 0.0]
    with pytest.raises(HParamError, match="needs 3 numbers"):
        layer_schedule(3, {**hparams, "layer_sparsity": "0.5,0.5"})
    with pytest.raises(HParamError, match="nothing would be sparse"):
        layer_schedule(2, hparams)
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
    assert logged[0]["flops_ratio_vs_lora"] == pytest.approx(1.0)  # dense warm-up step
    assert logged[-1]["flops_ratio_vs_lora"] < 1.0
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
