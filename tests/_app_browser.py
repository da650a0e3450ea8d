"""Driving the web app in headless Chromium (Selenium): the pieces the browser test and the
benchmark share. Elements are found by the elem_id the layout gives them (server.py)."""
from __future__ import annotations

import os
import shutil
import time

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# min/max of the red channel of a loaded <img>, drawn on a canvas (same origin: readable)
_PIXELS_JS = """
const img = document.querySelector(arguments[0]);
if (!img || !img.complete || !img.naturalWidth) return null;
const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext('2d'); g.drawImage(img, 0, 0);
const d = g.getImageData(0, 0, c.width, c.height).data;
let mn = 255, mx = 0;
for (let i = 0; i < d.length; i += 4) { mn = Math.min(mn, d[i]); mx = Math.max(mx, d[i]); }
return {src: img.src, w: c.width, h: c.height, min: mn, max: mx};
"""


# the red channel of a loaded <img> as a flat list, row by row (small images only)
_GRAY_JS = """
const img = document.querySelector(arguments[0]);
if (!img || !img.complete || !img.naturalWidth) return null;
const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext('2d'); g.drawImage(img, 0, 0);
const d = g.getImageData(0, 0, c.width, c.height).data, out = [];
for (let i = 0; i < d.length; i += 4) out.push(d[i]);
return {w: c.width, h: c.height, data: out};
"""


def missing() -> str | None:
    """Why the browser test cannot run here (None: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (requirements-dev.txt)"
    if not any(shutil.which(b) for b in BROWSERS):
        return "no Chromium on PATH (apt-get install chromium chromium-driver; .ci/run does)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (apt-get install chromium-driver; .ci/run does)"
    return None


def make_driver(width: int = 1500, height: int = 1150):
    os.environ.setdefault("SE_AVOID_STATS", "true")              # Selenium Manager: no usage statistics
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--disable-extensions", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--hide-scrollbars"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
    d.set_page_load_timeout(60)
    d.set_script_timeout(30)
    return d


def wait(cond, timeout: float, what: str, poll: float = 0.02):
    """Poll ``cond()`` until it returns something truthy (returned) or fail naming ``what``."""
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def image(driver, elem_id: str) -> dict | None:
    """{src, w, h, min, max} of the image shown in component ``elem_id`` (None: none loaded)."""
    return driver.execute_script(_PIXELS_JS, f"#{elem_id} img")


def gray_pixels(driver, elem_id: str):
    """The image shown in ``elem_id`` as uint8 [H, W] (its red channel), or None."""
    import numpy as np
    r = driver.execute_script(_GRAY_JS, f"#{elem_id} img")
    return None if r is None else np.asarray(r["data"], dtype=np.uint8).reshape(r["h"], r["w"])


def new_image(driver, elem_id: str, old_src):
    """The component's image once one that differs from ``old_src`` has loaded."""
    def cond():
        im = image(driver, elem_id)
        return im if im and im["src"] != old_src else None
    return cond


def text(driver, elem_id: str) -> str:
    """The text a textbox or markdown component shows."""
    from selenium.webdriver.common.by import By
    els = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    if els:
        return els[0].get_attribute("value") or ""
    els = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id}")
    return els[0].text if els else ""


def set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    el = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(str(value), Keys.TAB)


def click(driver, elem_id: str) -> None:
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id}").click()


def open_tab(driver, title: str) -> None:
    from selenium.webdriver.common.by import By
    for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
        if b.text.strip() == title:
            b.click()
            return
    raise AssertionError(f"no tab {title!r}")


def load(driver, url: str) -> None:
    driver.get(url)
    wait(lambda: driver.find_elements("css selector", "#gen-go"), 60, "the page to load")
