"""Draw the README's pictures from a real run: its loss curve and the web demo's three tabs.

    python tools/make_pictures.py                        # the latest run under out/
    python tools/make_pictures.py --out_dir out/default --to docs

Copies the run's loss.png, then starts app.py on the run and photographs the Generate,
Training and Attention tabs in Debian's Chromium (/usr/bin/chromium), driven by Playwright
(`pip install -r requirements-dev.txt`; no browser download).
"""

from __future__ import annotations

import signal

# Ctrl-C while the libraries below still load: the default action ends the program at once,
# without a traceback (Python's KeyboardInterrupt comes back before main runs).
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys
from pathlib import Path

# Run by its path (python tools/make_pictures.py), Python looks for imports in tools/; the
# project's modules sit one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from support.common import UserFacingError, check_figure_destination, print_error
from support.run_folder import chosen_run

PROG = "make_pictures.py"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# Headless, and quiet: no calls to Google's services, which a closed network would refuse.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 900}
PICTURES = ("loss.png", "app_generate.png", "app_training.png", "app_attention.png")


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(*options: str, cwd: Path | None = None, timeout: float = 90) -> Iterator[str]:
    """app.py with these options, on a free loopback port, until the block ends; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "app.py"), *options, f"--port={port}"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, timeout)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Return once the page answers; raise, with what app.py printed, if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"app.py did not start:\n{process.stdout.read()}")
        time.sleep(0.25)


def wait_until_stable(textbox: Any, timeout: float = 60.0) -> None:
    """Wait until a streaming text box stops changing: the whole sample, not a moment of it."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        current = textbox.input_value()
        if current == previous:
            return
        previous = current
        time.sleep(1.0)


def photograph_tabs(url: str, folder: Path, prompt: str = "ROMEO:") -> None:
    """Generate from the prompt, then photograph each tab into folder/app_<tab>.png."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        page.locator("#prompt textarea").fill(prompt)
        page.locator("#generate").click()
        output = page.locator("#output textarea")
        expect(output).not_to_have_value(prompt, timeout=120_000)
        wait_until_stable(output)
        page.screenshot(path=folder / "app_generate.png", full_page=True)
        page.get_by_role("tab", name="Training").click()
        expect(page.locator("#loss-plot")).to_be_visible(timeout=30_000)
        page.screenshot(path=folder / "app_training.png", full_page=True)
        page.get_by_role("tab", name="Attention").click()
        page.locator("#show-attention").click()
        expect(page.locator("#attention-image img")).to_be_visible(timeout=60_000)
        page.screenshot(path=folder / "app_attention.png", full_page=True)
        browser.close()


def command_line() -> argparse.ArgumentParser:
    """Which run, and where the pictures go."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out_dir", default="", help="the run (default: the latest under out/)")
    parser.add_argument("--to", default="docs", help="folder for the pictures (default: docs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Draw the pictures; returns the exit status."""
    args = command_line().parse_args(argv)
    run, folder = chosen_run(args.out_dir), Path(args.to)
    try:
        if not run.loss_plot.is_file():
            raise UserFacingError(f"{run.path} holds no loss.png; train with train_model.py")
        if not CHROMIUM.is_file():
            raise UserFacingError(f"needs Debian's chromium at {CHROMIUM} (apt-get install it)")
        for name in PICTURES:  # a picture replaces only a picture
            check_figure_destination(folder / name)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.loss_plot, folder / "loss.png")
        with serving(f"--out_dir={run.path}") as url:
            photograph_tabs(url, folder)
    except (UserFacingError, OSError, RuntimeError) as err:
        print_error(PROG, err)
        return 2
    print(f"{PROG}: drew loss.png and the demo's three tabs of {run.path} into {folder}/")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C as usual again
    raise SystemExit(main())
