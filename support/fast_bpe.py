"""Learning byte-pair merges fast: the library behind `tokenization.learn_merges`.

`learn_merges` in tokenization.py is the algorithm as a learner reads it, and recounts every
pair for every merge. rustbpe does the same work in Rust, counting pairs once and updating
only those a merge touches, with the same rule for ties (the smaller pair of ids), so it
learns the same merges; the tests compare the two.
"""

from __future__ import annotations

from itertools import pairwise

import rustbpe


def learn_merges(text: str, vocab_size: int, pattern: str) -> list[tuple[int, int]]:
    """The merges that grow 256 byte tokens to at most vocab_size tokens, learned from text.

    Words are split with the regular expression `pattern`. Token 256 + i joins merges[i].
    """
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator([text], vocab_size, pattern=pattern)
    ranks = sorted(trainer.get_mergeable_ranks(), key=lambda token_and_rank: token_and_rank[1])
    return pairs_from_tokens([bytes(token) for token, _ in ranks])


def pairs_from_tokens(tokens: list[bytes]) -> list[tuple[int, int]]:
    """The merges behind a vocabulary listed by id (the 256 bytes first, each later token once).

    The library gives each token's bytes, not its two parts. Encoding a token's bytes with the
    merges learned before it leaves exactly those two parts.
    """
    merges: dict[tuple[int, int], int] = {}
    for new_id, token in enumerate(tokens[256:], start=256):
        parts = list(token)
        while len(parts) > 2:
            pairs = list(pairwise(parts))
            earliest = min(pairs, key=lambda pair: merges.get(pair, new_id))
            if earliest not in merges:
                break
            i = pairs.index(earliest)
            parts[i : i + 2] = [merges[earliest]]
        if len(parts) != 2 or (parts[0], parts[1]) in merges:
            raise ValueError(f"token {new_id} ({token!r}) is not a new merge of earlier tokens")
        merges[(parts[0], parts[1])] = new_id
    return list(merges)
