"""Both ways of telling positions apart: a learned embedding each, and rotary embeddings.

Each must keep what the model guarantees (the two attention kernels agree, no position sees
the future, the cache changes nothing); rotary embeddings must also do what their name says.

Run alone: python -m pytest tests/test_positions.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hyperparameters import ModelConfig
from model_architecture import GPT, KVCache, apply_rotary, rotary_tables

POSITIONS = ["learned", "rope"]


def build(config: ModelConfig, **changes: object) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(config, **changes))


@pytest.mark.parametrize("position", POSITIONS)
def test_sdpa_and_manual_attention_agree(tiny_model_config, position):
    manual = build(tiny_model_config, attention="manual", position=position)
    fused = build(tiny_model_config, attention="sdpa", position=position)
    fused.load_state_dict(manual.state_dict())
    idx, targets = torch.randint(0, 40, (3, 16)), torch.randint(0, 40, (3, 16))
    logits_m, loss_m = manual(idx, targets)
    logits_f, loss_f = fused(idx, targets)
    torch.testing.assert_close(logits_m, logits_f, atol=1e-5, rtol=0)
    loss_m.backward()
    loss_f.backward()
    grads_m = dict(manual.named_parameters())
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, grads_m[name].grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_no_position_sees_the_future(tiny_model_config, position):
    model = build(tiny_model_config, position=position).eval()
    idx = torch.randint(0, 40, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 40
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[0, :10], logits_changed[0, :10], atol=0, rtol=0)
    assert not torch.allclose(logits[0, 10:], logits_changed[0, 10:])


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_forward_matches_full_forward(tiny_model_config, position):
    model = build(tiny_model_config, position=position).eval()
    idx = torch.randint(0, 40, (1, 12))
    full, _ = model(idx)
    cache = KVCache(model, batch_size=1)
    first, _ = model(idx[:, :5], cache=cache)
    rest = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_and_uncached_generation_agree_past_block_size(tiny_model_config, position):
    model = build(tiny_model_config, position=position).eval()

    def generate(use_cache: bool) -> list[int]:
        generator = torch.Generator().manual_seed(0)
        return list(model.generate([1, 2, 3], 40, generator=generator, use_cache=use_cache))

    assert generate(use_cache=True) == generate(use_cache=False)


def test_rotation_keeps_lengths_and_scores_depend_only_on_distance():
    tables = rotary_tables(length=20, head_size=8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def rotated(x: torch.Tensor, position: int) -> torch.Tensor:
        return apply_rotary(x, tables[:, position : position + 1])

    torch.testing.assert_close(rotated(q, 7).norm(), q.norm())
    score = (rotated(q, 9) * rotated(k, 4)).sum()  # query at 9, key at 4: 5 apart
    shifted = (rotated(q, 15) * rotated(k, 10)).sum()  # also 5 apart
    torch.testing.assert_close(score, shifted, atol=1e-5, rtol=0)
    assert not torch.allclose(score, (rotated(q, 9) * rotated(k, 8)).sum())
    torch.testing.assert_close(rotated(q, 0), q)  # position 0: no rotation


def test_rope_model_learns_no_position_table(tiny_model_config):
    learned = build(tiny_model_config, position="learned")
    rotary = build(tiny_model_config, position="rope")
    assert rotary.position_embedding is None
    assert not any("rotary" in key for key in rotary.state_dict())  # derived, not saved
    table = tiny_model_config.block_size * tiny_model_config.n_embd
    assert learned.num_parameters() - rotary.num_parameters() == table


def test_rope_needs_an_even_head_size():
    with pytest.raises(ValueError, match="even head size"):
        ModelConfig(n_embd=30, n_head=2, position="rope")
