"""The derivation book in a real browser: headless Chromium (Debian's chromium package,
installed by .ci/install-test-tools) opens every page from the file system and the tests
ask it what a reader would see.  Skipped, with the reason, where no Chromium is found."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from book_support import built_book

from cnnderive.book.browser import Browser, BrowserError, find_chromium

PHONE, LAPTOP, PROJECTOR = 390, 1280, 1920


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.skip("no Chromium here: install Debian's chromium (.ci/install-test-tools does)")
    try:
        opened = Browser()
    except BrowserError as error:
        pytest.skip(f"Chromium does not start here: {error}")
    with opened:
        yield opened


PAGE_FACTS = """(() => {
  const rect = (e) => e.getBoundingClientRect();
  return {
    katex: document.querySelectorAll('.katex').length,
    errors: document.querySelectorAll('.katex-error').length,
    unrendered: [...document.querySelectorAll('.katex-html')].filter((e) => rect(e).width === 0).length,
    fonts: document.fonts.check('16px KaTeX_Main') && document.fonts.check('16px KaTeX_Math'),
    links: [...document.querySelectorAll('a[href]')].map((a) => a.href),
    ids: [...document.querySelectorAll('[id]')].map((e) => e.id),
    scrollWidth: document.documentElement.scrollWidth,
    width: window.innerWidth,
  };
})()"""


@pytest.fixture(scope="module")
def visits(browser):
    """Each page opened once at a laptop's width: (path, requests, failed requests, facts)."""
    book = built_book()
    seen = []
    for path in sorted(book.pages):
        requests = browser.open(path.as_uri(), width=LAPTOP)
        seen.append((path, requests, browser.failed_requests(), browser.evaluate(PAGE_FACTS)))
    return book, seen


def test_every_page_renders_its_formulas_without_katex_errors(visits):
    book, seen = visits
    for path, _, _, facts in seen:
        expected = book.formulas.get(path.relative_to(book.out).as_posix(), 0)
        assert facts["errors"] == 0, path
        assert facts["katex"] == expected, path
        assert facts["unrendered"] == 0, path
        if expected:
            assert facts["fonts"], f"{path}: KaTeX's fonts did not load"
    # The layer pages hold most of the book's formulas.
    assert sum(facts["katex"] for path, _, _, facts in seen if path.parent.name == "layers") > 200


def test_no_page_loads_anything_from_the_network_and_every_resource_loads(visits):
    _, seen = visits
    for path, requests, failed, _ in seen:
        assert requests[0] == path.as_uri()
        remote = [url for url in requests if not url.startswith(("file://", "data:"))]
        assert not remote, f"{path} asked the network for {remote}"
        assert not failed, f"{path}: {failed}"


def test_every_link_resolves(visits):
    _, seen = visits
    for path, _, _, facts in seen:
        assert facts["links"], path
        for link in facts["links"]:
            url = urlparse(link)
            assert url.scheme == "file", f"{path}: {link} leaves the book"
            target = Path(unquote(url.path))
            assert target.is_file(), f"{path}: {link} leads nowhere"
            if url.fragment and target == path:
                assert url.fragment in facts["ids"], f"{path}: no #{url.fragment}"


@pytest.mark.parametrize("width", [PHONE, PROJECTOR])
def test_no_page_scrolls_sideways_on_a_phone_or_a_projector(browser, width):
    """Wide formulas, tables and code scroll inside their own boxes; the page does not."""
    for path in sorted(built_book().pages):
        browser.open(path.as_uri(), width=width, mobile=width == PHONE)
        facts = browser.evaluate(PAGE_FACTS)
        assert facts["scrollWidth"] <= facts["width"], f"{path} at {width} px"


def test_a_screenshot_of_the_conv2d_page_is_not_blank(browser):
    from PIL import Image

    book = built_book()
    browser.open((book.out / "layers" / "conv2d.html").as_uri(), width=LAPTOP, height=900)
    picture = Image.open(io.BytesIO(browser.screenshot(full_page=False))).convert("L")
    assert picture.size == (LAPTOP, 900)
    histogram = picture.histogram()
    dark = sum(histogram[:100])  # text and formulas
    white = histogram[255]
    total = LAPTOP * 900
    assert dark > 0.01 * total, "almost no dark pixels: no text was drawn"
    assert white > 0.5 * total, "mostly not white: not the page's background"
