"""The web app in a real browser: headless Chromium driven by Selenium against a server started
here on 127.0.0.1. It does what a learner does (seed, Generate, scrub, Start a training run, Stop)
and asserts on what the page shows; it also saves the screenshots the README shows
(FASTDDPM_SCREENSHOTS=docs writes them there; by default into the test's tmp_path)."""
import os
import re

import pytest

import _app_browser as B

pytest.importorskip("gradio", reason="the web app needs Gradio (pip install 'fastddpm[app]'; in requirements-dev)")
_why = B.missing()
if _why is not None and os.environ.get("FASTDDPM_REQUIRE_BROWSER") == "1":      # CI (.ci/run): never skip
    raise RuntimeError(f"FASTDDPM_REQUIRE_BROWSER=1 but there is no headless browser: {_why}")
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no headless browser: {_why}")


@pytest.fixture(scope="module")
def page(app_server_session):
    d = B.make_driver(height=1500)      # tall enough for a whole tab in one screenshot
    try:
        B.load(d, app_server_session.url)
        yield d
    finally:
        d.quit()


def shots(tmp_path) -> str:
    out = os.environ.get("FASTDDPM_SCREENSHOTS") or str(tmp_path)
    os.makedirs(out, exist_ok=True)
    return out


def test_generate_and_scrub(page, tmp_path):
    d = page
    B.set_number(d, "gen-seed", 2024)
    old = (B.image(d, "gen-strip") or {}).get("src")
    B.click(d, "gen-go")
    strip = B.wait(B.new_image(d, "gen-strip", old), 60, "the trajectory strip")
    assert strip["max"] - strip["min"] > 50, f"the strip is blank: {strip}"
    assert strip["h"] > strip["w"], "the strip runs from x_T at the top to x_0 at the bottom"
    grid = B.wait(lambda: B.image(d, "gen-grid"), 30, "the final images")
    assert grid["max"] - grid["min"] > 50
    B.wait(lambda: "seed 2024" in B.text(d, "gen-status"), 10, "the status naming the seed")
    caption = B.wait(lambda: B.text(d, "gen-caption"), 10, "the scrubber's caption")
    assert "position 25 of 50" in caption
    before = B.image(d, "gen-xt")["src"]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    rng = d.find_element(By.CSS_SELECTOR, "#gen-scrub input[type=range]")
    rng.send_keys(*[Keys.ARROW_LEFT] * 20)                          # toward the static: position 5
    B.wait(lambda: "position 5 of 50" in B.text(d, "gen-caption"), 30, "the caption of position 5")
    xt = B.wait(B.new_image(d, "gen-xt", before), 30, "x_t at the new position")
    x0 = B.wait(lambda: B.image(d, "gen-x0"), 10, "x̂_0")
    assert xt["max"] - xt["min"] > 50 and x0["max"] - x0["min"] > 50
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(os.path.join(shots(tmp_path), "app-generate.png"))


def test_train_a_denoiser(page, tmp_path):
    d = page
    B.open_tab(d, "Train a denoiser")
    B.set_number(d, "train-steps", 300)
    B.click(d, "train-start")
    first = B.wait(lambda: re.match(r"(\d+) / 300", B.text(d, "train-done")), 60, "the steps count")
    n0, loss0 = int(first.group(1)), B.text(d, "train-avg")
    later = B.wait(lambda: (lambda m: m if m and int(m.group(1)) >= n0 + 10 else None)(
        re.match(r"(\d+) / 300", B.text(d, "train-done"))), 90, "10 more steps")
    loss1 = B.text(d, "train-avg")
    assert int(later.group(1)) > n0 and loss1 != loss0, (n0, loss0, later.group(0), loss1)
    assert float(loss1) > 0
    for el in ("train-clean", "train-noisy", "train-denoised"):
        im = B.wait(lambda: B.image(d, el), 10, el)
        assert im["max"] - im["min"] > 30, f"{el} is blank: {im}"
    B.wait(lambda: d.find_elements("css selector", "#train-curve canvas, #train-curve svg"), 20, "the loss curve")
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(os.path.join(shots(tmp_path), "app-train.png"))
    B.click(d, "train-stop")
    B.wait(lambda: B.text(d, "train-status").strip() in ("stopped", "stopping…") or
           B.text(d, "train-status").startswith("done"), 30, "the run to stop")
