"""Device and precision choice, tested without the hardware: CUDA and MPS availability stubbed.

Run alone: python -m pytest tests/test_device_choice.py
"""

from __future__ import annotations

import pytest
import torch

from hyperparameters import TrainConfig
from model_architecture import GPT
from optimization import CombinedOptimizer, Muon, make_optimizer
from support.common import UserFacingError
from support.devices import resolve_device, resolve_dtype


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has the devices named: machine(cuda=True, bf16=False, mps=False)."""

    def pretend(cuda: bool = False, mps: bool = False, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_tries_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("requested", ["cuda", "mps"])
def test_an_unavailable_device_is_one_line(machine, requested):
    machine()
    with pytest.raises(UserFacingError, match=f"device {requested} is not available") as err:
        resolve_device(requested)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("device", "bf16", "expected"),
    [
        ("cuda", True, torch.bfloat16),
        ("cuda", False, torch.float16),  # older GPUs: float16, with gradient scaling
        ("mps", True, torch.float32),
        ("cpu", True, torch.float32),
    ],
)
def test_auto_precision_follows_the_device(machine, device, bf16, expected):
    machine(cuda=device == "cuda", mps=device == "mps", bf16=bf16)
    dtype, reason = resolve_dtype("auto", torch.device(device))
    assert dtype == expected
    assert str(expected).removeprefix("torch.") in reason


@pytest.mark.parametrize("device", ["mps", "cpu"])
def test_float16_is_refused_off_cuda_in_one_line(device):
    with pytest.raises(UserFacingError, match="float16 needs a CUDA device"):
        resolve_dtype("float16", torch.device(device))


def optimizers_for(device: torch.device, tiny_model_config) -> tuple[torch.optim.AdamW, Muon]:
    optimizer = make_optimizer(GPT(tiny_model_config), TrainConfig(optimizer="muon"), device)
    assert isinstance(optimizer, CombinedOptimizer)
    muon, adamw = optimizer.optimizers
    return adamw, muon


@pytest.mark.parametrize(
    ("device", "fused", "orthogonalize_dtype"),
    [("cuda", True, torch.bfloat16), ("cpu", True, torch.float32), ("mps", False, torch.float32)],
)
def test_mps_gets_no_fused_adamw_and_float32_muon(
    tiny_model_config, device, fused, orthogonalize_dtype
):
    # The parameters stay on the CPU: only the device's kind decides the optimizers' setup.
    adamw, muon = optimizers_for(torch.device(device), tiny_model_config)
    assert bool(adamw.defaults["fused"]) is fused
    assert muon.orthogonalize_dtype == orthogonalize_dtype
