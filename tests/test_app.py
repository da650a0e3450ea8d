"""The web app (``fastddpm app``) through its HTTP API, as the page calls it (gradio_client), against a
server this module starts on 127.0.0.1; and its plain-Python parts without a server."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import fastddpm
from fastddpm import images as fimages
from fastddpm.schedulers import BETA_SCHEDULE_SAMPLERS

pytest.importorskip("gradio", reason="the web app needs Gradio (pip install 'fastddpm[app]'; in requirements-dev)")
gradio_client = pytest.importorskip("gradio_client", reason="the app's API tests need gradio_client (requirements-dev)")
from PIL import Image  # noqa: E402

from fastddpm.app import validation  # noqa: E402
from fastddpm.app.denoiser import DenoiserConfig, DenoiserTrainer, RunRegistry, ServerBusy  # noqa: E402
from fastddpm.app.handlers import TARGETS, Handlers  # noqa: E402

DIGIT, UPLOAD = TARGETS
TRAIN_DEFAULTS = dict(target=DIGIT, digit=3, upload=None, lr=2e-3, beta_start=1e-4, beta_end=0.02,
                      schedule="linear", timesteps=1000, steps=200, show_t=300)


@pytest.fixture
def server(app_server_session):
    return app_server_session        # conftest.py: one server for the session, one run at a time


def client(server):
    return gradio_client.Client(server.url, verbose=False)


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def gray_grid(images, scale=None) -> np.ndarray:
    return fimages.grid(images, scale=scale)[..., 0]          # the page shows 1-channel grids as "L"


def generate(c, model="digits", label=0, guidance=3.0, sampler="ddim", steps=50, seed=0, n=4, backend="auto"):
    return c.predict(model, label, guidance, sampler, steps, seed, n, backend, api_name="/generate")


def train_args(**kw):
    a = dict(TRAIN_DEFAULTS, **kw)
    up = a["upload"]
    return (a["target"], a["digit"], None if up is None else gradio_client.handle_file(up), a["lr"],
            a["beta_start"], a["beta_end"], a["schedule"], a["timesteps"], a["steps"], a["show_t"])


def train(c, **kw):
    """The last view of a training request (a generator endpoint: its final output)."""
    return c.submit(*train_args(**kw), api_name="/train").result(timeout=150)


def refusal(call) -> str:
    """The message a refused request gets: Gradio's own (a component's bounds) arrives as an AppError,
    the app's as its status line (first output) starting with the warning sign."""
    try:
        out = call()
    except gradio_client.exceptions.AppError as exc:
        return str(exc)
    status = out[0] if isinstance(out, (tuple, list)) else out
    assert isinstance(status, str) and status.startswith("⚠️"), f"not refused: {status!r}"
    return status


# ---------------------------------------------------------------------- generate

@pytest.mark.parametrize("sampler", list(BETA_SCHEDULE_SAMPLERS))
def test_generate_equals_sample(server, sampler):
    c = client(server)
    out = generate(c, sampler=sampler, steps=10, seed=12345, n=3)
    status, strip, scrub, xt, x0, caption, grid = out
    assert "3 image(s)" in status and f"{sampler}, 10 steps" in status
    want = fastddpm.sample("digits", 3, sampler=sampler, steps=10, seed=12345)
    assert np.array_equal(png(grid), gray_grid(want)), "the page's images differ from fastddpm.sample"
    s = png(strip)
    assert s.std() > 10, "the trajectory strip is blank"
    assert scrub["maximum"] == 10


def test_generate_conditional_and_scrubber(server):
    c = client(server)
    out = generate(c, model="digits-cond", label=7, guidance=2.5, sampler="dpm++2m", steps=20, seed=9, n=2)
    want = fastddpm.sample("digits-cond", 2, sampler="dpm++2m", steps=20, seed=9, labels=7, guidance_scale=2.5)
    assert np.array_equal(png(out[6]), gray_grid(want))
    traj = fastddpm.sample("digits-cond", 2, sampler="dpm++2m", steps=20, seed=9, labels=7, guidance_scale=2.5,
                           trajectory=[0, 5, 20])
    # position 0: the static x_T; the end: x_0, where x̂_0 is x_0 itself
    xt, x0, caption = c.predict(0, api_name="/scrub")
    assert np.array_equal(png(xt), gray_grid(traj.trajectory[0], scale=6)) and "static" in caption
    xt5, x05, caption5 = c.predict(5, api_name="/scrub")
    assert np.array_equal(png(xt5), gray_grid(traj.trajectory[1], scale=6)) and "after 5 of 20" in caption5
    assert not np.array_equal(png(x05), png(xt5)), "x̂_0 should be the model's prediction, not x_t"
    _, x0_end, _ = c.predict(20, api_name="/scrub")
    assert np.array_equal(png(x0_end), gray_grid(want, scale=6))


def test_downloads(server):
    c = client(server)
    generate(c, sampler="ddim", steps=30, seed=4, n=4)
    grid_png, gif = c.predict(api_name="/downloads")
    want = fastddpm.sample("digits", 4, sampler="ddim", steps=30, seed=4)
    assert np.array_equal(png(grid_png), gray_grid(want))
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 31      # x_T and every step: 31 <= GIF_FRAMES positions


def test_scrub_before_generate_is_a_message(server):
    xt, x0, caption = client(server).predict(3, api_name="/scrub")
    assert "generate first" in caption


def test_new_seed(server):
    seeds = {client(server).predict(api_name="/new_seed") for _ in range(3)}
    assert len(seeds) > 1 and all(isinstance(s, (int, float)) and 0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize("kw, words", [
    (dict(steps=0), "minimum value 1"), (dict(steps=500), "200"), (dict(seed=-1), "-1"), (dict(n=17), "17"),
    (dict(n=2.5), "whole number"), (dict(sampler="bogus"), "bogus"), (dict(backend="cuda-x"), "cuda-x"),
    (dict(model="nope"), "nope"), (dict(model="digits-cond", label=10), "10"),
    (dict(model="digits-cond", guidance=50), "50")])
def test_generate_refuses_bad_values(server, kw, words):
    msg = refusal(lambda: generate(client(server), **kw))
    assert words in msg


# ---------------------------------------------------------------------- train a denoiser

@pytest.mark.slow   # 200 training steps: ~10 s on 2 idle Zen 1 cores, more under load
def test_train_streams_a_falling_loss(server):
    c = client(server)
    job = c.submit(*train_args(steps=200), api_name="/train")
    t0, updates = time.monotonic(), []
    for out in job:
        if isinstance(out, tuple) and len(out) == 7:     # a view (the client may also yield other messages)
            updates.append(out)
        assert time.monotonic() - t0 < 200
    status, clean, noisy, den, done, avg, curve = job.result()
    assert status.startswith("done: 200 steps") and done == "200 / 200"
    counts = [int(u[4].split("/")[0]) for u in updates if "/" in str(u[4])]
    assert counts == sorted(counts) and len(set(counts)) >= 5, f"the steps count did not stream: {counts}"
    losses = np.array([row[1] for row in curve["data"]])
    assert len(losses) == 200
    assert losses[-20:].mean() < 0.5 * losses[:20].mean(), (losses[:20].mean(), losses[-20:].mean())
    assert float(avg) == pytest.approx(losses[-20:].mean(), rel=1e-4)
    from fastddpm.data import load_digits
    want = load_digits(16)[3, 0]                                 # the clean target
    assert np.array_equal(png(clean), np.round((want / 2 + 0.5).clip(0, 1) * 255).astype(np.uint8)
                          .repeat(8, 0).repeat(8, 1))
    assert png(noisy).std() > 10 and png(den).std() > 10


def test_one_run_at_a_time_stop_and_busy(server):
    a, b = client(server), client(server)
    job = a.submit(*train_args(steps=5000), api_name="/train")
    t0 = time.monotonic()
    while not (job.outputs() and job.outputs()[-1][4] not in (None, "", "0 / 5000")):
        assert time.monotonic() - t0 < 60, "the run did not start"
        time.sleep(0.1)
    first = job.outputs()[-1][4]
    # another browser session: a clear "busy" message at once, not a wait
    t1 = time.monotonic()
    msg = refusal(lambda: train(b, steps=10))
    assert "busy" in msg and time.monotonic() - t1 < 10
    assert a.predict(api_name="/stop") == "stopping…"
    last = job.result(timeout=60)
    assert last[0] == "stopped" and last[4] != first
    assert b.predict(api_name="/stop") == "no run to stop"


def write_png(path, a):
    Image.fromarray(a).save(path)
    return str(path)


def test_uploaded_target(server, tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    out = train(client(server), target=UPLOAD, upload=write_png(tmp_path / "t.png", img), steps=3)
    assert out[0].startswith("done: 3 steps")
    from fastddpm.data import square_image
    want = square_image(Image.fromarray(img).convert("L"), 16).clip(-1, 1)
    want = np.round((want / 2 + 0.5) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    assert np.array_equal(png(out[1]), want)


def test_uploads_refused(server, tmp_path):
    c = client(server)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    gif = tmp_path / "gif-inside.png"                              # the name passes the page's filter
    Image.new("L", (16, 16), 128).save(gif, format="GIF")
    named_gif = tmp_path / "a.gif"
    Image.new("L", (16, 16), 128).save(named_gif)
    big = write_png(tmp_path / "big.png", (np.random.default_rng(1).random((1400, 1400, 3)) * 255).astype(np.uint8))
    assert os.path.getsize(big) > validation.LIMITS["upload_bytes"]
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 5000), 0).save(huge)                     # small file, too many pixels
    for path, words in [(text, "not a readable PNG or JPEG"), (gif, "only PNG and JPEG"), (big, "MiB"),
                        (huge, "5000x5000"), (named_gif, "Invalid file type")]:
        msg = refusal(lambda: train(c, target=UPLOAD, upload=str(path)))
        assert words in msg, (path, msg)
    msg = refusal(lambda: train(c, target=UPLOAD))
    assert "no uploaded file" in msg


@pytest.mark.parametrize("kw, words", [
    (dict(lr=0), "0"), (dict(lr=5), "5"), (dict(beta_start=0.02, beta_end=0.01), "beta_end"),
    (dict(schedule="cubic"), "cubic"), (dict(steps=0), "0"), (dict(steps=10**6), "1000000"),
    (dict(timesteps=100, show_t=150), "shown t"), (dict(digit=5000), "5000"), (dict(target="mine"), "mine")])
def test_train_refuses_bad_values(server, kw, words):
    msg = refusal(lambda: train(client(server), **kw))
    assert words in msg


# ---------------------------------------------------------------------- without a server

@pytest.mark.parametrize("value", ["abc", None, float("nan"), float("inf"), True, [3], {"a": 1}, 2.5, -1, 10**30])
def test_server_checks_every_generate_value(value, tmp_path):
    h = Handlers(str(tmp_path))
    good = dict(model="digits", label=0, guidance=3.0, sampler="ddim", steps=50, seed=0, n=4, backend="auto")
    for name in ("steps", "seed", "n"):
        with pytest.raises(validation.AppInputError, match=name if name != "n" else "number of images"):
            h.check_generate(**dict(good, **{name: value}))
    for name in ("model", "sampler", "backend"):
        with pytest.raises(validation.AppInputError, match=name):
            h.check_generate(**dict(good, **{name: value}))
    req = h.check_generate(**dict(good, steps="20", seed=7.0))      # what a form may send: accepted
    assert (req.steps, req.seed) == (20, 7)


def test_trainer_stop_time_limit_and_registry():
    target = np.zeros((1, 16, 16), np.float32)
    tr = DenoiserTrainer(target, DenoiserConfig(steps=5000, max_seconds=2.0)).start()
    tr._thread.join(60)
    snap = tr.snapshot()
    assert snap.state == "time limit" and snap.steps_done < 5000 and "2 s limit" in snap.message
    reg = RunRegistry(max_runs=1)
    one = reg.start("a", DenoiserTrainer(target, DenoiserConfig(steps=5000)))
    with pytest.raises(ServerBusy, match="busy"):
        reg.start("b", DenoiserTrainer(target, DenoiserConfig(steps=5)))
    two = reg.start("a", DenoiserTrainer(target, DenoiserConfig(steps=5000)))   # the same session: replaces
    assert not one.running and one.snapshot().state == "stopped" and two.running
    reg.stop_all()
    assert not two.running
    with pytest.raises(ValueError, match="target"):
        DenoiserTrainer(np.zeros((3, 16, 16), np.float32), DenoiserConfig())


def test_import_fastddpm_does_not_import_gradio():
    code = ("import sys, fastddpm, fastddpm.cli; fastddpm.sample; fastddpm.cli.build_parser(); "
            "assert 'gradio' not in sys.modules, 'gradio imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_app_port_taken():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "fastddpm", "app", "--port", str(port), "--quiet"],
                           capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "cannot serve on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr
