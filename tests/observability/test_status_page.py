"""The status page in a real browser: Debian's headless Chromium driven by Selenium.

Against the observed run (conftest.py: PostgreSQL, API process, workers, manager): the page's
numbers equal SQL counts, the failure links to its log, a file is searched by its path and shows
every copy, and a screenshot is taken (into docs/img/status-page.png, the README's picture,
only with CCAT_UPDATE_SCREENSHOT=1, so that a test run does not change the repository).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import PackageState, PhysicalCopyStatus, Status
from tests.observability.conftest import ObservedStack

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "img" / "status-page.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's chromium + chromium-driver packages)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs Selenium: pip install selenium")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists() and not shutil.which(Path(path).name):
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver ({package})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.add_argument("--disable-dev-shm-usage")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _count(stack: ObservedStack, query) -> int:
    with Session(stack.stack.engine) as s:
        return int(s.scalar(query))


def _wait(driver, css: str, timeout: float = 30):
    """The element ``css`` once the page showing it has loaded (clicks navigate asynchronously)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text.strip()


def test_without_a_token_the_page_asks_for_one(observed: ObservedStack) -> None:
    r = httpx.get(f"{observed.api.base_url}/ui", follow_redirects=False)
    assert r.status_code == 303 and "/ui/login" in r.headers["location"]
    r = httpx.post(
        f"{observed.api.base_url}/ui/login",
        data={"token": "ccat_nonsense", "next": "/ui"},
        follow_redirects=False,
    )
    assert r.status_code == 401 and "refused" in r.text
    r = httpx.post(
        f"{observed.api.base_url}/ui/login",
        data={"token": observed.reader_token, "next": "https://elsewhere.example/"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui"  # no open redirect
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_status_page_in_chromium(observed: ObservedStack, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    base = observed.api.base_url
    c = m.RawDataPackage
    # sign in through the form, as an operator would
    driver.get(f"{base}/ui")
    _wait(driver, "#token")
    assert "/ui/login" in driver.current_url
    driver.find_element(By.ID, "token").send_keys(observed.reader_token)
    driver.find_element(By.ID, "login").click()
    _wait(driver, "#stages")
    assert driver.current_url.rstrip("/").endswith("/ui"), driver.current_url

    # overview: the numbers are the database's
    expected = {
        "count-raw_data_package-completed": select(func.count())
        .select_from(c)
        .where(c.status == Status.COMPLETED),
        "count-raw_data_package-failed": select(func.count())
        .select_from(c)
        .where(c.status == Status.FAILED),
        "count-data_transfer-completed": select(func.count())
        .select_from(m.DataTransfer)
        .where(m.DataTransfer.status == Status.COMPLETED),
        "count-unpack-completed": select(func.count())
        .select_from(m.DataTransfer)
        .where(m.DataTransfer.unpack_status == Status.COMPLETED),
        "count-long_term_archive_transfer-completed": select(func.count())
        .select_from(m.LongTermArchiveTransfer)
        .where(m.LongTermArchiveTransfer.status == Status.COMPLETED),
        "state-archived": select(func.count())
        .select_from(c)
        .where(c.state == PackageState.ARCHIVED),
    }
    for element_id, query in expected.items():
        assert int(_text(driver, element_id)) == _count(observed, query), element_id
    assert int(_text(driver, "count-raw_data_package-failed")) == 1
    assert int(_text(driver, "state-archived")) >= 2
    assert _text(driver, "backlog-filing-ccat") == "0"
    assert driver.find_element(By.ID, "throughput").find_elements(By.CSS_SELECTOR, "rect")
    shot = SCREENSHOT if os.environ.get("CCAT_UPDATE_SCREENSHOT") == "1" else tmp_path / "page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # what needs a person: the failed package's notice, and the channel that was told
    notice = driver.find_element(By.CSS_SELECTOR, '#notices tr[data-kind="failed"]')
    assert observed.failed_package and observed.failed_package in notice.text
    assert "FAILED for good" in notice.text and "(log: " in notice.text
    assert notice.text.rstrip().endswith("webhook")

    # the failure, its reason and its log
    row = driver.find_element(By.CSS_SELECTOR, '#failures tr[data-stage="raw_data_package"]')
    assert "failed" in row.text and "(log: " in row.text
    row.find_element(By.LINK_TEXT, "log").click()
    _wait(driver, "#log-text")
    assert "Traceback" in _text(driver, "log-text")
    driver.save_screenshot(str(tmp_path / "failure.png"))  # for a person reading a failed run
    assert _text(driver, "reason").split(":")[0] in _text(driver, "log-text")

    # storage per site and location
    driver.get(f"{base}/ui/storage")
    with Session(observed.stack.engine) as s:
        loc_id = observed.stack.location_id("cologne", "buffer")
        live = s.scalar(
            select(func.count())
            .select_from(m.PhysicalCopy)
            .where(
                m.PhysicalCopy.data_location_id == loc_id,
                m.PhysicalCopy.status.in_([PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED]),
            )
        )
    assert int(_text(driver, "copies-cologne-buffer")) == live

    # search a file by its path: every copy of it and its package's history
    with Session(observed.stack.engine) as s:
        f = s.get(m.RawDataFile, observed.good_files[-1])
        assert f is not None
        path, file_id = f.relative_path, str(f.id)
        copies = s.scalars(
            select(m.PhysicalCopy).where(m.PhysicalCopy.raw_data_file_id == f.id)
        ).all()
        pkg_copies = s.scalar(
            select(func.count())
            .select_from(m.PhysicalCopy)
            .where(m.PhysicalCopy.raw_data_package_id == f.raw_data_package_id)
        )
    driver.get(f"{base}/ui/search")
    driver.find_element(By.ID, "q").send_keys(path)
    driver.find_element(By.ID, "search").click()
    card = _wait(driver, f'.file[data-file-id="{file_id}"]')
    rows = card.find_elements(By.CSS_SELECTOR, "#file-copies tr.copy")
    assert len(rows) == len(copies) >= 1  # its SOURCE copy (deleted once archived)
    shown = {(r.find_element(By.CSS_SELECTOR, ".status").text) for r in rows}
    assert shown == {str(x.status) for x in copies}
    assert len(card.find_elements(By.CSS_SELECTOR, "#package-copies tr.copy")) == pkg_copies
    driver.save_screenshot(str(tmp_path / "search.png"))
    history = card.find_element(By.CSS_SELECTOR, ".history").text
    assert "filed" in history and "archive transfer" in history and "ARCHIVED" in history
    # the same file by its UUID
    driver.get(f"{base}/ui/search?q={file_id}")
    assert driver.find_elements(By.CSS_SELECTOR, f'.file[data-file-id="{file_id}"]')
    driver.get(f"{base}/ui/search?q=no/such/file.dat")
    assert driver.find_elements(By.ID, "no-results")
