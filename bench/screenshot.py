"""A screenshot of an HTML page in headless Chromium (Debian's ``chromium``, driven by Playwright as the browser tests
drive it): how docs/img/circuit.png was made from a circuit run's circuit.html.

    .venv/bin/python bench/screenshot.py runs/ioi/circuit.html docs/img/circuit.png --width 1400 --height 760
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=700)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(args.page.resolve().as_uri())
        page.screenshot(path=str(args.png))
        browser.close()
    if errors:
        raise SystemExit(f"the page threw: {errors}")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
