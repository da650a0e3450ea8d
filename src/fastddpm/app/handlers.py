"""What each button and slider does: raw page values in, checked (validation.py), handed to the
plain-Python work (generate.py, denoiser.py), page values out. A bad value or a refused request
comes back as a message for the page's status line; an unexpected failure is logged here, and the
page gets one line saying so, never a traceback.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time

import numpy as np

import fastddpm
from fastddpm.schedulers import BETA_SCHEDULE_SAMPLERS

from . import validation as v
from .denoiser import (BETA_SCHEDULES, IMAGE_SIZE, DenoiserConfig, DenoiserTrainer, RunRegistry, ServerBusy,
                       digit_targets)
from .generate import MODELS, GenerateRequest, GenerateRun, generate, model_info

log = logging.getLogger("fastddpm.app")

TARGETS = ("a digit from the data set", "an uploaded image")
MAX_SEED = 2**32 - 1          # what a page's number field carries exactly (< 2**53)
POLL_SECONDS = 0.3            # the training view refreshes this often


def backend_choices() -> list[str]:
    return ["auto"] + [name for name, b in fastddpm.backends().items() if b["available"]]


def _page(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] -> what gr.Image takes: [H, W] for one channel (saved as a grayscale PNG)."""
    return img[..., 0] if img.shape[-1] == 1 else img


def _failure(exc: Exception) -> str:
    """The page's message for an exception: its text if it is about the request, else one line."""
    if isinstance(exc, (v.AppInputError, ValueError, TypeError, fastddpm.BackendUnavailableError, ServerBusy)):
        return f"⚠️ {exc}"
    log.exception("unexpected failure")
    return f"⚠️ internal error ({type(exc).__name__}); the details are in the server's log"


class Handlers:
    """The page's callbacks; one instance per server (state per browser session is keyed by
    Gradio's session hash or held in gr.State)."""

    def __init__(self, temp_root: str, max_runs: int = 2, max_seconds: float = 300.0):
        self.temp_root = temp_root
        self.runs = RunRegistry(max_runs=max_runs)
        self.max_seconds = float(max_seconds)

    # -- generate ----------------------------------------------------------------------------
    def check_generate(self, model, label, guidance, sampler, steps, seed, n, backend) -> GenerateRequest:
        model = v.choice("model", model, MODELS)
        info = model_info(model)
        sampler = v.choice("sampler", sampler, BETA_SCHEDULE_SAMPLERS)   # the app's models are beta-schedule ones
        steps = v.integer("steps", steps, 1, info["max_steps"])
        seed = v.integer("seed", seed, 0, MAX_SEED)
        n = v.integer("number of images", n, 1, v.LIMITS["max_images"])
        backend = v.choice("backend", backend, backend_choices())
        if info["conditional"]:
            label = v.integer("label", label, min(info["labels"]), max(info["labels"]))
            guidance = v.number("guidance scale", guidance, 0.0, v.LIMITS["max_guidance"])
        else:
            label = guidance = None
        return GenerateRequest(model=model, sampler=sampler, steps=steps, seed=seed, n=n, backend=backend,
                               label=label, guidance=guidance)

    def generate(self, model, label, guidance, sampler, steps, seed, n, backend):
        """-> status, strip, scrubber (update), x_t, x̂_0, caption, grid, run (state)."""
        import gradio as gr
        try:
            run = generate(self.check_generate(model, label, guidance, sampler, steps, seed, n, backend))
            k = run.steps // 2
            xt, x0 = run.step_images(k)
        except Exception as exc:
            return (_failure(exc),) + (gr.skip(),) * 7
        status = (f"{run.request.n} image(s), {run.request.sampler}, {run.steps} steps, seed {run.request.seed}: "
                  f"sampled in {run.seconds * 1000:.0f} ms")
        return (status, _page(run.strip()), gr.update(maximum=run.steps, value=k), _page(xt), _page(x0), run.caption(k),
                _page(run.grid()), run)

    def scrub(self, k, run: GenerateRun | None):
        """-> x_t, x̂_0, caption at position k of the last run."""
        import gradio as gr
        if not isinstance(run, GenerateRun):
            return gr.skip(), gr.skip(), "generate first: the scrubber walks the last run's trajectory"
        try:
            k = v.integer("position", k, 0, run.steps)
            xt, x0 = run.step_images(k)
        except Exception as exc:
            return gr.skip(), gr.skip(), _failure(exc)
        return _page(xt), _page(x0), run.caption(k)

    def downloads(self, run: GenerateRun | None):
        """-> PNG grid file, GIF file: written into this server's temporary directory."""
        if not isinstance(run, GenerateRun):
            return None, None
        d = tempfile.mkdtemp(prefix="dl-", dir=self.temp_root)
        return run.write_downloads(d)

    @staticmethod
    def new_seed() -> int:
        return secrets.randbelow(MAX_SEED + 1)

    def model_changed(self, model):
        """-> label picker, guidance slider: shown for a conditional model."""
        import gradio as gr
        try:
            info = model_info(v.choice("model", model, MODELS))
        except Exception:
            return gr.skip(), gr.skip()
        c = info["conditional"]
        return gr.update(visible=c), gr.update(visible=c, value=info["guidance"])

    # -- train a denoiser ----------------------------------------------------------------------
    def _digit(self, index) -> np.ndarray:
        digits = digit_targets()                                             # [1797, 1, 16, 16]
        i = v.integer("digit index", index, 0, len(digits) - 1)
        return digits[i]                                                     # [1, 16, 16]

    def check_train(self, target_kind, digit, upload, lr, beta_start, beta_end, schedule, timesteps, steps,
                    show_t):
        """(target float32 [1, 16, 16], DenoiserConfig), every value checked."""
        kind = v.choice("target", target_kind, TARGETS)
        lr = v.number("learning rate", lr, *v.LIMITS["lr"])
        b0 = v.number("beta_start", beta_start, *v.LIMITS["beta"])
        b1 = v.number("beta_end", beta_end, *v.LIMITS["beta"])
        if b1 < b0:
            raise v.AppInputError(f"beta_end ({b1:g}) must be at least beta_start ({b0:g})")
        schedule = v.choice("beta schedule", schedule, BETA_SCHEDULES)
        T = v.integer("diffusion timesteps T", timesteps, 2, v.LIMITS["max_train_timesteps"])
        steps = v.integer("training steps", steps, 1, v.LIMITS["max_train_steps"])
        show_t = v.integer("shown t", show_t, 0, T - 1)
        target = self._digit(digit) if kind == TARGETS[0] else v.image_upload(_upload_path(upload), IMAGE_SIZE)
        return target, DenoiserConfig(lr=lr, beta_start=b0, beta_end=b1, beta_schedule=schedule,
                                      num_train_timesteps=T, steps=steps, show_t=show_t,
                                      max_seconds=self.max_seconds)

    def train(self, target_kind, digit, upload, lr, beta_start, beta_end, schedule, timesteps, steps, show_t,
              session: str):
        """A generator: starts this session's run and yields the view every POLL_SECONDS until it ends.
        Yields: status, clean, noisy, denoised, steps done, average loss, loss curve."""
        import gradio as gr
        try:
            target, cfg = self.check_train(target_kind, digit, upload, lr, beta_start, beta_end, schedule,
                                           timesteps, steps, show_t)
            trainer = self.runs.start(session, DenoiserTrainer(target, cfg))
        except Exception as exc:
            yield (_failure(exc),) + (gr.skip(),) * 6
            return
        try:
            shown = -1
            while True:
                done = not trainer.running
                n = trainer.steps_done if not done else None
                if n != shown:                      # a view only when something changed (or at the end)
                    yield self._view(trainer)
                    shown = n
                if done:
                    return
                # until the first loss point, look often: it is what the learner waits for
                time.sleep(POLL_SECONDS if n else 0.03)
        finally:
            trainer.stop(wait=None)         # the page stopped watching (or the run ended)

    def _view(self, trainer: DenoiserTrainer):
        import pandas as pd
        s = trainer.snapshot()
        x, y = s.curve
        curve = pd.DataFrame({"step": x, "loss": y})
        status = {"starting": "starting…", "running": f"training… {s.seconds:.1f} s",
                  "done": f"done: {s.steps_done} steps in {s.seconds:.1f} s", "stopped": "stopped",
                  "time limit": s.message, "failed": f"⚠️ {s.message}"}[s.state]
        avg = "" if s.average_loss is None else f"{s.average_loss:.5f}"
        scale = 8
        big = lambda a: _page(a.repeat(scale, 0).repeat(scale, 1))           # noqa: E731  [H*8, W*8]
        return (status, big(s.clean), big(s.noisy), big(s.denoised), f"{s.steps_done} / {s.total_steps}", avg,
                curve)

    def stop(self, session: str) -> str:
        tr = self.runs.get(session)
        if tr is None or not tr.running:
            return "no run to stop"
        tr.stop(wait=None)
        return "stopping…"

    def set_show_t(self, t, timesteps, session: str):
        tr = self.runs.get(session)
        try:
            T = tr.cfg.num_train_timesteps if tr is not None else v.integer("diffusion timesteps T", timesteps, 2,
                                                                            v.LIMITS["max_train_timesteps"])
            t = v.integer("shown t", t, 0, T - 1)
        except Exception as exc:
            return _failure(exc)
        if tr is not None:
            tr.set_show_t(t)
        return __import__("gradio").skip()

    def close_session(self, session: str) -> None:
        self.runs.forget(session)

    def shutdown(self) -> None:
        self.runs.stop_all()
        shutil.rmtree(self.temp_root, ignore_errors=True)


def _upload_path(upload):
    """Gradio's File value: a path string (or an object with .name / .path from older clients)."""
    if isinstance(upload, dict):
        upload = upload.get("path") or upload.get("name")
    return getattr(upload, "path", None) or getattr(upload, "name", None) or upload

