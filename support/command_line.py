"""The command line, derived from the dataclass fields of hyperparameters.py.

Every field becomes a `--name` option with its type, choices, help text and default (and each
preset's value for it); a script picks the dataclasses it exposes. Errors are one line with
exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal, NoReturn

from hyperparameters import CONFIG_CLASSES, PRESETS, PRETRAINED_SHAPE, preset_for

# Filled in from the tokenizer or chosen by the program, never typed by a user.
NOT_OPTIONS = frozenset({"vocab_size"})


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        """Print `prog: error: message` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_bool(text: str) -> bool:
    """Read true/false, yes/no, 1/0 (any case) as a bool."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def text_arg(text: str) -> str:
    r"""Text whose "\n" and "\t", typed on a shell, become real newlines and tabs."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any) -> None:
    name, default, help = f.name, f.default, f.metadata["help"]
    # default=SUPPRESS keeps untyped options out of the namespace, so we know what was given.
    shown = [_shown(default)]
    shown += [f"{kind}: {_shown(table[name])}" for kind, table in PRESETS if name in table]
    kwargs: dict[str, Any] = {
        "default": argparse.SUPPRESS,
        "help": f"{help} (default: {'; '.join(shown)})",
    }
    if typing.get_origin(hint) is Literal:
        kwargs["choices"] = typing.get_args(hint)
    elif hint is bool:
        kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
    elif hint is str:
        kwargs["type"] = text_arg if f.metadata["escapes"] else str
    else:
        kwargs["type"] = hint
    group.add_argument(f"--{name}", **kwargs)


def build_parser(description: str, groups: list[tuple[type, list[str] | None]]) -> OneLineParser:
    """An argument parser with one `--field` option per dataclass field.

    Args:
        description: shown at the top of `--help`.
        groups: (config class, field names to expose or None for all) pairs; each becomes an
            argument group of `--help`.
    """
    parser = OneLineParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for config_class, only in groups:
        group = parser.add_argument_group(config_class.__name__, config_class.__doc__)
        hints = typing.get_type_hints(config_class)
        for f in dataclasses.fields(config_class):
            if f.name in NOT_OPTIONS or (only is not None and f.name not in only):
                continue
            _add_field(group, f, hints[f.name])
    return parser


def parse_configs(
    parser: OneLineParser, config_classes: list[type], argv: list[str] | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """Parse the command line into one validated instance per config class.

    Returns:
        The configs, in the order of `config_classes`, and the options the user gave
        explicitly (so a resumed run can tell a deliberate override from a default), plus any
        options the parser has beyond the dataclass fields.
    """
    given = vars(parser.parse_args(argv))
    if given.get("init_from") and not given.get("resume"):
        contradicting = [f"--{name}" for name in PRETRAINED_SHAPE if name in given]
        if contradicting:
            parser.error(f"--init_from takes {', '.join(contradicting)} from the pretrained model")
        if given.get("bpe_vocabulary") == "trained":
            parser.error(
                "--init_from reads GPT-2's tokens, not a learned vocabulary: use "
                "--bpe_vocabulary fitted or full"
            )
    preset = preset_for(given)
    applied = {} if preset is None else applied_preset(parser, preset[1], given)
    if applied and not given.get("resume"):  # a resumed run takes its settings from its checkpoint
        announce_preset(preset[0], applied)
    values = {**applied, **given}  # what the user typed wins over either default
    configs = []
    for config_class in config_classes:
        names = {f.name for f in dataclasses.fields(config_class)}
        try:
            configs.append(config_class(**{k: v for k, v in values.items() if k in names}))
        except ValueError as err:
            parser.error(str(err))
    return configs, given


def applied_preset(
    parser: OneLineParser, preset: dict[str, Any], given: dict[str, Any]
) -> dict[str, Any]:
    """The preset's values this command takes: its own options, the ones not typed."""
    options = {action.dest for action in parser._actions}
    return {name: value for name, value in preset.items() if name in options and name not in given}


def announce_preset(option: str, applied: dict[str, Any]) -> None:
    """Say, in one line, which of hyperparameters.py's defaults a preset replaces, and by what."""
    defaults = {f.name: f.default for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)}
    changes = [
        f"{name} {_shown(value)} (not {_shown(defaults[name])})"
        for name, value in applied.items()
        if value != defaults[name]
    ]
    if changes:
        print(
            f"{option} preset over hyperparameters.py's defaults: {', '.join(changes)}; "
            "an option typed here wins"
        )
