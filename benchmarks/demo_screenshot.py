"""Drive the demo in a real headless Chromium (Debian's `chromium`, through Playwright): pick a class and a seed,
generate, wait for every image, read the live latencies and save a screenshot of the page.

    .venv/bin/python benchmarks/demo_screenshot.py RELEASE_FOLDER [RELEASE_FOLDER ...] --output demo/screenshot.png

``tests/test_demo.py`` runs ``drive_demo`` on the tiny test releases; the committed screenshot comes from the
default benchmark run's releases (`dit-optimum release benchmark-results dit-optimum --dry-run release`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

BROWSER_ARGUMENTS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]


def drive_demo(url: str, class_name: str, seed: int, screenshot: Path, columns: int) -> list[float]:
    """Open ``url``, choose ``class_name`` and ``seed``, generate; return the latencies the page shows."""
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("Debian's chromium is needed: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGUMENTS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            choice = page.get_by_role("combobox", name="Class")
            choice.click()
            page.get_by_role("option", name=class_name, exact=True).click()
            expect(choice).to_have_value(class_name)
            page.get_by_label("Seed", exact=True).fill(str(seed))
            page.get_by_role("button", name="Generate", exact=True).click()
            expect(page.locator("#numbers").get_by_role("gridcell").first).not_to_have_text("", timeout=120_000)
            images = page.locator("#images img")
            expect(images.first).to_be_visible(timeout=120_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            cells = page.locator("#numbers").get_by_role("gridcell").all_inner_texts()
            latencies = [float(cells[i]) for i in range(1, len(cells), columns)]
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            return latencies
        finally:
            browser.close()


def launch(sources: list[str]):
    """The demo over ``sources``, served on a free port of 127.0.0.1; returns (app, url)."""
    from dit_optimum.hub.demo import build_demo

    demo = build_demo(sources)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


def main() -> None:
    from dit_optimum.hub.demo import TABLE_HEADERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="release folders or repo ids (the first two are compared)")
    parser.add_argument("--output", type=Path, default=Path("demo/screenshot.png"))
    parser.add_argument("--class-name", default="7")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    demo, url = launch(args.sources)
    try:
        latencies = drive_demo(url, args.class_name, args.seed, args.output, len(TABLE_HEADERS))
    finally:
        demo.close()
    print(f"Latencies shown: {latencies}; screenshot: {args.output}")


if __name__ == "__main__":
    main()
