"""Rotary position embeddings do what their name says.

The model's guarantees (the attention kernels agree, no position sees the future, the cache
changes nothing) are tested for both rotary and learned positions in test_model_architecture.py
and test_generation.py.

Run alone: python -m pytest tests/test_positions.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hyperparameters import ModelConfig
from model_architecture import GPT, apply_rotary, rotary_tables


def build(config: ModelConfig, **changes: object) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(config, **changes))


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
