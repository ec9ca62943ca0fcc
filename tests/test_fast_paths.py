"""The fast paths equal the readable model: training's CPU dropout, generation's layers (int8
weights close to float32, float32 products on every core).

Run alone: python -m pytest tests/test_fast_paths.py
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from model_architecture import GPT, attention_weights, causal_attention_sdpa, generate
from support import fast_paths
from support.fast_paths import (
    FLOAT32_MULTIPLY_MIN_ROWS,
    AllCoresLinear,
    CPUDropout,
    Int8Linear,
    attention_with_cpu_dropout,
    dropout,
    for_inference,
    for_training,
    keep_mask,
)

# ----------------------------------------------------------------------------------------------
# Training: the CPU dropout


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_the_dropout_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    count = 400_003  # not a multiple of 4: the last 64-bit draw is only partly used
    keep, keep_probability = keep_mask(torch.Size((count,)), p, torch.device("cpu"))
    assert keep.dtype == torch.bool
    assert keep.shape == (count,)
    assert abs(keep_probability - (1 - p)) <= 1 / 2**16
    # Each of the four 16-bit lanes of a 64-bit draw, and all together, keep at that rate
    # (within 5 standard deviations).
    for lane in [keep, *(keep[i::4] for i in range(4))]:
        spread = 5 * math.sqrt(keep_probability * (1 - keep_probability) / lane.numel())
        assert abs(lane.float().mean().item() - keep_probability) < spread
    # Neighbours are independent: both kept as often as chance says.
    both = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(both - keep_probability**2) < 5 * math.sqrt(keep_probability**2 / count)


def test_dropout_scales_the_kept_elements_and_their_gradients():
    torch.manual_seed(1)
    x = (torch.rand(64, 50, 30) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    y = dropout(x, 0.2, training=True)
    keep = y != 0
    scale = 1 / (1 - round(0.2 * 2**16) / 2**16)
    torch.testing.assert_close(y, x.detach() * keep * scale)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * keep * scale)
    assert abs(keep.float().mean().item() - 0.8) < 0.01
    assert not torch.equal(dropout(x, 0.2, training=True) != 0, keep)  # a new mask each time
    assert dropout(x, 0.2, training=False) is x
    assert dropout(x, 0.0, training=True) is x


def test_dropout_keeps_a_one_byte_mask_for_the_backward_pass():
    # F.dropout on a CPU keeps a float32 mask; this dropout keeps a boolean one.
    saved = []
    x = torch.randn(8, 16, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropout(x * 1, 0.1, training=True)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]


def test_fast_attention_with_dropout_equals_the_reference_with_the_same_mask(monkeypatch):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 12, 8, requires_grad=True) for _ in range(3))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    fixed_keep = torch.rand(2, 3, 12, 12) > 0.3
    monkeypatch.setattr(fast_paths, "keep_mask", lambda *args: (fixed_keep, 0.7))
    fast = attention_with_cpu_dropout(q, k, v, causal, 0.3)
    upstream = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, (q, k, v), upstream)
    reference = (attention_weights(q, k, causal) * fixed_keep / 0.7) @ v
    reference_grads = torch.autograd.grad(reference, (q, k, v), upstream)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    for got, expected in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_for_training_swaps_only_the_dropout_and_computes_the_same(tiny_model_config):
    config = dataclasses.replace(tiny_model_config, dropout=0.25)
    torch.manual_seed(0)
    reference = GPT(config)
    fast = for_training(GPT(config))
    fast.load_state_dict(reference.state_dict())  # the same keys: nothing new is saved
    kinds = {type(m) for m in fast.modules() if isinstance(m, nn.Dropout)}
    assert kinds == {CPUDropout}
    assert all(b.attn.attend is attention_with_cpu_dropout for b in fast.blocks)
    idx = torch.randint(0, tiny_model_config.vocab_size, (2, 16))
    torch.testing.assert_close(fast.eval()(idx)[0], reference.eval()(idx)[0], atol=0, rtol=0)
    # Training with p = 0 draws no mask: the two are the same function.
    for model in (reference, fast):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        for block in model.blocks:
            block.attn.dropout = 0.0
    torch.testing.assert_close(fast.train()(idx)[0], reference.train()(idx)[0], atol=0, rtol=0)


def test_for_training_keeps_the_manual_reference_attention(tiny_model_config):
    config = dataclasses.replace(tiny_model_config, attention="manual", dropout=0.1)
    model = for_training(GPT(config))
    assert all(b.attn.attend is not attention_with_cpu_dropout for b in model.blocks)
    assert causal_attention_sdpa is not attention_with_cpu_dropout


# ----------------------------------------------------------------------------------------------
# Generation: int8, bfloat16, float32 on every core


@pytest.mark.parametrize("in_features", [32, 20])  # the CPU kernel's width, and another
@pytest.mark.parametrize("bias", [False, True])
def test_an_int8_layer_computes_what_the_float_layer_does_up_to_rounding(in_features, bias):
    linear = nn.Linear(in_features, 24, bias=bias)
    int8 = Int8Linear(linear)
    x = torch.randn(3, 5, in_features)
    expected, got = linear(x), int8(x)
    assert got.shape == expected.shape
    assert got.dtype == torch.float32
    # int8 steps are 1/254 of a row's range; bfloat16 inputs add about as much again.
    assert (got - expected).norm() / expected.norm() < 0.01
    assert not torch.equal(got, expected)  # it did round


def kernel_calls(layer: Int8Linear, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """layer(x), and how many times it called PyTorch's int8 kernel."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as recorded:
        y = layer(x)
    return y, sum(event.name == "aten::_weight_int8pack_mm" for event in recorded.events())


def test_many_rows_get_the_kernels_arithmetic_as_one_float32_multiply():
    torch.manual_seed(0)
    int8 = Int8Linear(nn.Linear(32, 48, bias=True))
    few = torch.randn(FLOAT32_MULTIPLY_MIN_ROWS - 1, 32)
    many = torch.randn(2, FLOAT32_MULTIPLY_MIN_ROWS, 32)  # (B, T, C), as the model passes it
    assert kernel_calls(int8, few)[1] == 1
    together, calls = kernel_calls(int8, many)
    assert calls == 0
    one_by_one = torch.stack(
        [torch.cat([kernel_calls(int8, row[None])[0] for row in seq]) for seq in many]
    )  # each row through the kernel
    # The same products, summed in another order: at most one bfloat16 step (2^-7 of the
    # value) apart where the sum falls near a rounding boundary, and equal almost everywhere.
    torch.testing.assert_close(together, one_by_one, rtol=2**-7, atol=1e-6)
    assert (together != one_by_one).float().mean() < 0.01


def test_each_row_is_stored_as_int8_steps_of_its_own_scale():
    linear = nn.Linear(16, 3, bias=False)
    with torch.no_grad():
        linear.weight[1] = 0.0  # a row of zeros
        linear.weight[2, 5] = -4.0  # a row with one large weight
    int8 = Int8Linear(linear)
    assert int8.weight.dtype == torch.int8
    assert int8.weight.abs().max() == 127
    assert torch.equal(int8.weight[1], torch.zeros(16, dtype=torch.int8))
    assert int8.weight[2, 5] == -127
    assert int8.scale[2] == pytest.approx(4.0 / 127)
    dequantized = int8.weight.float() * int8.scale[:, None]
    assert (dequantized - linear.weight).abs().max() <= int8.scale.max() / 2 + 1e-7


def test_an_int8_model_keeps_its_embedding_and_norms_in_float32(tiny_model_config):
    model = for_inference(GPT(tiny_model_config), "int8")
    int8_layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(int8_layers) == 4 * tiny_model_config.n_layer  # q/k/v, out, and the MLP's two
    assert not any(isinstance(m, nn.Linear) for m in model.blocks.modules())
    assert model.token_embedding.weight.dtype == torch.float32
    assert model.lm_head.weight is model.token_embedding.weight  # still tied
    assert model.final_norm.weight.dtype == torch.float32
    assert model.num_parameters() == GPT(tiny_model_config).num_parameters()  # still counted


def prepared_copy(model: GPT, precision: str) -> GPT:
    """A copy of the model, with the same weights, prepared for generation in `precision`."""
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())
    return for_inference(twin, precision).eval()


def test_an_int8_model_gives_close_logits_and_generates(tiny_model_config):
    torch.manual_seed(0)
    model = GPT(tiny_model_config).eval()
    int8 = prepared_copy(model, "int8")
    idx = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(int8(idx)[0], model(idx)[0], atol=0.02, rtol=0)
    generator = torch.Generator().manual_seed(0)
    tokens = list(generate(int8, [1, 2, 3], 40, generator=generator))  # the window moves
    assert len(tokens) == 40
    assert all(0 <= t < 40 for t in tokens)
    generator = torch.Generator().manual_seed(0)
    uncached = list(generate(int8, [1, 2, 3], 40, generator=generator, use_cache=False))
    assert tokens == uncached


def test_bfloat16_only_changes_the_number_type(tiny_model_config):
    model = for_inference(GPT(tiny_model_config), "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(isinstance(m, (Int8Linear, AllCoresLinear)) for m in model.modules())


def batched_calls(layer: AllCoresLinear, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """layer(x), and how many batched multiplies (one slab per core) it made."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as recorded:
        y = layer(x)
    return y, sum(event.name == "aten::baddbmm" for event in recorded.events())


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_an_all_cores_layer_computes_what_nn_linear_does(parts, bias):
    torch.manual_seed(0)
    linear = nn.Linear(20, 24, bias=bias)
    layer = AllCoresLinear(linear)
    layer.parts = parts  # as if PyTorch had that many threads when the layer was made
    for one_row in (torch.randn(1, 1, 20), torch.randn(20), torch.randn(1, 20)):
        got, calls = batched_calls(layer, one_row)
        assert calls == 1  # one row: the slabs' batched multiply
        assert got.shape == linear(one_row).shape
        torch.testing.assert_close(got, linear(one_row))
    many_rows = torch.randn(2, 5, 20)
    got, calls = batched_calls(layer, many_rows)
    assert calls == 0  # nn.Linear's own multiply
    assert torch.equal(got, linear(many_rows))


def test_an_all_cores_layer_takes_one_slab_per_thread_that_divides_its_rows():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert AllCoresLinear(nn.Linear(8, 12)).parts == 4
        assert AllCoresLinear(nn.Linear(8, 6)).parts == 3  # 6 rows: 3 slabs of 2
        assert AllCoresLinear(nn.Linear(8, 7)).parts == 1  # a prime: F.linear, on one core
        torch.set_num_threads(1)
        assert AllCoresLinear(nn.Linear(8, 12)).parts == 1
    finally:
        torch.set_num_threads(threads)


def test_a_float32_model_generates_as_before_with_all_cores_layers(tiny_model_config):
    torch.manual_seed(0)
    plain = GPT(tiny_model_config).eval()
    model = prepared_copy(plain, "float32")
    layers = [m for m in model.modules() if isinstance(m, AllCoresLinear)]
    assert len(layers) == 4 * tiny_model_config.n_layer  # q/k/v, out, and the MLP's two
    for layer in layers:
        layer.parts = 2  # the batched multiply, whatever this machine's threads
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged
    generator = torch.Generator().manual_seed(0)
    tokens = list(generate(model, [1, 2, 3], 40, generator=generator))  # the window moves
    generator = torch.Generator().manual_seed(0)
    assert tokens == list(generate(plain, [1, 2, 3], 40, generator=generator))
