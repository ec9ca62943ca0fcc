"""Train the GPT on a text corpus, with periodic evaluation, checkpoints and logs.

    python train_model.py                       # Tiny Shakespeare, the defaults
    python train_model.py --tokenizer bpe       # GPT-2's tokens, with their own defaults
    python train_model.py --init_from gpt2      # fine-tune GPT-2 (124M) on the corpus
    python train_model.py --data my.txt         # your own text
    python train_model.py --resume              # continue the latest run
    python train_model.py --help                # every setting, with its default

Each run writes to a folder of its own (out_dir; by default a new folder under out/):
ckpt_last.pth (latest), ckpt_best.pth (lowest validation loss), metrics.jsonl (one line per
evaluation), loss.png, config.json and a TensorBoard log (`tensorboard --logdir out`).
"""

from __future__ import annotations

import signal

# Ctrl-C while the libraries below still load: the default action ends the program at once,
# without a traceback (Python's KeyboardInterrupt comes back before main runs).
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from checkpoint import (
    RunDescription,
    TrainingState,
    check_resumable,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    restore_training_state,
    restore_weights,
    save_checkpoint,
    saved_corpus_sha256,
    saved_settings,
    saved_tokenizer,
)
from common import ForgivingStream, UserFacingError, print_error
from data_handling import CorpusSplits, get_batch, load_splits
from devices import (
    Distributed,
    StopRequest,
    any_process,
    autocast_context,
    model_memory,
    process_rank,
    require_memory,
    sequences_per_pass,
    setup_compute,
    shutdown_distributed,
    start_random_streams,
    training_memory,
    wait_for_all,
    wrap_model,
)
from hugging_face import load_gpt2_weights, pretrained_gpt2, read_weights
from hyperparameters import (
    DataConfig,
    ModelConfig,
    RunSettings,
    TrainConfig,
    build_parser,
    parse_configs,
    settings_for_resume,
)
from model_architecture import GPT
from optimization import (
    Optimizer,
    learning_rate_at,
    make_optimizer,
    model_to_keep,
    weight_average,
)
from run_folder import RunFolder, chosen_run, folder_for_new_run, mark_latest
from training_log import (
    Progress,
    TensorBoardLog,
    best_evaluation,
    evaluation_row,
    model_sample,
    nats_per_char,
    plot_losses,
    read_history,
    write_history,
)

PROG = "train_model.py"


class TrainingDiverged(Exception):
    """The loss stopped being a finite number."""

    def __init__(self, loss: float, step: int, out_dir: Path) -> None:
        super().__init__(
            f"loss became {loss} by step {step}; the checkpoints in {out_dir} are from the "
            "last good evaluation. Try a lower --learning_rate"
        )


# ----------------------------------------------------------------------------------------------
# Training and evaluation steps


@dataclasses.dataclass
class Run:
    """What the training and evaluation steps work with."""

    model: GPT
    compiled: torch.nn.Module  # what runs forward passes: maybe torch.compile'd, maybe DDP
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    splits: dict[str, torch.Tensor]  # "train" and "val" token ids
    config: TrainConfig
    device: torch.device
    autocast: contextlib.AbstractContextManager
    sequences_per_pass: int  # of a micro-batch, through one forward and backward pass
    distributed: Distributed = dataclasses.field(default_factory=Distributed)
    average: AveragedModel | None = None  # the weights' moving average, if one is kept

    def final_model(self) -> GPT:
        """What checkpoints keep for generation: the weights' average if one is kept."""
        return model_to_keep(self.model, self.average)

    def evaluated(self) -> torch.nn.Module:
        """What evaluations run: final_model(), wrapped as training runs it if no average is kept.

        The average itself is never compiled or wrapped for DDP: only process 0 evaluates.
        """
        return self.compiled if self.average is None else self.average.module

    def tokens_per_step(self) -> int:
        """Tokens one optimizer step learns from, over all processes."""
        config = self.config
        sequences = (
            config.batch_size * config.gradient_accumulation_steps * self.distributed.world_size
        )
        return sequences * self.model.config.block_size


def in_passes(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A batch of inputs and targets (B, T), cut into passes of at most `size` sequences."""
    return list(zip(x.split(size), y.split(size), strict=True))


def train_step(run: Run, state: TrainingState) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimizer step number state.step, over gradient_accumulation_steps micro-batches.

    Each micro-batch goes through the model in passes of run.sequences_per_pass sequences; the
    gradients of all passes add up to the gradient of the whole step's batch.
    Returns the step's loss and the gradient norm before clipping (tensors: reading them
    waits for the step, so the loop does that only every log_interval steps).
    """
    config = run.config
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate_at(state.step, config)
    total_loss = torch.zeros((), device=run.device)
    for micro_step in range(config.gradient_accumulation_steps):
        x, y = get_batch(
            run.splits["train"],
            config.batch_size,
            run.model.config.block_size,
            state.batch_generator,
            run.device,
        )
        passes = in_passes(x, y, run.sequences_per_pass)
        for pass_number, (pass_x, pass_y) in enumerate(passes):
            # Across processes, gradients are averaged once per step, after the last pass.
            last = (
                micro_step == config.gradient_accumulation_steps - 1
                and pass_number == len(passes) - 1
            )
            skip_sync = run.distributed.enabled and not last
            with run.compiled.no_sync() if skip_sync else contextlib.nullcontext():
                with run.autocast:
                    _, loss = run.compiled(pass_x, pass_y)
                # Weighting each pass's mean loss by its share of the step's sequences makes
                # the summed gradient equal that of one big batch.
                share = pass_x.size(0) / (x.size(0) * config.gradient_accumulation_steps)
                loss = loss * share
                run.scaler.scale(loss).backward()
            total_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)  # true gradients, for their norm and for clipping
    if config.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm(p.grad for p in run.model.parameters())
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return total_loss, grad_norm


@torch.no_grad()
def estimate_loss(run: Run) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split; the same batches at every evaluation."""
    config = run.config
    model = run.evaluated()
    model.eval()
    losses = {}
    for name, data in run.splits.items():
        # A fixed, separate generator: evaluations are comparable and training's data order
        # is not disturbed.
        generator = torch.Generator().manual_seed(config.seed + 1)
        total = 0.0
        for _ in range(config.eval_iters):
            x, y = get_batch(
                data, config.batch_size, run.model.config.block_size, generator, run.device
            )
            for pass_x, pass_y in in_passes(x, y, run.sequences_per_pass):  # as in training
                with run.autocast:
                    _, loss = model(pass_x, pass_y)
                total += loss.item() * pass_x.size(0) / x.size(0)
        losses[name] = total / config.eval_iters
    model.train()
    return losses


# ----------------------------------------------------------------------------------------------
# Setting up a run


def read_settings(argv: list[str] | None) -> tuple[RunSettings, dict[str, Any] | None]:
    """The run's settings from the command line, or from the checkpoint when resuming."""
    parser = build_parser(__doc__, [(ModelConfig, None), (DataConfig, None), (TrainConfig, None)])
    (model_config, data_config, train_config), given = parse_configs(
        parser, [ModelConfig, DataConfig, TrainConfig], argv
    )
    if not train_config.resume:
        # Under torchrun, process 0 creates the folder; the others write nothing there.
        claim = process_rank() == 0
        folder = folder_for_new_run(train_config.out_dir, train_config.overwrite, claim)
        train_config = dataclasses.replace(train_config, out_dir=str(folder.path))
        return RunSettings(model=model_config, data=data_config, train=train_config), None
    folder = chosen_run(train_config.out_dir)
    checkpoint = load_checkpoint(folder.last_checkpoint)
    check_resumable(checkpoint)
    settings = settings_for_resume(saved_settings(checkpoint), given, str(folder.path))
    if checkpoint["step"] >= settings.train.max_iters:
        raise UserFacingError(
            f"the saved run already did {checkpoint['step']} steps; raise --max_iters to "
            "train further"
        )
    return settings, checkpoint


def load_data(data_config: DataConfig, block_size: int, checkpoint: dict | None) -> CorpusSplits:
    """The corpus, tokenized (with a resumed run's own tokenizer) and split; print its facts."""
    if checkpoint is None:
        corpus = load_splits(data_config, block_size)
    else:
        tokenizer, trained_on = saved_tokenizer(checkpoint), saved_corpus_sha256(checkpoint)
        corpus = load_splits(data_config, block_size, tokenizer, trained_on)
    print(corpus.summary())
    return corpus


def starting_state(run: Run, checkpoint: dict[str, Any] | None, folder: RunFolder) -> TrainingState:
    """A new run's state, or the saved run's, with its optimizer and random streams restored."""
    resumed_step = checkpoint["step"] if checkpoint is not None else 0
    batch_generator = start_random_streams(run.config, run.distributed, resumed_step)
    if checkpoint is None:
        if folder.holds_a_run():  # only with --overwrite: read_settings refuses otherwise
            print(f"starting a new run: the run in {folder.path} will be replaced (--overwrite)")
        return TrainingState(batch_generator)
    state = restore_training_state(
        checkpoint,
        run.optimizer,
        run.scaler,
        batch_generator,
        history=read_history(folder.metrics, resumed_step),
        restore_random_streams=run.distributed.is_main,
    )
    best = best_evaluation(state.history)
    best_loss = (  # per character, as the log says it; the history can be missing
        f"{nats_per_char(best['val_bpc']):.4f} nats/char"
        if best is not None and math.isclose(best["val_loss"], state.best_val_loss)
        else f"{state.best_val_loss:.4f} nats/token"
    )
    print(f"resuming from step {state.step} (best validation loss {best_loss})")
    return state


def build_run(
    settings: RunSettings, checkpoint: dict[str, Any] | None, folder: RunFolder
) -> tuple[Run, TrainingState, RunDescription]:
    """Load or create the data, model, optimizer and progress of a run."""
    distributed, device, dtype = setup_compute(settings.train)
    torch.manual_seed(settings.train.seed)  # the same initial weights in every process
    corpus = load_data(settings.data, settings.model.block_size, checkpoint)
    pretrained = None
    if checkpoint is None and settings.train.init_from:
        pretrained = pretrained_gpt2(settings.train.init_from, settings.model, corpus.tokenizer)
    model_config = pretrained.config if pretrained is not None else settings.model
    settings = dataclasses.replace(
        settings, model=dataclasses.replace(model_config, vocab_size=corpus.tokenizer.vocab_size)
    )
    pass_size = sequences_per_pass(
        settings.train.sequences_per_pass,
        settings.train.batch_size,
        settings.model.block_size,
        device,
    )
    averaged_copy = model_memory(settings.model) if settings.train.weight_average else 0
    require_memory(
        training_memory(settings.model, settings.train.batch_size, pass_size) + averaged_copy,
        device,
        "training this model on this batch",
        "lower --sequences_per_pass, --batch_size, --block_size, --n_embd or --n_layer",
    )
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint, device)[0].train()
    elif pretrained is not None:
        model = GPT(settings.model)
        load_gpt2_weights(model, read_weights(pretrained.weights), corpus.tokenizer)
        model = model.to(device)
        print(f"model: GPT-2's weights from {pretrained.weights}")
    else:
        model = GPT(settings.model).to(device)
    average = weight_average(model, settings.train.weight_average)
    if checkpoint is not None:
        restore_weights(checkpoint, model, average)
    print(f"model: {model.num_parameters():,} parameters")
    optimizer = make_optimizer(model, settings.train, device)
    run = Run(
        model=model,
        compiled=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        splits=corpus.tokens,
        config=settings.train,
        device=device,
        autocast=autocast_context(device, dtype),
        sequences_per_pass=pass_size,
        distributed=distributed,
        average=average,
    )
    state = starting_state(run, checkpoint, folder)
    if checkpoint is not None:
        checkpoint.clear()  # its tensors now live in the model and optimizer: no second copy
    example = corpus.tokens["train"][: model.config.block_size].long().unsqueeze(0).to(device)
    run.compiled = wrap_model(model, settings.train.compile, distributed, example)
    print(
        f"global batch: {settings.train.batch_size} x {settings.train.gradient_accumulation_steps}"
        f" accumulation x {distributed.world_size} processes = "
        f"{run.tokens_per_step() // model.config.block_size} sequences of "
        f"{model.config.block_size} tokens, {pass_size} sequences per forward and backward pass"
    )
    description = RunDescription(
        settings, corpus.tokenizer, corpus.tokens_per_char(), corpus.sha256
    )
    return run, state, description


# ----------------------------------------------------------------------------------------------
# The loop


def save(run: Run, state: TrainingState, description: RunDescription, path: Path) -> None:
    """Save a checkpoint of the run as it stands."""
    checkpoint = make_checkpoint(
        run.model, run.optimizer, run.scaler, description, state, run.average
    )
    save_checkpoint(path, checkpoint)


def evaluate_and_save(
    run: Run,
    state: TrainingState,
    description: RunDescription,
    folder: RunFolder,
    progress: Progress,
) -> None:
    """Evaluate, log a metrics line, refresh the plot and the log, save the checkpoints."""
    losses = estimate_loss(run)
    if not all(math.isfinite(loss) for loss in losses.values()):
        raise TrainingDiverged(losses["train"], state.step, folder.path)
    lr = learning_rate_at(state.step, run.config)
    row = evaluation_row(state.step, losses, description.tokens_per_char, lr, state.elapsed_s)
    state.history.append(row)
    tqdm.write(
        f"step {state.step}: validation {nats_per_char(row['val_bpc']):.4f} nats/char "
        f"({row['val_bpc']:.3f} bits/char); per token: train {row['train_loss']:.4f}, "
        f"val {row['val_loss']:.4f}"
    )
    write_history(state.history, folder.metrics)
    plot_losses(state.history, folder.loss_plot)
    if losses["val"] < state.best_val_loss:
        state.best_val_loss = losses["val"]
        save(run, state, description, folder.best_checkpoint)
    save(run, state, description, folder.last_checkpoint)
    if progress.board is not None:
        best_bpc = min(r["val_bpc"] for r in state.history)
        prompt = run.splits["val"][:1].tolist()  # the validation text's first token
        sample = model_sample(run.final_model(), description.tokenizer, prompt, run.config.seed)
        progress.board.log_evaluation(row, best_bpc, sample)


def save_and_stop(
    run: Run, state: TrainingState, description: RunDescription, folder: RunFolder
) -> int:
    """Save the latest checkpoint after a Ctrl-C, say how to continue; returns the status."""
    if run.distributed.is_main:
        save(run, state, description, folder.last_checkpoint)
    wait_for_all(run.distributed)  # nobody shuts down while process 0 still saves
    if run.distributed.is_main:
        print(
            f"stopped at step {state.step}; saved {folder.last_checkpoint}. Continue with: "
            f"python {PROG} --resume --out_dir={folder.path}",
            file=sys.stderr,
        )
    return 130


def train(run: Run, state: TrainingState, description: RunDescription, folder: RunFolder) -> int:
    """The training loop: evaluate when due, step, report; returns the exit status."""
    config = run.config
    board = None
    if run.distributed.is_main:
        resumed = state.step if config.resume else None
        board = TensorBoardLog(folder.path, description.settings.to_dict(), resumed)
    progress = Progress(config.max_iters, state.step, run.tokens_per_step(), board)
    session_start, elapsed_before = time.perf_counter(), state.elapsed_s
    with StopRequest() as stop, contextlib.closing(progress):
        while True:
            state.elapsed_s = elapsed_before + time.perf_counter() - session_start
            due = state.step % config.eval_interval == 0 or state.step == config.max_iters
            logged = state.history and state.history[-1]["step"] == state.step
            if due and not logged and run.distributed.is_main:
                evaluate_and_save(run, state, description, folder, progress)
            if state.step == config.max_iters:
                break
            # All processes must stop at the same step, or the others would wait forever.
            if any_process(stop.requested, run.distributed, run.device):
                progress.close()
                return save_and_stop(run, state, description, folder)
            loss, grad_norm = train_step(run, state)
            if run.average is not None:
                run.average.update_parameters(run.model)
            state.step += 1
            state.tokens_seen += run.tokens_per_step()
            progress.bar.update(1)
            if state.step % config.log_interval == 0:
                # The loop's only host sync, every log_interval (with --weight_average on a
                # GPU, AveragedModel also copies its step count to the GPU every step).
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(loss_value, state.step, folder.path)
                lr = learning_rate_at(state.step, config)
                progress.log_step(state.step, loss_value, lr, grad_norm.item())
    wait_for_all(run.distributed)  # nobody shuts down while process 0 still saves
    if run.distributed.is_main:
        best = best_evaluation(state.history)
        assert best is not None, "a finished run has evaluated at least once"
        print(
            f"done in {state.history[-1]['elapsed_s']:.0f} s: best validation loss "
            f"{nats_per_char(best['val_bpc']):.4f} nats/char ({best['val_bpc']:.3f} bits/char, "
            f"{best['val_loss']:.4f} nats/token) at step {best['step']}; "
            f"checkpoints in {folder.path}/. Sample with: python generate_text.py "
            f"--out_dir={folder.path}"
        )
    return 0


def run_training(
    settings: RunSettings, checkpoint: dict[str, Any] | None, folder: RunFolder
) -> int:
    """Set the run up in its folder and train; returns the exit status."""
    run, state, description = build_run(settings, checkpoint, folder)
    if run.distributed.is_main:
        # A new run clears what the folder holds of an earlier one: --overwrite let it replace
        # a run, and files without a checkpoint (a run killed at once) are worth nothing.
        folder.start(description.settings.to_dict(), replace=checkpoint is None)
        mark_latest(folder)
    return train(run, state, description, folder)


def main(argv: list[str] | None = None) -> int:
    """Train from the command line; returns the exit status."""
    streams = sys.stdout, sys.stderr
    # A closed terminal or pipe must not end the run before it saves: output that cannot be
    # written is dropped.
    sys.stdout, sys.stderr = ForgivingStream(sys.stdout), ForgivingStream(sys.stderr)
    folder = None
    try:
        if process_rank() > 0:
            # Under torchrun only process 0 reports progress; the others stay quiet.
            sys.stdout = ForgivingStream(open(os.devnull, "w"))  # noqa: SIM115 - for good
        settings, checkpoint = read_settings(argv)
        folder = RunFolder(Path(settings.train.out_dir))
        # One training process per folder: process 0 holds it (the others write nothing).
        new_run = checkpoint is None
        lock = folder.lock(discard_if_empty=new_run) if process_rank() == 0 else None
        with lock or contextlib.nullcontext():
            return run_training(settings, checkpoint, folder)
    except UserFacingError as err:
        print_error(PROG, err)
        return 2
    except (TrainingDiverged, OSError) as err:  # OSError: e.g. a full disk while saving
        print_error(PROG, err)
        return 1
    except KeyboardInterrupt:
        saved = folder is not None and folder.last_checkpoint.exists()
        kept = "the last checkpoint is intact" if saved else "nothing had been saved yet"
        print(f"{PROG}: interrupted; {kept}", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C as usual again
    raise SystemExit(main())
