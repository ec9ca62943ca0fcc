"""GPT-2's weights in, Hugging Face folders out.

This project's GPT is GPT-2's architecture, so the weights move between the two by renaming:

    ours                         GPT-2 (transformers.GPT2LMHeadModel)
    token_embedding              wte             (rows: GPT-2 ids; a fitted vocabulary slices them)
    position_embedding           wpe             (learned positions only)
    blocks.i.norm_1              h.i.ln_1
    blocks.i.attn.qkv_proj       h.i.attn.c_attn (q | k | v, in the same order)
    blocks.i.attn.out_proj       h.i.attn.c_proj
    blocks.i.norm_2              h.i.ln_2
    blocks.i.mlp.fc_in           h.i.mlp.c_fc
    blocks.i.mlp.fc_out          h.i.mlp.c_proj
    final_norm                   ln_f
    lm_head                      (tied to wte, as here)

GPT-2 stores its linear layers as Conv1D, whose weight is the transpose of nn.Linear's. A model
with rotary positions has no GPT-2 counterpart; it is written as GPT-NeoX
(transformers.GPTNeoXForCausalLM), whose layer is the same pre-LayerNorm block once its
parallel residual is off, with q, k and v grouped per head.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from hyperparameters import ModelConfig
from model_architecture import GPT
from support.common import UserFacingError, write_atomically
from tokenization import (
    GPT2_END_OF_TEXT,
    BPETokenizer,
    CharTokenizer,
    FittedBPETokenizer,
    Tokenizer,
    TrainedBPETokenizer,
    load_gpt2_ranks,
)

# The names --init_from accepts, and where Hugging Face's hub keeps them.
PRETRAINED = {
    "gpt2": "openai-community/gpt2",  # 124M parameters
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1.5B
}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
FITTED_IDS_FILE = "gpt2_ids.json"
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token, id 50256
# GPT-2's activation names in config.json; gelu_new and gelu_pytorch_tanh are the same tanh
# formula (the first written out in Python, the second PyTorch's kernel).
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
ROTARY_BASE = 10000.0  # model_architecture.rotary_tables' default


# ----------------------------------------------------------------------------------------------
# Finding and reading a GPT-2 model in the Hugging Face layout


def pretrained_files(source: str) -> tuple[Path, Path]:
    """config.json and model.safetensors of --init_from's model, downloaded if need be.

    Args:
        source: a name of PRETRAINED, a folder holding both files, or a .safetensors file with
            config.json beside it.
    """
    if source in PRETRAINED:
        return _download(PRETRAINED[source])
    path = Path(source)
    if path.is_dir():
        folder, weights = path, path / WEIGHTS_FILE
    elif path.suffix == ".safetensors" and path.is_file():
        folder, weights = path.parent, path
    else:
        names = ", ".join(PRETRAINED)
        raise UserFacingError(
            f"--init_from {source}: no such folder or .safetensors file (or give one of {names})"
        )
    for needed in (folder / CONFIG_FILE, weights):
        if not needed.is_file():
            raise UserFacingError(f"--init_from {source}: {needed} is missing")
    return folder / CONFIG_FILE, weights


def _download(repo: str) -> tuple[Path, Path]:
    """The two files from the hub, through huggingface_hub's cache (no download if cached)."""
    from huggingface_hub import hf_hub_download  # only this path needs it; it loads slowly
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings would break our one-line errors
    print(f"getting {repo} from the Hugging Face hub, or from its cache ...", flush=True)
    try:
        return tuple(Path(hf_hub_download(repo, name)) for name in (CONFIG_FILE, WEIGHTS_FILE))
    except Exception as err:  # offline, a proxy, a full disk: every cause ends the same way
        raise UserFacingError(
            f"cannot get {repo} from the Hugging Face hub ({type(err).__name__}); offline, put "
            f"its {CONFIG_FILE} and {WEIGHTS_FILE} (from https://huggingface.co/{repo}) in a "
            "folder and pass --init_from=FOLDER"
        ) from None


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json as a dict."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserFacingError(f"{path} cannot be read as JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserFacingError(f"{path} is not a model config (a JSON object)")
    return config


def model_config_from_gpt2(hf: dict[str, Any], base: ModelConfig, source: str) -> ModelConfig:
    """base, with the shape of the GPT-2 model that a Hugging Face config.json describes.

    block_size and dropout stay base's: training may use fewer positions than GPT-2 has.
    """
    if hf.get("model_type") != "gpt2":
        raise UserFacingError(
            f"--init_from {source}: a {hf.get('model_type', 'unknown')!r} model; only GPT-2 "
            "models (model_type 'gpt2') can be loaded"
        )
    n_embd, n_positions = (_whole_number(hf, name, source) for name in ("n_embd", "n_positions"))
    shape = {name: _whole_number(hf, name, source) for name in ("n_layer", "n_head")}
    shape["n_embd"] = n_embd
    named = hf.get("activation_function", "gelu_new")
    activation = ACTIVATIONS.get(named) if isinstance(named, str) else None
    problems = []
    if activation is None:
        problems.append(f"activation {hf.get('activation_function')!r} is not GELU")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner {hf.get('n_inner')} is not 4 x n_embd")
    epsilon = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(epsilon, int | float) or not math.isclose(epsilon, 1e-5):
        problems.append("layer_norm_epsilon is not 1e-5")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("tie_word_embeddings", True):
        problems.append("its attention scaling or untied head differ from GPT-2's")
    problems += quantization_problems(hf)
    if base.block_size > n_positions:
        problems.append(f"block_size {base.block_size} exceeds its {n_positions} positions")
    if problems:
        raise UserFacingError(f"--init_from {source}: {'; '.join(problems)}")
    try:
        return dataclasses.replace(
            base, **shape, position="learned", bias=True, activation=activation
        )
    except ValueError as err:
        raise UserFacingError(f"--init_from {source}: {err}") from None


FLOAT_DTYPES = (None, "auto", "float32", "float16", "bfloat16", "float64")


def quantization_problems(hf: dict[str, Any]) -> list[str]:
    """What in a config.json says that its weights are not floating-point numbers."""
    problems = []
    quantized = hf.get("quantization_config")
    if quantized is not None:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized
        problems.append(f"its weights are quantized ({method!r:.40}), not floating-point")
    for key in ("torch_dtype", "dtype"):
        if hf.get(key) not in FLOAT_DTYPES:
            problems.append(f"its {key} is {hf[key]!r:.40}, not floating-point")
    return problems


def _whole_number(hf: dict[str, Any], name: str, source: str) -> int:
    """A shape entry of a Hugging Face config.json: present, a JSON integer, at least 1."""
    if name not in hf:
        raise UserFacingError(f"--init_from {source}: config.json lacks {name!r}")
    value = hf[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserFacingError(
            f"--init_from {source}: config.json's {name} must be a whole number >= 1, "
            f"got {value!r:.40}"
        )
    return value


def _gpt2_names(n_layer: int) -> Iterator[tuple[str, str, bool]]:
    """(GPT-2 name, our name, stored transposed) for every weight but the tied head."""
    yield "wte.weight", "token_embedding.weight", False
    yield "wpe.weight", "position_embedding.weight", False
    pairs = [
        ("ln_1", "norm_1", False),
        ("attn.c_attn", "attn.qkv_proj", True),
        ("attn.c_proj", "attn.out_proj", True),
        ("ln_2", "norm_2", False),
        ("mlp.c_fc", "mlp.fc_in", True),
        ("mlp.c_proj", "mlp.fc_out", True),
    ]
    for i in range(n_layer):
        for theirs, ours, conv1d in pairs:
            yield f"h.{i}.{theirs}.weight", f"blocks.{i}.{ours}.weight", conv1d
            yield f"h.{i}.{theirs}.bias", f"blocks.{i}.{ours}.bias", False
    yield "ln_f.weight", "final_norm.weight", False
    yield "ln_f.bias", "final_norm.bias", False


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (a format of plain arrays: no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise UserFacingError(f"{path} is not a readable .safetensors file ({err})") from None


def load_gpt2_weights(model: GPT, weights: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    """Copy GPT-2's weights (Hugging Face names) into model, whose config matches them.

    A fitted vocabulary takes the embedding rows of the GPT-2 ids it keeps, in its own order.
    """
    weights = {name.removeprefix("transformer."): tensor for name, tensor in weights.items()}
    expected = model.state_dict()
    state = {}
    for theirs, ours, conv1d in _gpt2_names(model.config.n_layer):
        if theirs not in weights:
            raise UserFacingError(f"the GPT-2 weights lack {theirs}")
        tensor = weights[theirs]
        if not tensor.is_floating_point():  # int8 or int4: quantized, and needs its scales
            raise UserFacingError(
                f"the GPT-2 weight {theirs} is stored as {str(tensor.dtype).removeprefix('torch.')}"
                ", not as floating-point numbers (a quantized model?); --init_from needs the "
                "float32, float16 or bfloat16 model"
            )
        if not torch.isfinite(tensor).all():
            raise UserFacingError(f"the GPT-2 weight {theirs} is not all finite numbers")
        if conv1d and tensor.dim() == 2:
            tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
        if ours == "token_embedding.weight" and isinstance(tokenizer, FittedBPETokenizer):
            if tensor.dim() != 2 or tensor.size(0) <= int(tokenizer.gpt2_ids.max()):
                raise UserFacingError(f"{theirs} has {tensor.size(0)} rows, fewer than GPT-2's")
            tensor = tensor[torch.from_numpy(tokenizer.gpt2_ids)]
        if ours == "position_embedding.weight":
            tensor = tensor[: model.config.block_size]
        if tensor.shape != expected[ours].shape:
            raise UserFacingError(
                f"the GPT-2 weight {theirs} has shape {tuple(tensor.shape)}, where config.json's "
                f"model needs {tuple(expected[ours].shape)}"
            )
        state[ours] = tensor
    state["lm_head.weight"] = state["token_embedding.weight"]  # tied, as in GPT-2
    model.load_state_dict(state)


@dataclasses.dataclass(frozen=True)
class PretrainedGPT2:
    """The GPT-2 model --init_from names: its shape in our terms, and where its weights are."""

    config: ModelConfig
    weights: Path


def pretrained_gpt2(source: str, base: ModelConfig, tokenizer: Tokenizer) -> PretrainedGPT2:
    """Find (or download) --init_from's model and read its shape; the weights wait.

    Knowing the shape first lets training check the memory before reading 0.5-6 GB of weights.
    """
    if isinstance(tokenizer, TrainedBPETokenizer):
        raise UserFacingError(
            "--init_from reads GPT-2's tokens, not a learned vocabulary: use --bpe_vocabulary "
            "fitted or full"
        )
    if not isinstance(tokenizer, BPETokenizer | FittedBPETokenizer):
        raise UserFacingError("--init_from needs --tokenizer=bpe: GPT-2 reads GPT-2 tokens")
    config_path, weights_path = pretrained_files(source)
    return PretrainedGPT2(
        model_config_from_gpt2(read_config(config_path), base, source), weights_path
    )


# ----------------------------------------------------------------------------------------------
# Writing a model as a Hugging Face folder


def _bias(state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """A layer's bias; zeros where the model has none (bias=False), which sum the same."""
    bias = state.get(layer + ".bias")
    return bias if bias is not None else torch.zeros(state[layer + ".weight"].size(0))


def gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """A learned-position model's weights under GPT2LMHeadModel's names."""
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    tensors = {}
    for theirs, ours, conv1d in _gpt2_names(model.config.n_layer):
        if ours.endswith(".bias"):
            tensor = _bias(state, ours.removesuffix(".bias"))
        else:
            tensor = state[ours].t() if conv1d else state[ours]
        tensors["transformer." + theirs] = tensor.contiguous()
    return tensors


def gpt2_config(config: ModelConfig, end_of_text: int | None) -> dict[str, Any]:
    """config.json of GPT2LMHeadModel for a learned-position model."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
    }


def neox_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """A rotary model's weights under GPTNeoXForCausalLM's names."""
    c = model.config
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    tensors = {"gpt_neox.embed_in.weight": state["token_embedding.weight"]}

    def linear(theirs: str, ours: str) -> None:
        weight = state[ours + ".weight"]
        tensors[theirs + ".weight"] = weight
        tensors[theirs + ".bias"] = _bias(state, ours)

    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        linear(theirs + "input_layernorm", ours + "norm_1")
        # Ours: rows [q of every head | k of every head | v of every head]; NeoX: per head,
        # [q | k | v]. (3, nh, hs, C) -> (nh, 3, hs, C).
        head_size = c.n_embd // c.n_head
        qkv = state[ours + "attn.qkv_proj.weight"].view(3, c.n_head, head_size, c.n_embd)
        qkv_bias = _bias(state, ours + "attn.qkv_proj")
        tensors[theirs + "attention.query_key_value.weight"] = qkv.transpose(0, 1).reshape(
            3 * c.n_embd, c.n_embd
        )
        tensors[theirs + "attention.query_key_value.bias"] = (
            qkv_bias.view(3, c.n_head, head_size).transpose(0, 1).reshape(3 * c.n_embd)
        )
        linear(theirs + "attention.dense", ours + "attn.out_proj")
        linear(theirs + "post_attention_layernorm", ours + "norm_2")
        linear(theirs + "mlp.dense_h_to_4h", ours + "mlp.fc_in")
        linear(theirs + "mlp.dense_4h_to_h", ours + "mlp.fc_out")
    linear("gpt_neox.final_layer_norm", "final_norm")
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def neox_config(config: ModelConfig, end_of_text: int | None) -> dict[str, Any]:
    """config.json of GPTNeoXForCausalLM for a rotary model.

    Rotary on every channel, the sequential residual (not NeoX's parallel one), tied embedding.
    """
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": 4 * config.n_embd,
        "hidden_act": "gelu_pytorch_tanh" if config.activation == "gelu_tanh" else "gelu",
        "max_position_embeddings": config.block_size,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": ROTARY_BASE,
            "partial_rotary_factor": 1.0,
        },
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": False,
        "attention_bias": True,  # zeros where the model has no bias
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
    }


@functools.cache
def _byte_characters() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: a printable character standing for each of the 256 bytes.

    Printable Latin-1 bytes stand for themselves; the others (controls, space) take the
    characters from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    characters, spare = {}, 0x100
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte], spare = chr(spare), spare + 1
    return tuple(characters[byte] for byte in range(256))


def spelled(token: bytes) -> str:
    """A token's bytes in the tokenizers library's byte-level spelling."""
    alphabet = _byte_characters()
    return "".join(alphabet[byte] for byte in token)


def gpt2_vocabulary_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocabulary and merges in the tokenizers library's byte-level spelling.

    They are rebuilt from the ranks file: the token of rank r merges the two parts that
    byte-pair encoding with the ranks below r leaves of its bytes.
    """
    ranks = load_gpt2_ranks()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([byte]) for byte in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(pairwise(parts))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((spelled(parts[0]), spelled(parts[1])))
    vocabulary = {spelled(token): rank for token, rank in ranks.items()}
    vocabulary[END_OF_TEXT] = len(vocabulary)
    return vocabulary, merges


def hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """A tokenizers.Tokenizer that splits text exactly as ours does, or None where none fits.

    GPT-2's full vocabulary is GPT-2's own byte-level BPE. A character vocabulary is a BPE with
    no merges: every character is a token. A learned vocabulary is a byte-level BPE with its own
    merges. A fitted vocabulary has no such equivalent (its tokens are GPT-2's, but text
    outside it is spelled in bytes after GPT-2's merges), so it gets none.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if isinstance(tokenizer, CharTokenizer):
        vocabulary = {char: i for i, char in enumerate(tokenizer.chars)}
        hf = HFTokenizer(models.BPE(vocab=vocabulary, merges=[]))
        hf.decoder = decoders.Fuse()  # join the characters with nothing between them
        return hf
    if isinstance(tokenizer, BPETokenizer):
        vocabulary, merges = gpt2_vocabulary_and_merges()
        hf = HFTokenizer(models.BPE(vocab=vocabulary, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([END_OF_TEXT])
        return hf
    if isinstance(tokenizer, TrainedBPETokenizer):
        tokens = tokenizer.vocabulary
        vocabulary = {spelled(token): i for i, token in enumerate(tokens)}
        merges = [
            (spelled(tokens[left]), spelled(tokens[right])) for left, right in tokenizer.merges
        ]
        hf = HFTokenizer(models.BPE(vocab=vocabulary, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        return hf
    return None


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def write_hf_folder(model: GPT, tokenizer: Tokenizer, folder: Path) -> str:
    """Write model (and its tokenizer, where one fits) as a Hugging Face folder.

    Returns the transformers class that loads it.
    """
    from safetensors.torch import save_file

    config = model.config
    end_of_text = GPT2_END_OF_TEXT if isinstance(tokenizer, BPETokenizer) else None
    if config.position == "learned":
        architecture, tensors = "GPT2LMHeadModel", gpt2_tensors(model)
        hf_config = gpt2_config(config, end_of_text)
    else:
        architecture, tensors = "GPTNeoXForCausalLM", neox_tensors(model)
        hf_config = neox_config(config, end_of_text)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    write_atomically(folder / CONFIG_FILE, _json_bytes(hf_config))
    hf = hf_tokenizer(tokenizer)
    if hf is not None:
        hf.save(str(folder / TOKENIZER_FILE))
        special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT} if end_of_text else {}
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.block_size,
            **special,
        }
        write_atomically(folder / TOKENIZER_CONFIG_FILE, _json_bytes(tokenizer_config))
    elif isinstance(tokenizer, FittedBPETokenizer):
        write_atomically(folder / FITTED_IDS_FILE, _json_bytes(tokenizer.gpt2_ids.tolist()))
    return architecture
