"""GPT-2's weights in (--init_from) and Hugging Face folders out (export_model.py), checked
against transformers itself, offline: the GPT-2 models here are small ones with random weights,
written in the Hugging Face layout by transformers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import PROJECT_ROOT, SMALL_TEXT
from hyperparameters import ModelConfig
from model_architecture import GPT, generate
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.common import UserFacingError
from support.hugging_face import (
    hf_tokenizer,
    load_gpt2_weights,
    model_config_from_gpt2,
    pretrained_gpt2,
    read_config,
    read_weights,
    write_hf_folder,
)
from tokenization import BPETokenizer, CharTokenizer, FittedBPETokenizer

HARD_TEXT = (
    "First Citizen:\n  Before we proceed,\tany further\r\n"
    "héllo wörld 👩‍👩‍👧 日本語 e\u0301 1234567890 <|endoftext|> don't we'll\n\n\n  x"
)


def scale_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from the small initial ones, so that logits differ clearly between tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.2
            is_norm_gain = p.dim() == 1 and ("ln" in name or "norm" in name) and "weight" in name
            p.copy_(1 + 0.1 * noise if is_norm_gain else noise)


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> BPETokenizer:
    return BPETokenizer()


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> tuple[Path, GPT2LMHeadModel]:
    """A 2-layer GPT-2 with GPT-2's vocabulary and random weights, saved as Hugging Face does."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    scale_weights(model)
    model.save_pretrained(folder)
    return folder, model


def our_gpt2(folder: Path, tokenizer, block_size: int = 64) -> GPT:
    base = ModelConfig(block_size=block_size)
    pretrained = pretrained_gpt2(str(folder), base, tokenizer)
    model = GPT(ModelConfig(**{**pretrained.config.__dict__, "vocab_size": tokenizer.vocab_size}))
    load_gpt2_weights(model, read_weights(pretrained.weights), tokenizer)
    return model.eval()


def our_greedy(model: GPT, prompt: list[int], tokens: int) -> list[int]:
    return list(generate(model, prompt, tokens, temperature=0.0))


def hf_greedy(model, prompt: list[int], tokens: int) -> list[int]:
    output = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return output[0, len(prompt) :].tolist()


# ----------------------------------------------------------------------------------------------
# In: --init_from


def test_gpt2_weights_give_transformers_logits_and_greedy_tokens(tiny_gpt2, gpt2_tokenizer):
    folder, reference = tiny_gpt2
    model = our_gpt2(folder, gpt2_tokenizer)
    assert model.config.activation == "gelu_tanh"
    assert model.config.position == "learned"
    ids = gpt2_tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
        theirs = reference(torch.tensor([ids])).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert our_greedy(model, ids[:5], 50) == hf_greedy(reference, ids[:5], 50)


def test_fitted_vocabulary_takes_gpt2s_rows(tiny_gpt2, gpt2_tokenizer):
    folder, reference = tiny_gpt2
    train_ids = np.array(gpt2_tokenizer.encode(SMALL_TEXT))
    fitted = FittedBPETokenizer.from_training_ids(train_ids, gpt2_tokenizer)
    model = our_gpt2(folder, fitted)
    ids = fitted.encode("First Citizen: speak, speak.")
    gpt2_ids = fitted.gpt2_ids[ids].tolist()
    assert gpt2_ids == gpt2_tokenizer.encode("First Citizen: speak, speak.")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
        theirs = reference(torch.tensor([gpt2_ids])).logits[..., fitted.gpt2_ids]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_context_may_be_shorter_than_gpt2s(tiny_gpt2, gpt2_tokenizer):
    folder, reference = tiny_gpt2
    model = our_gpt2(folder, gpt2_tokenizer, block_size=16)
    assert model.position_embedding.weight.shape == (16, 32)
    ids = gpt2_tokenizer.encode("To be, or not to be: that is the question.")[:16]
    with torch.no_grad():
        assert torch.allclose(
            model(torch.tensor([ids]))[0], reference(torch.tensor([ids])).logits, atol=1e-4
        )


def write_gpt2_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("missing folder", "no such folder"),
        ("no weights", "model.safetensors is missing"),
        ("damaged weights", "not a readable .safetensors"),
        ("another architecture", "'llama' model"),
        ("wrong shapes", "has shape"),
        ("context too long", "exceeds its 64 positions"),
        ("char tokenizer", "needs --tokenizer=bpe"),
        ("damaged config", "layer_norm_epsilon is not 1e-5"),
        ("not finite", "is not all finite numbers"),
        ("int8 weights", "is stored as int8, not as floating-point numbers"),
        ("three-dimensional weight", "has shape"),
    ],
)
def test_bad_pretrained_models_are_one_line_errors(
    tiny_gpt2, gpt2_tokenizer, tmp_path, damage, needle
):
    folder, reference = tiny_gpt2
    config = read_config(folder / "config.json")
    tokenizer, block_size, source = gpt2_tokenizer, 64, folder
    if damage == "missing folder":
        source = tmp_path / "nothing"
    elif damage == "no weights":
        source = write_gpt2_folder(tmp_path / "m", config, {})
        (source / "model.safetensors").unlink()
    elif damage == "damaged weights":
        source = write_gpt2_folder(tmp_path / "m", config, {"x": torch.zeros(2)})
        (source / "model.safetensors").write_bytes(b"\x00" * 40)
    elif damage == "another architecture":
        source = write_gpt2_folder(tmp_path / "m", {**config, "model_type": "llama"}, {})
    elif damage == "wrong shapes":
        tensors = {k: v.contiguous() for k, v in reference.state_dict().items()}
        tensors.pop("lm_head.weight")
        source = write_gpt2_folder(tmp_path / "m", {**config, "n_embd": 64}, tensors)
    elif damage == "context too long":
        block_size = 128
    elif damage == "char tokenizer":
        tokenizer = CharTokenizer.from_text(SMALL_TEXT)
    elif damage in ("not finite", "int8 weights", "three-dimensional weight"):
        tensors = {k: v.contiguous() for k, v in reference.state_dict().items()}
        tensors.pop("lm_head.weight")
        name = "transformer.h.0.attn.c_attn.weight"
        if damage == "not finite":
            tensors[name] = tensors[name].clone().fill_(float("nan"))
        elif damage == "int8 weights":  # as an 8-bit quantization stores them, scales aside
            tensors[name] = (tensors[name] * 127).round().to(torch.int8)
        else:
            tensors[name] = tensors[name].unsqueeze(0).contiguous()
        source = write_gpt2_folder(tmp_path / "m", config, tensors)
    elif damage == "damaged config":
        source = write_gpt2_folder(tmp_path / "m", {**config, "layer_norm_epsilon": "x"}, {})
    with pytest.raises(UserFacingError, match=needle) as caught:
        our_gpt2(source, tokenizer, block_size)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"activation_function": ["gelu"]}, "is not GELU"),
        ({"n_embd": 1e999}, "n_embd must be a whole number >= 1, got inf"),
        ({"n_layer": "12"}, "n_layer must be a whole number >= 1"),
        ({"n_head": 0}, "n_head must be a whole number >= 1, got 0"),
        ({"n_positions": None}, "n_positions must be a whole number >= 1, got None"),
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
            "its weights are quantized ('bitsandbytes'), not floating-point",
        ),
        ({"torch_dtype": "int8"}, "its torch_dtype is 'int8', not floating-point"),
        ({"dtype": ["float32"]}, "its dtype is ['float32'], not floating-point"),
    ],
)
def test_a_config_with_values_of_the_wrong_kind_is_one_line(change, words):
    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
    with pytest.raises(UserFacingError, match=re.escape(words)) as caught:
        model_config_from_gpt2({**config, **change}, ModelConfig(block_size=64), "x")
    assert "\n" not in str(caught.value)


def test_unknown_activation_is_refused():
    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
    with pytest.raises(UserFacingError, match="not GELU"):
        model_config_from_gpt2(
            {**config, "activation_function": "relu"}, ModelConfig(block_size=64), "x"
        )
    shape = model_config_from_gpt2(
        {**config, "activation_function": "gelu"}, ModelConfig(block_size=64), "x"
    )
    assert shape.activation == "gelu"
    assert (shape.n_layer, shape.n_embd) == (2, 32)


def test_named_model_offline_says_which_files_to_put_where(monkeypatch, gpt2_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent/cache")
    with pytest.raises(UserFacingError) as caught:
        pretrained_gpt2("gpt2", ModelConfig(), gpt2_tokenizer)
    message = str(caught.value)
    assert "config.json and model.safetensors" in message
    assert "--init_from=FOLDER" in message
    assert "openai-community/gpt2" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------
# Out: Hugging Face folders


@pytest.mark.parametrize(
    ("position", "bias", "activation"),
    [
        ("learned", True, "gelu"),
        ("learned", False, "gelu_tanh"),
        ("rope", True, "gelu"),
        ("rope", False, "gelu_tanh"),
    ],
)
def test_exported_model_gives_our_logits_in_transformers(tmp_path, position, bias, activation):
    tokenizer = CharTokenizer.from_text(SMALL_TEXT)
    config = ModelConfig(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=64,
        position=position,
        bias=bias,
        activation=activation,
        vocab_size=tokenizer.vocab_size,
    )
    model = GPT(config).eval()
    scale_weights(model)
    architecture = write_hf_folder(model, tokenizer, tmp_path / "hf")
    assert architecture == ("GPT2LMHeadModel" if position == "learned" else "GPTNeoXForCausalLM")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == architecture
    ids = tokenizer.encode(SMALL_TEXT[:60])
    with torch.no_grad():
        ours_logits = model(torch.tensor([ids]))[0]
        their_logits = theirs(torch.tensor([ids])).logits
    assert torch.allclose(ours_logits, their_logits, atol=1e-4), (
        (ours_logits - their_logits).abs().max()
    )
    assert our_greedy(model, ids[:10], 50) == hf_greedy(theirs, ids[:10], 50)


def test_char_tokenizer_json_encodes_as_ours(tmp_path):
    tokenizer = CharTokenizer.from_text(SMALL_TEXT + "\t\r")
    hf = hf_tokenizer(tokenizer)
    text = "First Citizen:\n\tSpeak, speak.\r\n\nAll:\n"
    assert hf.encode(text).ids == tokenizer.encode(text)
    assert hf.decode(tokenizer.encode(text)) == text


def test_gpt2_tokenizer_json_encodes_as_tiktoken(gpt2_tokenizer, shakespeare_path):
    hf = hf_tokenizer(gpt2_tokenizer)
    texts = [HARD_TEXT.replace("<|endoftext|>", ""), "a" * 5000 + " b", "  \n\n \t x"]
    texts.append(shakespeare_path.read_text(encoding="utf-8")[:20_000])
    for text in texts:
        assert hf.encode(text).ids == gpt2_tokenizer.encode(text)
        assert hf.decode(gpt2_tokenizer.encode(text)) == text
    assert hf.get_vocab_size() == 50257
    assert hf.token_to_id("<|endoftext|>") == 50256


def test_fitted_vocabulary_exports_its_gpt2_ids(tmp_path, gpt2_tokenizer):
    fitted = FittedBPETokenizer.from_training_ids(
        np.array(gpt2_tokenizer.encode(SMALL_TEXT)), gpt2_tokenizer
    )
    config = ModelConfig(
        n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=fitted.vocab_size
    )
    write_hf_folder(GPT(config), fitted, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "gpt2_ids.json").read_text()) == fitted.gpt2_ids.tolist()
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


# ----------------------------------------------------------------------------------------------
# End to end, through the real scripts


def run(script: str, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PROJECT_ROOT / script), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_fine_tune_generate_and_export_through_the_scripts(tmp_path, tiny_gpt2):
    folder, _ = tiny_gpt2
    (tmp_path / "corpus.txt").write_text(SMALL_TEXT, encoding="utf-8")
    common = ["--data", "corpus.txt", "--cache_dir", "cache", "--block_size", 32]
    short = ["--max_iters", 4, "--eval_interval", 2, "--eval_iters", 2, "--batch_size", 2]
    trained = run(
        "train_model.py",
        "--init_from",
        folder,
        "--bpe_vocabulary",
        "full",
        *common,
        *short,
        "--out_dir",
        "run",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert "GPT-2's weights from" in trained.stdout
    settings = json.loads((tmp_path / "run" / "config.json").read_text())
    assert settings["model"]["activation"] == "gelu_tanh"
    assert settings["model"]["n_embd"] == 32
    assert settings["train"]["optimizer"] == "adamw"

    sampled = run(
        "generate_text.py",
        "--out_dir",
        "run",
        "--prompt",
        "First",
        "--max_new_tokens",
        20,
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("First")

    exported = run("tools/export_model.py", "--out_dir", "run", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "GPT2LMHeadModel" in exported.stdout
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").eval()
    their_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "hf")
    checkpoint = load_checkpoint(tmp_path / "run" / "ckpt_best.pth")
    model, tokenizer = model_from_checkpoint(checkpoint, torch.device("cpu"))
    ids = tokenizer.encode("First Citizen: speak")
    assert their_tokenizer("First Citizen: speak")["input_ids"] == ids
    with torch.no_grad():
        assert torch.allclose(
            model(torch.tensor([ids]))[0], theirs(torch.tensor([ids])).logits, atol=1e-4
        )

    again = run("tools/export_model.py", "--out_dir", "run", cwd=tmp_path)
    assert again.returncode == 2
    assert "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert "Traceback" not in again.stderr


def test_shape_options_with_init_from_are_refused(tmp_path, tiny_gpt2):
    folder, _ = tiny_gpt2
    status = run("train_model.py", "--init_from", folder, "--n_layer", 4, cwd=tmp_path)
    assert status.returncode == 2
    assert "--init_from takes --n_layer from the pretrained model" in status.stderr
    assert len(status.stderr.strip().splitlines()) == 1
