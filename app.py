"""A web demo: write with a trained model in the browser, see how it learned and where it looks.

    python app.py                          # http://127.0.0.1:7860, the latest run's best model
    python app.py --out_dir out/run-20261123-101500 --port 8000
    python app.py --host 0.0.0.0           # reachable from other machines on your network

Three tabs: Generate (text streamed as it is made, with temperature, top-k, top-p and a seed),
Training (the run's loss curves, and the runs beside it to compare) and Attention (the
attention weights of every layer and head for a short prompt, from the hand-written attention).
"""

from __future__ import annotations

import signal

# Ctrl-C while the libraries below still load: the default action ends the program at once,
# without a traceback (Python's KeyboardInterrupt comes back before main runs).
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import functools
import os
import socket
import sys
from typing import Any

from hyperparameters import SampleConfig, TrainConfig
from support.app_backend import (
    MAX_NEW_TOKENS,
    LoadedModel,
    attention_image,
    facts_markdown,
    generate_stream,
    load_model,
    runs_beside,
    runs_comparison,
    training_plot,
)
from support.command_line import build_parser, parse_configs
from support.common import UserFacingError, first_line, print_error
from support.devices import resolve_device
from support.run_folder import checkpoint_to_sample

PROG = "app.py"
CONCURRENCY_LIMIT = 4  # generations running at once; more wait in the queue
QUEUE_SIZE = 64  # requests waiting beyond this are turned away


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
            _training_tab(gr, loaded)
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
        # The values reach generate_stream as sent: it checks them itself, so that an API
        # call with NaN, text or null gets a note instead of an error and a server traceback.
        preprocess=False,
    )


def _training_tab(gr: Any, loaded: LoadedModel) -> None:
    figure = training_plot(loaded.folder.metrics)
    if figure is None:
        gr.Markdown(f"No training log found at `{loaded.folder.metrics}`.")
        return
    gr.Plot(value=figure, label="loss curves", elem_id="loss-plot")
    runs = runs_beside(loaded.folder)
    if len(runs) < 2:
        return
    gr.Markdown("### Runs side by side\nPick the runs to compare (found beside this one).")
    names = [folder.path.name for folder in runs]
    picked = gr.CheckboxGroup(names, value=[loaded.folder.path.name], label="Runs", elem_id="runs")
    figure, table = runs_comparison(runs, [loaded.folder.path.name])
    plot = gr.Plot(value=figure, label="validation loss per character", elem_id="runs-plot")
    summary = gr.Markdown(table, elem_id="runs-table")
    picked.change(functools.partial(runs_comparison, runs), inputs=picked, outputs=[plot, summary])


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

    button.click(
        show_attention, inputs=prompt, outputs=[image, note], api_name="attention", preprocess=False
    )


def port_number(text: str) -> int:
    """A TCP port, 1..65535, from the command line."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 1..65535, got {text!r}")
    return port


def check_address(host: str, port: int) -> None:
    """Refuse, in one line, an address this computer cannot serve on, before Gradio tries.

    (Gradio would report an unknown host as "cannot find empty port".)
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise UserFacingError(f"cannot serve on {host}:{port} ({err.strerror or err})") from None


def command_line() -> argparse.ArgumentParser:
    """The demo's options: sampling defaults, where the model is, and where to serve."""
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
    server.add_argument("--port", type=port_number, default=7860, help="port (default: 7860)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Start the web demo; returns the exit status when the server stops."""
    (sample_config, train_config), options = parse_configs(
        command_line(), [SampleConfig, TrainConfig], argv
    )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    address = f"{options['host']}:{options['port']}"
    try:
        check_address(options["host"], options["port"])
    except UserFacingError as err:
        print_error(PROG, err)
        return 2
    path = checkpoint_to_sample(sample_config.ckpt, train_config.out_dir)
    loaded, problem = None, ""
    try:
        loaded = load_model(path, resolve_device(train_config.device), sample_config.precision)
    except UserFacingError as err:
        problem = f"{err}. Then restart `python app.py`."
        print_error(PROG, UserFacingError(problem))
    demo = build_demo(loaded, problem, sample_config)
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    print(f"{PROG}: serving on http://{address}")
    sys.stdout.flush()
    try:
        demo.launch(
            server_name=options["host"],
            server_port=options["port"],
            ssr_mode=False,
            max_file_size=1,  # the page takes no files: refuse uploads to its API
            footer_links=["api"],
        )
    except (OSError, ValueError) as err:  # the port is taken, the address is not this host's
        print_error(PROG, UserFacingError(f"cannot serve on {address} ({first_line(err)})"))
        return 2
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C as usual again
    raise SystemExit(main())
