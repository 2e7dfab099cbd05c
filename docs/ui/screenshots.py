"""Screenshots of `tunesmith ui` pages for the README, in headless Chromium (Debian's chromium + chromium-driver).

Run: .venv/bin/python docs/ui/screenshots.py RUNS_FOLDER RUN [OTHER_RUN]  (writes docs/ui/*.png)
The UI must not be running already on the port this picks; it starts its own server in-process.
"""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tunesmith.ui.app import create_app
from tunesmith.ui.guard import Access


def main(root: Path, run: str, other: str | None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(root, Access("127.0.0.1", port, None)), port=port))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1500"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    pages = {"runs": "/", "run": f"/runs/{run}", "new": f"/new?source={run}"}
    if other:
        pages["compare"] = f"/compare?run={run}&run={other}"
    out = Path(__file__).parent
    for name, url in pages.items():
        driver.get(f"http://127.0.0.1:{port}{url}")
        time.sleep(1.5)  # charts, key help and the first validation
        driver.save_screenshot(str(out / f"{name}.png"))
        print(out / f"{name}.png")
    driver.quit()
    server.should_exit = True


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
