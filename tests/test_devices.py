"""The process-wide settings of devices.py.

Run alone: python -m pytest tests/test_devices.py
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from support.devices import keep_freed_memory

BUFFER_BYTES = 2**26  # 64 MiB: above the largest mmap threshold glibc picks by itself (32 MiB)

# Allocates and frees one buffer five times and prints the page faults of each round; with
# "keep", after keep_freed_memory (or "skip" where it cannot keep a buffer that large).
ALLOCATION_ROUNDS = f"""
import resource, sys
import torch
from support.devices import keep_freed_memory
if sys.argv[1] == "keep" and keep_freed_memory() < {BUFFER_BYTES}:
    print("skip")
    sys.exit()
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones({BUFFER_BYTES // 4})  # float32, freed at once
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: fresh memory then takes few faults."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.skipif(huge_pages_always(), reason="page faults do not tell fresh pages apart")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_memory_spares_page_faults_on_reuse(mode):
    # malloc's own settings from the environment would change what "default" measures.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "MALLOC_"))}
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATION_ROUNDS, mode],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    if result.stdout.strip() == "skip":
        pytest.skip("this glibc keeps only smaller buffers")
    faults = [int(line) for line in result.stdout.split()]
    pages = BUFFER_BYTES // resource.getpagesize()
    if mode == "keep":
        assert min(faults[-2:]) < pages // 10  # touched once, then reused
    else:
        assert min(faults) > pages // 2  # glibc maps fresh pages every round


def test_keep_freed_memory_is_skipped_without_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() == 0
