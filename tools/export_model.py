"""Write a trained model as a Hugging Face folder, for transformers and the tools around it.

    python tools/export_model.py                              # the latest run -> <run folder>/hf
    python tools/export_model.py --out_dir out/run-20261123-101500 --to shakespeare_gpt
    python tools/export_model.py --ckpt my_model.pth --to my_model --overwrite

The folder holds config.json and model.safetensors, which transformers loads as
GPT2LMHeadModel (a model with learned positions) or GPTNeoXForCausalLM (rotary positions):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("shakespeare_gpt")
    tokenizer = AutoTokenizer.from_pretrained("shakespeare_gpt")

Character, full GPT-2 and learned byte-pair vocabularies come with tokenizer.json, which
encodes text exactly as this project does. A fitted GPT-2 vocabulary has no tokenizer of that
kind; its folder holds gpt2_ids.json instead, the GPT-2 id of each of the model's ids.
"""

from __future__ import annotations

import signal

# Ctrl-C while the libraries below still load: the default action ends the program at once,
# without a traceback (Python's KeyboardInterrupt comes back before main runs).
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys
from pathlib import Path

# Run by its path (python tools/export_model.py), Python looks for imports in tools/; the project's
# modules sit one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from hyperparameters import SampleConfig, TrainConfig
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.command_line import build_parser, parse_bool, parse_configs
from support.common import UserFacingError, print_error
from support.hugging_face import (
    CONFIG_FILE,
    FITTED_IDS_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    write_hf_folder,
)
from support.run_folder import EXPORT_FOLDER, EXPORT_MARK, RunFolder, checkpoint_to_sample

PROG = "export_model.py"
# What an export writes; EXPORT_MARK tells a folder it wrote from any other. It writes into the
# run's folder (EXPORT_FOLDER) unless --to says otherwise.
EXPORT_FILES = frozenset(
    {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, FITTED_IDS_FILE, EXPORT_MARK}
)


def is_earlier_export(folder: Path) -> bool:
    """Whether folder holds an export of this script and nothing else."""
    entries = list(folder.iterdir())
    return (folder / EXPORT_MARK).is_file() and all(
        entry.name in EXPORT_FILES and entry.is_file() for entry in entries
    )


def destination(given: str, checkpoint: Path, overwrite: bool) -> Path:
    """--to, or the checkpoint's run folder's hf/, if the export may write there.

    An export replaces only an earlier export (with --overwrite): never a run folder, a folder
    that holds the checkpoint or the current folder, nor one holding files it did not write.
    """
    folder = Path(given) if given else RunFolder.of_checkpoint(checkpoint).path / EXPORT_FOLDER
    if folder.exists() and not folder.is_dir():
        raise UserFacingError(f"{folder} is a file; give --to a folder")
    resolved = folder.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise UserFacingError(f"{folder} is the current folder or holds it; give --to a new folder")
    if resolved in checkpoint.resolve().parents or RunFolder(folder).holds_a_run():
        raise UserFacingError(f"{folder} holds a training run; give --to a new folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return folder
    if not is_earlier_export(folder):
        raise UserFacingError(
            f"{folder} holds files export_model.py did not write; give --to a new folder"
        )
    if not overwrite:
        raise UserFacingError(
            f"{folder} holds an earlier export; --overwrite replaces it, or give another --to"
        )
    return folder


def export(checkpoint_path: Path, folder: Path) -> str:
    """Write the checkpoint's model into folder, replacing it only once complete."""
    checkpoint = load_checkpoint(checkpoint_path)
    model, tokenizer = model_from_checkpoint(checkpoint, torch.device("cpu"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the destination, then swapped in: a failure leaves the old folder whole.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        architecture = write_hf_folder(model, tokenizer, staging)
        (staging / EXPORT_MARK).touch()
        if folder.exists():  # empty, or an earlier export: destination() checked
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return architecture


def command_line() -> argparse.ArgumentParser:
    """Which checkpoint, and where its Hugging Face folder goes."""
    parser = build_parser(__doc__, [(SampleConfig, ["ckpt"]), (TrainConfig, ["out_dir"])])
    parser.add_argument(
        "--to", default="", help="folder to write; empty = hf/ inside the run's folder"
    )
    parser.add_argument(
        "--overwrite",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="replace an earlier export in --to (default: False)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export from the command line; returns the exit status."""
    try:
        (sample_config, train_config), given = parse_configs(
            command_line(), [SampleConfig, TrainConfig], argv
        )
        checkpoint = checkpoint_to_sample(sample_config.ckpt, train_config.out_dir)
        folder = destination(given["to"], checkpoint, given["overwrite"])
        architecture = export(checkpoint, folder)
    except UserFacingError as err:
        print_error(PROG, err)
        return 2
    except OSError as err:  # a full disk, a folder that cannot be written
        print_error(PROG, err)
        return 1
    print(
        f"wrote {folder}: transformers loads it as {architecture} "
        f'(AutoModelForCausalLM.from_pretrained("{folder}"))'
    )
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C as usual again
    raise SystemExit(main())
