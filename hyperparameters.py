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

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from common import UserFacingError

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
    bpe_vocabulary: Literal["fitted", "full"] = setting(
        "fitted",
        "bpe only: fitted keeps the GPT-2 tokens the training text uses (see bpe_min_count) "
        "and GPT-2's 256 byte tokens, which spell any other; full keeps all 50,257, as "
        "GPT-2's own tokenizer expects",
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
        5e-3, "peak step size; muon 2e-3..1e-2 (2e-2 for a few hundred steps), adamw 1e-3..3e-3"
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
        "generated more slowly on the CPUs measured; int8 stores the blocks' "
        "linear layers in a quarter of the bytes: faster on a CPU (with --compile)",
    )

    def __post_init__(self) -> None:
        raise_if_any(field_problems(self))  # a wrong type would break the range checks below
        problems = []
        if self.num_samples < 1:
            problems.append(f"num_samples must be >= 1, got {self.num_samples}")
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


def settings_for_resume(saved: RunSettings, given: dict[str, Any], out_dir: str) -> RunSettings:
    """A resumed run's settings: the saved ones, changed by the options given now where allowed.

    The model, the data and the optimizer cannot change (a contradicting option is a user
    error); other training settings (max_iters, learning_rate, ...) may; out_dir is where the
    checkpoint was found, and --data may point at a corpus that moved.
    """
    fixed = {
        **dataclasses.asdict(saved.model),
        **dataclasses.asdict(saved.data),
        "optimizer": saved.train.optimizer,
        "init_from": saved.train.init_from,
    }
    conflicts = [
        name
        for name, value in fixed.items()
        if name in given and name != "data" and given[name] != value
    ]
    if conflicts:
        raise UserFacingError(
            f"--resume keeps the saved run's {', '.join(conflicts)}; drop those options or "
            "start a new run in another --out_dir"
        )
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    changes = {name: value for name, value in given.items() if name in train_fields}
    try:
        train = dataclasses.replace(saved.train, **{**changes, "out_dir": out_dir, "resume": True})
    except ValueError as err:
        raise UserFacingError(f"the saved run's settings are not valid ({err})") from None
    data = dataclasses.replace(saved.data, data=given.get("data", saved.data.data))
    return RunSettings(model=saved.model, data=data, train=train)


# ----------------------------------------------------------------------------------------------
# Defaults that depend on the kind of run. Each table below replaces some of the defaults above
# for one kind of run; an option typed on the command line always wins, and --help shows both.

# --tokenizer=bpe. A GPT-2 token carries about three characters, so Tiny Shakespeare is only
# about 300,000 training tokens: a model sees all of them in a minute or two and then starts to
# learn the text by heart. Small AdamW steps on short contexts, with dropout, overfit least;
# Muon's fast steps, which win with characters, overfit sooner. A token the training text uses
# only once is spelled in byte tokens (bpe_min_count 2), so the model learns how the words it
# has never seen are spelled: worth 0.14 nats per character; spelling 2% of the other tokens
# as well gives it more practice: another 0.02. Chosen by comparing runs (README, "Why the BPE
# defaults"): about seven minutes on a 2-core CPU.
BPE_DEFAULTS: dict[str, Any] = {
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

# --init_from=gpt2 (or another GPT-2). The weights already know English: small, careful AdamW
# steps adapt them without wiping that out. The context stays block_size (256 of GPT-2's 1,024
# positions), which keeps a 124M-parameter model's steps affordable on a CPU.
FINE_TUNING_DEFAULTS: dict[str, Any] = {
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

# What --init_from takes from the pretrained model, so these options cannot be given with it.
PRETRAINED_SHAPE = ("n_layer", "n_head", "n_embd", "position", "bias", "activation")

# How --help names each table.
KIND_DEFAULTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--tokenizer=bpe", BPE_DEFAULTS),
    ("--init_from", FINE_TUNING_DEFAULTS),
)


def defaults_for(given: dict[str, Any]) -> dict[str, Any]:
    """The table of defaults for the kind of run the given options describe (maybe empty)."""
    if given.get("init_from"):
        return FINE_TUNING_DEFAULTS
    if given.get("tokenizer", DataConfig.tokenizer) == "bpe":  # also when edited to be the default
        return BPE_DEFAULTS
    return {}


# Filled in from the tokenizer or chosen by the program, never typed by a user.
NOT_OPTIONS = frozenset({"vocab_size"})


def field_problems(config: Any) -> list[str]:
    """Problems any setting can have, whatever its range.

    A value of the wrong type (a checkpoint can hold anything), a choice not on offer, a float
    that is nan or infinite (it would pass every range check).
    """
    problems: list[str] = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                choices = ", ".join(typing.get_args(hint))
                problems.append(f"{f.name} must be one of {choices}, got {value!r:.40}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            continue  # 3 serves as 3.0
        elif not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            problems.append(f"{f.name} must be {hint.__name__}, got {value!r:.40}")
        elif hint is float and not math.isfinite(value):
            problems.append(f"{f.name} must be a finite number, got {value}")
    return problems


def raise_if_any(problems: list[str]) -> None:
    """Report every validation problem at once, as one line."""
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Command line, derived from the dataclass fields


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        """Print `prog: error: message` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_bool(text: str) -> bool:
    """Read true/false, yes/no, 1/0 (any case) as a bool."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def text_arg(text: str) -> str:
    r"""Text whose "\n" and "\t", typed on a shell, become real newlines and tabs."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any) -> None:
    name, default, help = f.name, f.default, f.metadata["help"]
    # default=SUPPRESS keeps untyped options out of the namespace, so we know what was given.
    shown = [_shown(default)]
    shown += [f"{kind}: {_shown(table[name])}" for kind, table in KIND_DEFAULTS if name in table]
    kwargs: dict[str, Any] = {
        "default": argparse.SUPPRESS,
        "help": f"{help} (default: {'; '.join(shown)})",
    }
    if typing.get_origin(hint) is Literal:
        kwargs["choices"] = typing.get_args(hint)
    elif hint is bool:
        kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
    elif hint is str:
        kwargs["type"] = text_arg if f.metadata["escapes"] else str
    else:
        kwargs["type"] = hint
    group.add_argument(f"--{name}", **kwargs)


def build_parser(description: str, groups: list[tuple[type, list[str] | None]]) -> OneLineParser:
    """An argument parser with one `--field` option per dataclass field.

    Args:
        description: shown at the top of `--help`.
        groups: (config class, field names to expose or None for all) pairs; each becomes an
            argument group of `--help`.
    """
    parser = OneLineParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for config_class, only in groups:
        group = parser.add_argument_group(config_class.__name__, config_class.__doc__)
        hints = typing.get_type_hints(config_class)
        for f in dataclasses.fields(config_class):
            if f.name in NOT_OPTIONS or (only is not None and f.name not in only):
                continue
            _add_field(group, f, hints[f.name])
    return parser


def parse_configs(
    parser: OneLineParser, config_classes: list[type], argv: list[str] | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """Parse the command line into one validated instance per config class.

    Returns:
        The configs, in the order of `config_classes`, and the options the user gave
        explicitly (so a resumed run can tell a deliberate override from a default), plus any
        options the parser has beyond the dataclass fields.
    """
    given = vars(parser.parse_args(argv))
    if given.get("init_from") and not given.get("resume"):
        contradicting = [f"--{name}" for name in PRETRAINED_SHAPE if name in given]
        if contradicting:
            parser.error(f"--init_from takes {', '.join(contradicting)} from the pretrained model")
    values = {**defaults_for(given), **given}  # what the user typed wins over either default
    configs = []
    for config_class in config_classes:
        names = {f.name for f in dataclasses.fields(config_class)}
        try:
            configs.append(config_class(**{k: v for k, v in values.items() if k in names}))
        except ValueError as err:
            parser.error(str(err))
    return configs, given
