"""The CUDA path: mixed precision, both attention kernels, generation, compile, checkpoints
moving between GPU and CPU, stop and resume, torchrun, and the memory check, on a real GPU.

Skipped where torch sees no CUDA device; device choice without the hardware is
tests/test_device_choice.py.
Run alone, on a machine with an NVIDIA GPU: python -m pytest tests/test_cuda.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

import train_model
from conftest import PROJECT_ROOT, tiny_train_argv
from model_architecture import GPT, generate
from support.checkpoint import load_checkpoint, model_from_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def twin_models(config, **changes):
    """The same weights twice: on the GPU, and a second copy there for another path."""
    torch.manual_seed(0)
    first = GPT(dataclasses.replace(config, **changes)).to(CUDA)
    second = GPT(dataclasses.replace(config, **changes)).to(CUDA)
    second.load_state_dict(first.state_dict())
    return first, second


def loss_and_gradients(model, idx, targets, dtype):
    model.zero_grad(set_to_none=True)
    mixed = dtype != torch.float32
    with torch.autocast("cuda", dtype=dtype) if mixed else contextlib.nullcontext():
        _, loss = model(idx, targets)
    loss.backward()
    gradients = torch.cat([p.grad.flatten().float() for p in model.parameters()])
    return loss.item(), gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_step_under_autocast_stays_close_to_float32(tiny_model_config, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    reference, mixed = twin_models(tiny_model_config)
    idx = torch.randint(0, tiny_model_config.vocab_size, (4, 16), device=CUDA)
    targets = torch.randint(0, tiny_model_config.vocab_size, (4, 16), device=CUDA)
    loss_32, grads_32 = loss_and_gradients(reference, idx, targets, torch.float32)
    loss_mixed, grads_mixed = loss_and_gradients(mixed, idx, targets, dtype)
    # bfloat16 keeps 8 bits of mantissa, float16 11: a few parts in a thousand on the loss.
    assert loss_mixed == pytest.approx(loss_32, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(grads_mixed, grads_32, dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_fused_and_manual_attention_agree_on_the_gpu(tiny_model_config, position):
    torch.manual_seed(0)
    manual = GPT(dataclasses.replace(tiny_model_config, attention="manual", position=position))
    fused = GPT(dataclasses.replace(tiny_model_config, attention="sdpa", position=position))
    fused.load_state_dict(manual.state_dict())
    manual, fused = manual.to(CUDA), fused.to(CUDA)
    idx = torch.randint(0, tiny_model_config.vocab_size, (3, 16), device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(manual(idx)[0], fused(idx)[0], atol=1e-4, rtol=1e-4)


def test_cached_and_uncached_generation_give_the_same_tokens(tiny_model_config):
    model, _ = twin_models(tiny_model_config)
    model.eval()
    prompt = [1, 2, 3]
    tokens = {}
    for use_cache in (True, False):
        generator = torch.Generator(device=CUDA).manual_seed(7)
        tokens[use_cache] = list(
            generate(model, prompt, 40, temperature=0, generator=generator, use_cache=use_cache)
        )
    assert tokens[True] == tokens[False]  # past block_size (16): the window moves too


def run_script(script: str, *args: object, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PROJECT_ROOT / script), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_training_on_the_gpu_saves_a_scaler_only_for_float16(tmp_path, tiny_corpus, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, tiny_corpus, device="cuda", dtype=dtype, max_iters=6)
    assert train_model.main([*argv, "--eval_interval=3"]) == 0
    checkpoint = load_checkpoint(out_dir / "ckpt_last.pth")
    assert bool(checkpoint["scaler"]) is (dtype == "float16")
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_a_gpu_checkpoint_loads_on_the_cpu_and_back(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, device="cuda", max_iters=4)) == 0
    checkpoint = load_checkpoint(out_dir / "ckpt_last.pth")
    on_cpu, _ = model_from_checkpoint(checkpoint, CPU)
    on_gpu, _ = model_from_checkpoint(checkpoint, CUDA)
    idx = torch.randint(0, on_cpu.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(idx.to(CUDA))[0].cpu(), on_cpu(idx)[0], atol=1e-4, rtol=0)
    # And a CPU run resumes on the GPU.
    cpu_dir = tmp_path / "cpu"
    assert train_model.main(tiny_train_argv(cpu_dir, tiny_corpus, device="cpu", max_iters=4)) == 0
    resumed = tiny_train_argv(cpu_dir, tiny_corpus, max_iters=8)
    assert train_model.main([*resumed, "--resume", "--device=cuda"]) == 0


def validation_losses(out_dir) -> list[float]:
    rows = (json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines())
    return [row["val_loss"] for row in rows]


def test_a_stopped_run_resumes_where_it_left_off(tmp_path, tiny_corpus):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert train_model.main(tiny_train_argv(whole, tiny_corpus, device="cuda", max_iters=20)) == 0
    first = tiny_train_argv(halves, tiny_corpus, device="cuda", max_iters=10)
    assert train_model.main(first) == 0
    again = tiny_train_argv(halves, tiny_corpus, max_iters=20)
    assert train_model.main([*again, "--resume"]) == 0
    # The same batches and steps; GPU kernels may sum in another order: close, not equal.
    assert validation_losses(halves) == pytest.approx(validation_losses(whole), rel=1e-3)


def test_compiled_training_and_generation_run_on_the_gpu(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, tiny_corpus, device="cuda", max_iters=4)
    assert train_model.main([*argv, "--compile"]) == 0
    args = ["--prompt=First", "--max_new_tokens=40", "--temperature=0", "--device=cuda"]
    args.append(f"--out_dir={out_dir}")
    compiled = run_script("generate_text.py", *args, "--compile", cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    assert "torch.compile failed" not in compiled.stderr
    assert compiled.stdout == run_script("generate_text.py", *args, cwd=tmp_path).stdout


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_generation_in_other_precisions_runs_on_the_gpu(tmp_path, tiny_corpus, precision):
    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, device="cuda", max_iters=4)) == 0
    args = ["--prompt=First", "--max_new_tokens=30", "--device=cuda", f"--precision={precision}"]
    result = run_script("generate_text.py", *args, f"--out_dir={out_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("First")


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun on the PATH")
def test_torchrun_with_one_process_trains_on_the_gpu(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    command = [
        "torchrun",
        "--standalone",
        "--nproc_per_node=1",
        str(PROJECT_ROOT / "train_model.py"),
    ]
    command += tiny_train_argv(out_dir, tiny_corpus, device="cuda", max_iters=4)
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (out_dir / "ckpt_last.pth").is_file()


def test_the_memory_check_refuses_a_model_the_gpu_cannot_hold(tmp_path, tiny_corpus, capsys):
    total = torch.cuda.get_device_properties(0).total_memory
    width = 8192  # 48 blocks of width 8192: about 39 G parameters, far beyond any one GPU
    assert 48 * 12 * width * width * 4 * 4 > 2 * total
    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, device="cuda")
    status = train_model.main([*argv, "--n_layer=48", f"--n_embd={width}", "--n_head=64"])
    assert status == 2
    assert "needs about" in capsys.readouterr().err
