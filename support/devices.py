"""Where the computation runs: device, precision, torch.compile, and processes started by torchrun.

    python train_model.py --device=cpu                          # one process
    torchrun --standalone --nproc_per_node=2 train_model.py     # two processes, one machine

Under torchrun every process trains a copy of the model on its own batches, and their
gradients are averaged after each backward pass (DistributedDataParallel): backend nccl on
CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import platform
import re
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hyperparameters import ModelConfig, TrainConfig
from model_architecture import GPT, KVCache
from support.common import UserFacingError, first_line

FLOAT_BYTES = 4  # weights, gradients and activations are float32 (autocast keeps a copy)


# glibc's malloc options (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
MALLOC_TRIM_THRESHOLD, MALLOC_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 2**30  # memory a process keeps for reuse rather than return at once
OLD_GLIBC_MMAP_LIMIT = 2**25  # older glibc refuses mmap thresholds above 32 MiB (on 64 bits)


def keep_freed_memory() -> int:
    """Have glibc's malloc keep freed memory for reuse; the largest buffer kept (0: none).

    A training step frees and allocates the same activation buffers again and again. By
    default glibc serves large buffers from fresh pages of the system and gives freed memory
    back, so every step pays page faults to touch them again (more with dropout, whose
    attention weights are large temporaries). Buffers below
    the mmap threshold come from the process's own heap, which now keeps what is freed.
    Returns 0 where the C library is not glibc.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return 0
    mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter already uses
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(MALLOC_TRIM_THRESHOLD, KEEP_FREED_BYTES):
        return 0
    for threshold in (KEEP_FREED_BYTES, OLD_GLIBC_MMAP_LIMIT):
        if mallopt(MALLOC_MMAP_THRESHOLD, threshold):
            return threshold
    return 0


def resolve_device(requested: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an unavailable explicit choice is a user error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available[requested]:
        raise UserFacingError(f"device {requested} is not available here; try --device=cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype for autocast, and the reason it was chosen (printed at start)."""
    if requested == "auto":
        if device.type != "cuda":
            return torch.float32, f"float32 ({device.type})"
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bfloat16 (CUDA with bf16 support)"
        return torch.float16, "float16 with gradient scaling (CUDA without bf16)"
    if requested == "float16" and device.type != "cuda":
        raise UserFacingError("dtype float16 needs a CUDA device; use float32 or bfloat16")
    return getattr(torch, requested), f"{requested} (requested)"


def setup_compute(config: TrainConfig) -> tuple[Distributed, torch.device, torch.dtype]:
    """Choose device and precision (joining a torchrun job if there is one) and say which.

    Also has glibc keep freed memory for reuse (keep_freed_memory).
    """
    keep_freed_memory()  # for the whole process: every step reuses its buffers' pages
    distributed, device = init_distributed(config.device)
    dtype, dtype_reason = resolve_dtype(config.dtype, device)
    print(f"device {device}, compute dtype {dtype_reason}")
    if device.type == "cuda":
        # TF32 matmuls are much faster on Ampere+ GPUs and precise enough for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return distributed, device, dtype


# ----------------------------------------------------------------------------------------------
# Memory: what a configuration needs, checked against what the device has, before allocating


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give (None if this system does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:  # Linux: free memory plus reclaimable caches
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_memory(config: ModelConfig) -> int:
    """Bytes of a model's weights and constant buffers (the causal masks, rotary tables)."""
    C, T, L = config.n_embd, config.block_size, config.n_layer
    weights = config.vocab_size * C + L * (12 * C * C + 13 * C) + 2 * C
    if config.position == "learned":
        weights += T * C
    masks = L * T * T  # one bool a cell, in every attention layer
    return FLOAT_BYTES * weights + masks + L * FLOAT_BYTES * T * (C // config.n_head)


def training_memory(config: ModelConfig, batch_size: int, sequences_per_pass: int) -> int:
    """Bytes a training step needs, roughly.

    The model, its gradients and AdamW's two moments (Muon keeps less), the activations one
    pass keeps for its backward pass, and the whole batch's token ids and targets.
    """
    weights = model_memory(config)
    T, C = config.block_size, config.n_embd
    # Per token and layer, about 16 floats of width C are kept (projections, GELU, norms).
    # Unfused attention (the manual path, and the fused path's own
    # steps when there is dropout on a CPU) keeps T-wide rows for each head. The logits and
    # their gradient take a few floats per vocabulary entry.
    unfused = config.attention == "manual" or config.dropout > 0
    attention = 3 * config.n_head * T if unfused else 0
    per_token = config.n_layer * (16 * C + attention) + 3 * config.vocab_size
    activations = FLOAT_BYTES * sequences_per_pass * T * per_token
    token_ids = 3 * 8 * batch_size * (T + 1)  # the batch's windows, inputs, targets (int64)
    return 4 * weights + activations + token_ids


# Passes of at most this many tokens keep each operation's tensors small enough for a CPU's
# caches, which makes a step faster than one pass over the whole batch (docs/performance.md).
CPU_TOKENS_PER_PASS = 2048


def sequences_per_pass(
    requested: int, batch_size: int, block_size: int, device: torch.device
) -> int:
    """How many of a micro-batch's sequences one forward and backward pass takes (0 = choose)."""
    if requested > 0:
        return min(requested, batch_size)
    if device.type != "cpu":
        return batch_size  # a GPU is fastest with the whole batch at once
    largest = max(1, CPU_TOKENS_PER_PASS // block_size)
    passes = math.ceil(batch_size / largest)
    return math.ceil(batch_size / passes)  # passes of equal size: 12 goes as 6 + 6, not 8 + 4


def require_memory(needed: int, device: torch.device, what: str, remedy: str) -> None:
    """Refuse, in one line that says what to do, what the device cannot hold."""
    available = available_memory(device)
    if available is not None and needed > available:
        raise UserFacingError(
            f"{what} needs about {needed / 2**30:,.1f} GiB but {device.type} has "
            f"{available / 2**30:,.1f} GiB free; {remedy}"
        )


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun)


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process' place in a torchrun job; a plain run is rank 0 of a world of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs, plots and checkpoints."""
        return self.rank == 0


def torchrun_variable(name: str, default: int) -> int:
    """A whole number torchrun sets in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UserFacingError(
            f"the environment variable {name} must be a whole number, got {text!r}"
        )
    return value


def process_rank() -> int:
    """This process' rank in a torchrun job (torchrun sets RANK); 0 for a plain run."""
    return torchrun_variable("RANK", 0)


def init_distributed(requested_device: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job if there is one (torchrun sets RANK and WORLD_SIZE)."""
    device = resolve_device(requested_device)
    context = Distributed(
        rank=process_rank(),
        local_rank=torchrun_variable("LOCAL_RANK", 0),
        world_size=torchrun_variable("WORLD_SIZE", 1),
    )
    if "RANK" not in os.environ or not context.enabled:
        return Distributed(), device
    if device.type == "mps":
        raise UserFacingError("multi-process training runs on cuda or cpu; add --device=cpu")
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    except (ValueError, RuntimeError) as err:  # e.g. MASTER_ADDR missing: not from torchrun
        raise UserFacingError(
            f"cannot join the torchrun job ({first_line(err)}); start it with torchrun"
        ) from None
    return context, device


def start_random_streams(
    config: TrainConfig, distributed: Distributed, resumed_step: int
) -> torch.Generator:
    """Seed dropout and return the batch generator; each process gets streams of its own."""
    # Process 0 of a torchrun job is the twin of a plain run. A resumed run's process 0 gets
    # its saved streams back afterwards; the others start fresh ones.
    seed = config.seed + distributed.rank + (resumed_step if distributed.rank > 0 else 0)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def shutdown_distributed() -> None:
    """Leave the torchrun job cleanly, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wait_for_all(context: Distributed) -> None:
    """Block until every process gets here (a no-op for a single process)."""
    if context.enabled:
        dist.barrier()


class ProcessLost(Exception):
    """Another process of the job ended (killed, or failed first): this one cannot go on alone."""


# What gloo and NCCL say when a peer's connection breaks; any other error is left as it is.
LOST_PEER_WORDS = (
    "reset by peer",
    "closed by peer",
    "Connection closed",
    "Connection refused",
    "Broken pipe",
    "remote process exited",
)


def as_process_lost(err: RuntimeError, context: Distributed) -> ProcessLost | None:
    """The one-line story of a collective that failed because a peer is gone; None otherwise."""
    if not context.enabled:
        return None
    lost = isinstance(err, dist.DistNetworkError) or any(w in str(err) for w in LOST_PEER_WORDS)
    if not lost:
        return None
    # "[.../gloo/transport/tcp/pair.cc:537] Read error [...]: Connection reset by peer. This..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(err)).split(". ")[0]
    return ProcessLost(
        f"another training process ended ({reason}), so process {context.rank} stops too; "
        "what was saved before is intact"
    )


def any_process(flag: bool, context: Distributed, device: torch.device) -> bool:
    """True if the flag is set in any process, so that all of them act on it together."""
    if not context.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_process_0(value: int, context: Distributed, device: torch.device) -> int:
    """Process 0's value of a whole number, in every process (for decisions made once)."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


# ----------------------------------------------------------------------------------------------
# What runs the forward passes


def try_compile(
    model: torch.nn.Module,
    warm_up: Callable[[torch.nn.Module], object],
    instead: str,
    **options: Any,
) -> torch.nn.Module | None:
    """torch.compile(model, **options), compiled at once by warm_up; None if that fails here.

    Compilation happens on a compiled model's first call: warm_up makes that call now, so that
    a failure shows before any work, with a one-line warning that says what happens `instead`.
    """
    try:
        compiled = torch.compile(model, **options)
        warm_up(compiled)
    except Exception as err:  # any compiler failure: the eager model still works
        print(f"warning: torch.compile failed ({first_line(err):.100}); {instead}", file=sys.stderr)
        return None
    return compiled


def maybe_compile(model: torch.nn.Module, enabled: bool, example: torch.Tensor) -> torch.nn.Module:
    """torch.compile the model if asked and if it works here; otherwise say so and run eager."""
    if not enabled:
        return model

    def warm_up(compiled: torch.nn.Module) -> None:
        with torch.no_grad():
            compiled(example)

    compiled = try_compile(model, warm_up, "running uncompiled")
    return model if compiled is None else compiled


def compile_token_step(
    model: GPT, announce: Callable[[], object] | None = None
) -> torch.nn.Module | None:
    """The model compiled for generation's cached one-token steps; None if that fails here.

    A one-token step does little arithmetic but runs hundreds of small operations, so the cost
    of calling each one dominates; compiled, they become a few generated kernels called from
    C++ (cpp_wrapper). The cache has one fixed shape and dynamic=True makes the position a
    symbol, so one graph serves every position. It is compiled here, on a scratch cache;
    `announce` is called just before (compiling takes seconds), and not at all when there is
    nothing to compile (block_size 1).
    """
    if model.config.block_size < 2:
        return None  # every step recomputes its window: there are no one-token steps
    if announce is not None:
        announce()
    weight = model.token_embedding.weight

    def warm_up(compiled: torch.nn.Module) -> None:
        # Inference mode, as in generate: the graph is for its tensors (made in that mode).
        with torch.inference_mode():
            cache = KVCache(model.config, 1, weight.device, weight.dtype)
            token = torch.zeros(1, 1, dtype=torch.long, device=weight.device)
            model(token, cache=cache)  # position 0, as a prompt goes: uncompiled
            compiled(token, cache=cache)  # position 1: compiles the one-token step

    options = {"cpp_wrapper": True}
    return try_compile(model, warm_up, "generating uncompiled", dynamic=True, options=options)


def wrap_model(
    model: torch.nn.Module, compile_model: bool, distributed: Distributed, example: torch.Tensor
) -> torch.nn.Module:
    """The model, maybe compiled, maybe shared across processes: what runs forward passes."""
    wrapped = maybe_compile(model, compile_model, example)
    if distributed.enabled:
        device = example.device
        # forward_sync_buffers=False: the only buffers are constants (the causal mask, rotary
        # tables), and without buffer syncing a forward pass needs no other process (process 0
        # evaluates alone).
        wrapped = DistributedDataParallel(
            wrapped,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,
        )
    return wrapped


def note_random_streams(batch_generator: torch.Generator) -> dict[str, Any]:
    """The states of every random stream training draws from: batches, dropout, the GPUs'."""
    streams = {"torch": torch.get_rng_state(), "batches": batch_generator.get_state()}
    if torch.cuda.is_available():
        streams["cuda"] = torch.cuda.get_rng_state_all()
    return streams


def put_back_random_streams(streams: dict[str, Any], batch_generator: torch.Generator) -> None:
    """Put back what note_random_streams noted (a machine with fewer GPUs takes the first)."""
    batch_generator.set_state(streams["batches"])
    torch.set_rng_state(streams["torch"])
    if "cuda" in streams and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(streams["cuda"][: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------
# Stopping politely: a signal asks every process to stop after the same step (any_process)


def stop_signals() -> list[int]:
    """Ctrl-C, SIGTERM, and SIGHUP (the terminal closed) unless nohup asked to ignore it."""
    signals = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        signals.append(hangup)
    return signals


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP end the program as Ctrl-C does, with a KeyboardInterrupt.

    Before the loop (reading the corpus, compiling) a stop request cannot wait for a step: the
    program ends at once, with the same one-line message and clean-up whichever signal came.
    """
    previous = {sig: signal.signal(sig, _interrupt) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopRequest:
    """Stopping politely: a first Ctrl-C, SIGTERM or SIGHUP (the terminal closed).

    It asks the loop to stop after the current step (or pass: see train_model.train_step), and
    save; a second one quits at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in stop_signals():
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if process_rank() == 0:  # every process of a job hears it; one says so
            print(
                "\nstopping: saving the last finished step (press Ctrl-C again to quit at once)",
                file=sys.stderr,
            )
