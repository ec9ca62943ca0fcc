"""A training run's plumbing, behind one object: what train_model.py's recipe stands on.

train_model.py says what training is (data, model, optimizer, a loop of step / evaluate /
save). A TrainingSession does the rest: it reads the settings (from the command line, or from
the checkpoint of the run it resumes), holds the run folder's lock, chooses the device (joining
a torchrun job if there is one), checks that the model fits in memory, restores a resumed run's
progress and random streams, listens for Ctrl-C and SIGTERM, and writes the metrics, plot,
TensorBoard log and checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from data_handling import CorpusSplits, get_batch
from hyperparameters import DataConfig, ModelConfig, RunSettings, TrainConfig
from model_architecture import GPT
from optimization import Optimizer, learning_rate_at
from support.checkpoint import (
    RunDescription,
    TrainingState,
    check_resumable,
    load_checkpoint,
    load_saved_weights,
    make_checkpoint,
    restore_training_state,
    restore_weights,
    save_checkpoint,
    saved_corpus_sha256,
    saved_settings,
    saved_tokenizer,
)
from support.command_line import parse_configs
from support.common import ForgivingStream, UserFacingError, print_line
from support.devices import (
    Distributed,
    StopRequest,
    any_process,
    as_process_lost,
    from_process_0,
    model_memory,
    note_random_streams,
    process_rank,
    put_back_random_streams,
    require_memory,
    sequences_per_pass,
    setup_compute,
    shutdown_distributed,
    start_random_streams,
    stop_signals_interrupt,
    training_memory,
    wait_for_all,
)
from support.hugging_face import PretrainedGPT2, load_gpt2_weights, pretrained_gpt2, read_weights
from support.launcher import (
    check_processes,
    run_processes,
    starts_processes,
    stop_with_the_launcher,
)
from support.run_folder import RunFolder, chosen_run, folder_for_new_run, mark_latest
from support.training_log import (
    Progress,
    TensorBoardLog,
    best_evaluation,
    duration,
    evaluation_row,
    model_sample,
    nats_per_char,
    plot_losses,
    read_history,
    write_history,
)
from tokenization import Tokenizer

LONG_STEP_S = 60  # a step that takes longer is worth a warning at start
STOP_CHECK_S = 0.5  # several processes agree on stopping this often within a long step


class TrainingDiverged(Exception):
    """The loss stopped being a finite number."""

    def __init__(self, loss: float, step: int, out_dir: Path) -> None:
        super().__init__(
            f"loss became {loss} by step {step}; the checkpoints in {out_dir} are from the "
            "last good evaluation. Try a lower --learning_rate"
        )


class Trainee(Protocol):
    """What the session reads of train_model.Run: the model and what trains it."""

    model: GPT
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    average: AveragedModel | None
    splits: dict[str, torch.Tensor]

    def final_model(self) -> GPT:
        """What checkpoints keep for generation."""

    def tokens_per_step(self) -> int:
        """Tokens one optimizer step learns from, over all processes."""


# ----------------------------------------------------------------------------------------------
# Settings: the command line for a new run, the checkpoint for a resumed one


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


def read_settings(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[RunSettings, dict[str, Any] | None]:
    """The run's settings from the command line, or from the checkpoint when resuming."""
    (model_config, data_config, train_config), given = parse_configs(
        parser, [ModelConfig, DataConfig, TrainConfig], argv
    )
    if train_config.resume and train_config.overwrite:
        raise UserFacingError(
            "--resume continues a run and --overwrite replaces it with a new one; give one"
        )
    if not train_config.resume:
        # Under torchrun, process 0 creates the folder; the others write nothing there (nor
        # does the process that starts them with --processes).
        claim = process_rank() == 0 and not starts_processes(train_config.processes)
        folder = folder_for_new_run(train_config.out_dir, train_config.overwrite, claim)
        train_config = dataclasses.replace(train_config, out_dir=str(folder.path))
        return RunSettings(model=model_config, data=data_config, train=train_config), None
    folder = chosen_run(train_config.out_dir)
    checkpoint = load_checkpoint(folder.last_checkpoint)
    check_resumable(checkpoint)
    check_checkpoint_belongs(folder, checkpoint)
    settings = settings_for_resume(saved_settings(checkpoint), given, str(folder.path))
    if finished(folder, checkpoint["step"], settings.train.max_iters):
        raise UserFacingError(
            f"the saved run already did {checkpoint['step']} steps; raise --max_iters to "
            "train further"
        )
    return settings, checkpoint


def finished(folder: RunFolder, step: int, max_iters: int) -> bool:
    """Whether a run saved at `step` has nothing left to do up to max_iters.

    A run stopped during its final evaluation saved at max_iters without it: resuming does it.
    """
    history = read_history(folder.metrics, step)
    return step > max_iters or (step == max_iters and bool(history) and history[-1]["step"] == step)


def check_checkpoint_belongs(folder: RunFolder, checkpoint: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint that the folder's config.json says is another run's.

    A checkpoint copied in from another run would otherwise go on training here and replace
    this run's best checkpoint, settings and logs. Both record the run's identity (runs made
    before it existed: their model and data settings).
    """
    recorded = folder.read_settings()
    ids = recorded.get("run_id"), checkpoint.get("run_id")
    if all(ids) and ids[0] == ids[1]:
        return
    sections = (("model", "model_config"), ("data", "data_config"))
    differs = [
        name
        for section, key in sections
        for name, value in (recorded.get(section) or {}).items()
        if name != "data" and name in checkpoint[key] and checkpoint[key][name] != value
    ]
    if all(ids) and not differs:
        differs = ["run identity"]
    if differs:
        raise UserFacingError(
            f"{folder.last_checkpoint} is not the checkpoint of the run {folder.settings} "
            f"records (they differ in: {', '.join(differs)}); put that run's checkpoint back, "
            "or train a new run in another --out_dir"
        )


# ----------------------------------------------------------------------------------------------
# The session


class TrainingSession:
    """One training process's run: its settings, folder, device, progress and outputs.

    Use: `open` (a context: settings, folder lock, device); `saved_tokenizer`,
    `model_config_for`, `load_weights` and `start` as the run is built; `running` (a context)
    around the loop, and in it `evaluation_due` / `record_evaluation`, `stop_requested`,
    `report_step`; at the end `finish` or `save_and_stop`.
    """

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.settings: RunSettings
        self.checkpoint: dict[str, Any] | None = None  # of the run being resumed
        self.folder: RunFolder | None = None
        self.distributed = Distributed()
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.sequences_per_pass = 0  # sequences in one forward and backward pass
        self.pretrained: PretrainedGPT2 | None = None  # with --init_from
        self.run_id = ""  # set by open
        self.description: RunDescription
        self.state: TrainingState
        self.progress: Progress | None = None
        self.stop = StopRequest()
        self.clock_start, self.elapsed_before = 0.0, 0.0
        self._streams_before: dict[str, Any] = {}
        self._evaluating = False  # process 0 evaluates alone: see stop_asked_between_passes
        self._passes_per_stop_check = 0  # with several processes; 0: only between steps
        self._passes_seen = 0

    @contextlib.contextmanager
    def open(
        self, parser: argparse.ArgumentParser, argv: list[str] | None
    ) -> Iterator[RunSettings]:
        """Read the settings, hold the run folder and choose the device; yield the settings.

        Output that cannot be written (a closed terminal or pipe) is dropped rather than ending
        the run before it saves; under torchrun only process 0 reports progress.
        """
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = ForgivingStream(sys.stdout), ForgivingStream(sys.stderr)
        try:
            # Until the loop's StopRequest makes them ask for a save.
            with stop_signals_interrupt():
                stop_with_the_launcher()
                if process_rank() > 0:
                    sys.stdout = ForgivingStream(open(os.devnull, "w"))  # noqa: SIM115 - for good
                self.settings, self.checkpoint = read_settings(parser, argv)
                check_processes(self.settings.train.processes, self.settings.train.device)
                if self.starts_processes():  # they hold the folder and the device, not this one
                    self.checkpoint = None
                    yield self.settings
                    return
                # The run's identity: a resumed run's own, else (new, or older) a new one.
                saved_id = self.checkpoint.get("run_id") if self.checkpoint is not None else ""
                self.run_id = saved_id or uuid.uuid4().hex
                self.folder = RunFolder(Path(self.settings.train.out_dir))
                # One training process per folder: process 0 holds it (the others write nothing).
                new_run = self.checkpoint is None
                lock = self.folder.lock(discard_if_unsaved=new_run) if process_rank() == 0 else None
                with lock or contextlib.nullcontext():
                    self.distributed, self.device, self.dtype = setup_compute(self.settings.train)
                    yield self.settings
        except RuntimeError as err:  # several processes: a collective whose peer is gone?
            lost = as_process_lost(err, self.distributed)
            if lost is None:
                raise
            raise lost from None
        finally:
            shutdown_distributed()
            sys.stdout, sys.stderr = streams

    def starts_processes(self) -> bool:
        """Whether this process starts --processes training processes instead of training."""
        return starts_processes(self.settings.train.processes)

    def run_processes(self, script: str, argv: list[str] | None) -> int:
        """Train with --processes processes of `script` on this machine; returns the status."""
        given = sys.argv[1:] if argv is None else argv
        return run_processes(self.prog, script, given, self.settings.train.processes)

    # --- Before the loop ---------------------------------------------------------------------

    def saved_tokenizer(self) -> tuple[Tokenizer | None, str]:
        """A resumed run's tokenizer and the sha256 of its text; (None, "") for a new run."""
        if self.checkpoint is None:
            return None, ""
        return saved_tokenizer(self.checkpoint), saved_corpus_sha256(self.checkpoint)

    def model_config_for(self, corpus: CorpusSplits) -> ModelConfig:
        """The model's settings for this corpus, checked against the device's memory.

        The vocabulary's size comes from the tokenizer; with --init_from, the shape is GPT-2's.
        """
        settings = self.settings
        if self.checkpoint is None and settings.train.init_from:
            self.pretrained = pretrained_gpt2(
                settings.train.init_from, settings.model, corpus.tokenizer
            )
        model_config = self.pretrained.config if self.pretrained is not None else settings.model
        model_config = dataclasses.replace(model_config, vocab_size=corpus.tokenizer.vocab_size)
        self.settings = settings = dataclasses.replace(settings, model=model_config)
        self.description = RunDescription(
            settings, corpus.tokenizer, corpus.tokens_per_char(), corpus.sha256, self.run_id
        )
        self._check_memory()
        return model_config

    def load_weights(self, model: GPT) -> None:
        """GPT-2's weights (--init_from) or the resumed run's; a new run keeps its random ones."""
        if self.checkpoint is not None:
            load_saved_weights(model, self.checkpoint)
        elif self.pretrained is not None:
            weights = read_weights(self.pretrained.weights)
            load_gpt2_weights(model, weights, self.description.tokenizer)
            print(f"model: GPT-2's weights from {self.pretrained.weights}")

    def _check_memory(self) -> None:
        """Choose the pass size, and refuse a run the device cannot hold."""
        model, train = self.settings.model, self.settings.train
        self.sequences_per_pass = sequences_per_pass(
            train.sequences_per_pass, train.batch_size, model.block_size, self.device
        )
        averaged_copy = model_memory(model) if train.weight_average else 0
        require_memory(
            training_memory(model, train.batch_size, self.sequences_per_pass) + averaged_copy,
            self.device,
            "training this model on this batch",
            "lower --sequences_per_pass, --batch_size, --block_size, --n_embd or --n_layer",
        )

    def start(self, run: Trainee) -> None:
        """Seed the random streams; restore a resumed run; set up the folder and the logs."""
        checkpoint, folder = self.checkpoint, self.folder
        assert folder is not None, "start comes after open"
        resumed_step = checkpoint["step"] if checkpoint is not None else 0
        batch_generator = start_random_streams(self.settings.train, self.distributed, resumed_step)
        if checkpoint is None:
            if folder.holds_a_run():  # only with --overwrite: read_settings refuses otherwise
                print(
                    f"starting a new run: the run in {folder.path} will be replaced (--overwrite)"
                )
            self.state = TrainingState(batch_generator)
        else:
            self.state = self._resumed_state(run, batch_generator)
            checkpoint.clear()  # its tensors now live in the model and optimizer: no second copy
        if self.distributed.is_main:
            # A new run clears what the folder holds of an earlier one: --overwrite let it
            # replace a run, and files without a checkpoint (a run killed at once) are worth
            # nothing.
            folder.start(self.settings.to_dict(), self.run_id, replace=checkpoint is None)
            mark_latest(folder)
        self._say_batch(run)

    def _resumed_state(self, run: Trainee, batch_generator: torch.Generator) -> TrainingState:
        """The saved run's weights, optimizer, random streams and progress, put back."""
        checkpoint, folder = self.checkpoint, self.folder
        assert checkpoint is not None, "only a resumed run has a checkpoint"
        restore_weights(checkpoint, run.model, run.average)
        state = restore_training_state(
            checkpoint,
            run.optimizer,
            run.scaler,
            batch_generator,
            history=read_history(folder.metrics, checkpoint["step"]),
            restore_random_streams=self.distributed.is_main,
        )
        best = best_evaluation(state.history)
        best_loss = (  # per character, as the log says it; the history can be missing
            f"{nats_per_char(best['val_bpc']):.4f} nats/char"
            if best is not None and math.isclose(best["val_loss"], state.best_val_loss)
            else f"{state.best_val_loss:.4f} nats/token"
        )
        print(f"resuming from step {state.step} (best validation loss {best_loss})")
        return state

    def _say_batch(self, run: Trainee) -> None:
        train, block_size = self.settings.train, self.settings.model.block_size
        world = self.distributed.world_size
        print(
            f"global batch: {train.batch_size} x {train.gradient_accumulation_steps} accumulation"
            f"{f' x {world} processes' if world > 1 else ''} = "
            f"{run.tokens_per_step() // block_size} sequences of {block_size} tokens, "
            f"{self.sequences_per_pass} sequences per forward and backward pass"
        )

    @contextlib.contextmanager
    def running(self, run: Trainee) -> Iterator[None]:
        """While the loop runs: a progress bar, the TensorBoard log, a polite Ctrl-C."""
        train, state = self.settings.train, self.state
        board = None
        if self.distributed.is_main:
            resumed = state.step if train.resume else None
            board = TensorBoardLog(self.folder.path, self.settings.to_dict(), resumed)
        self._plan_for_long_steps(run)
        self.progress = Progress(train.max_iters, state.step, run.tokens_per_step(), board)
        self.clock_start, self.elapsed_before = time.perf_counter(), state.elapsed_s
        with self.stop, contextlib.closing(self.progress):
            yield

    def _plan_for_long_steps(self, run: Trainee) -> None:
        """Time a pass at start: warn of steps over a minute, and plan the stop checks.

        One forward pass, timed by process 0 without gradients (a training pass costs about
        three), tells. Several processes agree within a long step on whether to stop: each
        agreement is a message per process, so they agree about every STOP_CHECK_S of passes,
        soon enough to stop within seconds and rarely enough to cost nothing.
        """
        train = self.settings.train
        per_pass = self.sequences_per_pass
        passes = -(-train.batch_size // per_pass) * train.gradient_accumulation_steps
        pass_s = 0.0
        if passes > 1 and self.distributed.is_main:
            pass_s = 3 * self._time_a_forward_pass(run)
        if pass_s * passes > LONG_STEP_S:
            steps_left = train.max_iters - self.state.step
            print(
                f"warning: a step is {passes:,} passes of {per_pass:,} sequences, about "
                f"{duration(pass_s * passes)} each ({duration(pass_s * passes * steps_left)} "
                f"for {steps_left:,} steps); Ctrl-C stops within a pass. Lower --batch_size or "
                "--gradient_accumulation_steps for shorter steps",
                file=sys.stderr,
            )
        # 0: only between steps (a step is short, or a single pass).
        every = math.ceil(STOP_CHECK_S / pass_s) if pass_s * passes > STOP_CHECK_S else 0
        self._passes_per_stop_check = from_process_0(every, self.distributed, self.device)

    def _time_a_forward_pass(self, run: Trainee) -> float:
        """Seconds for one forward pass of a training pass's size, without gradients."""
        block_size = run.model.config.block_size
        x, y = get_batch(
            run.splits["train"], self.sequences_per_pass, block_size, torch.Generator(), self.device
        )
        run.model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            run.model(x, y)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        run.model.train()
        return seconds

    # --- In the loop -------------------------------------------------------------------------

    def _tick(self) -> None:
        """Bring the run's training time up to now (it adds up over every session of a run)."""
        self.state.elapsed_s = self.elapsed_before + time.perf_counter() - self.clock_start

    def evaluation_due(self) -> bool:
        """Every eval_interval steps and at the last, once per step, by process 0 only."""
        step, history = self.state.step, self.state.history
        due = step % self.settings.train.eval_interval == 0 or step == self.settings.train.max_iters
        logged = bool(history) and history[-1]["step"] == step
        self._evaluating = due and not logged and self.distributed.is_main
        if self._evaluating:
            self._note_random_streams()
        return self._evaluating

    def record_evaluation(self, losses: dict[str, float], run: Trainee) -> None:
        """Log the losses (metrics.jsonl, the plot, TensorBoard, a line) and save checkpoints."""
        self._tick()
        state, folder, train = self.state, self.folder, self.settings.train
        if not all(math.isfinite(loss) for loss in losses.values()):
            raise TrainingDiverged(losses["train"], state.step, folder.path)
        lr = learning_rate_at(state.step, train)
        tokens_per_char = self.description.tokens_per_char
        row = evaluation_row(state.step, losses, tokens_per_char, lr, state.elapsed_s)
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
            self._save(run, folder.best_checkpoint)
        self._save(run, folder.last_checkpoint)
        if self.progress.board is not None:
            best_bpc = min(r["val_bpc"] for r in state.history)
            prompt = run.splits["val"][:1].tolist()  # the validation text's first token
            sample = model_sample(run.final_model(), self.description.tokenizer, prompt, train.seed)
            self.progress.board.log_evaluation(row, best_bpc, sample)

    def stop_requested(self) -> bool:
        """Whether Ctrl-C or SIGTERM asked any process to stop: all stop at the same step."""
        self._note_random_streams()
        self._evaluating = False
        return any_process(self.stop.requested, self.distributed, self.device)

    def stop_asked_between_passes(self) -> bool:
        """Whether Ctrl-C or SIGTERM came, for a long step or evaluation to stop midway.

        Under torchrun, every process must drop the same pass of a step: they agree on it (a
        one-number message each) every few passes of a long step (_plan_for_long_steps).
        Process 0 evaluates alone, so it decides alone while the others wait for it at their
        stop check. A step or an evaluation dropped midway is saved as never begun (see
        save_and_stop).
        """
        if self._evaluating or not self.distributed.enabled:
            return self.stop.requested
        self._passes_seen += 1  # the same count in every process: each asks at every pass
        every = self._passes_per_stop_check
        if not every or self._passes_seen % every:
            return False
        return any_process(self.stop.requested, self.distributed, self.device)

    def _note_random_streams(self) -> None:
        """The random streams as the evaluation or step about to begin finds them."""
        self._streams_before = note_random_streams(self.state.batch_generator)

    def report_step(self, run: Trainee, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Count the step just taken; every log_interval, show its loss and stop a diverged run."""
        state, train = self.state, self.settings.train
        state.tokens_seen += run.tokens_per_step()
        self.progress.bar.update(1)
        if state.step % train.log_interval == 0:
            # The loop's only wait for the device, every log_interval steps (with
            # --weight_average on a GPU, AveragedModel also copies its count there every step).
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(loss_value, state.step, self.folder.path)
            lr = learning_rate_at(state.step, train)
            self.progress.log_step(state.step, loss_value, lr, grad_norm.item())

    # --- After the loop ----------------------------------------------------------------------

    def finish(self) -> int:
        """Say where the run ended and how to sample from it; returns the exit status."""
        self.progress.close()
        wait_for_all(self.distributed)  # nobody shuts down while process 0 still saves
        if self.distributed.is_main:
            best = best_evaluation(self.state.history)
            assert best is not None, "a finished run has evaluated at least once"
            print(
                f"done in {self.state.history[-1]['elapsed_s']:.0f} s: best validation loss "
                f"{nats_per_char(best['val_bpc']):.4f} nats/char ({best['val_bpc']:.3f} "
                f"bits/char, {best['val_loss']:.4f} nats/token) at step {best['step']}; "
                f"checkpoints in {self.folder.path}/. Sample with: python generate_text.py "
                f"--out_dir={self.folder.path}"
            )
        return 0

    def save_and_stop(self, run: Trainee, step_dropped: bool = False) -> int:
        """Save the latest checkpoint after a Ctrl-C, say how to continue; returns the status.

        With step_dropped, the evaluation or step that the stop cut short is saved as never
        begun: its random streams are put back, so --resume takes it exactly as it would have.
        """
        if step_dropped:
            put_back_random_streams(self._streams_before, self.state.batch_generator)
        # Process 0 dropped an evaluation that it makes alone: the others wait at their stop
        # check (told here to stop), or, after the last step, in finish (met below).
        if step_dropped and self._evaluating and self.state.step < self.settings.train.max_iters:
            any_process(True, self.distributed, self.device)
        self._tick()
        self.progress.close()
        if self.distributed.is_main:
            self._save(run, self.folder.last_checkpoint)
        wait_for_all(self.distributed)  # nobody shuts down while process 0 still saves
        if self.distributed.is_main:
            print(
                f"stopped at step {self.state.step}; saved {self.folder.last_checkpoint}. "
                f"Continue with: python {self.prog} --resume --out_dir={self.folder.path}",
                file=sys.stderr,
            )
        return 130

    def interrupted(self) -> int:
        """Say what a second Ctrl-C (or one during start-up) left behind; returns the status."""
        saved = self.folder is not None and self.folder.last_checkpoint.exists()
        kept = "the last checkpoint is intact" if saved else "nothing had been saved yet"
        print_line(f"{self.prog}: interrupted; {kept}")
        return 130

    def _save(self, run: Trainee, path: Path) -> None:
        """Save a checkpoint of the run as it stands."""
        checkpoint = make_checkpoint(
            run.model, run.optimizer, run.scaler, self.description, self.state, run.average
        )
        save_checkpoint(path, checkpoint)
