"""Shared fixtures: tiny configs, small corpora written by the tests, the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hyperparameters import ModelConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_SHAKESPEARE = PROJECT_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# A small corpus with real structure: enough to train a few steps and to sample from.
SMALL_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 20


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0, vocab_size=40)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def shakespeare_path() -> Path:
    if not SHARED_SHAKESPEARE.exists():
        pytest.skip(f"Tiny Shakespeare not found at {SHARED_SHAKESPEARE}")
    return SHARED_SHAKESPEARE


def tiny_train_argv(out_dir: Path, corpus: Path, **overrides: object) -> list[str]:
    """Command-line options for a training run that takes a second or two."""
    options: dict[str, object] = {
        "data": corpus,
        "out_dir": out_dir,
        "cache_dir": out_dir.parent / "cache",
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "block_size": 16,
        "batch_size": 8,
        "max_iters": 20,
        "eval_interval": 10,
        "eval_iters": 2,
        "warmup_iters": 5,
        "device": "cpu",
    }
    options.update(overrides)
    return [f"--{name}={value}" for name, value in options.items()]


def build_training(argv: list[str]):
    """What train_model.main sets up before its loop: (run, state, description)."""
    import train_model
    from support.training_session import TrainingSession

    session = TrainingSession("train_model.py")
    with session.open(train_model.command_line(), argv):
        run = train_model.build_run(session)
    return run, session.state, session.description
