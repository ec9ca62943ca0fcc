"""Generation's layers: int8 weights close to float32, float32 products on every core."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from model_architecture import GPT, generate
from quantization import FLOAT32_MULTIPLY_MIN_ROWS, AllCoresLinear, Int8Linear, to_precision


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
    model = to_precision(GPT(tiny_model_config), "int8")
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
    return to_precision(twin, precision).eval()


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
    model = to_precision(GPT(tiny_model_config), "bfloat16")
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
