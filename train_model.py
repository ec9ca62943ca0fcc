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

import argparse
import contextlib
import dataclasses
from collections.abc import Callable

import torch
from torch.optim.swa_utils import AveragedModel

from data_handling import get_batch, load_splits
from hyperparameters import DataConfig, ModelConfig, TrainConfig
from model_architecture import GPT
from optimization import Optimizer, learning_rate_at, make_optimizer, model_to_keep, weight_average
from support.checkpoint import TrainingState
from support.command_line import build_parser
from support.common import UserFacingError, print_error
from support.devices import Distributed, ProcessLost, autocast_context, wrap_model
from support.fast_paths import for_training
from support.training_session import TrainingDiverged, TrainingSession

PROG = "train_model.py"


# ----------------------------------------------------------------------------------------------
# One training step, and the evaluation


class StoppedMidway(Exception):
    """A stop request came between two passes: the step (or evaluation) is dropped unfinished."""


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
    # Whether Ctrl-C or SIGTERM came, asked between passes so that a long step stops within
    # seconds (several processes agree on it, so that all drop the same pass).
    stop_asked: Callable[[], bool] = lambda: False

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
    Returns the step's loss (under torchrun, this process's batches') and the gradient norm
    before clipping, as tensors: reading them waits for the step, so the loop does that only
    every log_interval steps.
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
            # The loop asked just before the step; asking again before each later pass lets a
            # long step stop within seconds. It is dropped: its gradients are never applied.
            if (micro_step, pass_number) != (0, 0) and run.stop_asked():
                run.optimizer.zero_grad(set_to_none=True)
                raise StoppedMidway
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
    return total_loss, apply_gradients(run)


def apply_gradients(run: Run) -> torch.Tensor:
    """The optimizer step on the summed gradients (clipped); returns their norm before clipping."""
    run.scaler.unscale_(run.optimizer)  # true gradients, for their norm and for clipping
    parameters = run.model.parameters()
    if run.config.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, run.config.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm(p.grad for p in parameters)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


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
                if run.stop_asked():
                    model.train()
                    raise StoppedMidway
                with run.autocast:
                    _, loss = model(pass_x, pass_y)
                total += loss.item() * pass_x.size(0) / x.size(0)
        losses[name] = total / config.eval_iters
    model.train()
    return losses


# ----------------------------------------------------------------------------------------------
# The recipe: settings -> data -> model and optimizer -> the loop


def build_run(session: TrainingSession) -> Run:
    """The data, the model and its optimizer: everything a training step works with."""
    settings, device = session.settings, session.device
    torch.manual_seed(settings.train.seed)  # the same initial weights in every process
    # The text, as token ids, split into training and validation (a resumed run keeps its own
    # tokenizer, and must find the text it trained on).
    tokenizer, trained_on = session.saved_tokenizer()
    corpus = load_splits(settings.data, settings.model.block_size, tokenizer, trained_on)
    print(corpus.summary())
    model = GPT(session.model_config_for(corpus)).to(device)  # vocab_size from the tokenizer
    session.load_weights(model)  # GPT-2's (--init_from) or the resumed run's; else random ones
    print(f"model: {model.num_parameters():,} parameters")
    # The same math, with a cheaper dropout on a CPU in the layers and in attention.
    model = for_training(model)
    train_config = session.settings.train
    run = Run(
        model=model,
        compiled=model,
        optimizer=make_optimizer(model, train_config, device),
        # Loss scaling keeps float16's small gradients from rounding to zero; off otherwise.
        scaler=torch.amp.GradScaler(device.type, enabled=session.dtype == torch.float16),
        splits=corpus.tokens,
        config=train_config,
        device=device,
        autocast=autocast_context(device, session.dtype),
        sequences_per_pass=session.sequences_per_pass,
        distributed=session.distributed,
        average=weight_average(model, train_config.weight_average),
        stop_asked=session.stop_asked_between_passes,
    )
    # Seeds the batches and dropout (a resumed run gets its saved weights' average, optimizer
    # state and random streams back), then writes the run's config.json into its folder.
    session.start(run)
    example = corpus.tokens["train"][: model.config.block_size].long().unsqueeze(0).to(device)
    run.compiled = wrap_model(model, train_config.compile, session.distributed, example)
    return run


def train(run: Run, session: TrainingSession) -> int:
    """The loop: evaluate and save when due, stop when asked, take a step; returns the status."""
    state = session.state
    with session.running(run):  # a progress bar, the logs, and a Ctrl-C that saves first
        while True:
            try:
                if session.evaluation_due():
                    session.record_evaluation(estimate_loss(run), run)  # logs, saves checkpoints
                if state.step == run.config.max_iters:
                    return session.finish()
                if session.stop_requested():  # Ctrl-C or SIGTERM, in any process
                    return session.save_and_stop(run)
                loss, grad_norm = train_step(run, state)
            except StoppedMidway:  # Ctrl-C or SIGTERM during a long evaluation or step
                return session.save_and_stop(run, step_dropped=True)
            if run.average is not None:
                run.average.update_parameters(run.model)
            state.step += 1
            session.report_step(run, loss, grad_norm)  # the progress bar; stops if loss is nan


def command_line() -> argparse.ArgumentParser:
    """One option for every field of hyperparameters.py's model, data and training settings."""
    return build_parser(__doc__, [(ModelConfig, None), (DataConfig, None), (TrainConfig, None)])


def main(argv: list[str] | None = None) -> int:
    """Train from the command line; returns the exit status."""
    session = TrainingSession(PROG)
    try:
        with session.open(command_line(), argv):  # settings, the run folder's lock, the device
            if session.starts_processes():  # --processes=N: N processes train; this one waits
                return session.run_processes(__file__, argv)
            return train(build_run(session), session)
    except UserFacingError as err:
        print_error(PROG, err)
        return 2
    # OSError: e.g. a full disk while saving; ProcessLost: another process of the job ended.
    except (TrainingDiverged, OSError, ProcessLost) as err:
        print_error(PROG, err)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: quit at once
        return session.interrupted()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C as usual again
    raise SystemExit(main())
