"""A GPT (GPT-2's architecture with rotary positions), written so every line maps to the math.

The computation, for a sequence of token ids:
    x = token_embedding(ids)             (+ position_embedding(0..T-1) with learned positions)
    for each block:  x = x + attention(layer_norm(x));  x = x + feed_forward(layer_norm(x))
    logits = final_norm(x) @ token_embedding.weight^T     (the output head shares the embedding)
Attention lets each position look back at earlier ones; the feed-forward then thinks about what
it gathered, one position at a time. With rotary positions (the default), attention itself
tells positions apart, by rotating each query and key by an angle that grows with its position.
`generate` samples text from the logits, one token at a time, reusing earlier keys and values
through a `KVCache`.

Shape legend: B batch, T time (sequence length), C = n_embd, nh heads, hs = C / nh head size,
V vocabulary size. GPT-2's names for our modules: token_embedding = wte,
position_embedding = wpe, qkv_proj = c_attn, out_proj = c_proj, fc_in = c_fc, fc_out = c_proj,
final_norm = ln_f.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hyperparameters import ModelConfig

# ----------------------------------------------------------------------------------------------
# Attention: the reference written out step by step, and the fused fast path.
# Both take q of shape (B, nh, Tq, hs), k and v of shape (B, nh, Tk, hs) with Tk >= Tq, and a
# boolean mask (Tq, Tk) that is True where a query may look at a key. Both return
# (B, nh, Tq, hs).


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much each query attends to each key: causally masked softmax(q k^T / sqrt(hs))."""
    scores = q @ k.transpose(-2, -1)  # (B, nh, Tq, hs) @ (B, nh, hs, Tk) -> (B, nh, Tq, Tk)
    # Dividing by sqrt(hs) keeps the scores' variance near 1, so softmax does not saturate.
    scores = scores / math.sqrt(k.size(-1))  # (B, nh, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))  # no looking at the future
    return F.softmax(scores, dim=-1)  # (B, nh, Tq, Tk), each row sums to 1


def causal_attention_manual(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """The reference: attention weights, dropout, then the weighted sum of the values."""
    weights = attention_weights(q, k, mask)  # (B, nh, Tq, Tk)
    # Dropout on the weights: a position randomly ignores some of the keys it would look at.
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return weights @ v  # (B, nh, Tq, Tk) @ (B, nh, Tk, hs) -> (B, nh, Tq, hs)


def causal_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """The same computation through PyTorch's fused kernel (faster, less memory)."""
    if q.size(-2) == k.size(-2):
        # is_causal aligns its triangle to the top-left, which is only right when Tq == Tk
        # (queries and keys at the same positions, as in training).
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


ATTENTION_KERNELS = {"manual": causal_attention_manual, "sdpa": causal_attention_sdpa}


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE, Su et al. 2021), the alternative to a learned embedding per
# position: each query and key is rotated by an angle proportional to its position, so the score
# q . k depends on how far apart two tokens are, not on where they sit.


def rotary_tables(length: int, head_size: int, base: float = 10000.0) -> torch.Tensor:
    """The cosines and sines of every position's angles, stacked: (2, length, hs / 2)."""
    # Channel pair i turns at frequency base^(-2i / hs): fast pairs tell neighbours apart,
    # slow pairs measure long distances.
    frequencies = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), frequencies)  # (length, hs/2)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rotary(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hs/2) of x (B, nh, T, hs) by the angles (2, T, hs/2)."""
    cos, sin = tables[0], tables[1]  # (T, hs/2) each, broadcast over batch and heads
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # 2-D rotation per pair


# ----------------------------------------------------------------------------------------------
# The transformer's layers


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: every position gathers information from earlier ones.

    Each head is an independent attention over an hs-wide slice of the channels; the heads run
    in parallel by folding nh into the batch dimension, and their outputs are concatenated and
    mixed by one output projection.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.attend = ATTENTION_KERNELS[config.attention]
        # Queries, keys and values for all heads come from one matrix multiply.
        self.qkv_proj = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.residual_dropout = nn.Dropout(config.dropout)
        # Rotary angles (None with learned positions): derived from the config, so not saved.
        tables = None
        if config.position == "rope":
            tables = rotary_tables(config.block_size, config.n_embd // config.n_head)
        self.register_buffer("rotary_tables", tables, persistent=False)
        # Lower triangle: position i may attend to positions 0..i. Built once; not saved in
        # checkpoints (persistent=False) because it is derived from block_size.
        mask = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def queries_keys_values(
        self, x: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project x (B, T, C) at positions start.. into per-head q, k, v: 3 x (B, nh, T, hs).

        With rotary positions, the queries and keys are also rotated to their positions.
        """
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.rotary_tables is not None:
            tables = self.rotary_tables[:, start : start + T]  # (2, T, hs/2)
            q, k = apply_rotary(q, tables), apply_rotary(k, tables)
        return q, k, v

    def forward(
        self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), for the positions start..start+T-1.

        With a cache, x holds only the new positions, and the keys and values of the earlier
        ones come from the cache.
        """
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, start)  # 3 x (B, nh, T, hs)
        if cache is not None:
            k, v = cache.store(k, v, start)  # (B, nh, Tk, hs): Tk = block_size slots
        # The new queries sit at positions start..start+T-1: those rows of the triangle, where
        # the query at position p sees keys 0..p.
        mask = self.causal_mask[start : start + T, : k.size(2)]  # (T, Tk)
        dropout_p = self.dropout if self.training else 0.0  # evaluation must be deterministic
        y = self.attend(q, k, v, mask, dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # merge heads: (B, T, nh * hs)
        return self.residual_dropout(self.out_proj(y))  # (B, T, C)


class FeedForward(nn.Module):
    """Per-position MLP: widen to 4 x n_embd, GELU, project back."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GELU(x) = x * P(X <= x) for X ~ N(0, 1). GPT-2 was trained with a tanh formula that
        # approximates it; loading its weights needs that formula to reproduce its outputs.
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.fc_out(self.gelu(self.fc_in(x))))


class Block(nn.Module):
    """Transformer block: communication (attention) followed by computation (feed-forward).

    Pre-LayerNorm: each sub-layer sees a normalised copy of the residual stream and adds its
    result back, so gradients flow straight through the additions.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(
        self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """(B, T, C) at positions start.. -> (B, T, C)."""
        x = x + self.attn(self.norm_1(x), start, cache)
        return x + self.mlp(self.norm_2(x))


# ----------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Embeddings, a stack of blocks, and a head that scores every vocabulary entry."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.vocab_size > 0, "vocab_size must be set from the tokenizer"
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        # With rotary embeddings, attention itself knows positions: no table to learn.
        self.position_embedding = (
            nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        )
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.final_norm = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading a token in and scoring it on the way out use one matrix, which
        # saves parameters and helps small models (Press & Wolf, 2017; GPT-2 does the same).
        self.lm_head.weight = self.token_embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's initialisation: N(0, 0.02) for weights, zero biases.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two projections into the residual stream; scaling them by
        # 1/sqrt(2 * n_layer) keeps its variance from growing with depth (GPT-2 paper, 2.3).
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.fc_out.weight, mean=0.0, std=residual_std)

    def num_parameters(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """What each token is plus where it is: (B, T) ids at positions start.. -> (B, T, C)."""
        x = self.token_embedding(idx)  # (B, T, C)
        if self.position_embedding is not None:
            positions = torch.arange(start, start + idx.size(1), device=idx.device)  # (T,)
            x = x + self.position_embedding(positions)  # (B, T, C)
        return self.embedding_dropout(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy loss if targets are given.

        Args:
            idx: token ids, (B, T). With a cache, only the positions not yet in it.
            targets: the next token at every position, (B, T), or None.
            cache: keys and values of earlier positions, extended in place.

        Returns:
            logits (B, T, V) and the loss (a scalar) or None.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        assert start + T <= self.config.block_size, (
            f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}"
        )
        x = self.embed(idx, start)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, start, cache.layers[i] if cache is not None else None)  # (B, T, C)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss


# ----------------------------------------------------------------------------------------------
# Generation: choosing each next token from the logits, and the context window that moves
# along as the text grows. The filters take logits of shape (V,) and return a filtered copy.


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits to -inf (k <= 0 or k >= V keeps all).

    Exactly k stay, also when several tie at the k-th value: top_k=1 is greedy.
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    top = torch.topk(logits, k)
    return torch.full_like(logits, float("-inf")).scatter_(-1, top.indices, top.values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of likeliest tokens whose total probability reaches p (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    # A token is dropped when the tokens ranked above it already reach p; the top one always
    # stays (even for a p so small that it rounds to 0 in float32).
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = mass_before >= p
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    """Choose the next token id from logits of shape (V,)."""
    if temperature == 0:
        return int(torch.argmax(logits))  # greedy, checked before any division
    # Subtracting the largest logit first keeps a small temperature from overflowing to inf.
    logits = (logits - logits.max()) / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = F.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


# ----------------------------------------------------------------------------------------------
# Key/value cache. When text is generated one token at a time, each new token attends to the
# keys and values of every earlier position; keeping them means each is computed only once.


class LayerCache:
    """Keys and values of one attention layer, preallocated: (B, nh, block_size, hs) each."""

    def __init__(
        self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        head_size = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def store(
        self, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep k, v (B, nh, T, hs) of positions start..; return the whole buffers.

        The buffers' slots after the new positions are empty (or left from an earlier window):
        the causal mask hides them, as they lie in every new query's future. Returning buffers
        of one fixed shape lets torch.compile build a single graph for every position.
        """
        end = start + k.size(2)
        assert end <= self.keys.size(2), f"cache overflow: {end} > {self.keys.size(2)}"
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys, self.values  # (B, nh, block_size, hs) each


class KVCache:
    """One LayerCache per block, and how many positions they hold."""

    def __init__(
        self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.layers = [LayerCache(config, batch_size, device, dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions 0..length-1 are stored


def context_start(length: int, first: int, block_size: int) -> int:
    """Where the model's context window begins once `length` tokens exist.

    The window starts at `first` (the prompt's last block_size tokens) and, once the text
    outgrows it, jumps forward by half a block at a time, so the model always sees between
    block_size // 2 + 1 and block_size tokens. Why not slide by one token? Every kept token
    would then sit at a new position and, from the second layer on, see one token less of the
    past, changing all its cached keys and values (with learned or rotary positions alike):
    sliding by one means recomputing the whole window for every new token.
    Jumping by half a block lets the cache serve block_size // 2 tokens per recomputation.
    The cached and uncached paths both follow this rule, so they give the same tokens.
    """
    overflow = length - first - block_size
    if overflow <= 0:
        return first
    jump = max(1, block_size // 2)
    jumps = math.ceil(overflow / jump)  # as few whole jumps as bring the text back in view
    return first + jumps * jump


@torch.inference_mode()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    token_step: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> Iterator[int]:
    """Continue the prompt, yielding each new token id as soon as it is chosen.

    Args:
        model: the GPT, in eval mode.
        prompt_ids: at least one token id; only the last block_size are used.
        max_new_tokens: how many tokens to generate.
        temperature: 0 picks the likeliest token; higher values flatten the distribution.
        top_k: keep only the k likeliest tokens (0 keeps all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 keeps all).
        generator: the random source for sampling, for reproducible text.
        use_cache: reuse keys and values of earlier positions (same tokens, less compute).
        token_step: what runs the cached one-token steps, e.g. the model compiled for them
            (support/devices.py compiles one); the model itself if None.
    """
    assert len(prompt_ids) > 0, "generate needs at least one prompt token"
    block_size = model.config.block_size
    token_step = model if token_step is None else token_step
    weight = model.token_embedding.weight
    cache = KVCache(model.config, 1, weight.device, weight.dtype) if use_cache else None
    tokens = list(prompt_ids)
    first = max(0, len(tokens) - block_size)  # the prompt's last block_size
    start = first
    logits, _ = model(torch.tensor([tokens[start:]], device=weight.device), cache=cache)
    for _ in range(max_new_tokens):
        next_id = sample_next(logits[0, -1].float(), temperature, top_k, top_p, generator)
        yield next_id
        tokens.append(next_id)
        window_start = context_start(len(tokens), first, block_size)
        if cache is not None and window_start == start:
            # Only the new token goes through the model; earlier keys/values are reused.
            logits, _ = token_step(torch.tensor([[next_id]], device=weight.device), cache=cache)
        else:
            # The window moved (or there is no cache): run the whole window again. With a
            # cache this happens once every block_size // 2 tokens.
            start = window_start
            if cache is not None:
                cache.length = 0  # forget every position: the buffers are overwritten
            logits, _ = model(torch.tensor([tokens[start:]], device=weight.device), cache=cache)


# ----------------------------------------------------------------------------------------------
# Looking inside, for the web demo's Attention tab (training and generation do not use this).


@torch.inference_mode()
def attention_maps(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Attention weights of every layer and head for token ids idx (1, T), T <= block_size.

    Returns (n_layer, nh, T, T): row t of a map is how position t spreads its attention.
    """
    T = idx.size(1)
    x = model.embed(idx)  # (1, T, C)
    maps = []
    for block in model.blocks:  # Block.forward's path, keeping each attention's weights
        q, k, _ = block.attn.queries_keys_values(block.norm_1(x), start=0)  # (1, nh, T, hs)
        maps.append(attention_weights(q, k, block.attn.causal_mask[:T, :T])[0])  # (nh, T, T)
        x = block(x)  # (1, T, C)
    return torch.stack(maps)
