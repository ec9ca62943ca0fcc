"""Measure how fast this machine trains and generates, and how much memory that takes.

    python tools/bench.py                          # every measurement; figures also in bench.json
    python tools/bench.py --only roof train        # some of them
    python tools/bench.py --metrics                # also: time-to-quality of the latest run
    python tools/bench.py --only --full_val        # the latest run's loss on all validation text
    python tools/bench.py --only --full_val out/run-20261123-101500/ckpt_last.pth   # another model
    python tools/bench.py --threads 4 --json bench_4threads.json
    python tools/bench.py --only train --shapes defaults --compile     # torch.compile's effect
    python tools/bench.py --only --vs-nanogpt ../nanoGPT  # beside a nanoGPT checkout, same work

Measurements (each training and generation case runs in a fresh process, so its peak memory
is its own):
  roof      the float32 matmul rate of a large torch.mm (GFLOP/s): the machine's ceiling for
            training; and the memory bandwidth of a 512 MB copy (GB/s), generation's ceiling
  train     tokens/s, ms per step, achieved GFLOP/s and its share of the roof (MFU), peak RSS
            for nanoGPT's CPU "baby" shape (4 x 128, block 64, batch 12) with characters, with
            GPT-2 BPE and with Tiny Shakespeare's fitted GPT-2 vocabulary, the classic 6 x 384
            (block 256, batch 64), all with AdamW as nanoGPT trains them; the current
            defaults (with their optimizer, and with AdamW); the BPE defaults with the fitted
            and the full vocabulary; GPT-2 124M fine-tuning (--init_from's defaults) with both
  generate  new tokens/s from a 6 x 384 character model with block 256 for 1,000 and 2,000
            tokens: with the key/value cache (float32, bfloat16 and int8 weights; float32 and
            int8 also with the one-token step compiled, as generate_text.py --compile does,
            compiled before timing) and with full recomputation; and 500 cached float32
            tokens from the BPE defaults' model and from GPT-2 124M, each with both
            vocabularies; time to the first token; the bytes read per second (every weight
            and the cache it attends to, once per token) and their share of the bandwidth
  tokenizer seconds to learn a 4,096-token byte-pair vocabulary from the corpus' training
            split (--corpus) with the library (rustbpe) and to encode the whole corpus with it
            (tiktoken); and, on its first 50,000 characters, the reference trainer and
            encoder of tokenization.py beside the library's
  quality   wall time at which a run's validation loss first reached 2.0 ... 1.4 nats/char
No figure here is asserted anywhere: this is a measuring tool, not a test.
"""

from __future__ import annotations

import signal

# Ctrl-C while the libraries below still load: the default action ends the program at once,
# without a traceback (Python's KeyboardInterrupt comes back before main runs).
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys
from pathlib import Path

# Run by its path (python tools/bench.py), Python looks for imports in tools/; the project's
# modules sit one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data_handling import load_splits, read_corpus
from hyperparameters import BPE_PRESET, FINE_TUNING_PRESET, DataConfig, ModelConfig, TrainConfig
from model_architecture import GPT, generate
from optimization import make_optimizer
from support import fast_bpe
from support.checkpoint import TrainingState, load_checkpoint, model_from_checkpoint, saved_settings
from support.common import UserFacingError, print_error, write_atomically
from support.devices import compile_token_step, keep_freed_memory, sequences_per_pass
from support.fast_paths import PRECISIONS, Int8Linear, for_inference, for_training
from support.run_folder import RunFolder, latest_run
from support.training_log import bits_per_char, first_reached, nats_per_char, read_history
from tokenization import GPT2_SPLIT_PATTERN, TrainedBPETokenizer, encode_with_merges, learn_merges
from tools import vs_nanogpt
from train_model import Run, train_step

CHARS, GPT2_TOKENS = 65, 50257  # vocabulary sizes: Tiny Shakespeare's characters, GPT-2 BPE
# The fitted GPT-2 vocabularies of Tiny Shakespeare's training split (val_fraction 0.1): the
# 11,265 GPT-2 tokens it uses (bpe_min_count 1, as GPT-2 fine-tuning keeps them) or the 7,672
# it uses at least twice (bpe_min_count 2, the BPE defaults'), each with the byte tokens among
# GPT-2's 256 that it leaves out.
FITTED_GPT2_TOKENS = 11459
FITTED_TWICE_GPT2_TOKENS = 7867
SIX_BY_384 = ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=CHARS)
# The shapes nanoGPT publishes, built and trained its way: learned positions, AdamW.
BABY = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, position="learned")
LIKE_NANOGPT = TrainConfig(optimizer="adamw")
TRAIN_SHAPES = {
    "baby 4x128 T64 B12": (
        dataclasses.replace(BABY, vocab_size=CHARS),
        dataclasses.replace(LIKE_NANOGPT, batch_size=12),
    ),
    "baby, GPT-2 BPE": (
        dataclasses.replace(BABY, vocab_size=GPT2_TOKENS),
        dataclasses.replace(LIKE_NANOGPT, batch_size=12),
    ),
    "baby, fitted GPT-2 BPE": (
        dataclasses.replace(BABY, vocab_size=FITTED_GPT2_TOKENS),
        dataclasses.replace(LIKE_NANOGPT, batch_size=12),
    ),
    "6x384 T256 B64": (
        dataclasses.replace(SIX_BY_384, position="learned"),
        dataclasses.replace(LIKE_NANOGPT, batch_size=64),
    ),
    "defaults": (ModelConfig(vocab_size=CHARS), TrainConfig()),
    "defaults with AdamW": (ModelConfig(vocab_size=CHARS), TrainConfig(optimizer="adamw")),
}


def with_defaults(config_class: type, table: dict[str, Any], **changes: Any) -> Any:
    """config_class's defaults, changed by a table of hyperparameters.py and by changes."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{**{k: v for k, v in table.items() if k in names}, **changes})


# The BPE defaults (hyperparameters.BPE_PRESET), with the fitted and the full vocabulary.
for _vocabulary, _size in (("fitted", FITTED_TWICE_GPT2_TOKENS), ("full", GPT2_TOKENS)):
    TRAIN_SHAPES[f"BPE defaults, {_vocabulary}"] = (
        with_defaults(ModelConfig, BPE_PRESET, vocab_size=_size),
        with_defaults(TrainConfig, BPE_PRESET),
    )
# GPT-2 124M's shape as --init_from=gpt2 fine-tunes it (its defaults; block 256 of its 1,024
# positions), with both vocabularies. Random weights: the speed does not depend on them.
GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "position": "learned"}
for _vocabulary, _size in (("fitted", FITTED_GPT2_TOKENS), ("full", GPT2_TOKENS)):
    TRAIN_SHAPES[f"GPT-2 124M fine-tuning, {_vocabulary}"] = (
        with_defaults(
            ModelConfig, FINE_TUNING_PRESET, **GPT2_124M, activation="gelu_tanh", vocab_size=_size
        ),
        with_defaults(TrainConfig, FINE_TUNING_PRESET),
    )
# Generation: the 6 x 384 character model at 1,000 and 2,000 tokens in every mode, and the
# BPE and GPT-2 models at GENERATE_OTHERS_TOKENS, cached, float32.
GENERATE_MODELS = {
    "6x384 chars": SIX_BY_384,
    "BPE defaults, fitted": TRAIN_SHAPES["BPE defaults, fitted"][0],
    "BPE defaults, full": TRAIN_SHAPES["BPE defaults, full"][0],
    "GPT-2 124M, fitted": TRAIN_SHAPES["GPT-2 124M fine-tuning, fitted"][0],
    "GPT-2 124M, full": TRAIN_SHAPES["GPT-2 124M fine-tuning, full"][0],
}
GENERATE_OTHERS_TOKENS = 500
TOKENIZER_VOCAB_SIZE = 4096  # the learned byte-pair vocabulary the tokenizer figures time
REFERENCE_CHARS = 50_000  # the reference trainer recounts every pair per merge: a slice only
QUALITY_TARGETS = (2.0, 1.8, 1.7, 1.6, 1.5, 1.45, 1.4)  # validation nats per character


def peak_rss_mb() -> float:
    """This process' peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    """The median time of `work`, after one untimed call (allocations, kernel choice)."""
    work()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def matmul_roof(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of a large float32 matrix multiply, the median of several runs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return {"matmul_gflops": 2 * size**3 / median_seconds(lambda: torch.mm(a, b), repeats) / 1e9}


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """GB/s of copying a tensor far larger than any cache: bytes read plus bytes written."""
    source = torch.randn(megabytes * 2**20 // 4)
    target = torch.empty_like(source)  # its pages exist after the untimed first copy
    seconds = median_seconds(lambda: target.copy_(source), repeats)
    return {"copy_gb_per_s": 2 * source.numel() * 4 / seconds / 1e9}


def bytes_per_generated_token(model: GPT, cached_positions: float) -> float:
    """What one cached step reads at least: every weight once, and the cache it attends to."""
    scales = [m.scale for m in model.modules() if isinstance(m, Int8Linear)]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *scales])
    c = model.config
    element = model.token_embedding.weight.element_size()
    cache = 2 * c.n_layer * c.n_embd * cached_positions * element  # keys and values
    return weights + cache


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's share."""
    c = model.config
    table = model.position_embedding  # looked up, not multiplied; None with rotary positions
    weights = model.num_parameters() - (table.weight.numel() if table is not None else 0)
    return 6 * weights + 12 * c.n_layer * c.n_embd * c.block_size


def train_speed(name: str, steps: int, compile_model: bool = False) -> dict[str, Any]:
    """Time real training steps (train_model.train_step) of one shape on random tokens."""
    model_config, train_config = TRAIN_SHAPES[name]
    train_config = dataclasses.replace(train_config, warmup_iters=0, max_iters=steps + 2)
    keep_freed_memory()  # as train_model.py does
    torch.manual_seed(0)
    model = for_training(GPT(model_config))  # as train_model.py trains it
    device = torch.device("cpu")
    run = Run(
        model=model,
        compiled=torch.compile(model) if compile_model else model,
        optimizer=make_optimizer(model, train_config, device),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        splits={"train": torch.randint(0, model_config.vocab_size, (200_000,))},
        config=train_config,
        device=device,
        autocast=contextlib.nullcontext(),
        sequences_per_pass=sequences_per_pass(
            train_config.sequences_per_pass,
            train_config.batch_size,
            model_config.block_size,
            device,
        ),
    )
    state = TrainingState(batch_generator=torch.Generator().manual_seed(0))
    train_step(run, state)[0].item()  # warm up: allocations, kernel selection
    seconds = []
    for step in range(1, steps + 1):
        state.step = step
        start = time.perf_counter()
        train_step(run, state)[0].item()  # the loss: waits for the step to finish
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    tokens_per_s = run.tokens_per_step() / step_s
    return {
        "parameters": model.num_parameters(),
        "ms_per_step": step_s * 1000,
        "tokens_per_s": tokens_per_s,
        "gflops": tokens_per_s * flops_per_token(model) / 1e9,
        "peak_rss_mb": peak_rss_mb(),
    }


def generate_speed(name: str, new_tokens: int, mode: str, precision: str) -> dict[str, Any]:
    """Generate from a random-weight model (speed does not depend on the weights).

    mode: "cache" (the key/value cache), "compiled" (the cache, and the one-token step through
    torch.compile, compiled before timing) or "recompute" (no cache).
    """
    torch.manual_seed(0)
    config = GENERATE_MODELS[name]
    model = for_inference(GPT(config), precision).eval()
    prompt = torch.randint(0, config.vocab_size, (16,)).tolist()
    generator = torch.Generator().manual_seed(0)
    use_cache = mode != "recompute"
    start = time.perf_counter()
    token_step = compile_token_step(model) if mode == "compiled" else None
    compile_s = time.perf_counter() - start
    if mode == "compiled" and token_step is None:
        return {"skipped": "torch.compile failed here"}
    options = {"generator": generator, "use_cache": use_cache, "token_step": token_step}
    list(generate(model, prompt, 8, **options))  # warm up
    start = time.perf_counter()
    stream = generate(model, prompt, new_tokens, **options)
    next(stream)
    first_token_s = time.perf_counter() - start
    count = 1 + sum(1 for _ in stream)
    total_s = time.perf_counter() - start
    # The first token after a prompt that fills the context: the whole block goes through the
    # model before it (the best of three, after the run above has warmed everything up).
    long_prompt = torch.randint(0, config.vocab_size, (config.block_size,)).tolist()
    full_block_s = min(first_token_seconds(model, long_prompt, **options) for _ in range(3))
    # What a cached step must read at least: every weight, and the keys and values of the
    # positions it attends to, between half a block and a block (three quarters on average).
    # (The step reads the cache's empty, masked slots too; they are not counted.)
    # Recomputing reads the weights once per position of the window: no single figure fits.
    read = bytes_per_generated_token(model, 0.75 * config.block_size) if use_cache else None
    return {
        "tokens_per_s": count / total_s,
        "gb_read_per_s": count / total_s * read / 1e9 if read is not None else None,
        "seconds": total_s,
        "first_token_ms": first_token_s * 1000,
        "first_token_full_block_ms": full_block_s * 1000,
        "compile_s": compile_s if mode == "compiled" else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def first_token_seconds(model: GPT, prompt: list[int], **options: Any) -> float:
    """How long generate takes to give its first token after `prompt`."""
    start = time.perf_counter()
    next(generate(model, prompt, 1, **options))
    return time.perf_counter() - start


def tokenizer_speed(corpus: Path) -> dict[str, float]:
    """Seconds to learn a byte-pair vocabulary and to encode with it, library and reference."""
    text = read_corpus(corpus)
    train = text[: len(text) - int(len(text) * DataConfig.val_fraction)]
    start = time.perf_counter()
    tokenizer = TrainedBPETokenizer.from_text(train, TOKENIZER_VOCAB_SIZE)
    learn_s = time.perf_counter() - start
    piece = train[:REFERENCE_CHARS]
    start = time.perf_counter()
    learn_merges(piece, 512)
    reference_learn_s = time.perf_counter() - start
    start = time.perf_counter()
    encode_with_merges(piece, tokenizer.merges)
    reference_encode_s = time.perf_counter() - start
    return {
        "learn_s": learn_s,
        "encode_corpus_s": median_seconds(lambda: tokenizer.encode_array(text), 3),
        "corpus_chars": len(text),
        "corpus_tokens": len(tokenizer.encode_array(text)),
        "piece_learn_512_library_s": median_seconds(
            lambda: fast_bpe.learn_merges(piece, 512, GPT2_SPLIT_PATTERN), 3
        ),
        "piece_learn_512_reference_s": reference_learn_s,
        "piece_encode_library_s": median_seconds(lambda: tokenizer.encode(piece), 3),
        "piece_encode_reference_s": reference_encode_s,
    }


def time_to_quality(metrics_path: Path) -> dict[str, Any]:
    """When (wall seconds into training) a run's validation loss first reached each target."""
    rows = read_history(metrics_path)
    if not rows:
        raise UserFacingError(f"{metrics_path} holds no evaluations")
    reached: dict[str, Any] = {}
    for target in QUALITY_TARGETS:
        hit = first_reached(rows, target)
        reached[f"{target:.2f} nats/char"] = hit["elapsed_s"] if hit else None
    best = min(rows, key=lambda r: r["val_bpc"])
    reached["best nats/char"] = nats_per_char(best["val_bpc"])
    reached["best at s"] = best["elapsed_s"]
    return reached


@torch.inference_mode()
def full_validation_loss(
    checkpoint_path: Path, precision: str = "float32", batch_size: int = 32
) -> dict[str, float]:
    """A checkpoint's loss on the whole validation split, not a sample of batches.

    Every token of the split but the first (which has nothing before it in the split) is
    scored once: the split is read in consecutive windows of block_size tokens (the last one
    shorter), and a token sees the tokens before it in its window, 0 to block_size - 1 of them,
    as in training. The loss per character divides by the characters of the scored tokens.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    model, tokenizer = model_from_checkpoint(checkpoint, torch.device("cpu"))
    model = for_inference(model, precision)
    block = model.config.block_size
    val = load_splits(saved_settings(checkpoint).data, block, tokenizer).tokens["val"].long()
    inputs, targets = val[:-1], val[1:]
    n_full = len(inputs) // block
    total = 0.0  # summed nats over every scored token
    full_inputs, full_targets = (
        inputs[: n_full * block].view(n_full, block),
        targets[: n_full * block].view(n_full, block),
    )
    for start in range(0, n_full, batch_size):
        _, loss = model(
            full_inputs[start : start + batch_size], full_targets[start : start + batch_size]
        )
        total += loss.float().item() * full_inputs[start : start + batch_size].numel()
    if len(inputs) > n_full * block:  # the tail that does not fill a window
        _, loss = model(
            inputs[n_full * block :].unsqueeze(0), targets[n_full * block :].unsqueeze(0)
        )
        total += loss.float().item() * (len(inputs) - n_full * block)
    nats_per_token = total / len(targets)
    bits = bits_per_char(nats_per_token, len(targets) / tokenizer.count_chars(targets))
    return {
        "val_nats_per_token": nats_per_token,
        "val_nats_per_char": nats_per_char(bits),
        "val_bits_per_char": bits,
        "tokens_scored": len(targets),
        "tokens_in_split": len(val),
    }


# ----------------------------------------------------------------------------------------------
# Each case in its own process


def run_case(case: list[str], threads: int) -> dict[str, Any]:
    """Run one measurement in a fresh Python process and return its figures."""
    command = [sys.executable, __file__, "--case", *case, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def case_main(case: list[str]) -> dict[str, Any]:
    """The body of a measuring process."""
    kind, *args = case
    if kind == "roof":
        return {**matmul_roof(), **copy_bandwidth()}
    if kind == "train":
        return train_speed(args[0], steps=int(args[1]), compile_model=args[2] == "compile")
    if kind == "tokenizer":
        return tokenizer_speed(Path(args[0]))
    return generate_speed(args[0], int(args[1]), mode=args[2], precision=args[3])


def print_report(results: dict[str, Any]) -> None:
    """Human-readable tables of the figures."""
    if "vs_nanogpt" in results:
        print(vs_nanogpt.report(results["vs_nanogpt"]))
    roof = results.get("roof", {}).get("matmul_gflops")
    if roof:
        print(f"matmul roof: {roof:.1f} GFLOP/s ({results['threads']} threads)")
    for name, row in results.get("train", {}).items():
        mfu = f", MFU {row['gflops'] / roof:.0%}" if roof else ""
        print(
            f"train {name}: {row['tokens_per_s']:,.0f} tokens/s, {row['ms_per_step']:.1f} ms/step,"
            f" {row['gflops']:.1f} GFLOP/s{mfu}, peak RSS {row['peak_rss_mb']:,.0f} MB"
        )
    bandwidth = results.get("roof", {}).get("copy_gb_per_s")
    if bandwidth:
        print(f"memory bandwidth (a 512 MB copy, read + write): {bandwidth:.1f} GB/s")
    for name, row in results.get("generate", {}).items():
        if "skipped" in row:
            print(f"generate {name}: skipped ({row['skipped']})")
            continue
        reads = ""
        if row.get("gb_read_per_s") is not None:
            share = (
                f" ({row['gb_read_per_s'] / bandwidth:.0%} of the bandwidth)" if bandwidth else ""
            )
            reads = f", reads {row['gb_read_per_s']:.1f} GB/s{share}"
        compiling = f", compiled first in {row['compile_s']:.1f} s" if row.get("compile_s") else ""
        print(
            f"generate {name}: {row['tokens_per_s']:,.1f} tokens/s ({row['seconds']:.1f} s), "
            f"first token {row['first_token_ms']:.1f} ms "
            f"({row['first_token_full_block_ms']:.1f} ms after a full block){reads}{compiling}, "
            f"peak RSS {row['peak_rss_mb']:,.0f} MB"
        )
    print_tokenizer_figures(results.get("tokenizer"))
    for name, value in results.get("full_validation", {}).items():
        print(f"whole validation split: {name} = {value:.4f}")
    for target, seconds in results.get("quality", {}).items():
        print(f"quality {target}: {seconds if seconds is not None else 'not reached'}")


def print_tokenizer_figures(tokenizer: dict[str, Any] | None) -> None:
    """The tokenizer figures, if measured: learning and encoding, library and reference."""
    if not tokenizer:
        return
    print(
        f"tokenizer: learning {TOKENIZER_VOCAB_SIZE:,} tokens from the training split "
        f"{tokenizer['learn_s']:.2f} s; encoding the corpus ({tokenizer['corpus_chars']:,} "
        f"characters, {tokenizer['corpus_tokens']:,} tokens) "
        f"{tokenizer['encode_corpus_s']:.3f} s"
    )
    print(
        f"tokenizer, first {REFERENCE_CHARS:,} characters: learning 512 tokens "
        f"{tokenizer['piece_learn_512_library_s']:.3f} s (library), "
        f"{tokenizer['piece_learn_512_reference_s']:.2f} s (reference); encoding "
        f"{tokenizer['piece_encode_library_s']:.4f} s (library), "
        f"{tokenizer['piece_encode_reference_s']:.3f} s (reference)"
    )


def run_file(given: str, pick: Callable[[RunFolder], Path]) -> Path:
    """A file named on the command line, or pick()'s file of a run folder (or the latest run)."""
    if not given:
        return pick(latest_run())
    path = Path(given)
    return pick(RunFolder(path)) if path.is_dir() else path


def command_line() -> argparse.ArgumentParser:
    """The command line: which measurements, and on what."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_measurement_options(parser)
    add_comparison_options(parser)
    parser.add_argument("--json", default="bench.json", help="where to write the figures")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)  # one measuring process
    return parser


def add_measurement_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose what this machine's measurements are, and of what."""
    parser.add_argument(
        "--only",
        nargs="*",
        choices=["roof", "train", "generate", "tokenizer"],
        default=["roof", "train", "generate", "tokenizer"],
        help="which measurements (none at all: only --metrics and --full_val)",
    )
    parser.add_argument(
        "--metrics",
        nargs="?",
        const="",
        help="time-to-quality of a run: its folder or metrics.jsonl (alone: the latest run)",
    )
    parser.add_argument(
        "--full_val",
        nargs="?",
        const="",
        help="loss on the whole validation split of a checkpoint, or of a run folder's best "
        "(alone: the latest run's)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="--full_val's weights, as generate_text.py --precision takes them",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads (default: what torch uses here)",
    )
    parser.add_argument(
        "--train_steps", type=int, default=10, help="timed steps per training shape (default: 10)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile (compiling is done before timing)",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=list(TRAIN_SHAPES),
        default=list(TRAIN_SHAPES),
        help="training shapes to time (default: all)",
    )


def add_comparison_options(parser: argparse.ArgumentParser) -> None:
    """The options of the side-by-side measurement with nanoGPT."""
    parser.add_argument(
        "--vs-nanogpt",
        metavar="PATH",
        help="also time nanoGPT (a checkout at PATH) and this project on the same work, "
        "alternating (see tools/vs_nanogpt.py); uses --corpus",
    )
    parser.add_argument(
        "--pairs", type=int, default=2, help="--vs-nanogpt: A B rounds per case (default: 2)"
    )
    parser.add_argument(
        "--corpus",
        default="input.txt",
        help="the text of --vs-nanogpt and of the tokenizer figures (default: input.txt)",
    )


def measure_training(args: argparse.Namespace) -> dict[str, Any]:
    """Training figures for each chosen shape, each shape in its own process."""
    mode = "compile" if args.compile else "eager"
    figures = {}
    for name in args.shapes:
        big = name.startswith(("6x384", "GPT-2 124M"))  # 6x384: ~10 s a step
        steps = 3 if big else args.train_steps
        figures[name] = run_case(["train", name, str(steps), mode], args.threads)
    return figures


def measure_generation(threads: int) -> dict[str, Any]:
    """Generation figures (see GENERATE_MODELS), each case in its own process."""
    cases = [
        ("cache", "float32"),
        ("compiled", "float32"),
        ("cache", "bfloat16"),
        ("cache", "int8"),
        ("compiled", "int8"),
        ("recompute", "float32"),
    ]
    figures = {
        f"6x384 chars, {n} tokens, {mode}, {precision}": run_case(
            ["generate", "6x384 chars", str(n), mode, precision], threads
        )
        for n in (1000, 2000)
        for mode, precision in cases
    }
    for name in list(GENERATE_MODELS)[1:]:
        case = ["generate", name, str(GENERATE_OTHERS_TOKENS), "cache", "float32"]
        figures[f"{name}, {GENERATE_OTHERS_TOKENS} tokens, cache, float32"] = run_case(
            case, threads
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    """Run the chosen measurements, print them, write the JSON file; returns the status."""
    try:
        return measure(command_line().parse_args(argv))
    except (UserFacingError, OSError) as err:
        print_error("bench.py", err)
        return 2


def measure(args: argparse.Namespace) -> int:
    """Everything main does once the command line is read."""
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(case_main(args.case)))
        return 0
    earlier = earlier_figures(Path(args.json))  # checked before any work
    results: dict[str, Any] = {"threads": args.threads, "torch": str(torch.__version__)}
    if "roof" in args.only:
        results["roof"] = run_case(["roof"], args.threads)
    if "train" in args.only:
        results["train"] = measure_training(args)
    if "generate" in args.only:
        results["generate"] = measure_generation(args.threads)
    if "tokenizer" in args.only:
        results["tokenizer"] = run_case(["tokenizer", args.corpus], args.threads)
    if args.metrics is not None:
        metrics = run_file(args.metrics, lambda folder: folder.metrics)
        results["quality"] = time_to_quality(metrics)
    if args.full_val is not None:
        checkpoint = run_file(args.full_val, lambda folder: folder.sampling_checkpoint)
        results["full_validation"] = full_validation_loss(checkpoint, args.precision)
    if args.vs_nanogpt is not None:
        if args.pairs < 1:
            raise UserFacingError(f"--pairs must be >= 1, got {args.pairs}")
        results["vs_nanogpt"] = vs_nanogpt.compare(
            Path(args.vs_nanogpt), Path(args.corpus), args.pairs
        )
    print_report(results)
    # The figures measured now replace their earlier ones; the others stay.
    write_atomically(Path(args.json), json.dumps({**earlier, **results}, indent=2).encode())
    print(f"figures written to {args.json}")
    return 0


def earlier_figures(path: Path) -> dict[str, Any]:
    """What an earlier run of this script wrote to path ({} if nothing is there yet).

    Anything else there is refused, in one line: the figures go only where figures were.
    """
    if not path.exists():
        return {}
    try:
        figures = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        figures = None
    if not isinstance(figures, dict) or not {"threads", "torch"} <= figures.keys():
        raise UserFacingError(f"{path} holds no figures of bench.py; give --json another file")
    return figures


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C as usual again
    raise SystemExit(main())
