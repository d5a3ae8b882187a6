"""Open an HTML report in headless Chromium and save a screenshot of the whole page.

    python -m scripts.screenshot_report reports/demo/report.html docs/evaluation-report.png

Uses Debian's chromium and chromedriver (`make system-deps`) through selenium. The test suite opens
every evaluation report this way (tests/test_evaluate.py).
"""

from __future__ import annotations

import argparse
import base64
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def open_report(html: str | Path, screenshot: str | Path, width: int = 1280) -> dict:
    """Load `html` in headless Chromium, save a full-page PNG to `screenshot`, and return what the page
    showed: {"title", "sections" (h2 texts), "images", "broken_images" (srcs that did not load), "height"}."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*HEADLESS_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1000"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            driver.get(Path(html).resolve().as_uri())
            state = driver.execute_script(
                "return {title: document.title,"
                " sections: Array.from(document.querySelectorAll('h2')).map(e => e.textContent),"
                " images: document.images.length,"
                " broken_images: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                "   .map(i => i.getAttribute('src')),"
                " height: document.documentElement.scrollHeight}")
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                                      "clip": {"x": 0, "y": 0, "width": width,
                                                                               "height": state["height"], "scale": 1}})
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        finally:
            driver.quit()
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.screenshot_report", description=__doc__.split("\n")[0])
    parser.add_argument("html")
    parser.add_argument("png")
    args = parser.parse_args(argv)
    state = open_report(args.html, args.png)
    print(f"{state['title']}: {len(state['sections'])} sections, {state['images']} images "
          f"({len(state['broken_images'])} broken), {state['height']} px -> {args.png}")
    return 0 if not state["broken_images"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
