"""The service's web page in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Upload a face, invert it with 3 style mixes, move an edit slider and see the re-synthesized image;
a screenshot of the page is saved under pytest's tmp path and its path printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e '.[serve]'")
pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[serve]'")

from _serve_app import service  # noqa: E402


pytestmark = pytest.mark.slow  # a Ray Serve app per test process (tens of seconds to start)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} not found: CI installs Debian's chromium (.ci/run)")
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_page_inverts_mixes_and_edits(browser, shared, tmp_path):
    url = service()
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_selector("#sliders input[data-edit='dir_a']")
    assert "32 px, 8 styles" in page.inner_text("#model")

    page.set_input_files("#image", str(shared / "data" / "faces" / "aligned" / "psp_input_img.jpg"))
    page.fill("#n_outputs", "3")
    page.click("#invert")
    page.wait_for_selector("body[data-inverted='1']", timeout=120_000)
    assert page.locator("#mixes img.mix").count() == 3
    for sel in ("#input", "#inversion", "#mixes img.mix >> nth=2"):
        assert page.eval_on_selector(sel, "img => img.complete && img.naturalWidth > 0"), sel
    assert page.eval_on_selector("#inversion", "img => img.naturalWidth") == 32
    before = page.get_attribute("#edited", "src")

    page.fill("#edit-dir_a", "3")  # a range input: sets the value and fires `input`
    page.wait_for_selector("body[data-edited]", timeout=60_000)
    assert page.get_attribute("#edited", "src") != before
    assert page.eval_on_selector("#edited", "img => img.complete && img.naturalWidth > 0")
    assert "dir_a" in page.inner_text("#status")
    assert not errors, errors

    shot = tmp_path / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot of the page: {shot}")
    assert shot.stat().st_size > 10_000
