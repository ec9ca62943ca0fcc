"""Generation's linear layers: float32 products on every core, bfloat16, or int8 weights.

    python generate_text.py --precision int8 --compile --max_new_tokens 20000  # long texts

Generating one token reads every weight once and does little arithmetic with each, so the
bytes of the weights bound its speed. int8 stores a weight in a quarter of float32's bytes:

    w[row, :] ~ scale[row] * q[row, :],   q in -127..127,   scale[row] = max |w[row, :]| / 127

one scale per output row (symmetric, rounded to the nearest step). On a CPU, PyTorch's int8
weight-only kernel multiplies bfloat16 inputs by the int8 weight, a few rows at a time (one
token's); many rows (a prompt) get the same arithmetic as one float32 multiply, which is
faster there, with the weight expanded to float32 for the call. Elsewhere (and for widths the
kernel does not take) the weight is expanded back to the input's type at every call: correct,
but slower than float32. Only the blocks' linear layers are stored so; the token embedding,
which the output layer shares, and the norms keep float32.

In float32, the blocks' layers become AllCoresLinear: the same weights, with a one-row product
split over the CPU's cores, which PyTorch would run on one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model_architecture import GPT

PRECISIONS = ("float32", "bfloat16", "int8")
# PyTorch's CPU kernel takes input widths that are multiples of 16; with torch 2.13 other
# widths crash the process, so those layers take the portable path.
KERNEL_WIDTH_MULTIPLE = 16
# The kernel is built for a few rows (a token at a time). From this many rows on (a prompt, or
# the window that generation recomputes when it moves) a float32 multiply by the weight's int8
# values takes over. Timed on two cores (kernel against multiply, microseconds, for layers
# 384 -> 1152, 384 -> 1536, 1536 -> 384): 16 rows 149/161, 195/211, 166/287; 32 rows 277/220,
# 361/288, 306/361; 64 rows 536/339, 701/423, 594/483; 129 rows 1,097/579, 1,414/781,
# 1,178/772. About level at 32 rows.
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

    A one-token step multiplies a single row by each weight matrix. PyTorch ran such a
    matrix-vector product on one core of the 2-core CPU measured (README, "Speed on a laptop
    CPU"): the 24 products of a 6 x 384 model took as long with one thread as with two. Cut into
    one slab of output rows per thread, the same product becomes a batched multiply, and
    PyTorch runs the slabs on separate cores:

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


def to_precision(model: GPT, precision: str) -> GPT:
    """The model ready to generate in `precision`: "float32", "bfloat16" or "int8".

    The weights take that number type; in float32 the blocks' layers become AllCoresLinear.
    """
    assert precision in PRECISIONS, f"unknown precision {precision!r}"
    if precision == "int8":
        return to_int8(model.float())
    model = model.to(getattr(torch, precision))
    if precision == "float32":  # in bfloat16, the batched multiply was slower than one core
        replace_block_linears(model, AllCoresLinear)
    return model
