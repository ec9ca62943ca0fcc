"""Write text with a trained model, streamed to the terminal as it is generated.

    python generate_text.py                  # the latest run's best checkpoint
    python generate_text.py --prompt "ROMEO:" --max_new_tokens 300 --temperature 0.7
    python generate_text.py --out_dir out/run-20261123-101500 --num_samples 3 --top_k 40
    python generate_text.py --ckpt my_model.pth --seed 7

Everything about the model (its shape and tokenizer) comes from the checkpoint; the same
checkpoint, prompt, settings and seed always give the same text.
"""

from __future__ import annotations

import signal

# Ctrl-C while the libraries below still load: the default action ends the program at once,
# without a traceback (Python's KeyboardInterrupt comes back before main runs).
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from hyperparameters import SampleConfig, TrainConfig
from model_architecture import GPT, generate
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.command_line import build_parser, parse_configs
from support.common import UserFacingError, print_error
from support.devices import compile_token_step, resolve_device
from support.fast_paths import for_inference
from support.run_folder import checkpoint_to_sample
from tokenization import Tokenizer, check_unicode, stream_decode

PROG = "generate_text.py"
SAMPLE_SEPARATOR = "\n" + "-" * 40 + "\n"
MAX_PROMPT_FILE_BYTES = 1 << 20  # the model reads block_size tokens of it at most anyway
# Control characters other than newline and tab would steer a terminal; shown escaped there.
CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in [*range(32), 127] if code not in (9, 10)}


def read_prompt(config: SampleConfig, given: dict[str, Any]) -> str:
    """The prompt text, from --prompt_file if given, else --prompt."""
    if config.prompt_file and "prompt" in given:
        raise UserFacingError("give --prompt or --prompt_file, not both")
    prompt = read_prompt_file(Path(config.prompt_file)) if config.prompt_file else config.prompt
    if not prompt:
        raise UserFacingError("the prompt is empty; give at least one character with --prompt")
    check_unicode(prompt, "the prompt")
    return prompt


def read_prompt_file(path: Path) -> str:
    """A prompt file's text: a regular UTF-8 file of at most MAX_PROMPT_FILE_BYTES."""
    if path.exists() and not path.is_file():  # a pipe or a device could block or never end
        raise UserFacingError(f"prompt file {path} is not a regular file")
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise UserFacingError(
                f"prompt file {path} is larger than {MAX_PROMPT_FILE_BYTES:,} bytes"
            )
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserFacingError(f"cannot read prompt file {path} ({err})") from None


def shown(text: str) -> str:
    """Text as it goes to the terminal: control characters (but newline and tab) escaped."""
    return text.translate(CONTROL_CHARACTERS) if sys.stdout.isatty() else text


def write_sample(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    config: SampleConfig,
    generator: torch.Generator,
    token_step: torch.nn.Module | None = None,
) -> None:
    """Write the prompt, then each new piece of text as soon as it is generated."""
    sys.stdout.write(shown(tokenizer.decode(prompt_ids)))
    new_ids = generate(
        model,
        prompt_ids,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        generator=generator,
        use_cache=config.use_cache,
        token_step=token_step,
    )
    for piece in stream_decode(tokenizer, new_ids):
        sys.stdout.write(shown(piece))
        sys.stdout.flush()


def command_line() -> argparse.ArgumentParser:
    """The sampling settings of hyperparameters.py, and where the model comes from."""
    return build_parser(
        __doc__, [(SampleConfig, None), (TrainConfig, ["out_dir", "device", "seed", "compile"])]
    )


def main(argv: list[str] | None = None) -> int:
    """Generate from the command line; returns the exit status."""
    try:
        (sample_config, train_config), given = parse_configs(
            command_line(), [SampleConfig, TrainConfig], argv
        )
        if sys.stdout is None:
            raise UserFacingError("the output is closed: nowhere to write the text")
        if train_config.compile and not sample_config.use_cache:
            raise UserFacingError("--compile needs --use_cache: it compiles the one-token step")
        device = resolve_device(train_config.device)
        checkpoint = load_checkpoint(checkpoint_to_sample(sample_config.ckpt, train_config.out_dir))
        model, tokenizer = model_from_checkpoint(checkpoint, device)
        # The same math, computed faster in the chosen number type (support/fast_paths.py).
        model = for_inference(model, sample_config.precision)
        prompt_ids = tokenizer.encode(read_prompt(sample_config, given))
    except UserFacingError as err:
        print_error(PROG, err)
        return 2
    # An output that cannot encode every character (PYTHONIOENCODING=ascii) shows it escaped.
    sys.stdout.reconfigure(errors="backslashreplace")
    generator = torch.Generator(device=device).manual_seed(train_config.seed)
    try:
        token_step = None
        if train_config.compile:
            token_step = compile_token_step(model, announce=announce_compiling)
        for sample in range(sample_config.num_samples):
            if sample > 0:
                sys.stdout.write(SAMPLE_SEPARATOR)
            write_sample(model, tokenizer, prompt_ids, sample_config, generator, token_step)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`, which stopped reading: not an error
        discard_output()
    except OSError as err:  # a full disk, a closed file
        discard_output()
        print_error(PROG, OSError(f"cannot write the text ({err.strerror or err})"))
        return 1
    return 0


def announce_compiling() -> None:
    """Say why the first token takes a while."""
    print(f"{PROG}: compiling the model (torch.compile)...", file=sys.stderr, flush=True)


def discard_output() -> None:
    """Point stdout at /dev/null, so that Python's final flush does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C as usual again
    raise SystemExit(main())
