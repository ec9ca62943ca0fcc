"""The model: attention paths agree, causality holds, init and tying are GPT-2's.

Run alone: python -m pytest tests/test_model_architecture.py
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hyperparameters import ModelConfig
from model_architecture import (
    GPT,
    KVCache,
    attention_maps,
    causal_attention_manual,
    causal_attention_sdpa,
)

POSITIONS = ["rope", "learned"]  # every guarantee holds for both ways of encoding position


def build(config, **changes):
    torch.manual_seed(0)
    return GPT(dataclasses.replace(config, **changes))


@pytest.mark.parametrize("position", POSITIONS)
def test_sdpa_and_manual_attention_give_same_logits_and_gradients(tiny_model_config, position):
    manual = build(tiny_model_config, attention="manual", position=position)
    fused = build(tiny_model_config, attention="sdpa", position=position)
    fused.load_state_dict(manual.state_dict())
    idx = torch.randint(0, 40, (3, 16))
    targets = torch.randint(0, 40, (3, 16))
    logits_m, loss_m = manual(idx, targets)
    logits_f, loss_f = fused(idx, targets)
    torch.testing.assert_close(logits_m, logits_f, atol=1e-5, rtol=0)
    loss_m.backward()
    loss_f.backward()
    grads_m = dict(manual.named_parameters())
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, grads_m[name].grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("t_query", "t_key"), [(1, 9), (4, 9), (9, 9)])
def test_attention_kernels_agree_when_queries_are_the_last_positions(t_query, t_key):
    q = torch.randn(2, 3, t_query, 8)
    k = torch.randn(2, 3, t_key, 8)
    v = torch.randn(2, 3, t_key, 8)
    mask = torch.ones(t_key, t_key, dtype=torch.bool).tril()[t_key - t_query :]
    manual = causal_attention_manual(q, k, v, mask, 0.0)
    fused = causal_attention_sdpa(q, k, v, mask, 0.0)
    torch.testing.assert_close(manual, fused, atol=1e-5, rtol=0)
    # The last query sees every key: its output is the plain softmax-weighted mean.
    weights = torch.softmax(q[:, :, -1:] @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(manual[:, :, -1:], weights @ v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_logits_at_t_ignore_tokens_after_t(tiny_model_config, attention, position):
    model = build(tiny_model_config, attention=attention, position=position).eval()
    idx = torch.randint(0, 40, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 40
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[0, :10], logits_changed[0, :10], atol=0, rtol=0)
    assert not torch.allclose(logits[0, 10:], logits_changed[0, 10:])


def test_output_head_is_tied_to_token_embedding(tiny_model_config):
    model = build(tiny_model_config)
    assert model.lm_head.weight is model.token_embedding.weight


def test_parameter_count_matches_the_formula(tiny_model_config):
    c = tiny_model_config
    C, V, L = c.n_embd, c.vocab_size, c.n_layer
    per_block = (
        2 * 2 * C  # two LayerNorms, weight and bias
        + C * 3 * C
        + 3 * C  # qkv projection
        + C * C
        + C  # attention output projection
        + C * 4 * C
        + 4 * C  # feed-forward in
        + 4 * C * C
        + C  # feed-forward out
    )
    expected = V * C + L * per_block + 2 * C  # + final LayerNorm
    assert build(c, position="rope").num_parameters() == expected
    learned_table = c.block_size * C
    assert build(c, position="learned").num_parameters() == expected + learned_table


def test_initialisation_follows_gpt2():
    model = GPT(ModelConfig(n_layer=8, n_embd=256, vocab_size=500))
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 0.001
    assert abs(model.blocks[0].mlp.fc_in.weight.std().item() - 0.02) < 0.001
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert abs(model.blocks[3].attn.out_proj.weight.std().item() - residual_std) < 0.0005
    assert abs(model.blocks[3].mlp.fc_out.weight.std().item() - residual_std) < 0.0005
    assert torch.count_nonzero(model.blocks[0].attn.qkv_proj.bias) == 0


def test_initial_loss_is_close_to_uniform_guess(tiny_model_config):
    model = build(tiny_model_config, vocab_size=65)
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.1


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_evaluation_is_deterministic_with_dropout(tiny_model_config, attention):
    model = build(tiny_model_config, attention=attention, dropout=0.5)
    idx = torch.randint(0, 40, (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])  # dropout is active in training
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_causal_mask_is_not_saved_in_the_state_dict(tiny_model_config):
    assert not any("mask" in key for key in build(tiny_model_config).state_dict())


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_cached_forward_matches_full_forward(tiny_model_config, attention, position):
    model = build(tiny_model_config, attention=attention, position=position).eval()
    idx = torch.randint(0, 40, (1, 12))
    full, _ = model(idx)
    cache = KVCache(model.config, 1, torch.device("cpu"), torch.float32)
    first, _ = model(idx[:, :5], cache=cache)
    rest = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    stepwise = torch.cat([first, *rest], dim=1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
    assert cache.length == 12


def test_cached_forward_ignores_what_the_cache_slots_after_it_hold(tiny_model_config):
    # After the context window moves, the buffers still hold the old window's keys and values
    # beyond the new positions: the causal mask must hide them.
    model = build(tiny_model_config).eval()
    idx = torch.randint(0, 40, (1, 9))
    full, _ = model(idx)
    cache = KVCache(model.config, 1, torch.device("cpu"), torch.float32)
    for layer in cache.layers:
        layer.keys.normal_(std=100.0)
        layer.values.normal_(std=100.0)
    first, _ = model(idx[:, :4], cache=cache)
    rest = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, 9)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=0)


def test_too_long_input_is_an_internal_error(tiny_model_config):
    model = build(tiny_model_config)
    with pytest.raises(AssertionError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_maps_are_causal_distributions(tiny_model_config):
    model = build(tiny_model_config).eval()
    maps = attention_maps(model, torch.randint(0, 40, (1, 10)))
    assert maps.shape == (2, 2, 10, 10)  # (n_layer, nh, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 10))
    assert torch.count_nonzero(maps.triu(diagonal=1)) == 0


def test_attention_maps_are_the_weights_the_forward_pass_uses(tiny_model_config):
    model = build(tiny_model_config, attention="manual").eval()
    idx = torch.randint(0, 40, (1, 10))
    maps = attention_maps(model, idx)
    attn = model.blocks[0].attn
    with torch.no_grad():
        x = model.blocks[0].norm_1(model.embed(idx))
        _, _, v = attn.queries_keys_values(x, start=0)
    with torch.no_grad():
        mixed = maps[0].unsqueeze(0) @ v  # (1, nh, T, hs)
        expected = attn.out_proj(mixed.transpose(1, 2).reshape(1, 10, -1))
        torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=0)
