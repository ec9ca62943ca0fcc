"""One truth for the dependencies: requirements*.txt repeat pyproject.toml's pins exactly.

(`uv lock --check`, in .ci/run, checks that uv.lock matches pyproject.toml.)
Run alone: python -m pytest tests/test_requirements.py
"""

from __future__ import annotations

import re
import tomllib

import pytest

from conftest import PROJECT_ROOT

PROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pins(lines: list[str]) -> set[str]:
    """The requirements, names normalised as pip does; comments and -r lines left out."""
    kept = (line.split("#")[0].strip() for line in lines)
    return {
        re.sub(r"^[\w.-]+", lambda name: re.sub(r"[-_.]+", "-", name[0]).lower(), line)
        for line in kept
        if line and not line.startswith("-")
    }


@pytest.mark.parametrize(
    ("path", "listed"),
    [
        ("requirements.txt", PROJECT["project"]["dependencies"]),
        ("requirements-dev.txt", PROJECT["dependency-groups"]["dev"]),
    ],
)
def test_requirements_files_repeat_pyproject(path, listed):
    written = (PROJECT_ROOT / path).read_text(encoding="utf-8").splitlines()
    assert pins(written) == pins(listed)


def test_every_pin_is_exact_and_the_dev_file_includes_the_runtime_one():
    runtime = PROJECT["project"]["dependencies"]
    assert all("==" in requirement for requirement in runtime + PROJECT["dependency-groups"]["dev"])
    dev_file = (PROJECT_ROOT / "requirements-dev.txt").read_text(encoding="utf-8")
    assert "-r requirements.txt" in dev_file.splitlines()


def test_the_pin_reader_normalises_names_and_ignores_comments():
    assert pins(["Huggingface_Hub==2.4.0  # hub", "-r other.txt", "", "# note"]) == {
        "huggingface-hub==2.4.0"
    }
