"""Settings: every field documented and reachable from the command line, bad values refused.

Run alone: python -m pytest tests/test_hyperparameters.py
"""

from __future__ import annotations

import dataclasses

import pytest

from hyperparameters import (
    CONFIG_CLASSES,
    DataConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
)
from support.command_line import NOT_OPTIONS, build_parser, parse_configs

ALL_GROUPS = [(cls, None) for cls in CONFIG_CLASSES]


def parse(argv):
    parser = build_parser("test", ALL_GROUPS)
    return parse_configs(parser, list(CONFIG_CLASSES), argv)


def all_fields():
    return [f for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)]


def test_every_field_has_a_default_and_help_text():
    for f in all_fields():
        assert f.default is not dataclasses.MISSING, f.name
        assert len(f.metadata.get("help", "")) > 10, f"{f.name} lacks help text"


def test_field_names_are_unique_across_configs():
    names = [f.name for f in all_fields()]
    assert len(names) == len(set(names))


def test_nanogpt_names_are_used():
    names = {f.name for f in all_fields()}
    expected = {
        "batch_size",
        "block_size",
        "n_layer",
        "n_head",
        "n_embd",
        "dropout",
        "learning_rate",
        "max_iters",
        "eval_interval",
        "eval_iters",
        "out_dir",
        "device",
        "compile",
        "seed",
        "tokenizer",
        "data",
        "temperature",
        "top_k",
        "top_p",
        "max_new_tokens",
        "num_samples",
    }
    assert expected <= names


def test_defaults_are_valid_and_match_the_dataclasses():
    configs, given = parse([])
    assert configs == [cls() for cls in CONFIG_CLASSES]
    assert given == {}


def test_help_lists_every_option_with_its_default(capsys):
    parser = build_parser("test", ALL_GROUPS)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in all_fields():
        if f.name not in NOT_OPTIONS:
            assert f"--{f.name}" in text
    assert "(default: 4)" in text


@pytest.mark.parametrize(
    "argv", [["--n_layer=6", "--learning_rate", "3e-4"], ["--n_layer", "6", "--learning_rate=3e-4"]]
)
def test_both_option_spellings_override(argv):
    (model, _, train, _), given = parse(argv)
    assert model.n_layer == 6
    assert train.learning_rate == 3e-4
    assert given == {"n_layer": 6, "learning_rate": 3e-4}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["--compile"], True), (["--compile=false"], False), (["--compile", "1"], True)],
)
def test_bool_options(argv, expected):
    (_, _, train, _), _ = parse(argv)
    assert train.compile is expected


def test_choices_and_escaped_newlines():
    (_, data, _, sample), _ = parse(["--tokenizer=bpe", "--prompt", "ROMEO:\\nO"])
    assert data.tokenizer == "bpe"
    assert sample.prompt == "ROMEO:\nO"


def test_paths_keep_their_backslashes():
    argv = ["--out_dir=run\\new", "--data=my\\train.txt", "--prompt_file=a\\tb"]
    (_, data, train, sample), _ = parse(argv)
    assert train.out_dir == "run\\new"
    assert data.data == "my\\train.txt"
    assert sample.prompt_file == "a\\tb"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no_such_option=1"], "unrecognized arguments"),
        (["--n_layer=two"], "invalid int value"),
        (["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
        (["--learning_rate=-1"], "learning_rate must be > 0"),
        (["--block_size=0"], "block_size must be >= 1"),
        (["--tokenizer=words"], "invalid choice"),
        (["--dropout=1.5"], "dropout must be in [0, 1)"),
        (["--weight_average=1"], "weight_average must be in [0, 1)"),
        (["--top_p=0"], "top_p must be in (0, 1]"),
        (["--vocab_size=10"], "unrecognized arguments"),
        (["--temperature=nan"], "temperature must be a finite number"),
        (["--weight_decay=inf"], "weight_decay must be a finite number"),
    ],
)
def test_bad_values_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError, match=r"n_layer must be >= 1.*dropout must be"):
        ModelConfig(n_layer=0, dropout=2.0)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().max_iters = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (TrainConfig, {"min_lr_fraction": 1.5}),
        (TrainConfig, {"gradient_accumulation_steps": 0}),
        (TrainConfig, {"sequences_per_pass": -1}),
        (DataConfig, {"val_fraction": 1.0}),
        (DataConfig, {"bpe_min_count": 0}),
        (DataConfig, {"bpe_spell_fraction": -0.1}),
        (DataConfig, {"bpe_spell_fraction": 1.0}),
        (SampleConfig, {"temperature": -0.1}),
        (SampleConfig, {"top_k": -1}),
    ],
)
def test_invalid_combinations_are_refused(cls, kwargs):
    with pytest.raises(ValueError, match="must be"):
        cls(**kwargs)


def test_bpe_runs_take_the_bpe_defaults_unless_an_option_says_otherwise():
    from hyperparameters import BPE_PRESET, FINE_TUNING_PRESET

    parser = build_parser("t", [(ModelConfig, None), (DataConfig, None), (TrainConfig, None)])
    classes = [ModelConfig, DataConfig, TrainConfig]
    (model, data, train), _ = parse_configs(parser, classes, ["--tokenizer=bpe"])
    assert model.block_size == BPE_PRESET["block_size"] != ModelConfig().block_size
    assert train.optimizer == BPE_PRESET["optimizer"] != TrainConfig().optimizer
    assert data.bpe_min_count == BPE_PRESET["bpe_min_count"] != DataConfig().bpe_min_count
    assert data.bpe_spell_fraction == BPE_PRESET["bpe_spell_fraction"] > 0
    (model, _, train), given = parse_configs(
        parser, classes, ["--tokenizer=bpe", "--block_size=128", "--optimizer=muon"]
    )
    assert (model.block_size, train.optimizer) == (128, "muon")
    assert "max_iters" not in given  # a default from the table is not an option the user gave
    (model, _, train), _ = parse_configs(parser, classes, [])
    assert (model.block_size, train.optimizer) == (256, "muon")  # characters: the plain ones
    (_, data, train), _ = parse_configs(parser, classes, ["--init_from=gpt2"])
    assert data.tokenizer == "bpe"
    assert data.bpe_min_count == 1  # GPT-2 knows every token: fine-tuning keeps them all
    assert data.bpe_spell_fraction == 0  # and reads the text as GPT-2 would
    assert train.learning_rate == FINE_TUNING_PRESET["learning_rate"]


TRAINING_CLASSES = [ModelConfig, DataConfig, TrainConfig]


def training_parser():
    return build_parser("t", [(cls, None) for cls in TRAINING_CLASSES])


def test_a_preset_names_in_one_line_each_default_it_replaces(capsys):
    parse_configs(training_parser(), TRAINING_CLASSES, ["--tokenizer=bpe", "--batch_size=3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("--tokenizer=bpe preset over hyperparameters.py's defaults: ")
    assert "block_size 64 (not 256)" in lines[0]
    assert "optimizer 'adamw' (not 'muon')" in lines[0]
    assert "batch_size" not in lines[0]  # typed on the command line: the preset does not apply
    parse_configs(training_parser(), TRAINING_CLASSES, [])
    assert capsys.readouterr().out == ""  # characters: no preset, nothing to say


def test_an_edited_default_that_a_preset_replaces_is_named(monkeypatch, capsys):
    # As if a learner had edited `block_size: int = setting(128, ...)` in hyperparameters.py.
    field = next(f for f in dataclasses.fields(ModelConfig) if f.name == "block_size")
    monkeypatch.setattr(field, "default", 128)
    (model, _, _), _ = parse_configs(training_parser(), TRAINING_CLASSES, ["--tokenizer=bpe"])
    assert model.block_size == 64
    assert "block_size 64 (not 128)" in capsys.readouterr().out


def test_a_preset_value_equal_to_the_default_is_not_named(monkeypatch, capsys):
    from hyperparameters import BPE_PRESET

    monkeypatch.setitem(BPE_PRESET, "block_size", ModelConfig().block_size)
    parse_configs(training_parser(), TRAINING_CLASSES, ["--tokenizer=bpe"])
    assert "block_size" not in capsys.readouterr().out


def test_a_resumed_run_announces_no_preset(capsys):
    parser = training_parser()
    parse_configs(parser, TRAINING_CLASSES, ["--tokenizer=bpe", "--resume"])
    assert capsys.readouterr().out == ""


def test_help_shows_each_kind_of_runs_default(capsys):
    parser = build_parser("t", [(ModelConfig, None), (TrainConfig, None)])
    parser.print_help()
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 256; --tokenizer=bpe: 64)" in help_text
    assert "(default: 'muon'; --tokenizer=bpe: 'adamw'; --init_from: 'adamw')" in help_text
