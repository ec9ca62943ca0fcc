"""Corpus loading, both tokenizers, the token cache, the split and batches.

Run alone: python -m pytest tests/test_data_handling.py
"""

from __future__ import annotations

import functools
import os
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data_handling
import tokenization
from data_handling import (
    download_corpus,
    encode_corpus,
    get_batch,
    load_splits,
    read_corpus,
    resolve_corpus,
    split_tokens,
)
from hyperparameters import DataConfig
from support.common import UserFacingError, sha256_hex
from tokenization import BPETokenizer, CharTokenizer, stream_decode, tokenizer_from_dict


@functools.cache
def shared_bpe() -> BPETokenizer:
    return BPETokenizer()  # building one parses 50k ranks: do it once per test session


@pytest.fixture
def bpe() -> BPETokenizer:
    return shared_bpe()


# ---------------------------------------------------------------------------- corpus


def test_resolve_corpus_prefers_explicit_path_then_input_txt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_corpus("other.txt") == Path("other.txt")
    (tmp_path / "input.txt").write_text("hello")
    assert resolve_corpus("") == Path("input.txt")


def test_download_is_verified_and_written(tmp_path):
    source = tmp_path / "remote.txt"
    source.write_bytes(b"to be or not to be\n")
    dest = tmp_path / "input.txt"
    download_corpus(dest, source.as_uri(), sha256_hex(source.read_bytes()))
    assert dest.read_bytes() == source.read_bytes()


def test_download_with_wrong_checksum_writes_nothing(tmp_path):
    source = tmp_path / "remote.txt"
    source.write_bytes(b"tampered text\n")
    dest = tmp_path / "input.txt"
    with pytest.raises(UserFacingError, match="sha256"):
        download_corpus(dest, source.as_uri(), "0" * 64)
    assert not dest.exists()


def test_offline_download_names_both_ways_out(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data_handling.urllib.request, "urlopen", no_network)
    with pytest.raises(UserFacingError, match=r"--data PATH.*input\.txt") as err:
        download_corpus(tmp_path / "input.txt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "input.txt").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"", "is empty"),
        (b"caf\xe9 latin-1", "not UTF-8"),
        (b" \n\t \n", "only whitespace"),
    ],
)
def test_unusable_corpora_are_refused(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserFacingError, match=message):
        read_corpus(path)


def test_directory_as_corpus_is_refused(tmp_path):
    with pytest.raises(UserFacingError, match="is a directory"):
        read_corpus(tmp_path)


# ---------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_vocabulary_is_sorted_characters():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.chars == " dehlorw"
    assert tokenizer.encode("hello") == [3, 2, 4, 4, 5]
    assert tokenizer.decode(tokenizer.encode("world hello")) == "world hello"


def test_char_tokenizer_names_unknown_characters():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(UserFacingError, match=r"'x', 'z'"):
        tokenizer.encode("abzx")


@given(st.text(min_size=1))
@settings(max_examples=200, deadline=None)
def test_char_round_trip_over_its_vocabulary(text):
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bpe_gives_gpt2_ids(bpe):
    assert bpe.encode("Hello world") == [15496, 995]
    assert bpe.encode(" the") == [262]
    assert bpe.vocab_size == 50257


def test_bpe_treats_end_of_text_as_ordinary_text(bpe):
    ids = bpe.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert bpe.decode(ids) == "a<|endoftext|>b"


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_bpe_round_trip_for_any_unicode(text):
    tokenizer = shared_bpe()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bpe_refuses_damaged_ranks_file(tmp_path):
    damaged = tmp_path / "ranks.tiktoken"
    damaged.write_bytes(tokenization.GPT2_RANKS_PATH.read_bytes()[:-10])
    with pytest.raises(UserFacingError, match="damaged"):
        BPETokenizer(damaged)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_rebuilds_from_its_description(kind, bpe):
    original = CharTokenizer.from_text("to be or not") if kind == "char" else bpe
    rebuilt = tokenizer_from_dict(original.to_dict())
    assert rebuilt.vocab_size == original.vocab_size
    assert rebuilt.encode("to be") == original.encode("to be")


def fitted_splits_of(text, tmp_path, **settings):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    config = DataConfig(data=str(path), tokenizer="bpe", **settings)
    return load_splits(config, block_size=8, tokenizer=None)


def test_fitted_vocabulary_keeps_gpt2_ids_of_the_training_split(bpe, tmp_path):
    train_text = "To be, or not to be, that is the question.\n" * 30
    val_text = "Zebras quaff jumbo vexing pizzazz.\n" * 4  # words only the validation text has
    splits = fitted_splits_of(train_text + val_text, tmp_path)
    fitted = splits.tokenizer
    gpt2_all = np.array(bpe.encode(train_text + val_text))
    n_train = len(splits.tokens["train"])
    # The training split's ids are GPT-2's own, renumbered one to one.
    train_gpt2 = fitted.gpt2_ids[splits.tokens["train"].numpy()]
    assert np.array_equal(train_gpt2, gpt2_all[:n_train])
    assert set(fitted.gpt2_ids.tolist()) == set(gpt2_all[:n_train].tolist()) | set(bpe.byte_ids)
    # Nothing of the validation text shaped the vocabulary: its words are spelled in bytes.
    assert not set(bpe.encode(" Zebras")) <= set(fitted.gpt2_ids.tolist())
    assert len(splits.tokens["val"]) > len(gpt2_all) - n_train
    assert fitted.decode(splits.tokens["val"].tolist()) == bpe.decode(gpt2_all[n_train:].tolist())


def test_fitted_vocabulary_spells_tokens_used_fewer_than_min_count_times(bpe, tmp_path):
    text = (
        "To be, or not to be, that is the question.\n" * 30
        + "Quoth Prospero.\n"
        + "To be, quoth the question.\n" * 6
    )  # 480 GPT-2 tokens: the validation split is the last 48, from the first " question"
    kept_all = fitted_splits_of(text, tmp_path, bpe_min_count=1)
    gpt2_train = bpe.encode(text)[: len(kept_all.tokens["train"])]  # one to one at 1
    counts = Counter(gpt2_train)
    once = {token for token, n in counts.items() if n == 1} - set(bpe.byte_ids)
    assert sorted(bpe.decode([token]) for token in once) == [" Prosper", " qu", "Qu"]

    splits = fitted_splits_of(text, tmp_path, bpe_min_count=2)
    fitted = splits.tokenizer
    kept = {token for token, n in counts.items() if n >= 2} | set(bpe.byte_ids)
    assert set(fitted.gpt2_ids.tolist()) == kept
    # In the training text too, a token used once is spelled with the byte tokens of its bytes.
    spelled = []
    for token in gpt2_train:
        if token in once:
            spelled += [bpe.byte_ids[byte] for byte in bpe.token_bytes(token)]
        else:
            spelled.append(token)
    assert fitted.gpt2_ids[splits.tokens["train"].numpy()].tolist() == spelled
    # " qu", used once in training, comes back in the validation text: spelled there too.
    assert once & set(kept_all.tokenizer.gpt2_ids[kept_all.tokens["val"].numpy()].tolist())
    assert not once & set(fitted.gpt2_ids[splits.tokens["val"].numpy()].tolist())
    # Both splits still decode to the text they hold.
    for name in ("train", "val"):
        assert fitted.decode(splits.tokens[name].tolist()) == kept_all.tokenizer.decode(
            kept_all.tokens[name].tolist()
        )


def test_bpe_spell_fraction_spells_that_share_of_the_training_tokens_in_bytes(bpe, tmp_path):
    text = "To be, or not to be, that is the question.\n" * 300  # 4,200 GPT-2 tokens
    plain = fitted_splits_of(text, tmp_path)
    splits = fitted_splits_of(text, tmp_path, bpe_spell_fraction=0.1)
    fitted = splits.tokenizer
    # The vocabulary, the validation split and the text the training split spells stay.
    assert np.array_equal(fitted.gpt2_ids, plain.tokenizer.gpt2_ids)
    assert torch.equal(splits.tokens["val"], plain.tokens["val"])
    assert fitted.decode(splits.tokens["train"].tolist()) == fitted.decode(
        plain.tokens["train"].tolist()
    )
    # The drawn positions are spelled with the byte tokens of their bytes, the others kept.
    gpt2_train = fitted.gpt2_ids[plain.tokens["train"].numpy()]
    drawn = data_handling.positions_to_spell(len(gpt2_train), 0.1)
    assert 0.08 < drawn.mean() < 0.12
    expected = []
    for token, spell in zip(gpt2_train.tolist(), drawn.tolist(), strict=True):
        if spell:
            expected += [bpe.byte_ids[byte] for byte in bpe.token_bytes(token)]
        else:
            expected.append(token)
    assert fitted.gpt2_ids[splits.tokens["train"].numpy()].tolist() == expected
    assert len(splits.tokens["train"]) > len(plain.tokens["train"])
    # The same positions every time: a resumed run and bench.py see the text the run saw.
    again = fitted_splits_of(text, tmp_path, bpe_spell_fraction=0.1)
    assert torch.equal(again.tokens["train"], splits.tokens["train"])


def test_positions_to_spell_draws_in_pieces_as_in_one_draw(monkeypatch):
    one_draw = np.random.default_rng(data_handling.SPELLING_SEED).random(1000) < 0.3
    monkeypatch.setattr(data_handling, "SPELLING_PIECE", 64)  # 15 full pieces and a short one
    assert np.array_equal(data_handling.positions_to_spell(1000, 0.3), one_draw)
    assert data_handling.positions_to_spell(1000, 0.0) is None


def test_fitted_vocabulary_round_trips_any_text(tmp_path):
    fitted = fitted_splits_of("plain words only\n" * 50, tmp_path).tokenizer
    assert fitted.decode(fitted.encode(HARD_TEXT)) == HARD_TEXT
    assert fitted.vocab_size < 300
    assert max(fitted.encode(HARD_TEXT)) < fitted.vocab_size


def test_fitted_vocabulary_rebuilds_from_its_checkpoint_description(tmp_path):
    splits = fitted_splits_of("the same corpus, twice read\n" * 40, tmp_path)
    rebuilt = tokenizer_from_dict(splits.tokenizer.to_dict())
    assert np.array_equal(rebuilt.gpt2_ids, splits.tokenizer.gpt2_ids)
    again = load_splits(
        DataConfig(data=str(tmp_path / "corpus.txt"), tokenizer="bpe"), 8, tokenizer=rebuilt
    )
    assert torch.equal(again.tokens["val"], splits.tokens["val"])
    description = splits.tokenizer.to_dict()
    with pytest.raises(UserFacingError, match="byte tokens"):
        tokenizer_from_dict({**description, "gpt2_ids": [11, 12]})


def test_full_vocabulary_stays_a_setting(tmp_path, bpe):
    splits = fitted_splits_of("to be or not to be\n" * 40, tmp_path, bpe_vocabulary="full")
    assert splits.tokenizer.vocab_size == 50257
    assert "gpt2_ids" not in splits.tokenizer.to_dict()


def test_unknown_tokenizer_description_is_refused():
    with pytest.raises(UserFacingError, match="unknown tokenizer"):
        tokenizer_from_dict({"kind": "words"})


def test_stream_decode_never_splits_a_character(bpe):
    text = "naïve café 日本語 🎭"
    pieces = list(stream_decode(bpe, bpe.encode(text)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


# ---------------------------------------------------------------------------- token cache


def test_cache_is_reused_without_encoding_again(tmp_path, monkeypatch):
    text = "some corpus text " * 10
    tokenizer = CharTokenizer.from_text(text)
    first = encode_corpus(text, tokenizer, tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1

    def fail(_text):
        raise AssertionError("encoded again despite a valid cache")

    monkeypatch.setattr(tokenizer, "encode", fail)
    monkeypatch.setattr(tokenizer, "encode_array", fail)
    second = encode_corpus(text, tokenizer, tmp_path)
    assert np.array_equal(first, second)
    assert second.dtype == np.uint16


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_damaged_or_foreign_cache_is_rebuilt(tmp_path, damage, capsys):
    text = "some corpus text " * 10
    tokenizer = CharTokenizer.from_text(text)
    expected = encode_corpus(text, tokenizer, tmp_path)
    (cache_file,) = tmp_path.glob("tokens-*.npz")
    if damage == "truncate":
        cache_file.write_bytes(cache_file.read_bytes()[:100])
    elif damage == "garbage":
        cache_file.write_bytes(b"\x00" * 500)
    else:  # a valid archive holding another corpus' tokens under this name
        other = tmp_path / "other"
        encode_corpus("text some " * 5, tokenizer, other)
        (other_file,) = other.glob("tokens-*.npz")
        cache_file.write_bytes(other_file.read_bytes())
    rebuilt = encode_corpus(text, tokenizer, tmp_path)
    assert np.array_equal(rebuilt, expected)
    assert "rebuilding" in capsys.readouterr().out


def test_cache_with_ids_outside_the_vocabulary_is_rebuilt(tmp_path, capsys):
    text = "some corpus text " * 10
    tokenizer = CharTokenizer.from_text(text)
    expected = encode_corpus(text, tokenizer, tmp_path)
    (cache_file,) = tmp_path.glob("tokens-*.npz")
    # A well-formed cache, with the right name, digests and checksum, but an id out of range.
    forged = expected.copy()
    forged[3] = tokenizer.vocab_size + 5
    meta = {"corpus_sha256": sha256_hex(text.encode("utf-8")), "tokenizer": tokenizer.cache_key()}
    data_handling._write_token_cache(cache_file, forged, meta)
    assert np.array_equal(encode_corpus(text, tokenizer, tmp_path), expected)
    assert "rebuilding" in capsys.readouterr().out


def test_old_caches_are_removed_beyond_the_newest_few(tmp_path):
    tokenizer = CharTokenizer("abc ")
    for n in range(data_handling.TOKEN_CACHES_KEPT + 2):
        encode_corpus("abc " * (n + 1), tokenizer, tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == data_handling.TOKEN_CACHES_KEPT


def test_bpe_encodes_a_corpus_in_pieces_exactly_as_at_once(bpe, monkeypatch, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000]
    monkeypatch.setattr(tokenization, "ENCODE_CHUNK_CHARS", 1000)  # about 200 pieces
    pieces = bpe.encode_array(text)
    assert np.array_equal(pieces, np.array(bpe.encode(text), dtype=np.uint16))
    assert bpe.count_chars(torch.from_numpy(pieces)) == len(text)


HARD_TEXT = (
    "  spaces   \t\ttabs\r\nCRLF\n\n\n emoji 👩‍👩‍👧 ZWJ, 中文字符, e\u0301 combining, "
    "1234567890123 digits, <|endoftext|> plain, " + "x" * 5000 + "\nend \n"
)


@pytest.mark.parametrize("piece", [7, 100, 1000])
def test_bpe_pieces_agree_on_hard_text(bpe, monkeypatch, piece):
    text = ("word\n" + HARD_TEXT + "CRLF lines;\r\nend, with: punctuation.\r\n") * 3
    monkeypatch.setattr(tokenization, "ENCODE_CHUNK_CHARS", piece)
    assert np.array_equal(bpe.encode_array(text), np.array(bpe.encode(text), dtype=np.uint16))
    assert bpe.decode(bpe.encode_array(text).tolist()) == text


def test_char_array_encoding_equals_the_plain_one():
    text = "héllo wörld 👩\n" * 50
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.encode_array(text).tolist() == tokenizer.encode(text)
    with pytest.raises(UserFacingError, match="not in the vocabulary"):
        tokenizer.encode_array(text + "€")


def test_written_files_get_the_usual_permissions(tmp_path):
    from support.common import write_atomically

    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "file", b"data")
        (tmp_path / "plain").write_bytes(b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "file").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_cache_depends_on_the_tokenizer(tmp_path, bpe):
    text = "to be or not to be " * 10
    encode_corpus(text, CharTokenizer.from_text(text), tmp_path)
    encode_corpus(text, bpe, tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 2


# ---------------------------------------------------------------------------- split and batches


def test_split_is_first_ninety_percent_then_the_rest():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1, block_size=8)
    assert len(train) == 900
    assert len(val) == 100
    assert train[0] == 0
    assert val[0] == 900
    assert train.dtype == torch.uint16  # 2 bytes a token in memory; batches are widened


def test_batches_are_int64_from_uint16_splits():
    x, y = get_batch(
        torch.arange(500, dtype=torch.int32).to(torch.uint16),
        4,
        8,
        torch.Generator(),
        torch.device("cpu"),
    )
    assert x.dtype == y.dtype == torch.int64


def test_split_too_short_for_block_size_is_refused():
    with pytest.raises(UserFacingError, match="block_size"):
        split_tokens(np.arange(100, dtype=np.uint16), 0.1, block_size=16)


def test_batches_are_shifted_windows_of_the_data():
    data = torch.arange(500)
    x, y = get_batch(data, 8, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))
    assert int(x.max()) < 500
    assert int(y.max()) <= 499


def test_batches_are_reproducible_with_the_same_seed():
    data = torch.arange(500)
    cpu = torch.device("cpu")
    a = get_batch(data, 4, 8, torch.Generator().manual_seed(3), cpu)
    b = get_batch(data, 4, 8, torch.Generator().manual_seed(3), cpu)
    c = get_batch(data, 4, 8, torch.Generator().manual_seed(4), cpu)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_last_window_can_be_drawn():
    data = torch.arange(17)  # exactly one window of 16 + 1
    x, y = get_batch(data, 2, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(x[0], torch.arange(16))
    assert torch.equal(y[0], torch.arange(1, 17))
