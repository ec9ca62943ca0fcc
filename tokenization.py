"""Text to token ids and back: one token per character, or byte-pair encoding.

Byte-pair tokens come from GPT-2's vocabulary (all of it, or the part a training text uses),
or from a vocabulary learned from the training text itself (`learn_merges`, below, shows how).
Every tokenizer encodes and decodes text, encodes a whole corpus into a uint16 array without
building a list of ints, and describes itself for a checkpoint (`to_dict`), from which
`tokenizer_from_dict` rebuilds it. Byte-pair text is encoded by tiktoken; GPT-2's ranks come
from the file shipped in `assets/` (checked by sha256), so no network is needed.
"""

from __future__ import annotations

import codecs
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import regex
import tiktoken
import torch

from support import fast_bpe
from support.common import UserFacingError, sha256_hex

GPT2_RANKS_PATH = Path(__file__).resolve().parent / "assets" / "r50k_base.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer: splits text into words, numbers, punctuation runs and spaces before
# byte-pair merging (the same pattern as tiktoken's r50k_base).
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_END_OF_TEXT = 50256
ENCODE_CHUNK_CHARS = 1 << 20  # corpora are encoded in pieces of about this many characters


def check_unicode(text: str, what: str) -> None:
    """Refuse text that no UTF-8 file could hold (lone surrogates, e.g. from a shell's bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise UserFacingError(
            f"{what} holds {bad!r} at position {err.start}, which is not a character (bytes "
            "that are not UTF-8?)"
        ) from None


# ----------------------------------------------------------------------------------------------
# The tokenizers


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of the corpus' characters."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise UserFacingError("the character vocabulary has duplicates")
        if len(chars) > 2**16:
            raise UserFacingError(
                f"the text has {len(chars):,} distinct characters; a character vocabulary holds "
                "at most 65,536: use --tokenizer=bpe"
            )
        self.chars = chars
        self.char_to_id = {ch: i for i, ch in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from every character that occurs in `text`."""
        return cls("".join(sorted(set(text))))

    def describe(self) -> str:
        """The vocabulary in a few words, for people."""
        return f"characters ({self.vocab_size:,} symbols)"

    def unknown_characters(self, text: str) -> str:
        """The characters of `text` outside the vocabulary, quoted ('' if there are none)."""
        unknown = sorted(set(text) - set(self.char_to_id))
        return ", ".join(repr(ch) for ch in unknown[:10])

    def encode(self, text: str) -> list[int]:
        """Text to ids; characters outside the vocabulary are a user error naming them."""
        try:
            return [self.char_to_id[ch] for ch in text]
        except KeyError:
            shown = self.unknown_characters(text)
            raise UserFacingError(f"text has characters not in the vocabulary: {shown}") from None

    def encode_array(self, text: str) -> np.ndarray:
        """A whole corpus to uint16 ids, a piece at a time (a list of ints costs 36 bytes each)."""
        vocabulary = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        order = np.argsort(vocabulary)
        ids = np.empty(len(text), dtype=np.uint16)
        for start in range(0, len(text), ENCODE_CHUNK_CHARS):
            piece = text[start : start + ENCODE_CHUNK_CHARS]
            code_points = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
            # Each character's place in the sorted vocabulary, then its id.
            found = order[
                np.minimum(np.searchsorted(vocabulary, code_points, sorter=order), len(order) - 1)
            ]
            if not np.array_equal(vocabulary[found], code_points):
                self.encode(piece)  # raises, naming the characters outside the vocabulary
            ids[start : start + len(piece)] = found
        return ids

    def count_chars(self, ids: torch.Tensor) -> int:
        """How many characters the ids decode to: one each."""
        return len(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text."""
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes of one token (for streaming output)."""
        return self.chars[token_id].encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        """The description stored in a checkpoint: the whole vocabulary."""
        return {"kind": self.kind, "chars": self.chars}

    def cache_key(self) -> str:
        """Identifies this exact vocabulary, for the token cache's file name."""
        return "char-" + sha256_hex(self.chars.encode("utf-8"))[:16]


def load_gpt2_ranks(path: Path = GPT2_RANKS_PATH) -> dict[bytes, int]:
    """Read GPT-2's byte-pair ranks (one `base64(token) rank` per line), checking the sha256."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserFacingError(f"GPT-2 ranks file {path} cannot be read ({err})") from err
    if sha256_hex(raw) != GPT2_RANKS_SHA256:
        raise UserFacingError(f"GPT-2 ranks file {path} is damaged (sha256 mismatch)")
    ranks = {}
    for line in raw.split(b"\n"):
        if line:
            token, rank = line.split()
            ranks[codecs.decode(token, "base64")] = int(rank)
    return ranks


class TiktokenVocabulary:
    """What the byte-pair vocabularies share: tiktoken encodes and decodes with their ranks."""

    encoding: tiktoken.Encoding  # set by each vocabulary from its own ranks

    def encode(self, text: str) -> list[int]:
        """Text to ids. "<|endoftext|>" inside the text is treated as ordinary characters."""
        check_unicode(text, "the text")
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """A whole corpus to uint16 ids, a piece at a time (a list of ints costs 36 bytes each)."""
        return encode_in_pieces(self.encoding, text)

    def count_chars(self, ids: torch.Tensor) -> int:
        """How many characters the ids decode to."""
        return count_decoded_chars(self.encoding, ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text (bytes that are not valid UTF-8 become U+FFFD)."""
        return self.encoding.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; a character may span two tokens."""
        return self.encoding.decode_single_token_bytes(token_id)


class BPETokenizer(TiktokenVocabulary):
    """GPT-2's byte-pair encoding (50,257 ids), built locally by tiktoken."""

    kind = "bpe"

    def __init__(self, ranks_path: Path = GPT2_RANKS_PATH) -> None:
        ranks = load_gpt2_ranks(ranks_path)
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": GPT2_END_OF_TEXT},
        )
        self.vocab_size = self.encoding.n_vocab
        self.byte_ids = [ranks[bytes([byte])] for byte in range(256)]  # every byte's own token

    def describe(self) -> str:
        """The vocabulary in a few words, for people."""
        return f"GPT-2 byte-pair encoding ({self.vocab_size:,} tokens)"

    def to_dict(self) -> dict[str, Any]:
        """The description stored in a checkpoint: the encoding's name and ranks digest."""
        return {"kind": self.kind, "encoding": "gpt2", "ranks_sha256": GPT2_RANKS_SHA256}

    def cache_key(self) -> str:
        """Identifies this exact encoding, for the token cache's file name."""
        return "bpe-" + GPT2_RANKS_SHA256[:16]


class FittedBPETokenizer:
    """GPT-2's byte-pair encoding, keeping only the tokens a training text uses (often enough).

    The kept tokens are exactly GPT-2's, renumbered 0..V-1; GPT-2's 256 single-byte tokens are
    always kept, and any other token (in the validation text, a prompt, another corpus, or a
    token the training text uses too rarely) is spelled with the byte tokens of its bytes, as
    is, in the training text, a random share of the kept ones (bpe_spell_fraction). So
    every text can be encoded and decodes back exactly. A small model then scores about 11,500
    tokens for Tiny Shakespeare instead of 50,257 at every position (about 7,900 when a token
    must be used twice to be kept).
    """

    kind = "bpe"

    def __init__(self, gpt2_ids: Iterable[int], gpt2: BPETokenizer | None = None) -> None:
        self.gpt2 = gpt2 or BPETokenizer()
        ids = sorted(set(gpt2_ids) | set(self.gpt2.byte_ids))
        if ids[0] < 0 or ids[-1] >= self.gpt2.vocab_size:
            raise UserFacingError("the fitted GPT-2 vocabulary holds ids outside GPT-2's")
        self.gpt2_ids = np.array(ids, dtype=np.int64)  # fitted id -> GPT-2 id
        self.fitted_ids = np.full(self.gpt2.vocab_size, -1, dtype=np.int64)  # and back
        self.fitted_ids[self.gpt2_ids] = np.arange(len(ids))
        self.byte_ids = self.fitted_ids[self.gpt2.byte_ids]
        self.vocab_size = len(ids)

    @classmethod
    def from_training_ids(
        cls, train_ids: np.ndarray, gpt2: BPETokenizer, min_count: int = 1
    ) -> FittedBPETokenizer:
        """The vocabulary of a training split's GPT-2 ids used at least min_count times.

        With min_count 1 the training text's tokens are all GPT-2's own. With 2, a token used
        only once is spelled in bytes in the training text too, as a token never seen is in
        any other text: so the model learns to read and write such spellings, which unseen
        words in new text need (the share of words used once estimates the share of words not
        seen yet: Good and Turing's estimate).
        """
        ids, counts = np.unique(train_ids, return_counts=True)
        return cls(ids[counts >= min_count].tolist(), gpt2)

    def from_gpt2(self, gpt2_ids: np.ndarray, spell: np.ndarray | None = None) -> np.ndarray:
        """GPT-2 ids to fitted ids (uint16); a token outside the vocabulary becomes its bytes.

        `spell`, one boolean per id, marks more tokens to spell in bytes (a byte token stays).
        """
        fitted = self.fitted_ids[np.asarray(gpt2_ids, dtype=np.int64)]
        if spell is not None:
            fitted[spell] = -1  # fitted is a new array: indexing copied it
        missing = np.flatnonzero(fitted < 0)
        pieces, start = [], 0
        for position in missing.tolist():
            spelled = self.byte_ids[list(self.gpt2.token_bytes(int(gpt2_ids[position])))]
            pieces += [fitted[start:position], spelled]
            start = position + 1
        return np.concatenate([*pieces, fitted[start:]]).astype(np.uint16)

    def describe(self) -> str:
        """The vocabulary in a few words, for people."""
        return (
            f"GPT-2 byte-pair encoding fitted to the training text ({self.vocab_size:,} of its "
            f"{self.gpt2.vocab_size:,} tokens)"
        )

    def encode(self, text: str) -> list[int]:
        """Text to ids, exactly as GPT-2 splits it (byte tokens where a token is missing)."""
        return self.from_gpt2(np.array(self.gpt2.encode(text), dtype=np.int64)).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """A whole corpus to uint16 ids, a piece at a time."""
        return self.from_gpt2(self.gpt2.encode_array(text))

    def count_chars(self, ids: torch.Tensor) -> int:
        """How many characters the ids decode to."""
        return self.gpt2.count_chars(torch.from_numpy(self.gpt2_ids[ids.numpy()]))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text (bytes that are not valid UTF-8 become U+FFFD)."""
        return self.gpt2.decode(self.gpt2_ids[list(ids)].tolist())

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token."""
        return self.gpt2.token_bytes(int(self.gpt2_ids[token_id]))

    def to_dict(self) -> dict[str, Any]:
        """The description stored in a checkpoint: GPT-2's, and the GPT-2 ids kept."""
        return {**self.gpt2.to_dict(), "gpt2_ids": self.gpt2_ids.tolist()}

    def cache_key(self) -> str:
        """Identifies this exact vocabulary, for the token cache's file name."""
        return "bpe-fitted-" + sha256_hex(self.gpt2_ids.tobytes())[:16]


def encode_in_pieces(encoding: tiktoken.Encoding, text: str) -> np.ndarray:
    """A whole corpus to uint16 ids, a piece at a time (a list of ints costs 36 bytes each).

    The ids are exactly those of encoding the text at once (see `_piece_end`).
    """
    pieces, start = [np.zeros(0, np.uint16)], 0
    while start < len(text):
        end = _piece_end(text, start + ENCODE_CHUNK_CHARS)
        pieces.append(np.array(encoding.encode_ordinary(text[start:end]), np.uint16))
        start = end
    return np.concatenate(pieces)


def count_decoded_chars(encoding: tiktoken.Encoding, ids: torch.Tensor) -> int:
    """How many characters byte-pair ids decode to, decoding a piece at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    count = 0
    for start in range(0, len(ids), ENCODE_CHUNK_CHARS):
        chunk = ids[start : start + ENCODE_CHUNK_CHARS].tolist()
        count += len(decoder.decode(encoding.decode_bytes(chunk)))
    return count + len(decoder.decode(b"", final=True))


_PIECE_BOUNDARY = re.compile(r"[ \n](?=.)", re.DOTALL)  # a space or newline with text after it


def _piece_end(text: str, at_least: int) -> int:
    """Where a piece of text that GPT-2 can encode on its own may end, from `at_least` on.

    GPT-2's pre-tokenizer always splits before a space between two letters (the space starts
    the next word, " the"), and after a newline between two letters or digits (it reads that
    newline alone): a piece ending there is split as it would be in the whole text.
    """
    for match in _PIECE_BOUNDARY.finditer(text, max(at_least, 1)):
        at = match.start()
        before, after = text[at - 1], text[at + 1]
        if match.group() == " " and before.isalpha() and after.isalpha():
            return at
        if match.group() == "\n" and before.isalnum() and after.isalnum():
            return at + 1
    return len(text)


# ----------------------------------------------------------------------------------------------
# A byte-pair vocabulary learned from the training text
#
# Start with the 256 byte values as tokens. Split the text into words with GPT-2's pattern, so
# that a merge never joins two words, and spell each word in bytes. Then repeat: count every
# pair of adjacent tokens (a word's pairs count as often as the word occurs), make the most
# frequent pair a new token, and write it in wherever the pair occurs. Token 256 + i is
# merges[i]: its two parts, in order. Encoding a new text replays the merges in that order.

MAX_BPE_VOCAB_SIZE = 2**16  # ids are stored as uint16


def words_in_bytes(text: str) -> Counter[tuple[int, ...]]:
    """Each distinct word of the text, as GPT-2's pattern splits it, in bytes, with its count."""
    words = regex.findall(GPT2_SPLIT_PATTERN, text)
    return Counter(tuple(word.encode("utf-8")) for word in words)


def merge_pair(ids: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """The ids with each occurrence of pair, read from the left, replaced by new_id."""
    merged, i = [], 0
    while i < len(ids):
        if ids[i : i + 2] == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return tuple(merged)


def learn_merges(text: str, vocab_size: int) -> list[tuple[int, int]]:
    """The merges that grow 256 byte tokens to vocab_size tokens, learned from the text.

    This is the algorithm as it reads, and slow: it recounts every pair for every merge. Real
    runs learn the same merges with a library (`support/fast_bpe.py`; the tests compare the
    two). It stops early when every word has become one token.
    """
    words = words_in_bytes(text)
    merges = []
    for new_id in range(256, vocab_size):
        pair_counts: Counter[tuple[int, int]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pair_counts[pair] += count
        if not pair_counts:
            break
        # The most frequent pair; between equally frequent ones, the one with smaller ids.
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        words = Counter({merge_pair(word, best, new_id): count for word, count in words.items()})
    return merges


def encode_with_merges(text: str, merges: list[tuple[int, int]]) -> list[int]:
    """Text to ids by replaying the merges inside each word, earliest learned first.

    The reference for `TrainedBPETokenizer.encode`, which gives the same ids faster.
    """
    new_id_of = {pair: 256 + i for i, pair in enumerate(merges)}
    ids = []
    for word in regex.findall(GPT2_SPLIT_PATTERN, text):
        tokens = tuple(word.encode("utf-8"))
        while len(tokens) >= 2:
            pair = min(pairwise(tokens), key=lambda p: new_id_of.get(p, math.inf))
            if pair not in new_id_of:
                break  # none of this word's pairs was ever merged
            tokens = merge_pair(tokens, pair, new_id_of[pair])
        ids.extend(tokens)
    return ids


def token_bytes_of(merges: list[tuple[int, int]]) -> list[bytes]:
    """Every token's bytes, by id: the 256 bytes, then each merge's two parts joined."""
    vocabulary = [bytes([byte]) for byte in range(256)]
    for left, right in merges:
        vocabulary.append(vocabulary[left] + vocabulary[right])
    return vocabulary


class TrainedBPETokenizer(TiktokenVocabulary):
    """A byte-pair vocabulary learned from a training text: 256 byte tokens and the merges.

    Any text encodes (bytes that no merge joined stay byte tokens) and decodes back exactly.
    tiktoken encodes, with the ids of `encode_with_merges` (the tests hold it to them).
    """

    kind = "bpe"

    def __init__(self, merges: Iterable[tuple[int, int]]) -> None:
        self.merges = [(int(left), int(right)) for left, right in merges]
        self.vocabulary = token_bytes_of(self.merges)  # id -> bytes
        ranks = {token: token_id for token_id, token in enumerate(self.vocabulary)}
        if len(ranks) != len(self.vocabulary):
            raise UserFacingError("the learned byte-pair vocabulary holds a token twice")
        self.encoding = tiktoken.Encoding(
            name="trained", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
        self.vocab_size = len(self.vocabulary)

    @classmethod
    def from_text(cls, text: str, vocab_size: int) -> TrainedBPETokenizer:
        """Learn up to vocab_size tokens from the text (`learn_merges`, done by a library)."""
        return cls(fast_bpe.learn_merges(text, vocab_size, GPT2_SPLIT_PATTERN))

    def describe(self) -> str:
        """The vocabulary in a few words, for people."""
        return f"byte-pair encoding learned from the training text ({self.vocab_size:,} tokens)"

    def to_dict(self) -> dict[str, Any]:
        """The description stored in a checkpoint: the merges, in the order they were learned."""
        return {"kind": self.kind, "encoding": "trained", "merges": [list(m) for m in self.merges]}

    def cache_key(self) -> str:
        """Identifies this exact vocabulary, for the token cache's file name."""
        return "bpe-trained-" + sha256_hex(np.array(self.merges, dtype=np.uint16).tobytes())[:16]


Tokenizer = CharTokenizer | BPETokenizer | FittedBPETokenizer | TrainedBPETokenizer


def build_tokenizer(kind: str, text: str) -> Tokenizer:
    """A fresh tokenizer of the given kind ("char" or "bpe") for this corpus."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "bpe":
        return BPETokenizer()
    raise UserFacingError(f"unknown tokenizer {kind!r}; choose char or bpe")


def tokenizer_from_dict(description: Any) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint describes."""
    if not isinstance(description, dict):
        raise UserFacingError(f"checkpoint describes its tokenizer as {description!r:.60}")
    kind = description.get("kind")
    if kind == "char" and isinstance(description.get("chars"), str):
        return CharTokenizer(description["chars"])
    if kind == "bpe" and description.get("encoding") == "gpt2":
        if description.get("ranks_sha256") != GPT2_RANKS_SHA256:
            raise UserFacingError("checkpoint was made with other GPT-2 ranks than this project's")
        kept = description.get("gpt2_ids")  # absent: the whole vocabulary
        if kept is None:
            return BPETokenizer()
        if not isinstance(kept, list) or not all(type(i) is int for i in kept):
            raise UserFacingError("checkpoint's fitted GPT-2 vocabulary is not a list of ids")
        if len(set(kept)) != len(kept):
            raise UserFacingError("checkpoint's fitted GPT-2 vocabulary has duplicates")
        tokenizer = FittedBPETokenizer(kept)
        if tokenizer.vocab_size != len(kept):  # the byte tokens were missing
            raise UserFacingError("checkpoint's fitted GPT-2 vocabulary lacks byte tokens")
        return tokenizer
    if kind == "bpe" and description.get("encoding") == "trained":
        return TrainedBPETokenizer(checked_merges(description.get("merges")))
    raise UserFacingError(f"checkpoint describes an unknown tokenizer: {description!r:.80}")


def checked_merges(merges: Any) -> list[tuple[int, int]]:
    """A checkpoint's merges, refused in one line unless each joins two earlier tokens."""
    if not isinstance(merges, list) or len(merges) > MAX_BPE_VOCAB_SIZE - 256:
        raise UserFacingError("checkpoint's byte-pair merges are not a list of at most 65,280")
    for new_id, pair in enumerate(merges, start=256):
        valid = isinstance(pair, list) and len(pair) == 2
        if not valid or not all(type(i) is int and 0 <= i < new_id for i in pair):
            raise UserFacingError(
                f"checkpoint's byte-pair merge for token {new_id} is {pair!r:.40}, not two "
                "earlier token ids"
            )
    return [tuple(pair) for pair in merges]


def stream_decode(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Turn a stream of ids into a stream of text pieces, never splitting a character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token_id in ids:
        piece = decoder.decode(tokenizer.token_bytes(token_id))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
