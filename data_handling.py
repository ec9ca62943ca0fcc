"""From a text file to batches of token ids.

1. Find the corpus: `--data PATH`, else `input.txt` in the current folder, else download
   Tiny Shakespeare (checked by sha256).
2. Tokenize it with one of tokenization.py's tokenizers: one token per character, GPT-2's
   byte-pair encoding, or a byte-pair vocabulary learned from the training text.
3. Cache the token ids on disk, so the next run skips encoding.
4. Split the ids into train (the start) and validation (the end), and draw random windows
   as batches with `get_batch`.
`load_splits` does steps 1 to 4 for training and the benchmark, and counts each split's
characters, so that losses can be given per character whatever the tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

from hyperparameters import DataConfig
from support.common import UserFacingError, sha256_hex, write_atomically
from tokenization import (
    ENCODE_CHUNK_CHARS,
    BPETokenizer,
    FittedBPETokenizer,
    Tokenizer,
    TrainedBPETokenizer,
    build_tokenizer,
)

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_CORPUS = Path("input.txt")
# The corpus is read whole into memory (its text, then 2 bytes a token; about 6 bytes a
# character at the peak); beyond this size, train on a part of it.
MAX_CORPUS_BYTES = 1 << 30
TOKEN_CACHES_KEPT = 4  # the token caches a cache folder keeps (the most recently used)
SPELLING_SEED = 0  # which training tokens bpe_spell_fraction spells (fixed: see its use)
SPELLING_PIECE = 1 << 20  # tokens drawn at a time


# ----------------------------------------------------------------------------------------------
# The corpus


def download_corpus(
    dest: Path, url: str = TINY_SHAKESPEARE_URL, expected_sha256: str = TINY_SHAKESPEARE_SHA256
) -> None:
    """Download `url` to `dest`, verified against its sha256 and written atomically."""
    print(f"downloading {url} to {dest} ...")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise UserFacingError(
            f"could not download the corpus from {url} ({err}); pass --data PATH to any "
            f"UTF-8 text file, or place the text at {dest}"
        ) from err
    digest = sha256_hex(data)
    if digest != expected_sha256:
        raise UserFacingError(
            f"downloaded corpus has sha256 {digest}, expected {expected_sha256}; pass --data "
            f"PATH to any UTF-8 text file, or place the text at {dest}"
        )
    write_atomically(dest, data)


def resolve_corpus(data: str) -> Path:
    """The corpus to train on: `data` if given, else input.txt, else a fresh download."""
    if data:
        return Path(data)
    if not DEFAULT_CORPUS.exists():
        download_corpus(DEFAULT_CORPUS)
    return DEFAULT_CORPUS


def read_corpus(path: Path) -> str:
    """Read a UTF-8 corpus, refusing files that cannot be trained on, with a clear reason."""
    if not path.exists():
        raise UserFacingError(f"corpus {path} not found; pass --data PATH to a UTF-8 text file")
    if path.is_dir():
        raise UserFacingError(f"corpus {path} is a directory; pass --data PATH to a text file")
    if not path.is_file():  # a device, a pipe: reading could never end
        raise UserFacingError(f"corpus {path} is not a regular file; pass a text file")
    size = path.stat().st_size
    if size > MAX_CORPUS_BYTES:
        raise UserFacingError(
            f"corpus {path} has {size:,} bytes; this project reads up to "
            f"{MAX_CORPUS_BYTES:,} whole into memory: train on a part of it"
        )
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserFacingError(f"cannot read corpus {path} ({err.strerror or err})") from None
    if not raw:
        raise UserFacingError(f"corpus {path} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserFacingError(
            f"corpus {path} is not UTF-8 text (bad byte at offset {err.start})"
        ) from err
    if text.isspace():
        raise UserFacingError(f"corpus {path} holds only whitespace")
    if "\0" in text:
        raise UserFacingError(f"corpus {path} contains NUL bytes; is it a binary file?")
    if len(set(text)) < 2:
        raise UserFacingError(f"corpus {path} repeats a single character: nothing to learn")
    return text


def text_sha256(text: str) -> str:
    """The sha256 of the text's UTF-8 bytes, encoded a piece at a time (no second copy)."""
    digest = hashlib.sha256()
    for start in range(0, len(text), ENCODE_CHUNK_CHARS):
        digest.update(text[start : start + ENCODE_CHUNK_CHARS].encode("utf-8"))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Encoding with an on-disk cache


def encode_corpus(
    text: str, tokenizer: Tokenizer, cache_dir: Path | None, digest: str = ""
) -> np.ndarray:
    """The corpus as a uint16 array of ids, from the cache when a valid one exists.

    The cache file's name holds the corpus' sha256 and the tokenizer's key, and the file holds
    both again plus a checksum of the ids, so a stale, truncated or foreign cache is rebuilt.
    Without a cache_dir, the corpus is encoded every time. `digest` is the text's sha256, if
    the caller has it already.
    """
    assert tokenizer.vocab_size <= 2**16, "uint16 cache cannot hold this vocabulary"
    if cache_dir is None:
        return tokenizer.encode_array(text)
    digest = digest or text_sha256(text)
    meta = {"corpus_sha256": digest, "tokenizer": tokenizer.cache_key()}
    path = cache_dir / f"tokens-{meta['corpus_sha256'][:16]}-{meta['tokenizer']}.npz"
    if path.exists():
        tokens = _read_token_cache(path, meta, tokenizer.vocab_size)
        if tokens is not None:
            path.touch()  # recently used: kept when the folder is trimmed
            return tokens
        print(f"token cache {path} is stale or damaged; rebuilding it")
    tokens = tokenizer.encode_array(text)
    _write_token_cache(path, tokens, meta)
    return tokens


def _read_token_cache(path: Path, meta: dict[str, str], vocab_size: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            tokens = archive["tokens"]
            stored = json.loads(str(archive["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if tokens.dtype != np.uint16 or tokens.ndim != 1 or not len(tokens):
        return None
    if stored != {**meta, "tokens_sha256": sha256_hex(tokens.data)}:
        return None
    return tokens if int(tokens.max()) < vocab_size else None


def _write_token_cache(path: Path, tokens: np.ndarray, meta: dict[str, str]) -> None:
    full_meta = {**meta, "tokens_sha256": sha256_hex(tokens.data)}
    buffer = io.BytesIO()
    np.savez(buffer, tokens=tokens, meta=np.array(json.dumps(full_meta)))
    try:
        write_atomically(path, buffer.getbuffer())  # a view: no second copy of the archive
    except OSError as err:  # a cache is an optimisation: failing to write one is not fatal
        print(f"warning: could not write token cache {path} ({err})")
        return
    # Caches of corpora no longer used would pile up: keep the most recently used ones.
    caches = sorted(path.parent.glob("tokens-*.npz"), key=lambda p: p.stat().st_mtime)
    for old in caches[:-TOKEN_CACHES_KEPT]:
        old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Splits and batches


def split_tokens(
    tokens: np.ndarray, val_fraction: float, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """First (1 - val_fraction) of the ids for training, the rest for validation (uint16)."""
    n_val = int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    ids = torch.from_numpy(tokens)  # 2 bytes a token; get_batch widens each batch to int64
    return check_split_sizes(ids[:n_train], ids[n_train:], block_size)


def check_split_sizes(
    train: torch.Tensor, val: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The splits, if each holds at least one window of block_size + 1 tokens."""
    for name, split in (("training", train), ("validation", val)):
        if len(split) < block_size + 1:
            raise UserFacingError(
                f"the {name} split has {len(split)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a longer corpus or a smaller block_size"
            )
    return train, val


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the data: inputs x and targets y (x shifted by one), each (B, T)."""
    # Every window of block_size + 1 consecutive ids, as a view: (len - block_size, T + 1).
    windows = data.unfold(0, block_size + 1, 1)
    starts = torch.randint(len(windows), (batch_size,), generator=generator)
    batch = windows[starts].long()  # (B, T + 1), one gather, no Python loop
    x, y = batch[:, :-1], batch[:, 1:]
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously with the GPU's work.
        return (
            x.pin_memory().to(device, non_blocking=True),
            y.pin_memory().to(device, non_blocking=True),
        )
    return x.contiguous().to(device), y.contiguous().to(device)


@dataclasses.dataclass(frozen=True)
class CorpusSplits:
    """A corpus read, tokenized and split: the token ids and the characters of each split."""

    path: Path
    sha256: str  # of the text: tells whether a resumed run still reads the same corpus
    tokenizer: Tokenizer
    tokens: dict[str, torch.Tensor]  # "train" and "val": 1-D uint16 ids
    chars: dict[str, int]  # how many characters of the text each split holds

    def summary(self) -> str:
        """One line about the corpus and its splits, for the start of training."""
        train, val = self.tokens["train"], self.tokens["val"]
        return (
            f"corpus {self.path}: {sum(self.chars.values()):,} characters; "
            f"{self.tokenizer.describe()}; {len(train):,} training and {len(val):,} validation "
            "tokens"
        )

    def tokens_per_char(self) -> dict[str, float]:
        """Tokens per character of each split: turns a loss per token into one per character."""
        return {name: len(ids) / self.chars[name] for name, ids in self.tokens.items()}


def fitted_splits(
    text: str,
    tokenizer: FittedBPETokenizer | None,
    config: DataConfig,
    block_size: int,
    cache_dir: Path | None,
    digest: str,
) -> tuple[FittedBPETokenizer, torch.Tensor, torch.Tensor]:
    """The splits in a fitted GPT-2 vocabulary.

    GPT-2's own ids are split; a new run's vocabulary is fitted to the training split alone
    (nothing of the validation text shapes it); then both splits are renumbered into it.
    """
    gpt2 = tokenizer.gpt2 if tokenizer is not None else BPETokenizer()
    gpt2_tokens = encode_corpus(text, gpt2, cache_dir, digest)
    train, val = split_tokens(gpt2_tokens, config.val_fraction, block_size)
    tokenizer = tokenizer or FittedBPETokenizer.from_training_ids(
        train.numpy(), gpt2, config.bpe_min_count
    )
    # Tokens outside the vocabulary are spelled as bytes in both splits: those used fewer than
    # bpe_min_count times, and in the validation text those the training text never used. In
    # the training text, a random share of the others too (bpe_spell_fraction).
    spell = positions_to_spell(len(train), config.bpe_spell_fraction)
    fitted_train = torch.from_numpy(tokenizer.from_gpt2(train.numpy(), spell))
    return tokenizer, fitted_train, torch.from_numpy(tokenizer.from_gpt2(val.numpy()))


def trained_splits(
    text: str, tokenizer: TrainedBPETokenizer | None, config: DataConfig, block_size: int
) -> tuple[TrainedBPETokenizer, torch.Tensor, torch.Tensor]:
    """The splits in a byte-pair vocabulary learned from the training text.

    The text is split first, by characters (the validation text is then the same as a
    character model's), and a new run's vocabulary is learned from the training text alone.
    Learning and encoding take well under a second for Tiny Shakespeare, so nothing is cached.
    """
    cut = len(text) - int(len(text) * config.val_fraction)
    train_text, val_text = text[:cut], text[cut:]
    tokenizer = tokenizer or TrainedBPETokenizer.from_text(train_text, config.bpe_vocab_size)
    train = torch.from_numpy(tokenizer.encode_array(train_text))
    val = torch.from_numpy(tokenizer.encode_array(val_text))
    return (tokenizer, *check_split_sizes(train, val, block_size))


def positions_to_spell(n_tokens: int, fraction: float) -> np.ndarray | None:
    """Each of n_tokens marked with probability `fraction` (None for 0), the same every time.

    The draw has a seed of its own, not the run's: a run, its --resume (even with another
    --seed) and every process of a distributed run must see the same training text. It is
    drawn a piece at a time (the same stream as one draw) to keep one byte a token in memory.
    """
    if fraction == 0:
        return None
    generator = np.random.default_rng(SPELLING_SEED)
    pieces = [
        generator.random(min(SPELLING_PIECE, n_tokens - start)) < fraction
        for start in range(0, n_tokens, SPELLING_PIECE)
    ]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=bool)


def bpe_vocabulary(config: DataConfig, tokenizer: Tokenizer | None) -> str:
    """Which splitting a run's vocabulary needs: "trained", "fitted", or "" for the others.

    A saved run's tokenizer decides; a new run's settings do.
    """
    if tokenizer is not None:
        kinds = {TrainedBPETokenizer: "trained", FittedBPETokenizer: "fitted"}
        return kinds.get(type(tokenizer), "")
    return config.bpe_vocabulary if config.tokenizer == "bpe" else ""


def load_splits(
    config: DataConfig,
    block_size: int,
    tokenizer: Tokenizer | None = None,
    expected_sha256: str = "",
) -> CorpusSplits:
    """Find, read, tokenize (through the cache) and split the corpus `config` names.

    `tokenizer` is a saved run's; without one, a new one of config.tokenizer's kind is built.
    With expected_sha256 (a resumed run's), another text than the one trained on is refused.
    """
    path = resolve_corpus(config.data)
    text = read_corpus(path)
    digest = text_sha256(text)
    if expected_sha256 and digest != expected_sha256:
        raise UserFacingError(
            f"{path} is not the text this run trained on (its sha256 differs); resume with "
            "the same corpus, or start a new run"
        )
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise UserFacingError(
            f"--cache_dir {cache_dir} is not a folder; name a folder, or --cache_dir '' for none"
        )
    vocabulary = bpe_vocabulary(config, tokenizer)
    if vocabulary == "trained":
        tokenizer, train, val = trained_splits(text, tokenizer, config, block_size)
    elif vocabulary == "fitted":
        tokenizer, train, val = fitted_splits(
            text, tokenizer, config, block_size, cache_dir, digest
        )
    else:
        tokenizer = tokenizer or build_tokenizer(config.tokenizer, text)
        tokens = encode_corpus(text, tokenizer, cache_dir, digest)
        train, val = split_tokens(tokens, config.val_fraction, block_size)
    # Characters per split, so that losses can be reported per character for any tokenizer.
    train_chars = tokenizer.count_chars(train)
    return CorpusSplits(
        path=path,
        sha256=digest,
        tokenizer=tokenizer,
        tokens={"train": train, "val": val},
        chars={"train": train_chars, "val": len(text) - train_chars},
    )
