"""What the web demo's page calls: loading the model, writing text, drawing its figures.

app.py builds the page and serves it; everything here works without Gradio, so the tests can
call it directly.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hyperparameters import MAX_SEED, MIN_TEMPERATURE
from model_architecture import GPT, attention_maps, generate
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.common import figure_png
from support.fast_paths import for_inference
from support.run_folder import RunFolder, runs_under
from support.training_log import (
    bits_per_char,
    loss_figure,
    nats_per_char,
    read_history,
    runs_figure,
    runs_table,
)
from tokenization import CharTokenizer, Tokenizer, stream_decode

MAX_PROMPT_CHARS = 2000  # longer prompts keep their end: the model sees block_size at most
MAX_NEW_TOKENS = 2000
MAX_ATTENTION_TOKENS = 48  # beyond this the heatmaps' labels become unreadable
STREAM_INTERVAL_S = 0.05  # how often the page receives new text


@dataclasses.dataclass
class LoadedModel:
    """A trained model with its tokenizer and the facts the page shows about it."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    folder: RunFolder  # the run the checkpoint belongs to: its metrics draw the Training tab
    facts: dict[str, Any]


def load_model(path: Path, device: torch.device, precision: str = "float32") -> LoadedModel:
    """Load a checkpoint for the demo (a UserFacingError says why it cannot be used)."""
    checkpoint = load_checkpoint(path)
    model, tokenizer = model_from_checkpoint(checkpoint, device)
    model = for_inference(model, precision)  # the same math, faster (fast_paths.py)
    config = model.config
    tokens_per_char = checkpoint.get("tokens_per_char", {}).get("val")
    best = checkpoint.get("best_val_loss", math.inf)
    facts = {
        "parameters": model.num_parameters(),
        "shape": f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd} wide",
        "context": config.block_size,
        "tokenizer": tokenizer.describe(),
        "steps": checkpoint.get("step", 0),
        "best_val_loss": best,
        "best_val_bpc": bits_per_char(best, tokens_per_char) if tokens_per_char else None,
    }
    return LoadedModel(model, tokenizer, path, RunFolder.of_checkpoint(path), facts)


def facts_markdown(loaded: LoadedModel) -> str:
    """The model's facts as a short Markdown list."""
    facts = loaded.facts
    lines = [
        f"**Model** `{loaded.path}`: {facts['parameters']:,} parameters, {facts['shape']}, "
        f"context {facts['context']} tokens",
        f"**Tokenizer**: {facts['tokenizer']}",
        f"**Trained** {facts['steps']:,} steps",
    ]
    if math.isfinite(facts["best_val_loss"]):
        per_token = f"{facts['best_val_loss']:.4f} nats per token"
        bpc = facts["best_val_bpc"]
        if bpc is not None:
            loss = f"{nats_per_char(bpc):.4f} nats per character ({bpc:.3f} bits; {per_token})"
        else:
            loss = per_token
        lines.append(f"**Best validation loss**: {loss}")
    return "  \n".join(lines)


# ----------------------------------------------------------------------------------------------
# Generate tab


def prepare_prompt(text: Any, tokenizer: Tokenizer) -> tuple[list[int], str]:
    """Token ids for a prompt typed in the page, and a note on anything that was changed.

    The page never fails on a prompt: an empty one becomes a newline, a long one keeps its end,
    and characters a character-level model never saw are left out (and named in the note).
    """
    notes = []
    if not isinstance(text, str):  # the API takes any JSON value
        text, notes = "", ["the prompt was not text"]
    readable = text.encode("utf-8", errors="replace").decode("utf-8")
    if readable != text:  # lone surrogates, which no tokenizer can encode
        text = readable
        notes.append("characters that are not text became '?'")
    if len(text) > MAX_PROMPT_CHARS:
        text = text[-MAX_PROMPT_CHARS:]
        notes.append(f"the prompt was cut to its last {MAX_PROMPT_CHARS} characters")
    if isinstance(tokenizer, CharTokenizer):
        unknown = tokenizer.unknown_characters(text)
        if unknown:
            text = "".join(ch for ch in text if ch in tokenizer.char_to_id)
            notes.append(f"left out characters the model does not know: {unknown}")
    if not text:
        known_start = "\n" in tokenizer.chars if isinstance(tokenizer, CharTokenizer) else True
        return ([tokenizer.encode("\n")[0]] if known_start else [0]), "; ".join(notes)
    return tokenizer.encode(text), "; ".join(notes)


def is_number(value: Any) -> bool:
    """Whether a value from the page or its API is a number (NaN, text and null are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def clamp(value: Any, low: float, high: float, default: float) -> float:
    """A number from the page or its API, brought into [low, high]; default if not a number."""
    return float(min(max(value, low), high)) if is_number(value) else default


def generate_stream(
    loaded: LoadedModel,
    prompt: str,
    temperature: float,
    top_k: float,
    top_p: float,
    max_new_tokens: float,
    seed: float | None,
) -> Iterator[tuple[str, str]]:
    """Yield (text so far, note) while the model writes; slider values are clamped to sense.

    The page's sliders keep to their ranges, but its API takes any JSON value (NaN, 1e300,
    text, null): each value is brought into its range here, and one that is not a number takes
    a default, which the note names.
    """
    prompt_ids, note = prepare_prompt(prompt, loaded.tokenizer)
    settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    settings |= {"new tokens": max_new_tokens, "seed": 0 if seed is None else seed}
    not_numbers = [name for name, value in settings.items() if not is_number(value)]
    if not_numbers:
        defaults = f"not numbers, so their defaults were used: {', '.join(not_numbers)}"
        note = f"{note}; {defaults}" if note else defaults
    generator = torch.Generator(device=loaded.model.token_embedding.weight.device)
    generator.manual_seed(int(clamp(seed, 0, MAX_SEED, 0)))
    temperature = clamp(temperature, 0.0, 5.0, 0.0)
    new_ids = generate(
        loaded.model,
        prompt_ids,
        max_new_tokens=int(clamp(max_new_tokens, 1, MAX_NEW_TOKENS, 1)),
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_k=int(clamp(top_k, 0, loaded.tokenizer.vocab_size, 0)),
        top_p=clamp(top_p, 0.01, 1.0, 1.0),
        generator=generator,
    )
    text = loaded.tokenizer.decode(prompt_ids)
    last_sent = time.monotonic()
    for piece in stream_decode(loaded.tokenizer, new_ids):
        text += piece
        if time.monotonic() - last_sent >= STREAM_INTERVAL_S:
            yield text, note
            last_sent = time.monotonic()
    yield text, note


# ----------------------------------------------------------------------------------------------
# Training and Attention tabs: matplotlib figures


def figure_image(fig: Any) -> Any:
    """Render a matplotlib figure to a PIL image (what gr.Image shows) and free the figure."""
    from PIL import Image  # installed with gradio

    return Image.open(io.BytesIO(figure_png(fig, dpi=110))).copy()


def training_plot(metrics_path: Path) -> Any:
    """Train and validation loss against step from the run's metrics.jsonl; None if absent."""
    history = read_history(metrics_path)
    return loss_figure(history) if history else None


def runs_beside(folder: RunFolder) -> list[RunFolder]:
    """The run folders next to this run's (under out/, usually), this run's included.

    For a run trained into out/ itself, the runs inside it too.
    """
    runs = runs_under(folder.path.parent)
    inside = [run for run in runs_under(folder.path) if run != folder]
    runs += [run for run in inside if run not in runs]
    return runs if folder in runs else [folder, *runs]


def runs_comparison(runs: list[RunFolder], names: list[str]) -> tuple[Any, str]:
    """The picked runs' validation curves overlaid, and their table (None and "" if none)."""
    picked = [folder for folder in runs if folder.path.name in (names or [])]
    picked = [folder for folder in picked if read_history(folder.metrics)]
    if not picked:
        return None, ""
    figure = runs_figure({folder.path.name: read_history(folder.metrics) for folder in picked})
    return figure, f"```\n{runs_table(picked)}\n```"


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Readable axis labels: spaces and newlines made visible."""
    labels = []
    for token_id in ids:
        text = tokenizer.decode([token_id])
        labels.append(text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅")
    return labels


def attention_image(loaded: LoadedModel, prompt: str) -> tuple[Any, str]:
    """Heatmaps of every layer's and head's attention weights for the prompt, and a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt_ids, note = prepare_prompt(prompt, loaded.tokenizer)
    limit = min(MAX_ATTENTION_TOKENS, loaded.model.config.block_size)
    if len(prompt_ids) > limit:
        prompt_ids = prompt_ids[:limit]
        note = "; ".join(filter(None, [note, f"showing the first {limit} tokens"]))
    device = loaded.model.token_embedding.weight.device
    maps = attention_maps(loaded.model, torch.tensor([prompt_ids], device=device)).float().cpu()
    n_layer, n_head = maps.shape[:2]
    labels = token_labels(loaded.tokenizer, prompt_ids)
    cell = max(2.2, 0.16 * len(labels))
    fig, axes = plt.subplots(
        n_layer, n_head, figsize=(cell * n_head, cell * n_layer), squeeze=False
    )
    rotation = 90 if any(len(label) > 1 for label in labels) else 0  # words stand upright
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].numpy(), cmap="magma", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
            ticks = range(len(labels))
            bottom_row = layer == n_layer - 1
            ax.set_xticks(ticks, labels if bottom_row else [], fontsize=7, rotation=rotation)
            ax.set_yticks(ticks, labels if head == 0 else [], fontsize=7)
    fig.supxlabel("attended-to token (key)")
    fig.supylabel("attending token (query)")
    fig.tight_layout()
    return figure_image(fig), note
