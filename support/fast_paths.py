"""The fast paths: the same math as model_architecture.py, computed faster.

Two seams, each applied by a script in one visible line:

    model = for_training(model)              # train_model.py: a cheaper dropout on a CPU
    model = for_inference(model, precision)  # generation: float32, bfloat16 or int8 weights

Neither changes what the model computes (tests/test_fast_paths.py proves each equal to the
readable layers, up to rounding where the number type changes); the model file never knows.

Training: dropout zeroes each element with probability p and scales the survivors by
1 / (1 - p). On a CPU, F.dropout draws a 32-bit float for every element and keeps a float mask
for the backward pass; drawing 16-bit integers, four from each 64-bit random number, and keeping
a one-byte mask does the same work with fewer random bits and a quarter of the memory. GPUs
keep their fused F.dropout.

Generation reads every weight once per token and does little arithmetic with each, so the
bytes of the weights bound its speed:
- float32: the blocks' layers become AllCoresLinear, the same weights with a one-row product
  split over the CPU's cores (PyTorch runs a matrix-vector product on one).
- bfloat16: half the bytes of every weight and of the cache.
- int8: the blocks' weights in a quarter of float32's bytes, one scale per output row,

      w[row, :] ~ scale[row] * q[row, :],   q in -127..127,   scale[row] = max |w[row, :]| / 127

  (symmetric, rounded to the nearest step). On a CPU, PyTorch's int8 weight-only kernel
  multiplies bfloat16 inputs by the int8 weight, a few rows at a time (one token's); many rows
  (a prompt) get the same arithmetic as one float32 multiply, with the weight expanded to
  float32 for that call. Elsewhere (and for widths the kernel does not take) the weight is
  expanded back to the input's type at every call. The token embedding, which the output layer
  shares, and the norms keep float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model_architecture import GPT, causal_attention_sdpa

# ----------------------------------------------------------------------------------------------
# Training: dropout with a cheaper mask on a CPU

RANDOM_LEVELS = 2**16  # the values a 16-bit random integer takes


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A random boolean mask, True with probability 1 - p, and that probability exactly.

    p is rounded to a multiple of 1 / 2**16 (0.2 becomes 0.199997).
    """
    count = math.prod(shape)
    draws = torch.randint(
        -(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device
    )
    uniform = draws.view(torch.int16)[:count].view(shape)  # each in -2**15 .. 2**15 - 1
    dropped_levels = min(round(p * RANDOM_LEVELS), RANDOM_LEVELS - 1)  # keep some, always
    keep = uniform >= dropped_levels - RANDOM_LEVELS // 2  # the lowest dropped_levels values drop
    return keep, 1 - dropped_levels / RANDOM_LEVELS


class MaskedScale(torch.autograd.Function):
    """y = x * keep * scale, remembering only the one-byte mask for the backward pass."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, keep: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Keep the mask; zero the dropped elements and scale the kept ones."""
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        """The gradient flows through the kept elements only, scaled alike."""
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training), with a cheaper mask on a CPU."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p=p, training=True)  # fused on GPUs; torch.compile fuses its own
    keep, keep_probability = keep_mask(x.shape, p, x.device)
    if keep_probability == 1:
        return x  # p below 1 / 2**17 rounds to keeping everything
    return MaskedScale.apply(x, keep, 1 / keep_probability)


class CPUDropout(nn.Dropout):
    """nn.Dropout through `dropout`: the same layer, with a cheaper mask on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout while training; the input unchanged in evaluation."""
        return dropout(x, self.p, self.training)


def attention_with_cpu_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """causal_attention_sdpa, with dropout on a CPU done by `dropout`.

    PyTorch's fused CPU kernel has no dropout and would fall back to unfused steps with
    F.dropout. These are the reference's steps, with fewer (T x T)-sized temporaries (the
    scaling applied to q, the mask in place) and the cheaper mask.
    """
    if dropout_p == 0 or q.device.type != "cpu":
        return causal_attention_sdpa(q, k, v, mask, dropout_p)
    scores = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1)  # (B, nh, Tq, Tk)
    weights = F.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1)
    return dropout(weights, dropout_p, training=True) @ v  # (B, nh, Tq, hs)


def for_training(model: GPT) -> GPT:
    """The model with a cheaper dropout mask on a CPU, in place; the same layers elsewhere.

    Every nn.Dropout becomes a CPUDropout, and the fused attention kernel its twin with that
    dropout (the manual reference keeps PyTorch's). Parameters and state dict are unchanged.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, CPUDropout(child.p))
    for block in model.blocks:
        if block.attn.attend is causal_attention_sdpa:
            block.attn.attend = attention_with_cpu_dropout
    return model


# ----------------------------------------------------------------------------------------------
# Generation: float32 on every core, bfloat16, or int8 weights

PRECISIONS = ("float32", "bfloat16", "int8")
# PyTorch's CPU kernel takes input widths that are multiples of 16; other widths crash the
# process, so those layers take the portable path.
KERNEL_WIDTH_MULTIPLE = 16
# The kernel is built for a few rows (a token at a time). From this many rows on (a prompt, or
# the window that generation recomputes when it moves) a float32 multiply by the weight's int8
# values is the faster of the two (tools/bench.py times both; docs/performance.md).
FLOAT32_MULTIPLY_MIN_ROWS = 32


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one float32 scale per output row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        scale = weight.abs().amax(dim=1) / 127  # (out,): each row's largest |w| becomes 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a row of zeros stays 0
        # A parameter (never trained) so that the model still counts its weights.
        int8 = torch.round(weight / scale[:, None]).to(torch.int8)
        self.weight = nn.Parameter(int8, requires_grad=False)
        self.register_buffer("scale", scale)
        # The kernel's own scales are bfloat16, which would round each row's scale on top of
        # its bfloat16 output; it gets ones instead, and the float32 scales scale its output.
        self.register_buffer("unit_scale", torch.ones_like(scale, dtype=torch.bfloat16))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), as the float layer would compute it, up to rounding."""
        if x.device.type == "cpu" and x.size(-1) % KERNEL_WIDTH_MULTIPLE == 0:
            rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)  # (N, in)
            if rows.size(0) < FLOAT32_MULTIPLY_MIN_ROWS:
                products = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.unit_scale)
            else:
                # The kernel's arithmetic: bfloat16 inputs times the int8 values (each product
                # exact in float32), summed in float32, rounded to bfloat16 as its output is.
                # The float32 copy of the weight lives for this call only.
                sums = rows.float() @ self.weight.t().float()  # (N, out)
                products = sums.to(torch.bfloat16)
            y = products.view(*x.shape[:-1], -1).to(x.dtype) * self.scale  # (..., out)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        """Shown in print(model)."""
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, int8"


class AllCoresLinear(nn.Module):
    """A float32 linear layer whose one-row products, a generated token's, use every CPU core.

    A one-token step multiplies a single row by each weight matrix, a matrix-vector product
    that PyTorch runs on one core. Cut into one slab of output rows per thread, the same
    product becomes a batched multiply, and PyTorch runs the slabs on separate cores:

        x W^T = [x W_1^T, ..., x W_P^T],   W_p = rows (p - 1) out / P .. p out / P - 1 of W

    More rows (a prompt, a moved window) go through F.linear, as nn.Linear does.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # (out, in), shared with the layer it replaces
        self.bias = linear.bias
        # baddbmm always adds a bias: a layer without one adds zeros, made here once (not saved).
        zeros = torch.zeros_like(linear.weight[:, 0]) if linear.bias is None else None
        self.register_buffer("zero_bias", zeros, persistent=False)
        # One slab per thread PyTorch has now (fewer if the rows do not divide evenly). Fixed
        # here rather than asked at each call, which torch.compile could not trace.
        self.parts = torch.get_num_threads()
        while linear.out_features % self.parts != 0:
            self.parts -= 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), as nn.Linear computes it, up to rounding."""
        out_features, in_features = self.weight.shape
        P = self.parts
        if x.device.type != "cpu" or x.numel() != in_features or P == 1:
            return F.linear(x, self.weight, self.bias)  # not one row on a CPU, or one core
        slabs = self.weight.view(P, out_features // P, in_features)  # (P, out/P, in)
        row = x.reshape(1, 1, in_features).expand(P, 1, in_features)  # (P, 1, in)
        bias = self.zero_bias if self.bias is None else self.bias
        # bias + row @ slab^T for each slab p: (P, 1, out/P), slab p's outputs in order.
        # baddbmm rather than `+` and bmm: torch.compile would turn a one-row bmm into loops of
        # its own, slower here than PyTorch's multiply, which it keeps for baddbmm.
        y = torch.baddbmm(bias.view(P, 1, out_features // P), row, slabs.transpose(1, 2))
        return y.view(*x.shape[:-1], out_features)  # (..., out)

    def extra_repr(self) -> str:
        """Shown in print(model)."""
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, parts={self.parts}"


def replace_block_linears(model: GPT, layer: Callable[[nn.Linear], nn.Module]) -> GPT:
    """Replace every nn.Linear inside the blocks by layer(it), in place."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, layer(child))
    return model


def to_int8(model: GPT) -> GPT:
    """Replace every linear layer inside the blocks by an Int8Linear, in place."""
    return replace_block_linears(model, Int8Linear)


def for_inference(model: GPT, precision: str) -> GPT:
    """The model ready to generate in `precision`: "float32", "bfloat16" or "int8", in place.

    The weights take that number type; in float32 the blocks' layers become AllCoresLinear,
    which keep the state dict's keys (int8 layers add their scales).
    """
    assert precision in PRECISIONS, f"unknown precision {precision!r}"
    if precision == "int8":
        return to_int8(model.float())
    model = model.to(getattr(torch, precision))
    if precision == "float32":  # bfloat16 keeps nn.Linear: its batched multiply is no faster
        replace_block_linears(model, AllCoresLinear)
    return model
