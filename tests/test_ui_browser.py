"""`tunesmith ui` in real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): the pages
of a tiny finished run render with their charts and no console errors, and the new-run form shows every
config error with its path. Skipped, with the reason, where Chromium or its driver is not installed."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
from test_ui import runs_root  # noqa: F401 (the module's finished runs)

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium")
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)


@pytest.fixture(scope="module")
def server(runs_root):  # noqa: F811
    import uvicorn

    from tunesmith.ui.app import create_app
    from tunesmith.ui.guard import Access

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(runs_root, Access("127.0.0.1", port, None)), port=port))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1400"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def errors(browser) -> list:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_runs_and_run_pages_render_with_charts(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    names = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#runs a")]
    assert names[:2] == ["tiny-b", "tiny"]  # newest first
    browser.get(server + "/runs/tiny")
    time.sleep(0.5)
    charts = browser.find_elements(By.CSS_SELECTOR, "#charts .chart")
    assert {c.get_attribute("data-name") for c in charts} >= {"train loss", "validation loss"}
    assert all(c.find_elements(By.TAG_NAME, "canvas") for c in charts)  # uPlot drew each
    assert browser.find_elements(By.CSS_SELECTOR, "#histograms canvas")
    assert "rougeL" in browser.find_element(By.ID, "verdict").text
    assert errors(browser) == []
    assert browser.save_screenshot(str(tmp_path / "run.png"))


def test_the_form_shows_every_error_with_its_path(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server + "/new?source=tiny")
    box = browser.find_element(By.ID, "yaml")
    assert "name: tiny" in box.get_attribute("value")
    browser.execute_script(
        "arguments[0].value = arguments[0].value.replace('max_steps: 8', 'max_steps: -3')"
        ".replace('lr: 0.01', 'lr: 7').replace('r: 4', 'r: zero');"
        "arguments[0].dispatchEvent(new Event('input'));",
        box,
    )
    deadline = time.time() + 10
    while time.time() < deadline and len(browser.find_elements(By.CSS_SELECTOR, "#problems li")) < 3:
        time.sleep(0.2)
    shown = [li.text.split(":")[0] for li in browser.find_elements(By.CSS_SELECTOR, "#problems li")]
    assert sorted(shown) == ["peft.r", "train.lr", "train.max_steps"]
    assert not browser.find_element(By.ID, "launch").is_enabled()
    assert errors(browser) == []
