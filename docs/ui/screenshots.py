"""Screenshots of `tunesmith ui` pages for the README, in headless Chromium (Debian's chromium + chromium-driver).

Run: .venv/bin/python docs/ui/screenshots.py RUNS_FOLDER RUN [--other RUN] [--search NAME] [--curve NAME]
         [--try-run RUN --try-text TEXT]                                   (writes docs/ui/*.png)
The UI must not be running already on the port this picks; it starts its own server in-process.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tunesmith.ui.app import create_app
from tunesmith.ui.guard import Access

OUT = Path(__file__).parent


def wait_done(driver, element_id: str, timeout: float = 600) -> None:
    end = time.time() + timeout
    while driver.find_element(By.ID, element_id).get_attribute("data-state") != "done" and time.time() < end:
        time.sleep(0.5)


def shot(driver, name: str, scroll_to: str | None = None) -> None:
    if scroll_to:
        driver.execute_script("document.getElementById(arguments[0]).scrollIntoView()", scroll_to)
        time.sleep(0.3)
    driver.save_screenshot(str(OUT / f"{name}.png"))
    print(OUT / f"{name}.png")


def main(a: argparse.Namespace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(a.root, Access("127.0.0.1", port, None)), port=port))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1500"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    url = f"http://127.0.0.1:{port}"
    pages = {"runs": "/", "run": f"/runs/{a.run}", "new": f"/new?source={a.run}"}
    if a.other:
        pages["compare"] = f"/compare?run={a.run}&run={a.other}"
    if a.search:
        pages["search"] = f"/search/{a.search}"
    if a.curve:
        pages["curve"] = f"/curve/{a.curve}"
    for name, path in pages.items():
        driver.get(url + path)
        time.sleep(1.5)  # charts, key help and the first validation
        shot(driver, name)
    driver.get(f"{url}/new?source={a.run}")
    driver.find_element(By.ID, "preview").click()
    wait_done(driver, "data-preview")
    shot(driver, "preview", scroll_to="preview")
    if a.try_run:
        driver.get(f"{url}/runs/{a.try_run}")
        driver.find_element(By.ID, "try-text").send_keys(a.try_text)
        driver.find_element(By.ID, "try-go").click()
        for box in ("try-base", "try-finetuned"):
            if driver.find_elements(By.ID, box):
                wait_done(driver, box)
        shot(driver, "try", scroll_to="try-text")
    driver.quit()
    server.should_exit = True


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("run")
    ap.add_argument("--other")
    ap.add_argument("--search")
    ap.add_argument("--curve")
    ap.add_argument("--try-run")
    ap.add_argument("--try-text", default="")
    main(ap.parse_args())
