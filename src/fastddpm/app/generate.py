"""The "Generate from static" tab's work, in plain Python (no Gradio): sample with the public API,
keep every position of the reverse trajectory, and render the strip, the scrubber's pair
(x_t beside the model's x̂_0) and the downloads.

    req = GenerateRequest(model="digits", sampler="ddim", steps=50, seed=0, n=4)
    run = generate(req)               # run.images == fastddpm.sample(...) for the same settings
    xt, x0 = run.step_images(10)      # position 10: x_t and x̂_0, uint8 grids
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

import fastddpm
from fastddpm import images as fimages
from fastddpm.coefficients import A_M, A_X, CLIP
from fastddpm.pipeline import SampleResult, to_uint8

__all__ = ["MODELS", "GenerateRequest", "GenerateRun", "generate", "model_info"]

MODELS = ("digits", "digits-cond")    # the bundled models
STRIP_ROWS = 11                       # positions shown in the strip, x_T .. x_0
STRIP_COLS = 8                        # samples shown in the strip
GIF_FRAMES = 40


@dataclass(frozen=True)
class GenerateRequest:
    """One click of "Generate", already validated (see server.py)."""

    model: str = "digits"
    sampler: str = "ddim"
    steps: int = 50
    seed: int = 0
    n: int = 4
    backend: str = "auto"
    label: int | None = None          # a conditional model's class, one for every image
    guidance: float | None = None     # None: the model's default scale

    def sample_kwargs(self) -> dict:
        """The arguments of ``fastddpm.sample`` that give the same images."""
        kw = dict(n=self.n, steps=self.steps, sampler=self.sampler, seed=self.seed, backend=self.backend)
        if self.label is not None:
            kw.update(labels=self.label, guidance_scale=self.guidance)
        return kw


def model_info(name: str) -> dict:
    """What the page needs to know about a bundled model: its labels, null class, default guidance,
    and its number of training timesteps (the most steps a sampler may take)."""
    pipe = fastddpm.load(name) if name not in _pipes else _pipes[name]
    _pipes[name] = pipe
    k = pipe.unet_config.num_class_embeds
    null = pipe.null_class
    return dict(conditional=k is not None, labels=[i for i in range(k or 0) if i != null],
                null_class=null, guidance=pipe.guidance_scale,
                max_steps=int(pipe.scheduler.num_train_timesteps))


_pipes: dict = {}


@dataclass
class GenerateRun:
    """One generation: the images and the whole reverse trajectory, kept for the scrubber."""

    request: GenerateRequest
    images: np.ndarray                # uint8 [n, H, W, C]: what fastddpm.sample returns
    frames: np.ndarray                # float32 [S + 1, n, C, H, W]: position 0 = x_T .. S = x_0
    timesteps: np.ndarray             # int64 [S]: the model timestep of step k (input: position k)
    table: np.ndarray                 # float32 [S, 12]: the scheduler's coefficient rows
    seconds: float = 0.0
    _x0: dict = field(default_factory=dict)   # position -> x̂_0 float32 [n, C, H, W]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def caption(self, k: int) -> str:
        S = self.steps
        if k >= S:
            return f"position {S} of {S}: x_0, the finished images (x̂_0 = x_0)"
        what = "pure static x_T" if k == 0 else f"after {k} of {S} steps"
        return f"position {k} of {S}: {what}; the model sees it at timestep t = {int(self.timesteps[k])}"

    def predicted_x0(self, k: int) -> np.ndarray:
        """The model's x̂_0 from position k, as the sampler's own step computes it: the U-Net
        output m at timestep[k] (guided: m_u + w (m_c - m_u)), then x̂_0 = clip(a_x x + a_m m)
        with the step's coefficient row. Computed on first use (one U-Net call)."""
        if k >= self.steps:
            return self.frames[-1]
        if k not in self._x0:
            req, pipe = self.request, _pipes[self.request.model]
            x = np.ascontiguousarray(self.frames[k])                           # [n, C, H, W]
            t = int(self.timesteps[k])
            be = "auto" if req.backend == "auto" else req.backend
            if req.label is None:
                m = pipe.unet(x, t, backend=be)
            else:
                w = pipe.guidance_scale if req.guidance is None else req.guidance
                m = pipe.unet(x, t, backend=be, labels=req.label)
                if w != 1.0:
                    mu = pipe.unet(x, t, backend=be, labels=pipe.null_class)
                    m = mu + np.float32(w) * (m - mu)
            row = self.table[k]
            x0 = row[A_X] * x + row[A_M] * m
            if row[CLIP] > 0:
                x0 = np.clip(x0, -row[CLIP], row[CLIP])
            self._x0[k] = x0.astype(np.float32)
        return self._x0[k]

    def step_images(self, k: int, scale: int = 6) -> tuple[np.ndarray, np.ndarray]:
        """(x_t grid, x̂_0 grid) at position k, uint8 [H', W', C] each."""
        k = min(max(int(k), 0), self.steps)
        return (fimages.grid(self.frames[k], scale=scale), fimages.grid(self.predicted_x0(k), scale=scale))

    def strip(self, scale: int = 3) -> np.ndarray:
        """uint8 [H', W', C]: one row per shown position (x_T at the top, x_0 at the bottom), one
        column per sample (the first STRIP_COLS)."""
        rows = fimages.trajectory_steps(self.steps, min(STRIP_ROWS, self.steps + 1))
        sel = self.frames[rows, :STRIP_COLS]                                   # [R, c, C, H, W]
        r, c = sel.shape[:2]
        return fimages.grid(sel.reshape((r * c,) + sel.shape[2:]), nrow=c, scale=scale)

    def grid(self, scale: int | None = None) -> np.ndarray:
        return fimages.grid(self.images, scale=scale)

    def write_downloads(self, directory: str) -> tuple[str, str]:
        """The final grid as PNG and the trajectory as GIF in ``directory``; their paths."""
        png = fimages.save_grid(self.images, os.path.join(directory, "fastddpm-samples.png"))
        keep = fimages.trajectory_steps(self.steps, min(GIF_FRAMES, self.steps + 1))
        res = SampleResult(images=self.images, trajectory=self.frames[keep], trajectory_steps=keep)
        gif = fimages.save_trajectory(res, os.path.join(directory, "fastddpm-trajectory.gif"))
        return png, gif


def generate(req: GenerateRequest) -> GenerateRun:
    """Sample with ``fastddpm.sample`` keeping every loop position; the images are the ones
    ``fastddpm.sample(req.model, **req.sample_kwargs())`` returns, bit for bit."""
    import time
    model_info(req.model)                                    # loads and keeps the pipeline
    pipe = _pipes[req.model]
    t0 = time.perf_counter()
    # output="float": the frames for the scrubber's x̂_0; the uint8 images are rounded from the
    # same floats exactly as sample(output="uint8") rounds them
    res = fastddpm.sample(pipe, trajectory=list(range(req.steps + 1)), output="float", **req.sample_kwargs())
    seconds = time.perf_counter() - t0
    sched = pipe.scheduler_for(req.sampler, req.steps)
    schedule = sched.schedule()
    return GenerateRun(request=req, images=to_uint8(res.images), frames=res.trajectory,
                       timesteps=np.asarray(schedule.timesteps), table=np.asarray(schedule.table), seconds=seconds)
