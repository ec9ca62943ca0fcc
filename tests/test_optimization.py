"""Optimizers and schedules: which weights each optimizer moves, the learning-rate curve, and
which settings --resume keeps (exact resumption itself: test_train_model.py).

Run alone: python -m pytest tests/test_optimization.py
"""

from __future__ import annotations

import json

import pytest
import torch

import train_model
from conftest import build_training, tiny_train_argv
from hyperparameters import TrainConfig
from model_architecture import GPT
from optimization import (
    CombinedOptimizer,
    Muon,
    learning_rate_at,
    make_optimizer,
    orthogonalize,
    weight_average,
)
from support.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

CPU = torch.device("cpu")


def test_cosine_warms_up_then_decays_to_the_floor():
    config = TrainConfig(learning_rate=1e-3, min_lr_fraction=0.1, warmup_iters=10, max_iters=110)
    assert learning_rate_at(0, config) > 0
    warmup = [learning_rate_at(s, config) for s in range(11)]
    assert warmup == sorted(warmup)
    assert learning_rate_at(10, config) == pytest.approx(1e-3)
    assert learning_rate_at(60, config) == pytest.approx(0.55e-3)  # halfway down the cosine
    assert learning_rate_at(110, config) == pytest.approx(1e-4)
    decay = [learning_rate_at(s, config) for s in range(10, 111)]
    assert decay == sorted(decay, reverse=True)


def test_learning_rate_without_warmup_starts_at_the_peak():
    config = TrainConfig(learning_rate=1e-3, warmup_iters=0, max_iters=100)
    assert learning_rate_at(0, config) == pytest.approx(1e-3)


def tiny_model(tiny_model_config) -> GPT:
    return GPT(tiny_model_config)


def test_adamw_decays_matrices_only(tiny_model_config):
    model = tiny_model(tiny_model_config)
    optimizer = make_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.1), CPU)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1
    assert plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_muon_takes_the_block_matrices_and_adamw_the_rest(tiny_model_config):
    model = tiny_model(tiny_model_config)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    assert isinstance(optimizer, CombinedOptimizer)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon)
    assert muon.orthogonalize_dtype == torch.float32  # on a CPU
    assert isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for group in muon.param_groups for p in group["params"]}
    adamw_ids = {id(p) for group in adamw.param_groups for p in group["params"]}
    block_matrices = {
        id(p) for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2
    }
    assert muon_ids == block_matrices  # 4 per block: qkv, attention out, feed-forward in and out
    assert len(muon_ids) == 4 * tiny_model_config.n_layer
    assert id(model.token_embedding.weight) in adamw_ids
    assert muon_ids.isdisjoint(adamw_ids)
    assert len(muon_ids | adamw_ids) == len(list(model.parameters()))  # every weight, once


TORCH_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults
MATRIX_SHAPES = [(48, 16), (16, 16), (16, 64), (8, 40)]  # tall, square, wide


def matrices(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator))
        for shape in MATRIX_SHAPES
    ]


def step_both(ours: torch.optim.Optimizer, reference: torch.optim.Optimizer, steps: int, seed: int):
    """Give both optimizers the same random gradients and step them."""
    generator = torch.Generator().manual_seed(seed)
    ours_params = [p for group in ours.param_groups for p in group["params"]]
    reference_params = [p for group in reference.param_groups for p in group["params"]]
    for _ in range(steps):
        for mine, theirs in zip(ours_params, reference_params, strict=True):
            grad = torch.randn(mine.shape, generator=generator)
            mine.grad, theirs.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()


@pytest.mark.parametrize(
    "settings",
    [
        {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"},  # what training uses
        {"lr": 0.05, "weight_decay": 0.0, "nesterov": False, "momentum": 0.9},
        {"lr": 0.01, "ns_steps": 3, "adjust_lr_fn": "original"},
    ],
)
def test_muon_in_bfloat16_steps_exactly_as_torchs(settings):
    ours_params, reference_params = matrices(0), matrices(0)
    ours = Muon(ours_params, orthogonalize_dtype=torch.bfloat16, **settings)
    reference = torch.optim.Muon(reference_params, **settings)
    step_both(ours, reference, steps=4, seed=1)
    for mine, theirs, start in zip(ours_params, reference_params, matrices(0), strict=True):
        assert torch.equal(mine, theirs)
        assert not torch.equal(mine, start)  # it moved
    for mine, theirs in zip(ours.state.values(), reference.state.values(), strict=True):
        assert torch.equal(mine["momentum_buffer"], theirs["momentum_buffer"])


@pytest.mark.parametrize("shape", [(384, 128), (128, 512), (128, 128)])
def test_float32_orthogonalisation_is_bfloat16s_without_the_rounding(shape):
    update = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    exact = orthogonalize(update, TORCH_COEFFICIENTS, 5, 1e-7, torch.float32)
    rounded = orthogonalize(update, TORCH_COEFFICIENTS, 5, 1e-7, torch.bfloat16).float()
    assert exact.dtype == torch.float32
    assert exact.shape == shape
    # bfloat16 keeps 8 bits of mantissa: the two agree to about 1%.
    assert (exact - rounded).norm() / exact.norm() < 0.03
    # Singular values near 1, not exactly (a square random matrix has a few far smaller ones).
    singular_values = torch.linalg.svdvals(exact)
    near_one = (singular_values > 0.6) & (singular_values < 1.25)
    assert near_one.float().mean() > (0.95 if shape[0] == shape[1] else 0.999)
    assert singular_values.max() < 1.25


def test_muon_resumes_torchs_saved_state_and_torchs_resumes_ours():
    saved_by_torch = torch.optim.Muon(matrices(0), lr=0.02, adjust_lr_fn="match_rms_adamw")
    saved_by_ours = Muon(matrices(0), torch.bfloat16, lr=0.02, adjust_lr_fn="match_rms_adamw")
    step_both(saved_by_ours, saved_by_torch, steps=3, seed=1)  # both hold momentum now
    ours_params, torch_params = matrices(5), matrices(5)
    ours = Muon(ours_params, torch.bfloat16)
    reference = torch.optim.Muon(torch_params)
    ours.load_state_dict(saved_by_torch.state_dict())
    reference.load_state_dict(saved_by_ours.state_dict())
    assert ours.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"  # the saved settings
    step_both(ours, reference, steps=2, seed=2)
    for mine, theirs in zip(ours_params, torch_params, strict=True):
        assert torch.equal(mine, theirs)


def test_muon_orthogonalises_in_bfloat16_on_cuda_only(tiny_model_config):
    model = tiny_model(tiny_model_config)
    for device, dtype in [("cpu", torch.float32), ("cuda", torch.bfloat16)]:
        optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device(device))
        assert optimizer.optimizers[0].orthogonalize_dtype == dtype


def test_one_learning_rate_reaches_every_group(tiny_model_config):
    optimizer = make_optimizer(tiny_model(tiny_model_config), TrainConfig(optimizer="muon"), CPU)
    for group in optimizer.param_groups:
        group["lr"] = 0.123
    assert all(g["lr"] == 0.123 for o in optimizer.optimizers for g in o.param_groups)


def test_resume_keeps_saved_settings_unless_given_again(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, tiny_corpus, max_iters=10, learning_rate=3e-3)
    assert train_model.main(argv) == 0
    resumed = tiny_train_argv(out_dir, tiny_corpus, max_iters=20)  # no --learning_rate
    run, state, _ = build_training([*resumed, "--resume"])
    assert state.step == 10
    assert run.config.learning_rate == 3e-3
    assert run.config.max_iters == 20  # given again: the new value wins


def test_resuming_an_older_checkpoint_keeps_its_adamw_and_floor(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, tiny_corpus, max_iters=10, optimizer="adamw")
    assert train_model.main([*argv, "--learning_rate=5e-3"]) == 0
    path = out_dir / "ckpt_last.pth"
    checkpoint = load_checkpoint(path)
    del checkpoint["train_config"]["optimizer"]  # what a checkpoint from before it holds
    del checkpoint["train_config"]["min_lr_fraction"]
    checkpoint["train_config"]["min_lr"] = 4e-4  # an absolute floor, as older runs saved it
    save_checkpoint(path, checkpoint)
    resumed = tiny_train_argv(out_dir, tiny_corpus, max_iters=20)
    run, _, _ = build_training([*resumed, "--resume"])
    assert run.config.optimizer == "adamw"
    assert isinstance(run.optimizer, torch.optim.AdamW)
    assert run.config.min_lr_fraction == pytest.approx(4e-4 / 5e-3)


def test_grad_scaler_steps_the_combined_optimizer(tiny_model_config):
    # float16 training on CUDA goes through a GradScaler; it must handle Muon + AdamW as one.
    model = tiny_model(tiny_model_config)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _, loss = model(torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16)))
    scaler.scale(loss).backward()
    scaled = {name: p.grad.clone() for name, p in model.named_parameters()}
    scaler.unscale_(optimizer)  # reaches the parameters of both optimizers
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, scaled[name] / 1024.0, atol=0, rtol=1e-6)
    scaler.step(optimizer)
    scaler.update()
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert "blocks.0.attn.qkv_proj.weight" in moved  # Muon stepped
    assert "token_embedding.weight" in moved  # AdamW stepped


def test_the_weight_average_follows_its_formula(tiny_model_config):
    model = tiny_model(tiny_model_config)
    assert weight_average(model, 0.0) is None
    average = weight_average(model, 0.9)
    expected = None
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # a step
        average.update_parameters(model)
        weights = [p.detach().clone() for p in model.parameters()]
        if expected is None:
            expected = weights  # the first update starts the average at the weights
        else:
            expected = [0.9 * e + 0.1 * w for e, w in zip(expected, weights, strict=True)]
    for got, want in zip(average.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert average.module.lm_head.weight is average.module.token_embedding.weight  # still tied


def test_a_run_with_a_weight_average_saves_it_as_the_model(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, tiny_corpus, max_iters=12, weight_average=0.8)
    assert train_model.main(argv) == 0
    plain = tmp_path / "plain"  # the same run without the average
    assert train_model.main(tiny_train_argv(plain, tiny_corpus, max_iters=12)) == 0
    checkpoint, without = (load_checkpoint(d / "ckpt_last.pth") for d in (out_dir, plain))
    assert "training_weights" not in without  # one set of weights, as before
    assert checkpoint["averaged_steps"] == 12
    averaged, raw = checkpoint["model"], checkpoint["training_weights"]
    for name, tensor in without["model"].items():  # the average does not change training
        assert torch.equal(raw[name], tensor), name
    assert not all(torch.equal(averaged[name], raw[name]) for name in averaged)
    model, _ = model_from_checkpoint(checkpoint, CPU)  # what generation loads: the average
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, averaged[name]), name
    # Evaluations score the average: the logged losses differ from the plain run's.
    logged = [(d / "metrics.jsonl").read_text().splitlines()[-1] for d in (out_dir, plain)]
    assert json.loads(logged[0])["val_loss"] != json.loads(logged[1])["val_loss"]
