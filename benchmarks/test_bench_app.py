"""The web app's latency as a learner feels it, in headless Chromium (Selenium) against a local server.

- test_click_to_trajectory: click "Generate" (digits model, DDIM 50 steps, 4 images) until the new
  trajectory strip has loaded in the page; the page's final grid is first checked against
  fastddpm.sample (a wrong answer fails before anything is timed). Two clocks: the page's own (the
  click event to the first frame after the new strip's load event: what the learner sees;
  extra_info in_page_*), and the wall time around WebDriver's click and a light poll (what
  pytest-benchmark reports; it adds WebDriver's click round trip, ~0.1-0.2 s here).
- test_click_to_first_loss: click "Start" (train a denoiser on a digit) until the page shows the
  first steps count of that run (the first loss point); each round's run is stopped, untimed.

Median of FASTDDPM_BENCH_APP_ROUNDS rounds (default 10). The machine's load average is recorded
beside the numbers: on a shared machine it explains most of their spread.
"""
import os
import re
import statistics
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import _app_browser as B  # noqa: E402

pytest.importorskip("gradio", reason="the web app needs Gradio (pip install 'fastddpm[app]')")
_why = B.missing()
if _why is not None and os.environ.get("FASTDDPM_REQUIRE_BROWSER") == "1":      # CI (.ci/run): never skip
    raise RuntimeError(f"FASTDDPM_REQUIRE_BROWSER=1 but there is no headless browser: {_why}")
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no headless browser: {_why}")
ROUNDS = int(os.environ.get("FASTDDPM_BENCH_APP_ROUNDS", "10"))

from _app_server import app_server  # noqa: E402


@pytest.fixture(scope="module")
def page():
    with app_server("--quiet", "--max-seconds", "60") as server:
        d = B.make_driver()
        try:
            B.load(d, server.url)
            yield d
        finally:
            d.quit()


# The page's own clock for one click: the click event (capture phase, before Gradio sees it) to the
# first animation frame after a new strip image fired its load event (load does not bubble: caught
# on the document in the capture phase). window.__fdStrip.ms is null until then.
_STRIP_CLOCK_JS = """
window.__fdStrip = {click: null, old: null, ms: null};
document.querySelector('#gen-go').addEventListener('click', e => {
  const img = document.querySelector('#gen-strip img');
  window.__fdStrip = {click: performance.now(), old: img ? img.src : null, ms: null};
}, true);
document.addEventListener('load', e => {
  const s = window.__fdStrip, t = e.target;
  if (t.tagName !== 'IMG' || !t.closest('#gen-strip') || s.click === null || t.src === s.old || s.ms !== null) return;
  requestAnimationFrame(() => { if (s.ms === null) s.ms = Math.max(performance.now() - s.click, 1e-3); });
}, true);
"""


def _info(benchmark, what):
    benchmark.group = "web app"
    benchmark.extra_info.update(kind="app-latency", what=what, load_average=list(os.getloadavg()))


def test_click_to_trajectory(benchmark, page):
    import fastddpm
    from fastddpm import images as fimages
    d = page
    B.set_number(d, "gen-seed", 31)
    B.click(d, "gen-go")
    B.wait(lambda: "seed 31" in B.text(d, "gen-status"), 60, "the first generation")
    B.wait(lambda: B.image(d, "gen-grid"), 30, "the final grid")
    want = fimages.grid(fastddpm.sample("digits", 4, sampler="ddim", steps=50, seed=31))[..., 0]
    got = B.gray_pixels(d, "gen-grid")
    assert got is not None and np.array_equal(got, want), "FAIL: the page's images differ from fastddpm.sample"

    seeds = iter(range(100, 100 + ROUNDS + 1))
    core = []       # the same request in this process before each click (untimed): the core alone, now

    in_page = []    # the page's clock, ms: click event -> first frame after the new strip loaded
    d.execute_script(_STRIP_CLOCK_JS)

    def setup():
        t0 = time.perf_counter()
        fastddpm.sample("digits", 4, sampler="ddim", steps=50, seed=7)
        core.append(time.perf_counter() - t0)
        B.set_number(d, "gen-seed", next(seeds))   # another seed: the same images would keep the same src
        return (), {}

    def click_to_strip():
        B.click(d, "gen-go")
        # a cheap poll (no pixels read): the benchmark must not load the 2 cores it measures
        in_page.append(B.wait(lambda: d.execute_script("return window.__fdStrip.ms"), 60, "the new strip"))

    benchmark.pedantic(click_to_strip, setup=setup, rounds=ROUNDS, iterations=1)
    shown = B.image(d, "gen-strip")
    assert shown and shown["max"] > shown["min"], "FAIL: the strip is blank"
    _info(benchmark, "click Generate (digits, DDIM 50 steps, 4 images) -> the new trajectory strip shown")
    benchmark.extra_info["in_page_click_to_strip_median_s"] = statistics.median(in_page) / 1e3
    benchmark.extra_info["in_page_click_to_strip_s"] = [v / 1e3 for v in in_page]
    print(f"click -> strip: page clock median {statistics.median(in_page):.0f} ms, wall median "
          f"{benchmark.stats.stats.median * 1e3:.0f} ms; fastddpm.sample alone {statistics.median(core) * 1e3:.0f} ms")
    benchmark.extra_info["fastddpm_sample_median_s"] = statistics.median(core)
    benchmark.extra_info["fastddpm_sample_rounds"] = len(core)


def test_click_to_first_loss(benchmark, page):
    d = page
    B.open_tab(d, "Train a denoiser")
    total = iter(range(1000, 1000 + ROUNDS + 1))

    def ended():   # the run's last view is shown (a click while its stream is open would be ignored)
        st = B.text(d, "train-status").strip()
        return st == "" or st == "stopped" or st.startswith(("done", "⚠️"))

    def setup():
        if not ended():
            B.click(d, "train-stop")
            B.wait(ended, 60, "the run to stop")
        n = next(total)
        B.set_number(d, "train-steps", n)
        return (n,), {}

    rounds = []     # s per round, in order: a slow first round (warm-up) shows here, not only in max

    def click_to_first_loss(n):
        t0 = time.perf_counter()
        B.click(d, "train-start")
        B.wait(lambda: (lambda m: m and int(m.group(1)) >= 1)(re.match(rf"(\d+) / {n}$", B.text(d, "train-done"))),
               60, "the first loss point")
        rounds.append(time.perf_counter() - t0)

    benchmark.pedantic(click_to_first_loss, setup=setup, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["click_to_first_loss_s"] = rounds
    print("click -> first loss, s per round:", " ".join(f"{v:.2f}" for v in rounds))
    B.click(d, "train-stop")
    assert float(B.text(d, "train-avg")) > 0
    _info(benchmark, "click Start (a digit, default knobs) -> the page shows the run's first steps count and loss")
