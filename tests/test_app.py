"""The web demo: the functions behind each tab, a real browser session, and a load test.

The browser test drives Debian's Chromium (/usr/bin/chromium) through Playwright and saves
screenshots of the three tabs under its temporary folder (the README's pictures come from
`python tools/make_pictures.py`, on a real run).
Run alone: python -m pytest tests/test_app.py
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import app
import train_model
from conftest import PROJECT_ROOT, tiny_train_argv
from support import app_backend
from tokenization import CharTokenizer
from tools.make_pictures import (
    CHROMIUM,
    CHROMIUM_ARGS,
    VIEWPORT,
    free_port,
    serving,
    wait_until_stable,
    wait_until_up,
)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory) -> Path:
    """A small model trained for a moment on a Shakespeare-like text, with a second, shorter
    run beside it (in runs/) to compare it with."""
    from conftest import SMALL_TEXT

    workdir = tmp_path_factory.mktemp("app")
    corpus = workdir / "corpus.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    argv = tiny_train_argv(workdir / "runs" / "main", corpus, max_iters=30, block_size=32)
    assert train_model.main(argv) == 0
    other = tiny_train_argv(workdir / "runs" / "other", corpus, max_iters=10, learning_rate=1e-2)
    assert train_model.main(other) == 0
    return workdir / "runs" / "main" / "ckpt_best.pth"


@pytest.fixture(scope="module")
def loaded(checkpoint_path) -> app_backend.LoadedModel:
    return app_backend.load_model(checkpoint_path, torch.device("cpu"))


# ---------------------------------------------------------------------------- unit tests


def test_facts_describe_the_model(loaded):
    text = app_backend.facts_markdown(loaded)
    assert f"{loaded.model.num_parameters():,} parameters" in text
    assert "2 layers x 2 heads x 32 wide" in text
    assert "characters (" in text
    assert "Trained** 30 steps" in text
    assert "nats per character (" in text
    assert " bits; " in text


def test_prompt_preparation_never_fails():
    tokenizer = CharTokenizer.from_text("abc \n")
    assert app_backend.prepare_prompt("", tokenizer) == ([tokenizer.encode("\n")[0]], "")
    ids, note = app_backend.prepare_prompt("a€b", tokenizer)
    assert ids == tokenizer.encode("ab")
    assert "'€'" in note
    ids, note = app_backend.prepare_prompt("a" * (app_backend.MAX_PROMPT_CHARS + 10), tokenizer)
    assert len(ids) == app_backend.MAX_PROMPT_CHARS
    assert "cut" in note
    ids, _ = app_backend.prepare_prompt("€€", tokenizer)  # nothing known left: start from a newline
    assert ids == tokenizer.encode("\n")


def test_generation_streams_growing_text_and_repeats_with_a_seed(loaded, monkeypatch):
    monkeypatch.setattr(app_backend, "STREAM_INTERVAL_S", 0.0)  # yield after every piece
    updates = list(app_backend.generate_stream(loaded, "All:", 0.8, 0, 1.0, 40, 7))
    texts = [text for text, _ in updates]
    assert len(texts) >= 40
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(texts))
    assert texts[-1].startswith("All:")
    assert len(texts[-1]) == len("All:") + 40
    again = list(app_backend.generate_stream(loaded, "All:", 0.8, 0, 1.0, 40, 7))[-1][0]
    assert again == texts[-1]


def test_bfloat16_model_generates_and_draws_attention(checkpoint_path, monkeypatch):
    monkeypatch.setattr(app_backend, "STREAM_INTERVAL_S", 0.0)
    half = app_backend.load_model(checkpoint_path, torch.device("cpu"), precision="bfloat16")
    assert half.model.token_embedding.weight.dtype == torch.bfloat16
    text = list(app_backend.generate_stream(half, "All:", 0.8, 0, 1.0, 30, 7))[-1][0]
    assert len(text) == len("All:") + 30
    image, _ = app_backend.attention_image(half, "All: speak")
    assert image.width > 200


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "max_new", "seed"),
    [
        (100.0, -5, 0.0, 10, 1),
        (0.0, 10_000, 1.0, 10, None),
        (-1.0, 3, 2.0, -4, math.nan),
        (None, None, None, None, None),
    ],
)
def test_extreme_slider_values_are_clamped(loaded, temperature, top_k, top_p, max_new, seed):
    text, _ = list(
        app_backend.generate_stream(loaded, "All:", temperature, top_k, top_p, max_new, seed)
    )[-1]
    assert text.startswith("All:")
    assert len(text) > len("All:")


@pytest.mark.parametrize(
    ("temperature", "seed"),
    [(math.nan, math.inf), (math.inf, -math.inf), (1e-300, 1e30), (-1e300, math.nan)],
)
def test_api_numbers_out_of_any_range_are_brought_in(loaded, temperature, seed):
    text, _ = list(
        app_backend.generate_stream(loaded, "All:", temperature, math.nan, math.inf, 8, seed)
    )[-1]
    assert text.startswith("All:")
    assert len(text) == len("All:") + 8


def test_max_new_tokens_is_capped(loaded, monkeypatch):
    monkeypatch.setattr(app_backend, "MAX_NEW_TOKENS", 25)
    text, _ = list(app_backend.generate_stream(loaded, "A", 1.0, 0, 1.0, 10**9, 0))[-1]
    assert len(text) == 1 + 25


def test_training_plot_reads_the_metrics_log(checkpoint_path, tmp_path):
    figure = app_backend.training_plot(checkpoint_path.parent / "metrics.jsonl")
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["train", "validation"]
    assert app_backend.training_plot(tmp_path / "missing.jsonl") is None


def test_runs_beside_the_model_are_offered_for_comparison(loaded):
    runs = app_backend.runs_beside(loaded.folder)
    assert [folder.path.name for folder in runs] == ["main", "other"]
    figure, table = app_backend.runs_comparison(runs, ["main", "other"])
    for ax in figure.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["main", "other"]
    assert "train/learning_rate" in table  # the setting in which the two runs differ
    assert app_backend.runs_comparison(runs, []) == (None, "")


def test_attention_image_has_a_heatmap_per_layer_and_head(loaded, monkeypatch):
    image, note = app_backend.attention_image(loaded, "All: speak")
    assert image.width > 200
    assert image.height > 200
    assert note == ""
    monkeypatch.setattr(app_backend, "MAX_ATTENTION_TOKENS", 5)
    _, note = app_backend.attention_image(loaded, "All: speak, speak")
    assert "first 5 tokens" in note


def test_token_labels_show_invisible_characters():
    tokenizer = CharTokenizer.from_text("a \n")
    assert app_backend.token_labels(tokenizer, tokenizer.encode("a \n")) == ["a", "␣", "↵"]


def test_demo_builds_with_and_without_a_model(loaded):
    import gradio as gr

    assert isinstance(app.build_demo(loaded), gr.Blocks)
    empty = app.build_demo(None, "checkpoint out/ckpt_best.pth not found")
    assert "not found" in json.dumps(empty.config)


# ---------------------------------------------------------------------------- a real server


@pytest.fixture
def server(checkpoint_path):
    """app.py running in a subprocess on a free loopback port; yields its URL."""
    with serving(f"--ckpt={checkpoint_path}") as url:
        yield url


@pytest.mark.slow
def test_app_without_a_checkpoint_explains_how_to_train(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "app.py"), f"--port={port}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    config = r.read().decode()
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("app.py did not start without a checkpoint")
                time.sleep(0.25)
        assert "python train_model.py" in config
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert "python train_model.py" in output


@pytest.mark.slow
def test_browser_generates_text_and_shows_attention(server, tmp_path):
    if not CHROMIUM.exists():
        message = f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a skip there would hide a broken setup
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(server)
        page.locator("#prompt textarea").fill("First Citizen:")
        page.locator("#generate").click()
        output = page.locator("#output textarea")
        expect(output).to_have_value(re.compile(r"^First Citizen:[\s\S]{100,}"), timeout=120_000)
        wait_until_stable(output)  # the whole sample, not a moment of the stream
        page.screenshot(path=shots / "generate.png", full_page=True)

        page.get_by_role("tab", name="Training").click()
        expect(page.locator("#loss-plot")).to_be_visible(timeout=30_000)
        table = page.locator("#runs-table")
        expect(table).to_contain_text("main")
        expect(table).not_to_contain_text("other")
        before = page.locator("#runs-plot img").get_attribute("src")
        page.locator("#runs").get_by_label("other").check()  # a second run's curve joins
        expect(table).to_contain_text("other", timeout=30_000)
        expect(page.locator("#runs-plot img")).not_to_have_attribute("src", before)
        page.screenshot(path=shots / "training.png", full_page=True)

        page.get_by_role("tab", name="Attention").click()
        page.locator("#show-attention").click()
        heatmap = page.locator("#attention-image img")
        expect(heatmap).to_be_visible(timeout=60_000)
        assert heatmap.evaluate("img => img.naturalWidth") > 200
        page.screenshot(path=shots / "attention.png", full_page=True)
        browser.close()
    for name in ("generate", "training", "attention"):
        assert (shots / f"{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_uploads_are_refused(server):
    boundary = "minigptboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\n{'x' * 4096}\r\n--{boundary}--\r\n"
    ).encode()
    request = urllib.request.Request(
        f"{server}/gradio_api/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 413


@pytest.mark.slow
def test_sixteen_concurrent_generations_all_complete(server):
    from gradio_client import Client

    client = Client(server, verbose=False, analytics_enabled=False, download_files=False)
    prompts = ["All:" if i % 2 else "First Citizen:" for i in range(16)]

    def generate(prompt: str) -> tuple[str, float]:
        start = time.perf_counter()
        job = client.submit(prompt, 0.8, 0, 1.0, 200, len(prompt), api_name="/generate")
        text, _ = job.result(timeout=120)
        return text, time.perf_counter() - start

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(generate, prompts))
    total = time.perf_counter() - started
    latencies = sorted(seconds for _, seconds in results)
    print(
        f"16 concurrent requests of 200 tokens: all done in {total:.1f} s; latency median "
        f"{latencies[8]:.2f} s, max {latencies[-1]:.2f} s"
    )
    for (text, _), prompt in zip(results, prompts, strict=True):
        assert text.startswith(prompt)
        assert len(text) == len(prompt) + 200  # one character per token
    with urllib.request.urlopen(server, timeout=5) as response:
        assert response.status == 200  # the server is still up


def call_api(url: str, name: str, values: list) -> list:
    """A call of the demo's API with raw JSON (NaN and Infinity included); its last output."""
    body = json.dumps({"data": values}).encode()  # json writes NaN as NaN, as a browser may not
    request = urllib.request.Request(
        f"{url}/gradio_api/call/{name}", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/{name}/{event}", timeout=120) as response:
        stream = response.read().decode()
    assert "event: error" not in stream, stream
    return json.loads(stream.strip().splitlines()[-1].removeprefix("data:"))


@pytest.mark.slow
def test_api_values_that_are_not_numbers_get_a_note_not_an_error(checkpoint_path, tmp_path):
    log = tmp_path / "app.log"
    port = free_port()
    command = [sys.executable, str(PROJECT_ROOT / "app.py"), f"--ckpt={checkpoint_path}"]
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, f"--port={port}"], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process, timeout=90)
        cases = [
            ["First", math.nan, "ten", None, 20, 1.5],
            ["First", 0.8, 5, 1.0, "many", "seed"],
            [None, None, None, None, None, None],
            ["\ud800First", math.inf, -1e300, 1e300, 1e300, -5],
        ]
        for case in cases:
            text, note = call_api(url, "generate", case)
            assert isinstance(text, str)
            assert text
            if any(isinstance(v, str) or v is None or v != v for v in case[1:5]):
                assert "not numbers, so their defaults were used" in note
        _, note = call_api(url, "attention", [12345])
        assert "the prompt was not text" in note
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "Traceback" not in log.read_text()
