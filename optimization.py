"""How the weights move: optimizer (AdamW, or Muon with AdamW), schedule, moving average.

AdamW scales each weight's step by a running estimate of its gradient's size. Muon
(Jordan et al., 2024) treats a weight matrix as a whole: it takes the momentum of the gradient
and replaces it by (nearly) the closest orthogonal matrix, found by a few Newton-Schulz steps,
so every direction of the matrix moves by the same amount, not just the few that dominate.
Muon only applies to the blocks' 2-D weight matrices; embeddings, biases and norm gains stay
with AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hyperparameters import TrainConfig
from model_architecture import GPT


class CombinedOptimizer:
    """Several optimizers, each over its own parameters, stepped and saved as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every group of every optimizer (the schedule sets their learning rates)."""
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        """One step of every optimizer."""
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every optimizer's gradients."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Every optimizer's state, in order, for a checkpoint."""
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


Optimizer = torch.optim.Optimizer | CombinedOptimizer


# ----------------------------------------------------------------------------------------
# Muon


def orthogonalize(
    update: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The orthogonal matrix nearest to update, roughly: U V^T where update = U S V^T.

    Newton-Schulz iteration: X, the update scaled so that its largest singular value is at
    most 1, goes through `steps` rounds of the odd polynomial

        X <- a X + b (X X^T) X + c (X X^T)^2 X

    which pushes the singular values towards 1 and leaves the singular vectors alone. Not all
    the way, but near enough: Jordan (2024) found that it trains as well as exactly 1. Only
    matrix products,
    so it is fast where an SVD is not. The wide orientation keeps X X^T the smaller square.
    """
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.to(dtype)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= the largest singular value
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, polynomial, x, beta=a)  # a X + (b G + c G^2) X
    return x.T if tall else x


def muon_learning_rate(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The step size for one matrix: torch's two rules for matching its update's size."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":  # the size of an AdamW step (Moonshot, 2025)
        return lr * 0.2 * math.sqrt(max(rows, columns))
    return lr * math.sqrt(max(1.0, rows / columns))  # "original" (Jordan): tall ones step further


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with the number type of its orthogonalisation chosen by the caller.

    PyTorch's Muon orthogonalises in bfloat16, which a GPU's tensor cores run fast but a CPU
    without bfloat16 instructions emulates, slowly (docs/performance.md). Settings, checks and
    the saved state (one "momentum_buffer" per matrix) are torch's own, so either class resumes
    the other's checkpoint.
    """

    def __init__(self, params: Any, orthogonalize_dtype: torch.dtype, **settings: Any) -> None:
        super().__init__(params, **settings)
        self.orthogonalize_dtype = orthogonalize_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Muon step for every matrix that has a gradient (closure: as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_one(param, group)
        return loss

    def _step_one(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, lr, momentum = param.grad, group["lr"], group["momentum"]
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - momentum)  # a moving average of the gradients
        # Nesterov: look one momentum step ahead, from the gradient towards the average.
        update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
        direction = orthogonalize(update, coefficients, steps, eps, self.orthogonalize_dtype)
        param.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
        param.add_(direction, alpha=-muon_learning_rate(lr, group["adjust_lr_fn"], param.shape))


def make_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> Optimizer:
    """The optimizer config.optimizer names, with weight decay on weight matrices only."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # Muon takes the blocks' matrices (attention and feed-forward projections), not the
    # embedding: its rows are looked up one token at a time, not multiplied as a whole.
    muon = config.optimizer == "muon"
    muon_matrices, matrices, others = [], [], []
    for name, p in named:
        if muon and name.startswith("blocks.") and p.dim() == 2:
            muon_matrices.append(p)
        elif p.dim() >= 2:
            matrices.append(p)  # AdamW, with weight decay
        else:
            others.append(p)  # biases and norm gains: AdamW, no decay
    adamw = torch.optim.AdamW(
        [
            {"params": matrices, "weight_decay": config.weight_decay},
            {"params": others, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters, not eight ops each
    )
    if not muon:
        return adamw
    # match_rms_adamw scales Muon's orthogonal steps to the size of AdamW's, so one
    # learning_rate (and one schedule) serves both optimizers.
    orthogonalized = Muon(
        muon_matrices,
        # bfloat16 where tensor cores run it fast; float32 elsewhere, where bfloat16 products
        # are emulated or no faster than float32's.
        orthogonalize_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    return CombinedOptimizer([orthogonalized, adamw])


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr_fraction of it at max_iters."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)  # never 0
    decay_steps = max(1, config.max_iters - config.warmup_iters)
    progress = min(1.0, (step - config.warmup_iters) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    min_lr = config.min_lr_fraction * config.learning_rate
    return min_lr + cosine * (config.learning_rate - min_lr)


def weight_average(model: GPT, decay: float) -> AveragedModel | None:
    """A moving average of the model's weights, updated after each step; None if decay is 0.

        average <- decay * average + (1 - decay) * weights

    Each step moves the weights by a noisy estimate of the gradient, so late in a run they
    jitter around the low ground rather than settle on it; the average of the last
    1 / (1 - decay) steps sits nearer its middle and scores better. Training itself goes on
    from the weights; evaluations, checkpoints and generation use the average.
    """
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def model_to_keep(model: GPT, average: AveragedModel | None) -> GPT:
    """What checkpoints and generation keep: the weights' moving average if one is kept."""
    return model if average is None else average.module
