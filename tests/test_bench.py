"""bench.py's bookkeeping (not its timings, which are measured, never asserted).

Run alone: python -m pytest tests/test_bench.py
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from hyperparameters import BPE_PRESET, ModelConfig, TrainConfig
from model_architecture import GPT
from support.fast_paths import Int8Linear, for_inference
from tools import bench


def test_time_to_quality_reads_the_first_time_each_target_was_reached(tmp_path):
    rows = [
        {"step": 0, "val_bpc": 4.0 / math.log(2), "elapsed_s": 0.0},
        {"step": 100, "val_bpc": 1.9 / math.log(2), "elapsed_s": 30.0},
        {"step": 200, "val_bpc": 1.65 / math.log(2), "elapsed_s": 60.0},
        {"step": 300, "val_bpc": 1.69 / math.log(2), "elapsed_s": 90.0},
    ]
    losses = {"train_loss": 1.0, "val_loss": 1.0, "train_bpc": 1.0}  # not read here
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({**row, **losses}) + "\n" for row in rows))
    reached = bench.time_to_quality(path)
    assert reached["2.00 nats/char"] == 30.0
    assert reached["1.70 nats/char"] == 60.0
    assert reached["1.60 nats/char"] is None
    assert math.isclose(reached["best nats/char"], 1.65)
    assert reached["best at s"] == 60.0


def test_flops_per_token_counts_weights_and_attention():
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=10)
    learned = GPT(dataclasses.replace(config, position="learned"))
    weights = learned.num_parameters() - 16 * 32  # position embeddings do no multiplications
    assert bench.flops_per_token(learned) == 6 * weights + 12 * 2 * 32 * 16
    rotary = GPT(dataclasses.replace(config, position="rope"))
    assert rotary.num_parameters() == weights
    assert bench.flops_per_token(rotary) == bench.flops_per_token(learned)  # same multiplications


def test_a_generated_token_reads_every_weight_and_the_cache_once():
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=10)
    model = GPT(config)
    weights = 4 * model.num_parameters()  # float32
    keys_and_values = 2 * 2 * 32 * 12 * 4  # two tensors, two layers, 12 positions, float32
    assert bench.bytes_per_generated_token(model, 12) == weights + keys_and_values
    int8 = for_inference(GPT(config), "int8")
    layers = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    int8_weights = sum(m.weight.numel() for m in layers)  # 1 byte instead of 4
    scales = 4 * sum(m.scale.numel() for m in layers)
    expected = weights - 3 * int8_weights + scales + keys_and_values  # the cache stays float32
    assert bench.bytes_per_generated_token(int8, 12) == expected
    half = model.to(torch.bfloat16)
    assert bench.bytes_per_generated_token(half, 12) == (weights + keys_and_values) / 2


def test_a_compiled_generation_case_is_skipped_when_the_compiler_fails(monkeypatch, capsys):
    bench.GENERATE_MODELS["tiny"] = ModelConfig(
        n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=10
    )
    monkeypatch.setattr(bench, "compile_token_step", lambda model: None)
    try:
        figures = bench.generate_speed("tiny", 20, mode="compiled", precision="float32")
    finally:
        del bench.GENERATE_MODELS["tiny"]
    assert figures == {"skipped": "torch.compile failed here"}
    bench.print_report({"generate": {"tiny, compiled": figures}})
    assert "generate tiny, compiled: skipped (torch.compile failed here)" in capsys.readouterr().out


def test_a_generation_case_reports_the_bytes_it_reads_per_second():
    tiny = ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=10)
    bench.GENERATE_MODELS["tiny"] = tiny
    try:
        figures = bench.generate_speed("tiny", 20, mode="cache", precision="float32")
        recomputing = bench.generate_speed("tiny", 20, mode="recompute", precision="float32")
    finally:
        del bench.GENERATE_MODELS["tiny"]
    per_token = bench.bytes_per_generated_token(GPT(tiny), 0.75 * 8)
    expected = figures["tokens_per_s"] * per_token / 1e9
    assert figures["gb_read_per_s"] == pytest.approx(expected)
    assert recomputing["gb_read_per_s"] is None  # no single figure: see generate_speed
    assert bench.copy_bandwidth(megabytes=8, repeats=2)["copy_gb_per_s"] > 0


def test_a_generation_case_times_the_first_token_after_a_full_block(monkeypatch, capsys):
    bench.GENERATE_MODELS["tiny"] = ModelConfig(
        n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=10
    )
    prompts = []
    timed = bench.first_token_seconds

    def recording(model, prompt, **options):
        prompts.append(len(prompt))
        return timed(model, prompt, **options)

    monkeypatch.setattr(bench, "first_token_seconds", recording)
    try:
        figures = bench.generate_speed("tiny", 20, mode="cache", precision="float32")
    finally:
        del bench.GENERATE_MODELS["tiny"]
    assert prompts == [8, 8, 8]  # a prompt of block_size tokens, timed three times
    assert 0 < figures["first_token_full_block_ms"] < 1000 * figures["seconds"]
    bench.print_report({"generate": {"tiny, cache": figures}})
    shown = f"({figures['first_token_full_block_ms']:.1f} ms after a full block)"
    assert shown in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_training_case_reports_every_figure(optimizer):
    tiny = ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=10)
    bench.TRAIN_SHAPES["tiny"] = (tiny, TrainConfig(batch_size=2, optimizer=optimizer))
    try:
        figures = bench.train_speed("tiny", steps=2)
    finally:
        del bench.TRAIN_SHAPES["tiny"]
    assert set(figures) == {"parameters", "ms_per_step", "tokens_per_s", "gflops", "peak_rss_mb"}
    assert figures["tokens_per_s"] > 0


def test_nanogpt_shapes_train_the_way_nanogpt_does():
    nanogpt_shapes = [name for name in bench.TRAIN_SHAPES if name.startswith(("baby", "6x384"))]
    assert len(nanogpt_shapes) == 4
    for name in nanogpt_shapes:
        model_config, train_config = bench.TRAIN_SHAPES[name]
        assert train_config.optimizer == "adamw", name
        assert model_config.position == "learned", name


def test_bench_shapes_follow_the_defaults_tables():
    from hyperparameters import FINE_TUNING_PRESET

    model_config, train_config = bench.TRAIN_SHAPES["BPE defaults, fitted"]
    # bpe_min_count shapes the vocabulary (vocab_size, checked below); the spelled share only
    # lengthens the training text, not a step.
    data_settings = {"bpe_min_count", "bpe_spell_fraction"}
    assert data_settings <= set(BPE_PRESET)
    for name, value in BPE_PRESET.items():
        if name not in data_settings:
            assert getattr(model_config, name, getattr(train_config, name, None)) == value, name
    assert model_config.vocab_size == bench.FITTED_TWICE_GPT2_TOKENS
    model_config, train_config = bench.TRAIN_SHAPES["GPT-2 124M fine-tuning, full"]
    assert (model_config.n_layer, model_config.n_embd, model_config.vocab_size) == (12, 768, 50257)
    assert model_config.activation == "gelu_tanh"
    assert train_config.optimizer == FINE_TUNING_PRESET["optimizer"]
    assert model_config.dropout == FINE_TUNING_PRESET["dropout"]


@pytest.mark.parametrize(
    ("min_count", "size"),
    [
        (1, bench.FITTED_GPT2_TOKENS),
        (BPE_PRESET["bpe_min_count"], bench.FITTED_TWICE_GPT2_TOKENS),
    ],
)
def test_fitted_vocabulary_sizes_are_tiny_shakespeares(min_count, size, shakespeare_path):
    from data_handling import load_splits
    from hyperparameters import DataConfig

    config = DataConfig(
        data=str(shakespeare_path), tokenizer="bpe", bpe_min_count=min_count, cache_dir=""
    )
    assert load_splits(config, block_size=64).tokenizer.vocab_size == size


def test_full_validation_scores_every_token_of_the_split(tmp_path, tiny_corpus):
    import torch.nn.functional as F

    import train_model
    from conftest import tiny_train_argv
    from data_handling import load_splits
    from hyperparameters import DataConfig
    from support.checkpoint import load_checkpoint, model_from_checkpoint

    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, max_iters=5)) == 0
    figures = bench.full_validation_loss(out_dir / "ckpt_best.pth")
    model, tokenizer = model_from_checkpoint(
        load_checkpoint(out_dir / "ckpt_best.pth"), torch.device("cpu")
    )
    config = DataConfig(data=str(tiny_corpus), cache_dir=str(tmp_path / "cache"))
    val = load_splits(config, 16, tokenizer).tokens["val"].long()
    assert figures["tokens_scored"] == len(val) - 1  # all but the first, which has no past
    # The same sum, one window of 16 at a time, the last one shorter.
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(val) - 1, 16):
            window = val[start : start + 17]
            logits, _ = model(window[:-1].unsqueeze(0))
            total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
    assert figures["val_nats_per_token"] == pytest.approx(total / (len(val) - 1), rel=1e-5)
