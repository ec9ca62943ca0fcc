"""This project beside nanoGPT on the same work, measured in one sitting (bench.py --vs-nanogpt).

Given a nanoGPT checkout that you provide (nothing of it is part of this project), each case
runs nanoGPT's own train.py or sample.py and this project's train_model.py or generate_text.py
as whole processes, alternating A B A B, on the same work: the same corpus (characters), shape,
dropout, batch and number of steps, float32 on the CPU, both with AdamW and learned positions.
Training runs without torch.compile. Generation runs without it and with it, and this project
also with int8 weights (GENERATION_CASES); nanoGPT always samples in float32.
nanoGPT's scripts run from a scratch copy (a temporary folder), never in the checkout itself.

Every figure is a whole process's wall time and peak memory (its maximum resident set size).
Start-up (importing torch, reading the data, building the model) is taken out by running each
case twice: with its full length and with one step (or a short text); the difference, over the
extra steps or tokens, is the time per step or per token.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from support.common import UserFacingError

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # tools/ sits in the project folder
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "sample.py")
NANOGPT_DATASET = "shakespeare_char"


@dataclasses.dataclass(frozen=True)
class TrainingCase:
    """A training shape, run for `steps` optimizer steps by both projects."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    dropout: float
    steps: int
    # nanoGPT's batch in this many passes (its gradient_accumulation_steps), as this project
    # takes it on a CPU: the same work, so that the comparison shows what passes alone give.
    nanogpt_passes: int = 1

    def __post_init__(self) -> None:
        assert self.batch_size % self.nanogpt_passes == 0, "nanoGPT's passes must be equal"


TRAINING_CASES = (  # name, n_layer, n_head, n_embd, block_size, batch_size, dropout, steps
    TrainingCase("baby 4x128, block 64, batch 12, dropout 0", 4, 4, 128, 64, 12, 0.0, 400),
    TrainingCase("baby 4x128, block 64, batch 12, dropout 0.2", 4, 4, 128, 64, 12, 0.2, 400),
    TrainingCase("6x384, block 256, batch 64, dropout 0.2", 6, 6, 384, 256, 64, 0.2, 3),
    TrainingCase("6x384, block 256, batch 64, dropout 0.2, nanoGPT in 8 passes of 8",
                 6, 6, 384, 256, 64, 0.2, 3, nanogpt_passes=8),
    TrainingCase("6x384, block 256, batch 64, dropout 0", 6, 6, 384, 256, 64, 0.0, 3),
    TrainingCase("6x384, block 256, batch 64, dropout 0, nanoGPT in 8 passes of 8",
                 6, 6, 384, 256, 64, 0.0, 3, nanogpt_passes=8),
)  # fmt: skip
# The model that generates: trained for a step or two (its weights do not change the speed).
GENERATION_SHAPE = TrainingCase("6x384, block 256", 6, 6, 384, 256, 4, 0.0, 1)
GENERATION_TOKENS, SHORT_GENERATION_TOKENS = 2000, 50


@dataclasses.dataclass(frozen=True)
class GenerationCase:
    """Our weights' precision, and whether each project samples through torch.compile.

    nanoGPT samples in float32 (it has no int8) and, by default, uncompiled.
    """

    name: str
    our_precision: str
    our_compile: bool
    nanogpt_compile: bool


GENERATION_CASES = (  # name, our_precision, our_compile, nanogpt_compile
    GenerationCase("float32", "float32", False, False),
    GenerationCase("float32, ours with --compile", "float32", True, False),
    GenerationCase("ours in int8 with --compile, nanoGPT float32", "int8", True, False),
    GenerationCase("ours in int8, both with torch.compile", "int8", True, True),
)  # fmt: skip


def run_measured(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run a command to its end; its wall seconds and peak memory in MB (its own, not ours)."""
    # stderr goes to a file, not a pipe: a progress bar filling an unread pipe would block.
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            last = errors.read().strip().splitlines()
            raise UserFacingError(
                f"{' '.join(command[:2])} failed ({last[-1] if last else process.returncode})"
            )
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in kB on Linux


def prepare_nanogpt(checkout: Path, corpus: Path, workdir: Path) -> Path:
    """A scratch copy of nanoGPT's scripts, with the corpus prepared its way (characters)."""
    missing = [name for name in NANOGPT_FILES if not (checkout / name).is_file()]
    if missing:
        raise UserFacingError(f"{checkout} is not a nanoGPT checkout (no {', '.join(missing)})")
    copy = workdir / "nanogpt"
    data = copy / "data" / NANOGPT_DATASET
    data.mkdir(parents=True)
    for name in NANOGPT_FILES:
        shutil.copy(checkout / name, copy / name)
    shutil.copy(checkout / "data" / NANOGPT_DATASET / "prepare.py", data / "prepare.py")
    shutil.copy(corpus, data / "input.txt")  # present, so prepare.py downloads nothing
    run_measured([sys.executable, "prepare.py"], cwd=data)
    return copy


def nanogpt_training(case: TrainingCase, steps: int, out_dir: Path) -> list[str]:
    """The command line of nanoGPT's train.py for `steps` steps.

    Its loop runs max_iters + 1 steps. It evaluates one batch at step 0, and once more (saving
    ckpt.pt) at step 1 only when steps is 2: for the model that generation uses. Its batch is
    batch_size x gradient_accumulation_steps sequences.
    """
    passes = case.nanogpt_passes
    return [
        sys.executable, "train.py", f"--dataset={NANOGPT_DATASET}", f"--out_dir={out_dir}",
        "--device=cpu", "--dtype=float32", "--compile=False", "--bias=False",
        f"--n_layer={case.n_layer}", f"--n_head={case.n_head}", f"--n_embd={case.n_embd}",
        f"--block_size={case.block_size}", f"--batch_size={case.batch_size // passes}",
        f"--dropout={case.dropout}", f"--gradient_accumulation_steps={passes}",
        f"--max_iters={steps - 1}", f"--lr_decay_iters={max(steps - 1, 1)}",
        f"--eval_interval={1 if steps == 2 else 10**9}", "--eval_iters=1",
        "--learning_rate=1e-3", "--warmup_iters=0", "--log_interval=1000000",
        "--always_save_checkpoint=True",
    ]  # fmt: skip


def our_training(case: TrainingCase, steps: int, out_dir: Path, corpus: Path) -> list[str]:
    """train_model.py on the same work: evaluated (one batch) at step 0 and at the end."""
    return [
        sys.executable, str(PROJECT_ROOT / "train_model.py"), f"--data={corpus}",
        f"--out_dir={out_dir}", "--overwrite", "--device=cpu", "--dtype=float32",
        "--optimizer=adamw", "--position=learned", "--bias=false",
        f"--n_layer={case.n_layer}", f"--n_head={case.n_head}", f"--n_embd={case.n_embd}",
        f"--block_size={case.block_size}", f"--batch_size={case.batch_size}",
        f"--dropout={case.dropout}", f"--max_iters={steps}", f"--eval_interval={steps}",
        "--eval_iters=1", "--learning_rate=1e-3", "--warmup_iters=0",
    ]  # fmt: skip


def nanogpt_sampling(out_dir: Path, tokens: int, compile_model: bool = False) -> list[str]:
    """The command line of nanoGPT's sample.py: one sample of `tokens` new characters."""
    return [
        sys.executable, "sample.py", f"--out_dir={out_dir}", "--device=cpu",
        "--dtype=float32", f"--compile={compile_model}", "--num_samples=1",
        f"--max_new_tokens={tokens}",
    ]  # fmt: skip


def our_sampling(
    out_dir: Path, tokens: int, compile_model: bool = False, precision: str = "float32"
) -> list[str]:
    """generate_text.py, the same: one sample, with the key/value cache (the default)."""
    return [
        sys.executable, str(PROJECT_ROOT / "generate_text.py"), f"--out_dir={out_dir}",
        "--device=cpu", f"--precision={precision}", f"--max_new_tokens={tokens}",
        f"--compile={compile_model}",
    ]  # fmt: skip


def per_unit(long: tuple[float, float], short: tuple[float, float], extra: int) -> float:
    """Seconds per step or token: the long run's time beyond the short run's, per extra unit."""
    return (long[0] - short[0]) / extra


def compare_training(
    case: TrainingCase, nanogpt: Path, corpus: Path, workdir: Path, pairs: int
) -> dict[str, Any]:
    """Alternate nanoGPT and ours on one case; medians over the pairs."""
    runs: dict[str, list[dict[str, float]]] = {"nanogpt": [], "ours": []}
    for _ in range(pairs):
        for who in ("nanogpt", "ours"):
            times = []
            for steps in (1, case.steps):  # 1 step: the start-up alone, nearly
                out_dir = workdir / f"{who}-train"
                if who == "nanogpt":
                    command, cwd = nanogpt_training(case, steps, out_dir), nanogpt
                else:
                    command, cwd = our_training(case, steps, out_dir, corpus), workdir
                times.append(run_measured(command, cwd))
                shutil.rmtree(out_dir, ignore_errors=True)
            short, long = times
            runs[who].append(
                {
                    "process_s": long[0],
                    "step_s": per_unit(long, short, case.steps - 1),
                    "peak_mb": long[1],
                }
            )
    return summarise(runs, tokens=case.batch_size * case.block_size, unit="step")


def generation_models(nanogpt: Path, corpus: Path, workdir: Path) -> tuple[Path, Path]:
    """Each project's 6x384 model, trained for one step: nanoGPT's out_dir, then ours."""
    shape = GENERATION_SHAPE
    nanogpt_model, our_model = workdir / "nanogpt-model", workdir / "our-model"
    run_measured(nanogpt_training(shape, 2, nanogpt_model), nanogpt)  # saves ckpt.pt at step 1
    run_measured(our_training(shape, 1, our_model, corpus), workdir)
    return nanogpt_model, our_model


def generation_commands(
    case: GenerationCase, models: tuple[Path, Path], tokens: int
) -> dict[str, list[str]]:
    """The case's sampling command for each project, given nanoGPT's and our model folders."""
    nanogpt_model, our_model = models
    return {
        "nanogpt": nanogpt_sampling(nanogpt_model, tokens, case.nanogpt_compile),
        "ours": our_sampling(our_model, tokens, case.our_compile, case.our_precision),
    }


def compare_generation(
    case: GenerationCase, nanogpt: Path, models: tuple[Path, Path], workdir: Path, pairs: int
) -> dict[str, Any]:
    """Each project's model writes GENERATION_TOKENS characters; medians over the pairs.

    Compiling happens in the short and the long run alike, so the per-token time leaves it out.
    A first, unmeasured short run fills torch.compile's on-disk cache, so that every measured
    run finds it filled.
    """
    folders = {"nanogpt": nanogpt, "ours": workdir}  # where each project's script runs
    for who in ("nanogpt", "ours"):
        run_measured(generation_commands(case, models, SHORT_GENERATION_TOKENS)[who], folders[who])
    runs: dict[str, list[dict[str, float]]] = {"nanogpt": [], "ours": []}
    for _ in range(pairs):
        for who in ("nanogpt", "ours"):
            times = []
            for tokens in (SHORT_GENERATION_TOKENS, GENERATION_TOKENS):
                times.append(
                    run_measured(generation_commands(case, models, tokens)[who], folders[who])
                )
            short, long = times
            extra = GENERATION_TOKENS - SHORT_GENERATION_TOKENS
            runs[who].append(
                {"process_s": long[0], "token_s": per_unit(long, short, extra), "peak_mb": long[1]}
            )
    return summarise(runs, tokens=1, unit="token")


def summarise(runs: dict[str, list[dict[str, float]]], tokens: int, unit: str) -> dict[str, Any]:
    """Medians for each project, tokens/s, and ours against nanoGPT's."""
    figures: dict[str, Any] = {}
    for who, rows in runs.items():
        seconds = statistics.median(row[f"{unit}_s"] for row in rows)
        figures[who] = {
            f"{unit}_ms": seconds * 1000,
            "tokens_per_s": tokens / seconds,
            "process_s": statistics.median(row["process_s"] for row in rows),
            "peak_mb": statistics.median(row["peak_mb"] for row in rows),
            "all_tokens_per_s": [round(tokens / row[f"{unit}_s"], 1) for row in rows],
        }
    figures["speed_ratio"] = figures["ours"]["tokens_per_s"] / figures["nanogpt"]["tokens_per_s"]
    figures["memory_ratio"] = figures["ours"]["peak_mb"] / figures["nanogpt"]["peak_mb"]
    return figures


def compare(checkout: Path, corpus: Path, pairs: int) -> dict[str, Any]:
    """Every case, side by side; figures keyed by case name, with the commands used."""
    if not corpus.is_file():
        raise UserFacingError(f"--vs-nanogpt needs the corpus as a file: {corpus} is missing")
    with tempfile.TemporaryDirectory(prefix="vs-nanogpt-") as scratch:
        workdir = Path(scratch)
        nanogpt = prepare_nanogpt(checkout.resolve(), corpus.resolve(), workdir)
        results: dict[str, Any] = {}
        for case in TRAINING_CASES:
            print(f"training: {case.name}, {case.steps} steps, {pairs} pairs ...", flush=True)
            results[f"training, {case.name}"] = {
                **compare_training(case, nanogpt, corpus.resolve(), workdir, pairs),
                "nanogpt_command": shown(nanogpt_training(case, case.steps, Path("OUT"))),
                "our_command": shown(
                    our_training(case, case.steps, Path("OUT"), Path("input.txt"))
                ),
            }
        models = generation_models(nanogpt, corpus.resolve(), workdir)
        for generation in GENERATION_CASES:
            name = f"generation, {GENERATION_SHAPE.name}, {GENERATION_TOKENS} characters, "
            print(f"{name}{generation.name}, {pairs} pairs ...", flush=True)
            shown_commands = generation_commands(
                generation, (Path("OUT"), Path("OUT")), GENERATION_TOKENS
            )
            results[name + generation.name] = {
                **compare_generation(generation, nanogpt, models, workdir, pairs),
                "nanogpt_command": shown(shown_commands["nanogpt"]),
                "our_command": shown(shown_commands["ours"]),
            }
    return results


def shown(command: list[str]) -> str:
    """A command as a person would type it in the project's (or nanoGPT's) folder."""
    return " ".join(["python", Path(command[1]).name, *command[2:]])


def report(results: dict[str, Any]) -> str:
    """The comparison as lines of text."""
    lines = []
    for name, figures in results.items():
        ours, theirs = figures["ours"], figures["nanogpt"]
        lines.append(
            f"{name}: ours {ours['tokens_per_s']:,.1f} tokens/s, nanoGPT "
            f"{theirs['tokens_per_s']:,.1f} ({figures['speed_ratio']:.2f}x); peak memory ours "
            f"{ours['peak_mb']:,.0f} MB, nanoGPT {theirs['peak_mb']:,.0f} MB "
            f"({figures['memory_ratio']:.2f}x)"
        )
        lines.append(f"    nanoGPT: {figures['nanogpt_command']}")
        lines.append(f"    ours:    {figures['our_command']}")
    return "\n".join(lines)
