"""Sampling: cached and uncached generation agree, the filters keep the right tokens.

Run alone: python -m pytest tests/test_generation.py
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch

from model_architecture import (
    GPT,
    KVCache,
    generate,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from support.devices import compile_token_step
from support.fast_paths import for_inference


@pytest.fixture
def model(tiny_model_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_model_config).eval()


def generate_list(model, prompt, n, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return list(generate(model, prompt, max_new_tokens=n, generator=generator, **kwargs))


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_cached_and_uncached_generation_give_the_same_tokens(
    tiny_model_config, attention, position
):
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_model_config, attention=attention, position=position)
    model = GPT(config).eval()
    # 3 prompt tokens + 40 new ones: well past block_size (16), so the window slides.
    cached = generate_list(model, [1, 2, 3], 40, temperature=1.0, use_cache=True)
    uncached = generate_list(model, [1, 2, 3], 40, temperature=1.0, use_cache=False)
    assert cached == uncached
    assert len(cached) == 40


@pytest.mark.parametrize("block_size", [1, 2, 5])
@pytest.mark.parametrize("prompt_length", [1, 4, 5, 6, 13])
def test_cached_and_uncached_generation_agree_for_any_block_and_prompt(
    tiny_model_config, block_size, prompt_length
):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(tiny_model_config, block_size=block_size)).eval()
    prompt = list(range(1, prompt_length + 1))  # shorter than, as long as and beyond the block
    cached = generate_list(model, prompt, 12, use_cache=True)
    assert cached == generate_list(model, prompt, 12, use_cache=False)


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    assert generate_list(model, [5], 30, seed=1) == generate_list(model, [5], 30, seed=1)
    assert generate_list(model, [5], 30, seed=1) != generate_list(model, [5], 30, seed=2)


def test_temperature_zero_is_greedy(model):
    tokens = [4, 9]
    new = generate_list(model, tokens, 20, temperature=0.0)
    for token in new:
        logits, _ = model(torch.tensor([tokens[-16:]]))
        assert token == int(torch.argmax(logits[0, -1]))
        tokens.append(token)


def test_prompt_longer_than_block_size_is_cropped(model):
    long_prompt = list(range(40))  # block_size is 16
    out = generate_list(model, long_prompt, 5, temperature=0.0)
    expected = generate_list(model, long_prompt[-16:], 5, temperature=0.0)
    assert out == expected


def test_generate_streams_one_id_at_a_time(model):
    stream = generate(model, [1], max_new_tokens=3)
    assert inspect.isgenerator(stream)
    first = next(stream)
    assert isinstance(first, int)
    assert len(list(stream)) == 2


def test_top_k_larger_than_vocabulary_and_top_p_one_work(model):
    assert len(generate_list(model, [1], 10, top_k=10_000, top_p=1.0)) == 10


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [False, True, False, True, False]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = top_p_filter(probs.log(), 0.7)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    kept = top_p_filter(probs.log(), 0.8)  # 0.5 + 0.3 reaches 0.8 exactly
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    kept = top_p_filter(probs.log(), 0.1)  # the likeliest token always stays
    assert torch.isfinite(kept).tolist() == [True, False, False, False]


def test_top_p_handles_unsorted_logits():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    kept = top_p_filter(logits, 0.7)
    assert torch.isfinite(kept).tolist() == [False, True, False, True]
    torch.testing.assert_close(kept[1], logits[1])


def test_top_k_of_one_is_greedy_even_with_ties():
    logits = torch.tensor([1.0, 5.0, 2.0, 5.0, 5.0])  # three tokens share the largest logit
    kept = top_k_filter(logits, 1)
    assert torch.isfinite(kept).sum() == 1
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 1, 1.0, generator) for _ in range(50)}
    assert draws == {int(torch.argmax(logits))}


def test_a_top_p_that_rounds_to_zero_keeps_the_likeliest_token():
    logits = torch.tensor([1.0, 3.0, 2.0])
    kept = top_p_filter(logits, 1e-300)
    assert torch.isfinite(kept).tolist() == [False, True, False]


@pytest.mark.parametrize("temperature", [1e-4, 1e-30])
def test_tiny_temperatures_pick_the_likeliest_token_without_overflow(temperature):
    logits = torch.tensor([10.0, 80.0, 79.9, -50.0])
    generator = torch.Generator().manual_seed(0)
    assert {sample_next(logits, temperature, 0, 1.0, generator) for _ in range(20)} == {1}


def test_sampling_only_draws_from_the_kept_tokens():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 2, 1.0, generator) for _ in range(200)}
    assert draws == {1, 3}


def test_context_window_jumps_by_half_a_block():
    from model_architecture import context_start

    assert context_start(16, 0, 16) == 0  # fits: everything
    assert context_start(17, 0, 16) == 8  # one too many: jump half a block
    assert context_start(24, 0, 16) == 8
    assert context_start(25, 0, 16) == 16
    assert context_start(40, 24, 16) == 24  # a long prompt starts at its last block_size
    for length in range(17, 200):
        window = length - context_start(length, 0, 16)
        assert 9 <= window <= 16  # the model always sees more than half a block


def test_bfloat16_weights_give_close_logits_and_valid_tokens(model):
    idx = torch.randint(0, 40, (1, 16))
    half = GPT(model.config).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    torch.testing.assert_close(half(idx)[0].float(), model(idx)[0], atol=0.05, rtol=0)
    tokens = generate_list(half, [1, 2, 3], 40)  # past block_size: the cache is bfloat16 too
    assert len(tokens) == 40
    assert all(0 <= t < 40 for t in tokens)


@pytest.mark.parametrize(
    ("position", "precision"), [("rope", "float32"), ("learned", "float32"), ("rope", "int8")]
)
def test_the_compiled_token_step_gives_the_tokens_of_the_model(
    tiny_model_config, position, precision
):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(tiny_model_config, position=position))
    model = for_inference(model, precision).eval()
    token_step = compile_token_step(model)
    assert token_step is not None
    # A one-token prompt and 40 new tokens: every position of the block, and window moves.
    eager = generate_list(model, [1], 40, temperature=1.0)
    with torch.compiler.set_stance("fail_on_recompile"):  # one graph serves every position
        compiled = generate_list(model, [1], 40, temperature=1.0, token_step=token_step)
        longer_prompt = generate_list(model, [1, 2, 3, 4, 5], 20, token_step=token_step)
    assert compiled == eager
    assert longer_prompt == generate_list(model, [1, 2, 3, 4, 5], 20)
    with torch.inference_mode():  # what the compiled step computes is the model's forward
        cache = KVCache(model.config, 1, torch.device("cpu"), torch.float32)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        token = torch.tensor([[4]])
        expected, _ = model(token, cache=copy.deepcopy(cache))
        logits, _ = token_step(token, cache=cache)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_a_compiler_that_cannot_start_means_generating_uncompiled(model, monkeypatch, capsys):
    def unsupported(module, **options):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    assert compile_token_step(model) is None
    assert "generating uncompiled" in capsys.readouterr().err


def test_a_failing_compiler_means_generating_uncompiled(model, monkeypatch, capsys):
    def broken_compile(module, **options):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert compile_token_step(model) is None
    assert "torch.compile failed (no C++ compiler found); generating uncompiled" in (
        capsys.readouterr().err
    )


def test_compiling_is_announced_only_when_there_is_a_token_step(tiny_model_config, monkeypatch):
    def unsupported(module, **options):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)  # fast: the announcement comes first
    announced = []
    one_token_context = GPT(dataclasses.replace(tiny_model_config, block_size=1)).eval()
    assert compile_token_step(one_token_context, announce=lambda: announced.append(1)) is None
    assert announced == []  # block_size 1: every step recomputes its window, nothing compiles
    compile_token_step(GPT(tiny_model_config).eval(), announce=lambda: announced.append(1))
    assert announced == [1]
