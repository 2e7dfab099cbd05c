"""`tunesmith ui` in real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): the pages
of a tiny finished run render with their charts and no console errors; Try it answers with both models; the
new-run form shows every config error with its path; a run launched from the form shows its curve growing,
stops with a checkpoint, resumes and shows its verdict. Skipped, with the reason, where Chromium or its driver
is not installed."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time

import pytest
from test_ui import runs_root, tiny_cfg  # noqa: F401 (the module's finished runs)

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium")
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
STEPS = 400  # the launched run: long enough to be seen growing and stopped midway on 2 CPU cores
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)


@contextlib.contextmanager
def serving(root):
    """`tunesmith ui --runs root` on a free loopback port, in a thread: its URL."""
    import uvicorn

    from tunesmith.ui.app import create_app
    from tunesmith.ui.guard import Access

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(root, Access("127.0.0.1", port, None)), port=port))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(runs_root):  # noqa: F811
    with serving(runs_root) as url:
        yield url


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


def until(check, timeout: float, every: float = 0.2):
    """check()'s first truthy value within timeout seconds (the test fails otherwise)."""
    end = time.time() + timeout
    while time.time() < end:
        with contextlib.suppress(Exception):  # the page may be reloading under the query
            if value := check():
                return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


def visit(browser, url: str, css: str, timeout: float = 30) -> list:
    """The elements matching css on the page at url, once there are any: a first navigation in a fresh headless
    Chromium has returned before its document was parsed (seen once in CI: the runs table looked empty)."""
    from selenium.webdriver.common.by import By

    browser.get(url)
    try:
        return until(lambda: browser.find_elements(By.CSS_SELECTOR, css), timeout)
    except AssertionError:
        raise AssertionError(f"no {css} on {url} within {timeout} s; the page:\n{browser.page_source[:2000]}") from None


def test_runs_and_run_pages_render_with_charts(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    names = [a.text for a in visit(browser, server + "/", "#runs a")]
    assert names[:2] == ["tiny-b", "tiny"]  # newest first
    visit(browser, server + "/runs/tiny", "#verdict")

    def drawn() -> list:
        charts = browser.find_elements(By.CSS_SELECTOR, "#charts .chart")
        named = {c.get_attribute("data-name") for c in charts} >= {"train loss", "validation loss"}
        drew = all(c.find_elements(By.TAG_NAME, "canvas") for c in charts)  # uPlot drew each
        return charts if named and drew else []

    until(drawn, 15)
    assert browser.find_elements(By.CSS_SELECTOR, "#histograms canvas")
    assert "rougeL" in browser.find_element(By.ID, "verdict").text
    assert errors(browser) == []
    assert browser.save_screenshot(str(tmp_path / "run.png"))


def test_the_form_shows_every_error_with_its_path(server, browser):
    from selenium.webdriver.common.by import By

    (box,) = visit(browser, server + "/new?source=tiny", "#yaml")
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


def test_the_compare_page_shows_both_runs_checked_on_the_runs_page(server, browser):
    from selenium.webdriver.common.by import By

    for box in visit(browser, server + "/", '#runs input[name="run"]'):
        box.click()
    browser.find_element(By.CSS_SELECTOR, "#compare-form button").click()
    until(lambda: "/compare?" in browser.current_url, 15)
    headers = [th.text for th in browser.find_elements(By.TAG_NAME, "th")]
    assert "tiny" in headers and "tiny-b" in headers
    assert all(img.get_attribute("naturalWidth") != "0" for img in browser.find_elements(By.TAG_NAME, "img"))
    assert browser.find_elements(By.TAG_NAME, "img") and errors(browser) == []


def test_the_form_previews_the_data_before_launch(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    visit(browser, server + "/new?source=tiny", "#preview")[0].click()
    box = browser.find_element(By.ID, "data-preview")
    until(lambda: box.get_attribute("data-state") == "done", 120)
    titles = [h.text for h in box.find_elements(By.TAG_NAME, "h3")]
    assert "Rows" in titles and "train: first 5 rows as parsed" in titles, titles
    assert "reverse the words" in box.text and errors(browser) == []
    assert browser.save_screenshot(str(tmp_path / "preview.png"))


def test_try_it_answers_with_the_base_and_the_fine_tuned_model(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    visit(browser, server + "/runs/tiny", "#try-text")[0].send_keys("one two three")
    browser.find_element(By.ID, "try-go").click()
    for which in ("base", "finetuned"):
        box = browser.find_element(By.ID, "try-" + which)
        until(lambda box=box: box.get_attribute("data-state") == "done", 120)
        assert box.text.strip() and "error" not in (box.get_attribute("class") or ""), (which, box.text)
    assert browser.find_element(By.ID, "try-go").is_enabled()
    assert errors(browser) == []
    assert browser.save_screenshot(str(tmp_path / "try.png"))


def test_a_run_launched_from_the_form_grows_its_curve_stops_resumes_and_shows_its_verdict(
    browser, tmp_path, tiny_llama
):
    import yaml
    from selenium.webdriver.common.by import By

    root = tmp_path / "runs"
    root.mkdir()
    cfg = tiny_cfg(tmp_path, tiny_llama, "live", steps=STEPS)
    cfg["train"].update(save_every=10, log_every=1)
    cfg["eval"].update(every=None, samples=1)
    run = root / "live"
    with serving(root) as url:
        (box,) = visit(browser, url + "/new", "#yaml")
        browser.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));",
            box,
            yaml.safe_dump(cfg),
        )
        until(lambda: browser.find_element(By.ID, "launch").is_enabled(), 15)
        browser.find_element(By.ID, "launch").click()
        until(lambda: browser.current_url.endswith("/runs/live"), 15)

        def points() -> int:
            chart = browser.find_elements(By.CSS_SELECTOR, '#charts .chart[data-name="train loss"]')
            return int(chart[0].get_attribute("data-points")) if chart else 0

        first = until(points, 120)
        until(lambda: points() > first, 60)  # the live stream redraws the curve as steps are logged
        until(lambda: any(run.glob("checkpoints/step-*")), 60)
        browser.find_element(By.ID, "stop").click()
        until(lambda: json.loads((run / "run.json").read_text()).get("status") == "interrupted", 60)
        stopped_at = json.loads((run / "run.json").read_text())["step"]
        assert 0 < stopped_at < STEPS and any(run.glob("checkpoints/step-*"))
        until(lambda: browser.find_element(By.ID, "resume").is_enabled(), 30)  # the page reloaded as stopped
        browser.find_element(By.ID, "resume").click()
        verdict = until(lambda: browser.find_element(By.ID, "verdict").text, 300)
        assert "rougeL" in verdict
        assert json.loads((run / "run.json").read_text())["steps"] == STEPS
        assert errors(browser) == []
        assert browser.save_screenshot(str(tmp_path / "live.png"))
