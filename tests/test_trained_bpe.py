"""A byte-pair vocabulary learned from the training text: the reference trainer and encoder
in tokenization.py against the library path (rustbpe to learn, tiktoken to encode), the
checkpoint's merges, the splits, and the Hugging Face tokenizer.json an export writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from conftest import PROJECT_ROOT, SHARED_SHAKESPEARE, SMALL_TEXT
from hyperparameters import DataConfig
from model_architecture import GPT
from support import fast_bpe
from support.checkpoint import load_checkpoint
from support.common import UserFacingError
from support.hugging_face import write_hf_folder
from tokenization import (
    GPT2_SPLIT_PATTERN,
    TrainedBPETokenizer,
    encode_with_merges,
    learn_merges,
    merge_pair,
    token_bytes_of,
    tokenizer_from_dict,
)

# Strings that tokenizers get wrong: runs of whitespace, CR/LF, emoji joined by ZWJ, CJK,
# combining marks, long digit runs, contractions, a 5,000-character word.
HARD_STRINGS = [
    "First Citizen:\n  Before we proceed,\tany further\r\n\r\n",
    "   \n\n\n \t\t  x  \n",
    "héllo wörld 👩‍👩‍👧 👍🏽 日本語のテキスト 한국어 e\u0301 n\u0303",
    "1234567890123456789 3.14159 1,000,000",
    "don't we'll I'M they've she'd 'tis",
    "x" * 5000,
    "<|endoftext|> \x00\x7f\u200b",
]
# Ties everywhere: few symbols, each pair about as frequent as the next.
SMALL_ALPHABET = "ab c\n'é😀"


@pytest.fixture(scope="module")
def shakespeare_path() -> Path:
    """conftest's, for the whole module: the tokenizer below is learned once."""
    if not SHARED_SHAKESPEARE.exists():
        pytest.skip(f"Tiny Shakespeare not found at {SHARED_SHAKESPEARE}")
    return SHARED_SHAKESPEARE


@pytest.fixture(scope="module")
def shakespeare_tokenizer(shakespeare_path) -> TrainedBPETokenizer:
    text = shakespeare_path.read_text(encoding="utf-8")
    return TrainedBPETokenizer.from_text(text[: len(text) * 9 // 10], 1024)


def test_merge_pair_replaces_each_occurrence_from_the_left():
    assert merge_pair((1, 1, 1, 2, 1, 1), (1, 1), 300) == (300, 1, 2, 300)


def test_the_reference_learns_the_most_frequent_pair_first():
    # The words are "aaa" and " aa": the pair (a, a) occurs three times, (space, a) once.
    merges = learn_merges("aaa aa", 258)
    a, space = ord("a"), ord(" ")
    assert merges[0] == (a, a)
    # Then "aaa" is (aa, a) and " aa" is (space, aa): a tie, won by the smaller ids.
    assert merges[1] == (space, 256)
    assert token_bytes_of(merges)[256:] == [b"aa", b" aa"]


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=SMALL_ALPHABET, max_size=80),
    vocab_size=st.integers(min_value=257, max_value=320),
)
def test_the_library_learns_the_reference_merges_ties_included(text, vocab_size):
    assert fast_bpe.learn_merges(text, vocab_size, GPT2_SPLIT_PATTERN) == learn_merges(
        text, vocab_size
    )


def test_the_library_learns_the_reference_merges_on_shakespeare(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:20_000]
    reference = learn_merges(text, 400)
    assert len(reference) == 144
    assert fast_bpe.learn_merges(text, 400, GPT2_SPLIT_PATTERN) == reference


def test_a_small_text_gives_fewer_merges_than_asked():
    merges = learn_merges("ab ab", 1000)
    assert fast_bpe.learn_merges("ab ab", 1000, GPT2_SPLIT_PATTERN) == merges
    assert TrainedBPETokenizer(merges).vocab_size == 256 + len(merges) < 1000


@pytest.mark.parametrize(
    ("tokens", "words"), [([b"abc"], "token 256"), ([b"ab", b"ab"], "token 257")]
)
def test_a_vocabulary_that_is_not_merges_is_refused(tokens, words):
    with pytest.raises(ValueError, match=words):
        fast_bpe.pairs_from_tokens([bytes([b]) for b in range(256)] + tokens)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_tiktoken_gives_the_reference_ids_on_hard_strings(shakespeare_tokenizer, text):
    ids = shakespeare_tokenizer.encode(text)
    assert ids == encode_with_merges(text, shakespeare_tokenizer.merges)
    assert shakespeare_tokenizer.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_tiktoken_gives_the_reference_ids_on_any_text(shakespeare_tokenizer, text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates: refused by encode, tested with the bad inputs
    ids = shakespeare_tokenizer.encode(text)
    assert ids == encode_with_merges(text, shakespeare_tokenizer.merges)
    assert shakespeare_tokenizer.decode(ids) == text


def test_a_corpus_encodes_in_pieces_as_at_once(shakespeare_tokenizer, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    ids = shakespeare_tokenizer.encode_array(text)
    assert ids.tolist() == shakespeare_tokenizer.encode(text)
    assert shakespeare_tokenizer.count_chars(torch.from_numpy(ids)) == len(text)


def test_the_checkpoint_description_rebuilds_the_same_tokenizer(shakespeare_tokenizer):
    description = json.loads(json.dumps(shakespeare_tokenizer.to_dict()))  # as saved
    again = tokenizer_from_dict(description)
    assert isinstance(again, TrainedBPETokenizer)
    assert again.merges == shakespeare_tokenizer.merges
    assert again.cache_key() == shakespeare_tokenizer.cache_key()


@pytest.mark.parametrize(
    ("merges", "words"),
    [
        ("ab", "not a list"),
        ([[97, 98], [256]], "token 257"),
        ([[97, 256]], "token 256"),
        ([[97, -1]], "token 256"),
        ([[97, 98.0]], "token 256"),
        ([[97, True]], "token 256"),
        ([[97, 98], [97, 98]], "twice"),
    ],
)
def test_damaged_merges_in_a_checkpoint_are_one_line(merges, words):
    with pytest.raises(UserFacingError, match=words):
        tokenizer_from_dict({"kind": "bpe", "encoding": "trained", "merges": merges})


@pytest.mark.parametrize("size", [0, 256, 65537])
def test_a_vocabulary_size_out_of_range_is_refused(size):
    with pytest.raises(ValueError, match=r"bpe_vocab_size must be in 257\.\.65536"):
        DataConfig(bpe_vocab_size=size)


def test_a_word_only_the_validation_text_has_never_becomes_one_token(tmp_path):
    from data_handling import load_splits

    corpus = tmp_path / "corpus.txt"
    # The validation text (the last tenth) repeats a word the training text never has.
    text = SMALL_TEXT + " zyzzogeton" * 20
    corpus.write_text(text, encoding="utf-8")
    assert len(text) - int(len(text) * DataConfig.val_fraction) < len(SMALL_TEXT)
    config = DataConfig(data=str(corpus), tokenizer="bpe", bpe_vocabulary="trained", cache_dir="")
    splits = load_splits(dataclass_replace(config, bpe_vocab_size=600), block_size=8)
    tokenizer = splits.tokenizer
    assert len(tokenizer.encode(" resolved")) == 1  # the training text's word is learned
    assert len(tokenizer.encode(" zyzzogeton")) > 3  # the validation text's is not
    assert tokenizer.decode(splits.tokens["val"].tolist()).endswith(" zyzzogeton")
    assert sum(splits.chars.values()) == len(text)


def dataclass_replace(config: DataConfig, **changes: object) -> DataConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_tokenizer_json_gives_our_ids(tmp_path, shakespeare_tokenizer, shakespeare_path):
    from hyperparameters import ModelConfig

    config = ModelConfig(
        n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=shakespeare_tokenizer.vocab_size
    )
    write_hf_folder(GPT(config), shakespeare_tokenizer, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [*HARD_STRINGS, shakespeare_path.read_text(encoding="utf-8")[-20_000:]]
    for text in texts:
        ids = shakespeare_tokenizer.encode(text)
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == text


def run(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, *(str(a) for a in args)]
    if str(args[0]).endswith(".py"):
        command[1] = str(PROJECT_ROOT / str(args[0]))
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_resume_generate_and_export_through_the_scripts(tmp_path):
    (tmp_path / "corpus.txt").write_text(SMALL_TEXT + "Zounds! ", encoding="utf-8")
    shape = ["--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--block_size", 16]
    short = ["--eval_interval", 2, "--eval_iters", 2, "--batch_size", 2, "--out_dir", "run"]
    options = ["--data", "corpus.txt", "--tokenizer", "bpe", "--bpe_vocabulary", "trained"]
    options += ["--bpe_vocab_size", 300, *shape, *short]
    trained = run("train_model.py", *options, "--max_iters", 2, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "learned from the training text (300 tokens)" in trained.stdout
    merges = load_checkpoint(tmp_path / "run" / "ckpt_last.pth")["tokenizer"]["merges"]

    resumed = run("train_model.py", "--resume", "--out_dir", "run", "--max_iters", 4, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "run" / "ckpt_last.pth")["tokenizer"]["merges"] == merges

    prompt = "First Citizen: 👩‍👩‍👧 Zounds"
    sampled = run(
        "generate_text.py", "--out_dir", "run", "--prompt", prompt, "--max_new_tokens", 10,
        cwd=tmp_path,
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith(prompt)

    exported = run("tools/export_model.py", "--out_dir", "run", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    theirs = AutoTokenizer.from_pretrained(tmp_path / "run" / "hf")
    ours = TrainedBPETokenizer([tuple(pair) for pair in merges])
    for text in [prompt, *HARD_STRINGS]:
        assert theirs(text)["input_ids"] == ours.encode(text)
