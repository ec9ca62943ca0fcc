"""Optimizers and schedules: which weights each optimizer moves, the learning-rate curve, and
which settings --resume keeps (exact resumption itself: test_train_model.py).

Run alone: python -m pytest tests/test_optimization.py
"""

from __future__ import annotations

import json

import pytest
import torch

import train_model
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import build_training, tiny_train_argv
from hyperparameters import TrainConfig
from model_architecture import GPT
from optimization import CombinedOptimizer, learning_rate_at, make_optimizer, weight_average

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
    assert isinstance(muon, torch.optim.Muon)
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
