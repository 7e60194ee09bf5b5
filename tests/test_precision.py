"""Precision and the LM head's work: `auto` follows the detected hardware, bf16 stores the frozen
weights in bf16 and trains float32 ones, and logits computed only where the loss reads them give
the loss and gradients of logits everywhere."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_sentiment_config
from safetensors.torch import load_file

from lora_methods import get_method
from training.core import compute, data, environment, inference, memory
from training.core.config import ConfigError, TrainConfig
from training.core.models import load_model, load_tokenizer
from training.core.runs import RunStore, resumable
from training.engine import resume, train


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(environment, "has_cuda", lambda: False)
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(environment, "has_cuda", lambda: False)
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))


def test_auto_picks_bf16_only_where_the_cpu_has_it(cpu_without_bf16, monkeypatch):
    precision, why = compute.resolve_precision("auto")
    assert precision == "fp32" and "no fast bf16" in why
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    assert compute.resolve_precision("auto") == ("bf16", "auto: the CPU has AMX-BF16 and AVX512-BF16")
    assert compute.resolve_precision("fp32") == ("fp32", "given")


def test_auto_attention_is_eager_only_for_short_bf16_sequences_on_a_cpu_that_computes_bf16(cpu_with_bf16, monkeypatch):
    short, long = compute.EAGER_ATTENTION_MAX_TOKENS, compute.EAGER_ATTENTION_MAX_TOKENS + 1
    assert compute.resolve_attention("auto", "bf16", short)[0] == "eager"
    # None: the model's default, the fused kernel where its architecture has one
    assert compute.resolve_attention("auto", "bf16", long) == (
        None,
        f"auto: the model's default for sequences over {short} tokens",
    )
    assert compute.resolve_attention("auto", "bf16", None)[0] is None  # any length: the kernel that scales
    assert compute.resolve_attention("auto", "fp32", short)[0] is None
    assert compute.resolve_attention("eager", "fp32", 4096) == ("eager", "given")
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx2"}))  # bf16 asked for, but emulated
    assert compute.resolve_attention("auto", "bf16", short) == (
        None,
        "auto: the model's default where bf16 is emulated",
    )
    monkeypatch.setattr(environment, "has_cuda", lambda: True)
    assert compute.resolve_attention("auto", "bf16", short)[0] is None


@pytest.mark.parametrize(
    ("architecture", "padding_side"),
    [("bert", "right"), ("distilbert", "right"), ("gpt2", "right"), ("llama", "right"), ("llama", "left")],
)
def test_eager_and_fused_attention_give_the_same_logits_and_gradients_on_padded_batches(
    tiny_models, architecture, padding_side
):
    """The kernel is a speed choice only: same classifier logits and LoRA gradients on a batch whose
    rows are padded (fp32, so that only the kernels' summation order can differ)."""
    tokenizer = load_tokenizer(tiny_models[architecture])
    tokenizer.padding_side = padding_side
    batch = tokenizer(
        ["a fine film", "dull, slow and far too long for what it says"], padding=True, return_tensors="pt"
    )
    assert (batch["attention_mask"] == 0).any()
    method = get_method("lora")
    hparams = method.resolve_hparams({"dropout": 0.0})

    def logits_and_gradients(attention: str) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        torch.manual_seed(0)  # the same classification head
        model = method.apply(
            load_model(tiny_models[architecture], "sentiment", tokenizer, attention=attention), "sentiment", hparams
        )
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():  # B starts at zero: give every factor a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
        meter = memory.ActivationMeter(model)
        with meter.measuring():
            logits = model(**batch).logits
        logits.square().sum().backward()
        return logits.detach(), [p.grad for p in model.parameters() if p.requires_grad], meter.bytes

    fused_logits, fused_grads, fused_saved = logits_and_gradients("sdpa")
    eager_logits, eager_grads, eager_saved = logits_and_gradients("eager")
    assert eager_saved != fused_saved  # two kernels did run: they keep different tensors for the backward pass
    torch.testing.assert_close(eager_logits, fused_logits, rtol=1e-5, atol=1e-6)
    for eager, fused in zip(eager_grads, fused_grads, strict=True):
        torch.testing.assert_close(eager, fused, rtol=1e-4, atol=1e-6)


def test_a_resumed_run_keeps_the_attention_kernel_it_trained_with(
    cpu_with_bf16, monkeypatch, tmp_path, tiny_models, review_csv
):
    store = RunStore(tmp_path / "runs")
    config = tiny_sentiment_config(tiny_models, review_csv, max_steps=6, checkpoint_steps=2, eval_subsample=8)

    def stop_after_two_steps():
        calls = []
        return lambda: calls.append(1) or len(calls) >= 2

    assert train(config, store, should_stop=stop_after_two_steps())["attention"] == "eager"
    (run,) = store.runs()
    # on a machine where `auto` would now pick the default, the run goes on as it began
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resume(run.id, store, should_stop=stop_after_two_steps())["attention"] == "eager"
    # a run recorded before the kernel was chosen trained with the model's default, and goes on with it
    recorded = json.loads((run.dir / "config.json").read_text())
    del recorded["attention"], recorded["attention_source"]
    (run.dir / "config.json").write_text(json.dumps(recorded))
    resumed = resume(run.id, store)
    assert resumed["status"] == "completed" and resumed["attention"] == "sdpa"


def test_fp16_without_cuda_is_refused_before_anything_is_written(tmp_path, tiny_models, review_csv):
    store = RunStore(tmp_path / "runs")
    config = TrainConfig(
        task="sentiment", method="lora", model=tiny_models["bert"], dataset=str(review_csv), precision="fp16"
    )
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(config, store)
    assert list(store.runs()) == []
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        TrainConfig(task="sentiment", method="lora", precision="fp8").resolved()


@pytest.mark.parametrize(("hardware", "expected"), [("cpu_with_bf16", "bf16"), ("cpu_without_bf16", "fp32")])
def test_a_default_run_computes_in_what_the_hardware_runs_fast_and_says_so(
    request, hardware, expected, tmp_path, tiny_models, review_csv
):
    request.getfixturevalue(hardware)
    store = RunStore(tmp_path / "runs")
    summary = train(tiny_sentiment_config(tiny_models, review_csv, eval_subsample=8), store)
    (run,) = store.runs()
    assert summary["status"] == "completed"
    assert summary["precision"] == run.config["precision"] == expected
    assert summary["precision_source"].startswith("auto: ")
    # the tiny run's 48-token sequences: eager attention in bf16, the fused kernel in fp32
    assert summary["attention"] == ("eager" if expected == "bf16" else "sdpa")  # the kernel that computed
    assert run.config["attention"] == ("eager" if expected == "bf16" else None)  # what was asked for
    assert summary["attention_source"].startswith("auto: ")
    # Whatever it computed in, the trained adapter is kept in float32 (the master weights).
    saved = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


def test_bf16_stores_frozen_weights_in_bf16_and_trains_float32_ones(tiny_models):
    tokenizer = load_tokenizer(tiny_models["bert"])
    method = get_method("lora")
    fp32_base = load_model(tiny_models["bert"], "sentiment", tokenizer)
    fp32_bytes = sum(p.nbytes for p in fp32_base.parameters())
    model = method.apply(fp32_base, "sentiment", method.resolve_hparams({}))
    compute.store_frozen_weights(model, "bf16")
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    frozen_bytes = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
    assert frozen_bytes == pytest.approx(fp32_bytes / 2, rel=0.01)
    batch = data.collator(tokenizer, "sentiment")(
        [{"input_ids": [101, 2204, 3185, 102], "attention_mask": [1, 1, 1, 1], "labels": 1}] * 2
    )
    with compute.autocast("bf16", model):
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_a_run_recorded_before_the_precision_setting_resumes_in_fp32(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create({"task": "sentiment", "method": "lora", "model": "m", "dataset": "d"})
    (run.dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run.dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    run.update_summary(status="stopped")
    config, _ = resumable(run)
    assert config.precision == "fp32"


def _generation_batch(tokenizer) -> dict:
    """Two rows of different lengths whose prompts (and padding) carry no labels."""
    collate = data.collator(tokenizer, "generation")
    rows = []
    for prompt, target in (("Write a positive review: ", "a fine film"), ("Review: ", "dull, slow and far too long")):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + target_ids
        labels = [-100] * len(prompt_ids) + target_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return collate(rows)


@pytest.mark.parametrize(
    ("architecture", "method_name"), [("llama", "lora"), ("gpt2", "lora"), ("llama", "full"), ("llama", "sparselora")]
)
@pytest.mark.parametrize("num_items", [None, 9])
def test_logits_only_where_read_give_the_same_loss_and_gradients(tiny_models, architecture, method_name, num_items):
    """Both passes see one network: no dropout (eval mode; SparseLoRA only runs sparse in training
    mode, where it routes the labelled tokens dense by the labels, so it trains without dropout)."""
    tokenizer = load_tokenizer(tiny_models[architecture])
    method = get_method(method_name)
    torch.manual_seed(0)
    hparams = method.resolve_hparams({"dropout": 0.0} if method_name != "full" else {})
    if method_name == "sparselora":
        hparams = method.resolve_hparams({**hparams, "layer_sparsity": "0.75,0"})  # 2 layers: the first sparse
    model = method.apply(load_model(tiny_models[architecture], "generation", tokenizer), "generation", hparams)
    for name, parameter in model.named_parameters():  # B is zero at the start: give every factor a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.train(method_name == "sparselora")
    batch = _generation_batch(tokenizer)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    trimmed = compute.logits_where_read(batch)
    labelled = batch["labels"][:, 1:] != data.IGNORE_INDEX
    assert int(trimmed["logits_to_keep"].sum()) == int(labelled.sum()) < labelled.numel()  # prompts are skipped

    def loss_and_gradients(inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(**inputs, **extra).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    full_loss, full_grads = loss_and_gradients(batch)
    read_loss, read_grads = loss_and_gradients(trimmed)
    assert read_loss == pytest.approx(float(full_loss), rel=1e-6)
    for full, read in zip(full_grads, read_grads, strict=True):
        torch.testing.assert_close(read, full, rtol=1e-5, atol=1e-7)
    if method_name == "sparselora":
        assert method.telemetry(model)["flops_ratio_vs_lora"] < 1  # the passes did run sparse


@pytest.mark.e2e
def test_bf16_answers_agree_with_fp32_on_the_sentiment_validation_split(bundled_encoder_run):
    """The Playground's answer in bf16 is the fp32 answer on at least 99% of 640 reviews spread
    over the validation split (the whole split took 105 s on a CPU that emulates bf16)."""
    run = bundled_encoder_run
    loaded = {precision: inference.load_run(run, precision) for precision in ("bf16", "fp32")}
    validation = data.load_splits(run.config["dataset"], "sentiment", offline=True).validation
    texts = list(validation["text"])[:: max(1, len(validation) // 640)][:640]
    answers = {}
    for precision, model in loaded.items():
        answers[precision] = torch.cat(
            [
                inference.class_probabilities(model.model, model.tokenizer, texts[i : i + 64], precision).argmax(-1)
                for i in range(0, len(texts), 64)
            ]
        )
    agreement = float((answers["bf16"] == answers["fp32"]).float().mean())
    print(json.dumps({"examples": len(texts), "agreement": agreement}))
    assert agreement >= 0.99
