"""Train the GPT on a text corpus, with periodic evaluation, checkpoints and a loss plot.

    python train_model.py                          # Tiny Shakespeare, the defaults
    python train_model.py --data my.txt --tokenizer bpe --max_iters 5000
    python train_model.py --resume                 # continue out/ckpt_last.pth
    python train_model.py --help                   # every setting, with its default

Writes to out_dir: ckpt_last.pth (latest), ckpt_best.pth (lowest validation loss),
metrics.jsonl (one line per evaluation), loss.png and config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import (
    FORMAT_VERSION,
    TRAIN_SETTINGS_BEFORE_THEY_EXISTED,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    saved_model_config,
)
from data_handling import (
    Tokenizer,
    build_tokenizer,
    encode_corpus,
    get_batch,
    read_corpus,
    resolve_corpus,
    split_tokens,
    tokenizer_from_dict,
    write_atomically,
)
from devices import (
    Distributed,
    any_process,
    autocast_context,
    init_distributed,
    resolve_dtype,
    shutdown_distributed,
    wait_for_all,
)
from hyperparameters import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    UserFacingError,
    build_parser,
    first_line,
    parse_configs,
    print_error,
)
from model_architecture import GPT
from optimization import Optimizer, learning_rate_at, make_optimizer
from training_log import bits_per_char, plot_losses, read_history, write_history

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
    """Everything one training run works with, passed to the step functions."""

    model: GPT
    compiled: torch.nn.Module  # what runs forward passes: maybe torch.compile'd, maybe DDP
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    splits: dict[str, torch.Tensor]
    tokens_per_char: dict[str, float]
    batch_generator: torch.Generator
    device: torch.device
    autocast: contextlib.AbstractContextManager
    model_config: ModelConfig
    data_config: DataConfig
    train_config: TrainConfig
    tokenizer: Tokenizer
    distributed: Distributed

    def tokens_per_step(self) -> int:
        """Tokens one optimizer step learns from, over all processes."""
        config = self.train_config
        sequences = (
            config.batch_size * config.gradient_accumulation_steps * self.distributed.world_size
        )
        return sequences * self.model_config.block_size


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step over gradient_accumulation_steps micro-batches; returns the loss."""
    config = run.train_config
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate_at(step, config)
    total_loss = torch.zeros((), device=run.device)
    for micro_step in range(config.gradient_accumulation_steps):
        # Across processes, gradients are averaged once per step, after the last micro-batch.
        last = micro_step == config.gradient_accumulation_steps - 1
        skip_sync = run.distributed.enabled and not last
        x, y = get_batch(
            run.splits["train"],
            config.batch_size,
            run.model_config.block_size,
            run.batch_generator,
            run.device,
        )
        with run.compiled.no_sync() if skip_sync else contextlib.nullcontext():
            with run.autocast:
                _, loss = run.compiled(x, y)
            # Scaling each micro-batch's loss makes the summed gradient equal one big batch's.
            loss = loss / config.gradient_accumulation_steps
            run.scaler.scale(loss).backward()
        total_loss += loss.detach()
    if config.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return total_loss


@torch.no_grad()
def estimate_loss(run: Run) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split; the same batches at every evaluation."""
    config = run.train_config
    run.compiled.eval()
    losses = {}
    for name, data in run.splits.items():
        # A fixed, separate generator: evaluations are comparable and training's data order
        # is not disturbed.
        generator = torch.Generator().manual_seed(config.seed + 1)
        total = 0.0
        for _ in range(config.eval_iters):
            x, y = get_batch(
                data, config.batch_size, run.model_config.block_size, generator, run.device
            )
            with run.autocast:
                _, loss = run.compiled(x, y)
            total += loss.item()
        losses[name] = total / config.eval_iters
    run.compiled.train()
    return losses


# ----------------------------------------------------------------------------------------------
# Checkpoints


def make_checkpoint(run: Run, step: int, best_val_loss: float) -> dict[str, Any]:
    """A weights_only-safe dict with everything needed to generate from or resume this run."""
    rng = {"torch": torch.get_rng_state(), "batches": run.batch_generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format_version": FORMAT_VERSION,
        "model_config": dataclasses.asdict(run.model_config),
        "data_config": dataclasses.asdict(run.data_config),
        "train_config": dataclasses.asdict(run.train_config),
        "tokenizer": run.tokenizer.to_dict(),
        "model": run.model.state_dict(),  # the raw module: no torch.compile key prefixes
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": step,
        "best_val_loss": best_val_loss,
        "tokens_seen": step * run.tokens_per_step(),
        "tokens_per_char": run.tokens_per_char,  # turns losses into bits per character
        "rng": rng,
        "torch_version": str(torch.__version__),  # a plain str: weights_only-safe
    }


# ----------------------------------------------------------------------------------------------
# Stopping politely on Ctrl-C


class StopRequest:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second quits."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (press Ctrl-C again to quit at once)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Setting up a run


def load_configs_for_resume(
    checkpoint: dict[str, Any], given: dict[str, Any], out_dir: str
) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """The resumed run's settings: the saved ones, with the options given now where allowed.

    The model, the data and the optimizer cannot change (contradicting options are a user
    error); other training settings (max_iters, learning_rate, ...) may; out_dir is where the
    checkpoint was found, and --data may point at a corpus that moved.
    """
    saved_model = dataclasses.asdict(saved_model_config(checkpoint))
    saved_data = checkpoint["data_config"]
    saved_train = {**TRAIN_SETTINGS_BEFORE_THEY_EXISTED, **checkpoint.get("train_config", {})}
    if "min_lr" in saved_train:  # older checkpoints hold the floor itself, not its share
        saved_train["min_lr_fraction"] = saved_train["min_lr"] / saved_train["learning_rate"]
    fixed = {**saved_model, **saved_data, "optimizer": saved_train["optimizer"]}
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
    train = {k: v for k, v in {**saved_train, **given}.items() if k in train_fields}
    try:
        return (
            ModelConfig(**saved_model),
            DataConfig(**{**saved_data, "data": given.get("data", saved_data["data"])}),
            TrainConfig(**{**train, "out_dir": out_dir, "resume": True}),
        )
    except (TypeError, ValueError) as err:  # a damaged or hand-edited checkpoint
        raise UserFacingError(f"the saved run's settings are not valid ({err})") from None


def prepare_data(
    data_config: DataConfig, block_size: int, tokenizer: Tokenizer | None
) -> tuple[Tokenizer, dict[str, torch.Tensor], dict[str, float]]:
    """Read, tokenize (cached) and split the corpus; print its facts."""
    path = resolve_corpus(data_config.data)
    text = read_corpus(path)
    tokenizer = tokenizer or build_tokenizer(data_config.tokenizer, text)
    tokens = encode_corpus(text, tokenizer, Path(data_config.cache_dir))
    train, val = split_tokens(tokens, data_config.val_fraction, block_size)
    splits = {"train": train, "val": val}
    # Characters per split, so losses can be reported per character for any tokenizer.
    n_train_chars = len(tokenizer.decode(train.tolist()))
    tokens_per_char = {
        "train": len(train) / n_train_chars,
        "val": len(val) / (len(text) - n_train_chars),
    }
    print(
        f"corpus {path}: {len(text):,} characters, {data_config.tokenizer} tokenizer with "
        f"{tokenizer.vocab_size:,} tokens; {len(train):,} training and {len(val):,} "
        "validation tokens"
    )
    return tokenizer, splits, tokens_per_char


def maybe_compile(model: GPT, enabled: bool, example: torch.Tensor) -> torch.nn.Module:
    """torch.compile the model if asked and if it works here; otherwise say so and run eager."""
    if not enabled:
        return model
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(example)  # compilation happens on the first call; fail here, not later
        return compiled
    except Exception as err:  # any compiler failure: the eager model still works
        print(f"warning: torch.compile failed ({first_line(err):.100}); running uncompiled")
        return model


def restore_training_state(
    checkpoint: dict[str, Any],
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler,
    batch_generator: torch.Generator,
    distributed: Distributed,
) -> None:
    """Put the optimizer and the random number generators back where the run left them."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    if distributed.rank > 0:
        return  # the saved random state is process 0's
    batch_generator.set_state(checkpoint["rng"]["batches"])  # the same batches follow
    torch.set_rng_state(checkpoint["rng"]["torch"])  # the same dropout masks follow
    if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])


def read_settings(
    argv: list[str] | None,
) -> tuple[ModelConfig, DataConfig, TrainConfig, dict[str, Any] | None]:
    """The run's settings from the command line, or from the checkpoint when resuming."""
    parser = build_parser(__doc__, [(ModelConfig, None), (DataConfig, None), (TrainConfig, None)])
    (model_config, data_config, train_config), given = parse_configs(
        parser, [ModelConfig, DataConfig, TrainConfig], argv
    )
    if not train_config.resume:
        return model_config, data_config, train_config, None
    checkpoint = load_checkpoint(Path(train_config.out_dir) / "ckpt_last.pth")
    model_config, data_config, train_config = load_configs_for_resume(
        checkpoint, given, train_config.out_dir
    )
    if checkpoint["step"] >= train_config.max_iters:
        raise UserFacingError(
            f"the saved run already did {checkpoint['step']} steps; raise --max_iters to "
            "train further"
        )
    return model_config, data_config, train_config, checkpoint


def setup_compute(config: TrainConfig) -> tuple[Distributed, torch.device, torch.dtype]:
    """Choose device and precision (joining a torchrun job if there is one) and say which."""
    distributed, device = init_distributed(config.device)
    dtype, dtype_reason = resolve_dtype(config.dtype, device)
    print(f"device {device}, compute dtype {dtype_reason}")
    if device.type == "cuda":
        # TF32 matmuls are much faster on Ampere+ GPUs and precise enough for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return distributed, device, dtype


def wrap_model(
    model: GPT, config: TrainConfig, distributed: Distributed, example: torch.Tensor
) -> torch.nn.Module:
    """What runs the forward passes: the model, maybe compiled, maybe shared across processes."""
    wrapped = maybe_compile(model, config.compile, example)
    if distributed.enabled:
        device = example.device
        # forward_sync_buffers=False: the only buffer is the constant causal mask, and without
        # buffer syncing a forward pass needs no other process (process 0 evaluates alone).
        wrapped = DistributedDataParallel(
            wrapped,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,
        )
    return wrapped


def start_random_streams(
    config: TrainConfig, distributed: Distributed, resumed_step: int
) -> torch.Generator:
    """Seed dropout and return the batch generator; each process gets streams of its own."""
    # Process 0 of a torchrun job is the twin of a plain run. A resumed run's process 0 gets
    # its saved streams back afterwards; the others start fresh ones.
    seed = config.seed + distributed.rank + (resumed_step if distributed.rank > 0 else 0)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_run(argv: list[str] | None) -> tuple[Run, int, float, list[dict[str, Any]]]:
    """Read settings, load or create everything; returns the run, start step, best val loss."""
    model_config, data_config, train_config, checkpoint = read_settings(argv)
    distributed, device, dtype = setup_compute(train_config)
    torch.manual_seed(train_config.seed)  # the same initial weights in every process
    saved_tokenizer = tokenizer_from_dict(checkpoint["tokenizer"]) if checkpoint else None
    tokenizer, splits, tokens_per_char = prepare_data(
        data_config, model_config.block_size, saved_tokenizer
    )
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint, device)[0].train()
    else:
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
        model = GPT(model_config).to(device)
    print(f"model: {model.num_parameters():,} parameters")

    optimizer = make_optimizer(model, train_config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, best_val_loss = 0, math.inf
    out_dir = Path(train_config.out_dir)
    if checkpoint is not None:
        start_step, best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
    batch_generator = start_random_streams(train_config, distributed, start_step)
    if checkpoint is not None:
        restore_training_state(checkpoint, optimizer, scaler, batch_generator, distributed)
        print(f"resuming from step {start_step} (best validation loss {best_val_loss:.4f})")
    elif (out_dir / "ckpt_last.pth").exists():
        print(f"starting a new run: the checkpoints in {out_dir} will be replaced")

    example = splits["train"][: model_config.block_size].unsqueeze(0).to(device)
    run = Run(
        model=model,
        compiled=wrap_model(model, train_config, distributed, example),
        optimizer=optimizer,
        scaler=scaler,
        splits=splits,
        tokens_per_char=tokens_per_char,
        batch_generator=batch_generator,
        device=device,
        autocast=autocast_context(device, dtype),
        model_config=model_config,
        data_config=data_config,
        train_config=train_config,
        tokenizer=tokenizer,
        distributed=distributed,
    )
    print(
        f"global batch: {train_config.batch_size} x {train_config.gradient_accumulation_steps} "
        f"accumulation x {distributed.world_size} processes = "
        f"{run.tokens_per_step() // model_config.block_size} sequences of "
        f"{model_config.block_size} tokens"
    )
    history = read_history(out_dir / "metrics.jsonl", start_step) if checkpoint else []
    return run, start_step, best_val_loss, history


# ----------------------------------------------------------------------------------------------
# The loop


def evaluate_and_save(
    run: Run, step: int, best_val_loss: float, history: list[dict[str, Any]], elapsed: float
) -> float:
    """Evaluate, log a metrics line, refresh the plot, save checkpoints; returns best val."""
    out_dir = Path(run.train_config.out_dir)
    losses = estimate_loss(run)
    if not all(math.isfinite(loss) for loss in losses.values()):
        raise TrainingDiverged(losses["train"], step, out_dir)
    row = {
        "step": step,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "train_bpc": bits_per_char(losses["train"], run.tokens_per_char["train"]),
        "val_bpc": bits_per_char(losses["val"], run.tokens_per_char["val"]),
        "lr": learning_rate_at(step, run.train_config),
        "elapsed_s": round(elapsed, 2),
    }
    history.append(row)
    tqdm.write(
        f"step {step}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f} "
        f"({row['val_bpc']:.3f} bits/char)"
    )
    write_history(history, out_dir / "metrics.jsonl")
    plot_losses(history, out_dir / "loss.png")
    if losses["val"] < best_val_loss:
        best_val_loss = losses["val"]
        save_checkpoint(out_dir / "ckpt_best.pth", make_checkpoint(run, step, best_val_loss))
    save_checkpoint(out_dir / "ckpt_last.pth", make_checkpoint(run, step, best_val_loss))
    return best_val_loss


def save_and_stop(run: Run, step: int, best_val_loss: float) -> int:
    """Save the latest checkpoint after a Ctrl-C, say how to continue; returns the status."""
    path = Path(run.train_config.out_dir) / "ckpt_last.pth"
    if run.distributed.is_main:
        save_checkpoint(path, make_checkpoint(run, step, best_val_loss))
    wait_for_all(run.distributed)  # nobody shuts down while process 0 still saves
    if run.distributed.is_main:
        print(
            f"stopped at step {step}; saved {path}. Continue with: python {PROG} --resume "
            f"--out_dir={run.train_config.out_dir}",
            file=sys.stderr,
        )
    return 130


def train(run: Run, start_step: int, best_val_loss: float, history: list[dict[str, Any]]) -> int:
    """The training loop; returns the exit status."""
    config = run.train_config
    out_dir = Path(config.out_dir)
    bar = tqdm(
        total=config.max_iters,
        initial=start_step,
        desc="training",
        dynamic_ncols=True,
        file=sys.stdout,  # progress is output; stderr stays for warnings and errors
    )
    start_time = time.perf_counter()
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    interval_start, interval_steps = time.perf_counter(), 0
    step = start_step
    with StopRequest() as stop:
        while True:
            elapsed = elapsed_before + time.perf_counter() - start_time
            due = step % config.eval_interval == 0 or step == config.max_iters
            logged = history and history[-1]["step"] == step
            if due and run.distributed.is_main and not logged:
                best_val_loss = evaluate_and_save(run, step, best_val_loss, history, elapsed)
            if step == config.max_iters:
                break
            # All processes must stop at the same step, or the others would wait forever.
            if any_process(stop.requested, run.distributed, run.device):
                bar.close()
                return save_and_stop(run, step, best_val_loss)
            loss = train_step(run, step)
            step += 1
            interval_steps += 1
            bar.update(1)
            if step % config.log_interval == 0:
                loss_value = loss.item()  # the only host sync in the loop, every log_interval
                if not math.isfinite(loss_value):
                    bar.close()
                    raise TrainingDiverged(loss_value, step, out_dir)
                seconds = time.perf_counter() - interval_start
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{learning_rate_at(step, config):.2e}",
                    tok_s=f"{interval_steps * run.tokens_per_step() / seconds:,.0f}",
                )
                interval_start, interval_steps = time.perf_counter(), 0
    bar.close()
    wait_for_all(run.distributed)  # nobody shuts down while process 0 still saves
    if not run.distributed.is_main:
        return 0
    best = min(history, key=lambda r: r["val_loss"])
    print(
        f"done in {history[-1]['elapsed_s']:.0f} s: best validation loss {best['val_loss']:.4f} "
        f"({best['val_bpc']:.3f} bits/char) at step {best['step']}; checkpoints in {out_dir}/. "
        f"Sample with: python generate_text.py --out_dir={config.out_dir}"
    )
    return 0


def prepare_out_dir(run: Run) -> None:
    """Create out_dir, clear temporary files a killed run left, and record the settings."""
    out_dir = Path(run.train_config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*.tmp"):  # from write_atomically, cut short by a kill
        leftover.unlink()
    settings = {
        "model": dataclasses.asdict(run.model_config),
        "data": dataclasses.asdict(run.data_config),
        "train": dataclasses.asdict(run.train_config),
    }
    write_atomically(out_dir / "config.json", json.dumps(settings, indent=2).encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    """Train from the command line; returns the exit status."""
    if int(os.environ.get("RANK", "0")) > 0:
        # Under torchrun only process 0 reports progress; the others stay quiet.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - open for the process' lifetime
    try:
        run, start_step, best_val_loss, history = build_run(argv)
        if run.distributed.is_main:
            prepare_out_dir(run)
        return train(run, start_step, best_val_loss, history)
    except UserFacingError as err:
        print_error(PROG, err)
        return 2
    except (TrainingDiverged, OSError) as err:  # OSError: e.g. a full disk while saving
        print_error(PROG, err)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
