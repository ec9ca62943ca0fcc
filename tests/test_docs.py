"""The documentation cannot drift silently: its commands parse, the files it names exist.

Every command line in README.md and docs/*.md (in code blocks, and `python ...` in the text)
goes through its script's own parser, as `--help` would check it; every project file it names
or links to must exist.
Run alone: python -m pytest tests/test_docs.py
"""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from conftest import PROJECT_ROOT

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:python|torchrun) [^`]+)`")
LINK = re.compile(r"\]\(([^)#\s]+)")
CODE_FILE = re.compile(r"`([\w./-]+\.py)`")
FOLDERS = ("", "support/", "tools/", "tests/")  # where a file named without its folder may be
NANOGPT_FILES = {"train.py", "sample.py", "model.py", "configurator.py"}  # the pages compare


def command_lines(text: str) -> list[str]:
    """Each `python ...` or `torchrun ...` command the page shows, continuations joined."""
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith(("python ", "torchrun ")):
                commands.append(line)
    commands += INLINE.findall(text)
    commands = [command.split("  #")[0].split(" # ")[0] for command in commands]
    return [" ".join(command.split()) for command in commands]  # inline code may wrap


def script_and_options(command: str) -> tuple[str, list[str]] | None:
    """The script a command runs and its options; None for `python -m pytest` and the like."""
    words = shlex.split(command)
    scripts = [i for i, word in enumerate(words) if word.endswith(".py")]
    if not scripts or words[:2] == ["python", "-m"]:
        return None
    return words[scripts[0]], words[scripts[0] + 1 :]


def all_commands() -> list[tuple[str, str]]:
    return [
        (page.name, command)
        for page in PAGES
        for command in command_lines(page.read_text(encoding="utf-8"))
    ]


@pytest.mark.parametrize(("page", "command"), all_commands())
def test_every_documented_command_parses(page, command, capsys):
    found = script_and_options(command)
    if found is None:
        assert command.startswith("python -m "), f"{page}: no script in {command!r}"
        paths = [word for word in shlex.split(command) if word.endswith(".py")]
        assert all((PROJECT_ROOT / path).is_file() for path in paths), f"{page}: {command!r}"
        return
    script, options = found
    assert (PROJECT_ROOT / script).is_file(), f"{page}: {script} does not exist"
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    parser = module.command_line()
    try:
        parser.parse_args(options)
    except SystemExit as stop:
        if stop.code == 0:  # --help
            return
        pytest.fail(f"{page}: {command!r} does not parse: {capsys.readouterr().err.strip()}")


def test_the_pages_show_the_main_commands():
    commands = {script_and_options(c)[0] for _, c in all_commands() if script_and_options(c)}
    expected = {"train_model.py", "generate_text.py", "app.py", "tools/bench.py"}
    assert expected | {"tools/export_model.py", "tools/compare_runs.py"} <= commands


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_linked_or_named_project_file_exists(page):
    text = page.read_text(encoding="utf-8")
    links = [link for link in LINK.findall(text) if "://" not in link]
    missing = [link for link in links if not (page.parent / link).exists()]
    for name in set(CODE_FILE.findall(text)) - NANOGPT_FILES:
        places = [name] if "/" in name else [folder + name for folder in FOLDERS]
        if not any((PROJECT_ROOT / place).is_file() for place in places):
            missing.append(name)
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_the_readme_stays_short_and_gives_the_test_command():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert "python -m pytest" in readme  # .ci/run runs the command the README gives


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_picture_is_there(page):
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text(encoding="utf-8"))
    for picture in pictures:
        assert (page.parent / picture).stat().st_size > 5_000, picture


def test_a_command_with_an_unknown_option_is_caught():
    # The check itself can fail: an option no parser has is refused.
    module = importlib.import_module("train_model")
    with pytest.raises(SystemExit):
        module.command_line().parse_args(["--no_such_option=1"])
    assert script_and_options("python tools/bench.py --only") == ("tools/bench.py", ["--only"])
    assert command_lines("```bash\npython a.py \\\n  --x 1   # note\n```") == ["python a.py --x 1"]
