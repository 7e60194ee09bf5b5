"""The method registry: schemas reject bad values, every method applies to every architecture,
adapters start as the identity and train only what they should."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from lora_methods import METHODS, HParamError, get_method
from lora_methods.targets import DEFAULT_TARGETS
from training.core.models import keep_4bit_layers_trainable, load_model, load_tokenizer, weight_memory_bytes

ARCH_TASK = {"bert": "sentiment", "distilbert": "sentiment", "gpt2": "generation", "llama": "generation"}


def test_registry_has_every_method_of_the_core():
    assert {"full", "lora", "qlora", "hira", "hira-4bit"} <= set(METHODS)
    for method in METHODS.values():
        assert method.summary and method.title
        method.resolve_hparams({})  # defaults are valid


@pytest.mark.parametrize(
    "method, hparams, message",
    [
        ("lora", {"learning_rate": -1e-3}, "learning_rate must satisfy 0 < learning_rate"),
        ("lora", {"learning_rate": 0}, "learning_rate must satisfy"),
        ("lora", {"learning_rate": "fast"}, "learning_rate must be a number"),
        ("lora", {"learning_rate": float("nan")}, "finite"),
        ("lora", {"rank": 0}, "rank must satisfy 1 <= rank"),
        ("lora", {"rank": 2.5}, "rank must be a whole number"),
        ("lora", {"rank": True}, "rank must be a number"),
        ("lora", {"dropout": 1.0}, "dropout must satisfy"),
        ("lora", {"alpha": 0}, "alpha must satisfy"),
        ("lora", {"target_modules": "  "}, "target_modules must not be empty"),
        ("hira", {"alpha": 16}, "does not take alpha"),
        ("full", {"rank": 8}, "does not take rank"),
    ],
)
def test_bad_hyperparameters_get_a_readable_error(method, hparams, message):
    with pytest.raises(HParamError, match=message):
        get_method(method).resolve_hparams(hparams)


def test_unknown_method_lists_the_choices():
    with pytest.raises(HParamError, match="unknown method 'sparse-magic'.*lora"):
        get_method("sparse-magic")  # not "dora": DoRA joins the registry


def test_values_from_forms_are_converted():
    assert get_method("lora").resolve_hparams({"rank": "16", "learning_rate": "2e-4"})["rank"] == 16


def _load(path: str, task: str, quantize: bool = False):
    tokenizer = load_tokenizer(path)
    return load_model(path, task, tokenizer, quantize_4bit=quantize), tokenizer


def test_loading_names_the_weights_a_checkpoint_lacks_and_is_quiet_about_a_new_classifier_head(
    tiny_models, tmp_path, capfd
):
    from transformers import AutoModelForCausalLM

    reported = []  # what transformers logs, past its loggers' filters (its own handler is not on stderr here)
    handler = logging.Handler()
    handler.emit = lambda record: reported.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        _load(tiny_models["llama"], "sentiment")  # a causal LM's checkpoint: the classifier head is new
        _load(tiny_models["bert"], "sentiment")
        assert "has no weights" not in capfd.readouterr().err
        assert not [message for message in reported if "LOAD REPORT" in message]

        # A weight of the wrong shape fails the load, and transformers' report, which its error
        # points to, stays.
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
        state = dict(model.state_dict(), **{"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})
        model.save_pretrained(tmp_path / "misshapen", state_dict=state)
        load_tokenizer(tiny_models["llama"]).save_pretrained(tmp_path / "misshapen")
        with pytest.raises(RuntimeError, match="above report"):
            _load(str(tmp_path / "misshapen"), "generation")
        assert [message for message in reported if "LOAD REPORT" in message and "MISMATCH" in message]
    finally:
        logging.getLogger("transformers").removeHandler(handler)

    lacking = "model.layers.0.mlp.up_proj.weight"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.save_pretrained(
        tmp_path / "lacking", state_dict={k: v for k, v in model.state_dict().items() if k != lacking}
    )
    load_tokenizer(tiny_models["llama"]).save_pretrained(tmp_path / "lacking")
    for task in ("sentiment", "generation"):
        _load(str(tmp_path / "lacking"), task)
        said = capfd.readouterr().err
        assert f"{tmp_path / 'lacking'} has no weights for {lacking}: they start at random values." in said
        assert "score" not in said


def _inputs(tokenizer, task: str) -> dict:
    batch = tokenizer(["a fine, moving film", "dull and far too long"], return_tensors="pt", padding=True)
    return dict(batch)


@pytest.mark.parametrize("arch", list(ARCH_TASK))
@pytest.mark.parametrize("method_name", ["lora", "hira"])
def test_adapter_starts_as_identity_and_trains_only_itself(tiny_models, arch, method_name):
    task = ARCH_TASK[arch]
    torch.manual_seed(0)
    model, tokenizer = _load(tiny_models[arch], task)
    model.eval()
    inputs = _inputs(tokenizer, task)
    before = model(**inputs).logits.detach()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    method = get_method(method_name)
    wrapped = method.apply(model, task, method.resolve_hparams({"rank": 4}))
    wrapped.eval()
    assert torch.allclose(wrapped(**inputs).logits, before, atol=1e-5)

    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(f"{method_name}_" in n or "modules_to_save" in n for n in trainable)
    adapted = {re.search(rf"\.(\w+)\.{method_name}_", n).group(1) for n in trainable if f"{method_name}_" in n}
    assert adapted == set(DEFAULT_TARGETS[arch])

    # One optimiser step changes adapter weights and never the frozen base.
    wrapped.train()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([1, 0]) if task == "sentiment" else inputs["input_ids"]
    wrapped(**inputs, labels=labels).loss.backward()
    optimizer.step()
    for name, param in wrapped.named_parameters():
        if not param.requires_grad and "modules_to_save" not in name:
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
            assert torch.equal(param, frozen_before[base_name]), name


def test_full_fine_tuning_trains_everything(tiny_models):
    model, _ = _load(tiny_models["bert"], "sentiment")
    model.requires_grad_(False)
    trained = get_method("full").apply(model, "sentiment", {"learning_rate": 1e-4})
    assert all(p.requires_grad for p in trained.parameters())


def test_user_target_modules_are_checked_against_the_model(tiny_models):
    model, _ = _load(tiny_models["llama"], "generation")
    lora = get_method("lora")
    wrapped = lora.apply(model, "generation", lora.resolve_hparams({"target_modules": "q_proj, down_proj", "rank": 2}))
    names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("down_proj.lora_A" in n for n in names) and not any("v_proj.lora_A" in n for n in names)

    model, _ = _load(tiny_models["llama"], "generation")
    with pytest.raises(HParamError, match="query_proj not found.*available: .*q_proj"):
        lora.apply(model, "generation", lora.resolve_hparams({"target_modules": "query_proj"}))


def test_rank_larger_than_a_layer_is_refused(tiny_models):
    model, _ = _load(tiny_models["bert"], "sentiment")
    with pytest.raises(
        HParamError, match="rank 128 is larger than layer .*query \\(64x64\\); choose a rank of at most 64"
    ):
        get_method("lora").apply(model, "sentiment", get_method("lora").resolve_hparams({"rank": 128}))


def test_distilbert_pre_classifier_trains_with_the_adapter(tiny_models):
    model, _ = _load(tiny_models["distilbert"], "sentiment")
    wrapped = get_method("lora").apply(model, "sentiment", get_method("lora").resolve_hparams({}))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("pre_classifier" in n for n in trainable) and any("classifier.modules_to_save" in n for n in trainable)


@pytest.mark.parametrize("method_name, arch", [("qlora", "llama"), ("hira-4bit", "llama"), ("qlora", "bert")])
def test_4bit_methods_quantize_the_base_and_train(tiny_models, method_name, arch):
    task = ARCH_TASK[arch]
    method = get_method(method_name)
    full_precision, tokenizer = _load(tiny_models[arch], task)
    quantized, _ = _load(tiny_models[arch], task, quantize=method.quantize_base)
    assert type(quantized.get_submodule(_first_target(quantized, arch))).__name__ == "Linear4bit"
    assert weight_memory_bytes(quantized) < weight_memory_bytes(full_precision)
    head = "classifier" if task == "sentiment" else "lm_head"
    assert type(quantized.get_submodule(head)).__name__ == "Linear"  # heads stay out of quantization

    keep_4bit_layers_trainable(quantized)
    wrapped = method.apply(quantized, task, method.resolve_hparams({"rank": 4}))
    inputs = _inputs(tokenizer, task)
    with torch.no_grad():  # an evaluation before training must not break the backward pass
        wrapped.eval()(**inputs)
    wrapped.train()
    labels = torch.tensor([1, 0]) if task == "sentiment" else inputs["input_ids"]
    loss = wrapped(**inputs, labels=labels).loss
    loss.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if p.requires_grad and "_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # every layer gets a gradient


def _first_target(model, arch: str) -> str:
    suffix = DEFAULT_TARGETS[arch][0]
    return next(name for name, _ in model.named_modules() if name.endswith(suffix))


def test_a_method_names_its_optimizer_callbacks_and_telemetry(tiny_models):
    assert get_method("qlora").optimizer_name(cuda=True) == "paged_adamw_8bit"
    assert get_method("qlora").optimizer_name(cuda=False) == "adamw_torch"  # bitsandbytes' paged AdamW needs CUDA
    assert get_method("lora").optimizer_name(cuda=True) == "adamw_torch"

    lora = get_method("lora")
    hparams = lora.resolve_hparams({})
    plain = lora.apply(_load(tiny_models["bert"], "sentiment")[0], "sentiment", hparams)
    assert lora.callbacks(plain, hparams) == [] and lora.telemetry(plain) == {}

    sparselora = get_method("sparselora")
    hparams = sparselora.resolve_hparams({"layer_sparsity": "0.75,0"})  # 2 layers: the first sparse
    sparse = sparselora.apply(_load(tiny_models["bert"], "sentiment")[0], "sentiment", hparams)
    (schedule,) = sparselora.callbacks(sparse, hparams)
    assert set(sparselora.telemetry(sparse)) == {"flops_ratio_vs_lora", "exact_skip_share", "estimator_recall"}
    assert set(sparselora.telemetry(sparse)) <= set(schedule.summary()["sparsity"])  # the names training logs


def test_a_trained_model_loads_as_its_method_saved_it(tiny_models, tmp_path):
    path = tiny_models["bert"]
    model, tokenizer = _load(path, "sentiment")
    lora = get_method("lora")
    adapter = lora.apply(model, "sentiment", lora.resolve_hparams({}))
    torch.manual_seed(1)
    for param in adapter.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.1)  # a trained update, not the identity
    adapter.save_pretrained(tmp_path / "adapter")

    def load(location: str, quantize_4bit: bool) -> torch.nn.Module:
        return load_model(location, "sentiment", tokenizer, quantize_4bit=quantize_4bit)

    inputs = _inputs(tokenizer, "sentiment")
    loaded = lora.load_trained(tmp_path / "adapter", lambda: path, load).eval()
    assert torch.allclose(loaded(**inputs).logits, adapter.eval()(**inputs).logits, atol=1e-6)

    whole = get_method("full").apply(_load(path, "sentiment")[0], "sentiment", {})
    whole.save_pretrained(tmp_path / "model")
    unused_base = lambda: pytest.fail("a whole saved model needs no base")  # noqa: E731
    loaded = get_method("full").load_trained(tmp_path / "model", unused_base, load).eval()
    assert torch.allclose(loaded(**inputs).logits, whole.eval()(**inputs).logits, atol=1e-6)


def test_a_lora_variant_reuses_lora_with_one_more_peft_option(tiny_models):
    from lora_methods import lora

    stabilised = lora.apply_with(use_rslora=True)  # rank-stabilised LoRA: alpha / sqrt(r)
    model, _ = _load(tiny_models["bert"], "sentiment")
    wrapped = stabilised(model, "sentiment", get_method("lora").resolve_hparams({"rank": 4, "alpha": 8}))
    query = wrapped.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    assert query.scaling["default"] == pytest.approx(8 / 4**0.5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_dora_trains_a_magnitude_per_adapted_layer_and_merges_exactly(tiny_models, arch):
    task = ARCH_TASK[arch]
    torch.manual_seed(0)
    model, tokenizer = _load(tiny_models[arch], task)
    inputs = _inputs(tokenizer, task)
    before = model.eval()(**inputs).logits.detach()
    method = get_method("dora")
    wrapped = method.apply(model, task, method.resolve_hparams({"rank": 4, "dropout": 0.0}))
    assert torch.allclose(wrapped.eval()(**inputs).logits, before, atol=1e-5)  # identity at start
    magnitudes = {n for n, p in wrapped.named_parameters() if p.requires_grad and "lora_magnitude_vector" in n}
    assert len(magnitudes) == len({n for n, _ in wrapped.named_modules() if n.endswith(".lora_A")})

    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=5e-2)
    labels = torch.tensor([1, 0]) if task == "sentiment" else inputs["input_ids"]
    for _ in range(3):
        wrapped.train()(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted = wrapped.eval()(**inputs).logits.detach()
    assert not torch.allclose(adapted, before, atol=1e-4)  # it trained
    assert method.merge_blocker is None
    assert torch.allclose(wrapped.merge_and_unload()(**inputs).logits, adapted, atol=1e-4)
