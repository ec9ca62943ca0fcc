"""The one place where the model, data, training and sampling settings live.

Edit the defaults below to experiment, or override any of them on the command line:

    python train_model.py --n_layer=6 --n_embd=192 --max_iters=3000
    python train_model.py --tokenizer bpe --data my_text.txt
    python generate_text.py --temperature=0.8 --top_k=40

Each setting is a dataclass field with a default and a help text; the command-line options,
their types, choices and `--help` are all derived from these fields, and a trained model
carries its settings inside its checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from support.validation import field_problems, raise_if_any

MAX_SEED = 2**62  # torch seeds are 64-bit; headroom for the seed + rank + step sums
MIN_TEMPERATURE = 1e-4  # below this, logits / temperature overflows float32


def setting(default: Any, help: str, escapes: bool = False) -> Any:
    """A dataclass field whose help text is data, so the CLI and the tests can read it.

    With escapes, a backslash-n or backslash-t typed on the command line becomes a newline or
    a tab (for text such as a prompt; never for paths).
    """
    return field(default=default, metadata={"help": help, "escapes": escapes})


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer."""

    n_layer: int = setting(4, "transformer blocks; 2..12")
    n_head: int = setting(4, "attention heads per block; must divide n_embd")
    n_embd: int = setting(128, "width of the residual stream; 64..768")
    block_size: int = setting(256, "context length in tokens; 32..1024")
    dropout: float = setting(0.0, "dropout probability during training; 0..0.3")
    bias: bool = setting(True, "use bias in Linear and LayerNorm layers, as GPT-2 does")
    attention: Literal["sdpa", "manual"] = setting(
        "sdpa", "attention kernel: fused scaled_dot_product_attention, or the manual reference"
    )
    position: Literal["rope", "learned"] = setting(
        "rope", "how positions are told apart: rotary embeddings (RoPE), or a learned vector each"
    )
    activation: Literal["gelu", "gelu_tanh"] = setting(
        "gelu", "feed-forward nonlinearity: exact GELU, or GPT-2's tanh approximation of it"
    )
    vocab_size: int = setting(0, "set from the tokenizer when training starts; not an option")

    def __post_init__(self) -> None:
        raise_if_any(field_problems(self))  # a wrong type would break the range checks below
        problems = []
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head >= 1 and self.n_embd % self.n_head != 0:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        head_size = self.n_embd // self.n_head if self.n_head >= 1 else 0
        if self.position == "rope" and head_size % 2 != 0:
            problems.append(f"rope needs an even head size (n_embd / n_head), got {head_size}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.vocab_size < 0:
            problems.append(f"vocab_size must be >= 0, got {self.vocab_size}")
        raise_if_any(problems)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    data: str = setting("", "path to a UTF-8 text file; empty = input.txt, else Tiny Shakespeare")
    tokenizer: Literal["char", "bpe"] = setting(
        "char", "char: one token per character; bpe: GPT-2's byte-pair encoding"
    )
    bpe_vocabulary: Literal["fitted", "full", "trained"] = setting(
        "fitted",
        "bpe only: fitted keeps the GPT-2 tokens the training text uses (see bpe_min_count) "
        "and GPT-2's 256 byte tokens, which spell any other; full keeps all 50,257, as "
        "GPT-2's own tokenizer expects; trained learns a vocabulary of bpe_vocab_size tokens "
        "from the training text",
    )
    bpe_vocab_size: int = setting(
        1024,
        "trained bpe only: the 256 byte tokens plus the merges learned from the training "
        "text; 512..8192 (at most 65,536)",
    )
    bpe_min_count: int = setting(
        1,
        "fitted bpe only: keep a GPT-2 token the training text uses at least this often; a "
        "rarer one is spelled in byte tokens in the training text too, which teaches the model "
        "how unseen words are spelled; 1 keeps every token the training text uses",
    )
    bpe_spell_fraction: float = setting(
        0.0,
        "fitted bpe only: share of the training text's tokens spelled in byte tokens instead, "
        "drawn at random (the same ones every run), so the model practises the spellings that "
        "words it has never seen need; 0..0.05",
    )
    val_fraction: float = setting(0.1, "share of the corpus (its end) held out; 0.05..0.2")
    cache_dir: str = setting(".cache", "folder for encoded-corpus caches; empty = no cache")

    def __post_init__(self) -> None:
        raise_if_any(field_problems(self))  # a wrong type would break the range checks below
        problems = []
        if self.bpe_min_count < 1:
            problems.append(f"bpe_min_count must be >= 1, got {self.bpe_min_count}")
        if not 257 <= self.bpe_vocab_size <= 2**16:
            problems.append(f"bpe_vocab_size must be in 257..65536, got {self.bpe_vocab_size}")
        if not 0.0 <= self.bpe_spell_fraction < 1.0:
            problems.append(f"bpe_spell_fraction must be in [0, 1), got {self.bpe_spell_fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        raise_if_any(problems)


@dataclass(frozen=True)
class TrainConfig:
    """How long and how fast to learn, where to write results, on which device."""

    batch_size: int = setting(8, "sequences per micro-batch; 4..64 on a CPU")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step; 1..8")
    sequences_per_pass: int = setting(
        0,
        "sequences in one forward and backward pass; a micro-batch takes as many passes as it "
        "needs, with the same gradient up to rounding (and dropout's random masks); 0 = the "
        "whole micro-batch on a GPU, equal passes of at most 2,048 tokens on a CPU (faster: "
        "each operation's tensors stay small enough for its caches)",
    )
    max_iters: int = setting(4000, "optimizer steps in total; 1000..20000")
    learning_rate: float = setting(
        5e-3,
        "peak step size; muon 2e-3..1e-2 (2e-2..3e-2 for a few hundred steps), adamw 1e-3..3e-3",
    )
    min_lr_fraction: float = setting(0.1, "the cosine decay ends at this share of learning_rate")
    warmup_iters: int = setting(100, "steps of linear warmup from near 0 to learning_rate")
    weight_decay: float = setting(0.3, "decay of weight matrices only (not biases, gains); 0..0.5")
    beta1: float = setting(0.9, "AdamW first-moment decay")
    beta2: float = setting(0.99, "AdamW second-moment decay; 0.95..0.999")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 disables")
    weight_average: float = setting(
        0.0,
        "keep a moving average of the weights, decay per step: 0.995 spans about the last 200 "
        "steps; evaluations, checkpoints and generation use it; 0 = off",
    )
    eval_interval: int = setting(250, "evaluate and checkpoint every this many steps")
    eval_iters: int = setting(20, "batches per split when estimating the loss")
    log_interval: int = setting(10, "refresh the progress bar's loss every this many steps")
    out_dir: str = setting(
        "", "run folder; empty: a new one under out/ to train, out/'s latest to resume or sample"
    )
    resume: bool = setting(False, "continue out_dir's run (no out_dir: the latest run)")
    overwrite: bool = setting(False, "start a new run in an out_dir that holds one, replacing it")
    device: Literal["auto", "cpu", "cuda", "mps"] = setting(
        "auto", "auto tries cuda, then mps, then cpu"
    )
    processes: int = setting(
        1,
        "training processes on this machine, each on batches of its own with the gradients "
        "averaged: a step learns from processes x batch_size x gradient_accumulation_steps "
        "sequences; one GPU each on CUDA (several machines: torchrun, see "
        "docs/multiple-processes.md)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "auto: bfloat16 (or float16) autocast on CUDA, float32 elsewhere"
    )
    compile: bool = setting(
        False,
        "wrap the model in torch.compile (falls back if it fails); generate_text.py compiles "
        "its one-token step first (seconds to tens of seconds), then each token is faster: "
        "worth it for long texts",
    )
    optimizer: Literal["muon", "adamw"] = setting(
        "muon", "muon for the blocks' matrices and adamw for the rest, or adamw for all weights"
    )
    seed: int = setting(1337, "random seed: same seed, same run and same samples; 0..2**62")
    init_from: str = setting(
        "",
        "start from GPT-2's weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face "
        "folder or .safetensors file of a GPT-2 model; its shape replaces n_layer, n_head, "
        "n_embd, position, bias and activation; empty = random weights",
    )

    def __post_init__(self) -> None:
        raise_if_any(field_problems(self))  # a wrong type would break the range checks below
        problems = []
        at_least_one = (
            "batch_size",
            "gradient_accumulation_steps",
            "max_iters",
            "eval_interval",
            "eval_iters",
            "log_interval",
            "processes",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sequences_per_pass < 0:
            problems.append(f"sequences_per_pass must be >= 0, got {self.sequences_per_pass}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_fraction <= 1:
            problems.append(f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}")
        for name in ("warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "weight_average"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be in 0..2**62, got {self.seed}")
        raise_if_any(problems)


@dataclass(frozen=True)
class SampleConfig:
    """How to draw text from a trained model."""

    ckpt: str = setting("", "checkpoint file to sample from; empty = out_dir's best checkpoint")
    prompt: str = setting("\n", "text the samples continue from (\\n: a newline)", escapes=True)
    prompt_file: str = setting("", "read the prompt from this UTF-8 file instead")
    num_samples: int = setting(1, "how many samples to draw; 1..10")
    max_new_tokens: int = setting(500, "tokens to generate per sample; 1..100000")
    temperature: float = setting(
        0.8, "0 = always the likeliest token, else at least 1e-4; 0.5..1.2 for variety"
    )
    top_k: int = setting(0, "sample only from the k likeliest tokens; 0 disables")
    top_p: float = setting(
        1.0, "sample from the smallest set with this much probability; 1 disables"
    )
    use_cache: bool = setting(True, "reuse keys/values of earlier tokens (same text, faster)")
    precision: Literal["float32", "bfloat16", "int8"] = setting(
        "float32",
        "number type of the weights; bfloat16 halves their memory (and the cache's) but "
        "is often slower on CPUs without bfloat16 instructions; int8 stores the blocks' "
        "linear layers in a quarter of the bytes, for long texts on a CPU (with --compile)",
    )

    def __post_init__(self) -> None:
        raise_if_any(field_problems(self))  # a wrong type would break the range checks below
        problems = []
        if not 1 <= self.num_samples <= 10:
            problems.append(f"num_samples must be in 1..10, got {self.num_samples}")
        if not 1 <= self.max_new_tokens <= 100_000:
            problems.append(f"max_new_tokens must be in 1..100000, got {self.max_new_tokens}")
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= 100:
            problems.append(
                f"temperature must be 0 or in [{MIN_TEMPERATURE}, 100], got {self.temperature}"
            )
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        raise_if_any(problems)


CONFIG_CLASSES = (ModelConfig, DataConfig, TrainConfig, SampleConfig)


@dataclass(frozen=True)
class RunSettings:
    """Everything a training run is made with: its model, its data and how it trains."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The settings as plain dicts, as config.json shows them."""
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }


# ----------------------------------------------------------------------------------------------
# Presets: the defaults above, changed for one kind of run. An option typed on the command line
# always wins; a run that uses a preset prints, at start, each value it takes from it that
# differs from the defaults above, so an edit up there is never silently overruled.

# --tokenizer=bpe. A GPT-2 token carries about three characters, so Tiny Shakespeare is only
# about 300,000 training tokens: a model soon sees all of them and starts to learn the text by
# heart. Small AdamW steps on short contexts, with dropout, overfit least; Muon's fast steps,
# which win with characters, overfit sooner. A token the training text uses only once is
# spelled in byte tokens (bpe_min_count 2), and a few other tokens at random (bpe_spell_fraction)
# too, so that the model learns how words it has never seen are spelled (docs/tokenizers.md).
BPE_PRESET: dict[str, Any] = {
    "bpe_min_count": 2,
    "bpe_spell_fraction": 0.02,
    "block_size": 64,
    "batch_size": 12,
    "dropout": 0.2,
    "optimizer": "adamw",
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
    "max_iters": 6000,
    "eval_interval": 1000,
}

# --tokenizer=bpe --bpe_vocabulary=trained. A vocabulary of 1,024 tokens learned from the
# training text (bpe_vocab_size) carries about 2.4 characters a token: Tiny Shakespeare is about
# 410,000 training tokens, and a context of 256 tokens spans about 600 characters. The
# character defaults' Muon steps suit it, with a little dropout against learning the text by
# heart and a moving average of the weights. The ten-minute comparison of vocabularies that
# chose it is in docs/tokenizers.md.
TRAINED_BPE_PRESET: dict[str, Any] = {
    "dropout": 0.1,
    "weight_average": 0.995,
    "max_iters": 3400,
    "eval_interval": 1000,
}

# --init_from=gpt2 (or another GPT-2). The weights already know English: small, careful AdamW
# steps adapt them without wiping that out. The context stays block_size (256 of GPT-2's 1,024
# positions), which keeps a 124M-parameter model's steps affordable on a CPU.
FINE_TUNING_PRESET: dict[str, Any] = {
    "tokenizer": "bpe",
    "bpe_min_count": 1,  # GPT-2 knows every token: keep all that the training text uses
    "bpe_spell_fraction": 0.0,  # and read the text as GPT-2 does
    "dropout": 0.1,
    "batch_size": 4,
    "max_iters": 200,
    "optimizer": "adamw",
    "learning_rate": 3e-5,
    "warmup_iters": 10,
    "weight_decay": 0.1,
    "eval_interval": 50,
    "eval_iters": 10,
}

# Each preset and the option that selects it, as --help and the start-up line name them.
PRESETS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--tokenizer=bpe", BPE_PRESET),
    ("--init_from", FINE_TUNING_PRESET),
    ("--tokenizer=bpe --bpe_vocabulary=trained", TRAINED_BPE_PRESET),
)

# What --init_from takes from the pretrained model, so these options cannot be given with it.
PRETRAINED_SHAPE = ("n_layer", "n_head", "n_embd", "position", "bias", "activation")


def preset_for(given: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The preset for the kind of run the given options describe, with its option, or None."""
    if given.get("init_from"):
        return PRESETS[1]
    if given.get("tokenizer", DataConfig.tokenizer) == "bpe":  # also when edited to be the default
        trained = given.get("bpe_vocabulary", DataConfig.bpe_vocabulary) == "trained"
        return PRESETS[2] if trained else PRESETS[0]
    return None
