"""Write text with a trained model, streamed to the terminal as it is generated.

    python generate_text.py                                  # from out/ckpt_best.pth
    python generate_text.py --prompt "ROMEO:" --max_new_tokens 300 --temperature 0.7
    python generate_text.py --ckpt out/ckpt_last.pth --num_samples 3 --top_k 40 --seed 7

Everything about the model (its shape and tokenizer) comes from the checkpoint; the same
checkpoint, prompt, settings and seed always give the same text.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserFacingError, print_error
from data_handling import Tokenizer, stream_decode
from devices import resolve_device
from hyperparameters import SampleConfig, TrainConfig, build_parser, parse_configs
from model_architecture import GPT, generate
from run_folder import checkpoint_to_sample

PROG = "generate_text.py"
SAMPLE_SEPARATOR = "\n" + "-" * 40 + "\n"


def read_prompt(config: SampleConfig) -> str:
    """The prompt text, from --prompt_file if given, else --prompt."""
    if config.prompt_file:
        try:
            prompt = Path(config.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserFacingError(f"cannot read prompt file {config.prompt_file} ({err})") from None
    else:
        prompt = config.prompt
    if not prompt:
        raise UserFacingError("the prompt is empty; give at least one character with --prompt")
    return prompt


def write_sample(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    config: SampleConfig,
    generator: torch.Generator,
) -> None:
    """Write the prompt, then each new piece of text as soon as it is generated."""
    sys.stdout.write(tokenizer.decode(prompt_ids))
    new_ids = generate(
        model,
        prompt_ids,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        generator=generator,
        use_cache=config.use_cache,
    )
    for piece in stream_decode(tokenizer, new_ids):
        sys.stdout.write(piece)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Generate from the command line; returns the exit status."""
    parser = build_parser(
        __doc__, [(SampleConfig, None), (TrainConfig, ["out_dir", "device", "seed"])]
    )
    try:
        (sample_config, train_config), _ = parse_configs(parser, [SampleConfig, TrainConfig], argv)
        device = resolve_device(train_config.device)
        checkpoint = load_checkpoint(checkpoint_to_sample(sample_config.ckpt, train_config.out_dir))
        model, tokenizer = model_from_checkpoint(checkpoint, device, sample_config.precision)
        prompt_ids = tokenizer.encode(read_prompt(sample_config))
    except UserFacingError as err:
        print_error(PROG, err)
        return 2
    generator = torch.Generator(device=device).manual_seed(train_config.seed)
    try:
        for sample in range(sample_config.num_samples):
            if sample > 0:
                sys.stdout.write(SAMPLE_SEPARATOR)
            write_sample(model, tokenizer, prompt_ids, sample_config, generator)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`, which stopped reading: not an error
        # Point stdout at /dev/null so Python's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
