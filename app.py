"""A web demo: write with a trained model in the browser, see how it learned and where it looks.

    python app.py                          # http://127.0.0.1:7860, the model in out/ckpt_best.pth
    python app.py --ckpt out/ckpt_last.pth --port 8000
    python app.py --host 0.0.0.0           # reachable from other machines on your network

Three tabs: Generate (text streamed as it is made, with temperature, top-k, top-p and a seed),
Training (the run's loss curves) and Attention (the attention weights of every layer and head
for a short prompt, from the hand-written attention).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from data_handling import CharTokenizer, Tokenizer, stream_decode
from devices import resolve_device
from hyperparameters import (
    SampleConfig,
    TrainConfig,
    UserFacingError,
    build_parser,
    first_line,
    parse_configs,
    print_error,
)
from model_architecture import GPT
from training_log import loss_figure, read_history

PROG = "app.py"
MAX_PROMPT_CHARS = 2000  # longer prompts keep their end: the model sees block_size at most
MAX_NEW_TOKENS = 2000
MAX_ATTENTION_TOKENS = 48  # beyond this the heatmaps' labels become unreadable
CONCURRENCY_LIMIT = 4  # generations running at once; more wait in the queue
QUEUE_SIZE = 64  # requests waiting beyond this are turned away
STREAM_INTERVAL_S = 0.05  # how often the page receives new text


@dataclasses.dataclass
class LoadedModel:
    """A trained model with its tokenizer and the facts the page shows about it."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    facts: dict[str, Any]


def load_model(path: Path, device: torch.device, precision: str = "float32") -> LoadedModel:
    """Load a checkpoint for the demo (a UserFacingError says why it cannot be used)."""
    checkpoint = load_checkpoint(path)
    model, tokenizer = model_from_checkpoint(checkpoint, device, precision)
    config = model.config
    tokens_per_char = checkpoint.get("tokens_per_char", {}).get("val")
    best = checkpoint.get("best_val_loss", math.inf)
    facts = {
        "parameters": model.num_parameters(),
        "shape": f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd} wide",
        "context": config.block_size,
        "tokenizer": (
            f"characters ({tokenizer.vocab_size} symbols)"
            if isinstance(tokenizer, CharTokenizer)
            else f"GPT-2 byte-pair encoding ({tokenizer.vocab_size:,} tokens)"
        ),
        "steps": checkpoint.get("step", 0),
        "best_val_loss": best,
        "best_val_bpc": best * tokens_per_char / math.log(2) if tokens_per_char else None,
    }
    return LoadedModel(model, tokenizer, path, facts)


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
        loss = f"**Best validation loss**: {facts['best_val_loss']:.4f} nats per token"
        if facts["best_val_bpc"] is not None:
            loss += f" ({facts['best_val_bpc']:.3f} bits per character)"
        lines.append(loss)
    return "  \n".join(lines)


# ----------------------------------------------------------------------------------------------
# Generate tab


def prepare_prompt(text: str, tokenizer: Tokenizer) -> tuple[list[int], str]:
    """Token ids for a prompt typed in the page, and a note on anything that was changed.

    The page never fails on a prompt: an empty one becomes a newline, a long one keeps its end,
    and characters a character-level model never saw are left out (and named in the note).
    """
    notes = []
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


def generate_stream(
    loaded: LoadedModel,
    prompt: str,
    temperature: float,
    top_k: float,
    top_p: float,
    max_new_tokens: float,
    seed: float | None,
) -> Iterator[tuple[str, str]]:
    """Yield (text so far, note) while the model writes; slider values are clamped to sense."""
    prompt_ids, note = prepare_prompt(prompt or "", loaded.tokenizer)
    generator = torch.Generator(device=loaded.model.token_embedding.weight.device)
    generator.manual_seed(int(seed) if seed is not None and math.isfinite(seed) else 0)
    new_ids = loaded.model.generate(
        prompt_ids,
        max_new_tokens=int(min(max(max_new_tokens or 1, 1), MAX_NEW_TOKENS)),
        temperature=float(min(max(temperature or 0.0, 0.0), 5.0)),
        top_k=int(max(top_k or 0, 0)),
        top_p=float(min(max(top_p or 1.0, 0.01), 1.0)),
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


def _figure_to_image(fig: Any) -> Any:
    """Render a matplotlib figure to a PIL image and free the figure."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).copy()


def training_plot(metrics_path: Path) -> Any:
    """Train and validation loss against step from the run's metrics.jsonl; None if absent."""
    history = read_history(metrics_path)
    return loss_figure(history) if history else None


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

    prompt_ids, note = prepare_prompt(prompt or "", loaded.tokenizer)
    limit = min(MAX_ATTENTION_TOKENS, loaded.model.config.block_size)
    if len(prompt_ids) > limit:
        prompt_ids = prompt_ids[:limit]
        note = "; ".join(filter(None, [note, f"showing the first {limit} tokens"]))
    device = loaded.model.token_embedding.weight.device
    maps = loaded.model.attention_maps(torch.tensor([prompt_ids], device=device)).float().cpu()
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
    return _figure_to_image(fig), note


# ----------------------------------------------------------------------------------------------
# The page


def build_demo(
    loaded: LoadedModel | None, problem: str = "", defaults: SampleConfig | None = None
) -> Any:
    """The Gradio page; with no model it explains how to train one instead."""
    import gradio as gr

    defaults = defaults or SampleConfig()
    with gr.Blocks(title="mini-GPT") as demo:
        gr.Markdown("# mini-GPT\nA small GPT trained from scratch, writing one token at a time.")
        if loaded is None:
            gr.Markdown(f"### No model to show\n{problem}", elem_id="no-model")
            return demo
        gr.Markdown(facts_markdown(loaded), elem_id="facts")
        with gr.Tab("Generate"):
            _generate_tab(gr, loaded, defaults)
        with gr.Tab("Training"):
            metrics_path = loaded.path.parent / "metrics.jsonl"
            figure = training_plot(metrics_path)
            if figure is None:
                gr.Markdown(f"No training log found at `{metrics_path}`.")
            else:
                gr.Plot(value=figure, label="loss curves", elem_id="loss-plot")
        with gr.Tab("Attention"):
            _attention_tab(gr, loaded)
    return demo


def _generate_tab(gr: Any, loaded: LoadedModel, defaults: SampleConfig) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", value="ROMEO:", lines=3, elem_id="prompt")
            temperature = gr.Slider(
                0.0,
                2.0,
                value=defaults.temperature,
                step=0.05,
                label="Temperature (0 = always the likeliest token)",
            )
            top_k = gr.Slider(
                0,
                min(loaded.tokenizer.vocab_size, 500),
                value=defaults.top_k,
                step=1,
                label="Top-k (0 = off)",
            )
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (1 = off)")
            max_new = gr.Slider(
                1,
                MAX_NEW_TOKENS,
                value=min(defaults.max_new_tokens, 1000),
                step=1,
                label="New tokens",
            )
            seed = gr.Number(value=1337, precision=0, label="Seed (same seed, same text)")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            output = gr.Textbox(label="Text", lines=22, elem_id="output")
            note = gr.Markdown(elem_id="note")

    button.click(
        functools.partial(generate_stream, loaded),  # still a generator: Gradio streams it
        inputs=[prompt, temperature, top_k, top_p, max_new, seed],
        outputs=[output, note],
        api_name="generate",
        concurrency_limit=CONCURRENCY_LIMIT,
    )


def _attention_tab(gr: Any, loaded: LoadedModel) -> None:
    gr.Markdown(
        "Each square shows one head of one layer: row *t* is how the token at position *t* "
        "spreads its attention over the tokens up to itself (brighter = more). The upper "
        "triangle is dark because a token never looks ahead."
    )
    with gr.Row():
        prompt = gr.Textbox(
            label="Short prompt", value="To be, or not to be", scale=3, elem_id="attention-prompt"
        )
        button = gr.Button("Show attention", variant="primary", scale=1, elem_id="show-attention")
    note = gr.Markdown()
    image = gr.Image(label="Attention weights", type="pil", elem_id="attention-image")

    def show_attention(prompt: str) -> tuple[Any, str]:
        return attention_image(loaded, prompt)

    button.click(show_attention, inputs=prompt, outputs=[image, note], api_name="attention")


def main(argv: list[str] | None = None) -> int:
    """Start the web demo; returns the exit status when the server stops."""
    parser = build_parser(
        __doc__,
        [
            (
                SampleConfig,
                ["ckpt", "temperature", "top_k", "top_p", "max_new_tokens", "precision"],
            ),
            (TrainConfig, ["out_dir", "device"]),
        ],
    )
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on "
        "(default: 127.0.0.1, this computer only; 0.0.0.0 = every network)",
    )
    server.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    (sample_config, train_config), options = parse_configs(
        parser, [SampleConfig, TrainConfig], argv
    )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    path = Path(sample_config.ckpt or Path(train_config.out_dir) / "ckpt_best.pth")
    loaded, problem = None, ""
    try:
        loaded = load_model(path, resolve_device(train_config.device), sample_config.precision)
    except UserFacingError as err:
        problem = f"{err}. Then restart `python app.py`."
        print_error(PROG, UserFacingError(problem))
    demo = build_demo(loaded, problem, sample_config)
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    print(f"{PROG}: serving on http://{options['host']}:{options['port']}")
    sys.stdout.flush()
    try:
        demo.launch(
            server_name=options["host"],
            server_port=options["port"],
            ssr_mode=False,
            footer_links=["api"],
        )
    except OSError as err:  # most often: the port is taken
        reason = first_line(err)
        print_error(PROG, UserFacingError(f"cannot serve on port {options['port']} ({reason})"))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
