"""The reference sampler: the reverse diffusion loop in plain, unfused torch ops.

It mirrors ``Pipeline.__call__`` / ``fastddpm.sample`` and is written from the papers' formulas
(diffusers' DDPMScheduler.step and DDIMScheduler.step), reading only the scheduler's float64
``alphas_cumprod`` and timesteps, never its fused coefficient table: so it also checks the table.
The noise is the spec's (fastddpm.noise): x_T at noise step -1 (times the scheduler's x_scale), the
noise of timestep t at step t (a fractional schedule: its integer noise key, schedulers.noise_keys).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .. import philox as noise_spec
from ..loop import run_loop, schedule_loop


def spec_noise(seed: int, shape: tuple, step: int, first_index: int, device) -> torch.Tensor:
    """The spec's normals as a float32 tensor on ``device``."""
    return torch.from_numpy(noise_spec.noise(seed, shape, step, first_index)).to(device)


def _x0_and_eps(prediction_type: str, x, m, abar: float):
    sa, sb = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return (x - sb * m) / sa, m
    if prediction_type == "sample":
        return m, (x - sa * m) / sb
    return sa * x - sb * m, sa * m + sb * x      # v_prediction


def ddpm_step(scheduler, m, t: int, x, z):
    """diffusers' DDPMScheduler.step (fixed_small / fixed_large) with the noise z given."""
    cfg = scheduler.config
    row = scheduler.row_index(t)
    prev = int(scheduler.timesteps[row + 1]) if row + 1 < len(scheduler.timesteps) else -1
    abar = float(scheduler.alphas_cumprod[t])
    abar_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else 1.0
    alpha, beta = abar / abar_prev, 1.0 - abar / abar_prev
    x0, _ = _x0_and_eps(cfg["prediction_type"], x, m, abar)
    if cfg["clip_sample"]:
        x0 = x0.clamp(-cfg["clip_sample_range"], cfg["clip_sample_range"])
    mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * x
    if t == 0:
        return mean
    var = beta if cfg["variance_type"] == "fixed_large" else max((1 - abar_prev) / (1 - abar) * beta, 1e-20)
    return mean + math.sqrt(var) * z


def ddim_step(scheduler, m, t: int, x, z, eta: float):
    """diffusers' DDIMScheduler.step(eta) with the noise z given (used only when eta > 0)."""
    cfg = scheduler.config
    prev = t - scheduler.num_train_timesteps // scheduler.num_inference_steps
    abar = float(scheduler.alphas_cumprod[t])
    abar_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else scheduler.final_alpha_cumprod
    x0, eps = _x0_and_eps(cfg["prediction_type"], x, m, abar)
    if cfg["clip_sample"]:
        x0 = x0.clamp(-cfg["clip_sample_range"], cfg["clip_sample_range"])
    std = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    out = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - std**2, 0.0)) * eps
    return out + std * z if eta > 0 else out


def dpm_solver_step(scheduler, history: list, m, t: int, x, z):
    """diffusers' DPMSolverMultistepScheduler.step (dpmsolver++ / sde-dpmsolver++, orders 1-3) with
    the noise z given, written out as diffusers writes it: the x0 conversion, lambdas, h, D0/D1/D2.
    ``history``: this run's previous x0 predictions, oldest first (updated here)."""
    cfg = scheduler.config
    k = scheduler.row_index(t)
    sig = scheduler._sigmas                       # the float64 sigma sequence, [S + 1]

    def alpha_sigma(v):
        a = 1.0 / math.sqrt(v * v + 1.0)
        return a, v * a

    def lam(i):
        a, s = alpha_sigma(sig[i])
        return math.log(a) - math.log(s) if s > 0 else math.inf

    a_t, s_t = alpha_sigma(sig[k])
    if cfg["prediction_type"] == "epsilon":
        x0 = (x - s_t * m) / a_t
    elif cfg["prediction_type"] == "sample":
        x0 = m
    else:
        x0 = a_t * x - s_t * m
    if cfg["thresholding"]:   # diffusers' dynamic thresholding, per sample
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs().double(), cfg["dynamic_thresholding_ratio"], dim=1).clamp(
            1.0, cfg["sample_max_value"]).to(x0.dtype)[:, None]
        x0 = (flat.clamp(-s, s) / s).reshape(x0.shape)
    history.append(x0)
    order = scheduler._order_of_row(k)
    a_n, s_n = alpha_sigma(sig[k + 1])
    h = lam(k + 1) - lam(k)
    sde = cfg["algorithm_type"] == "sde-dpmsolver++"
    e, e2 = math.exp(-h), math.exp(-2.0 * h)
    m0 = history[-1]
    if order == 1:
        D = [m0]
        c = [a_n * (1 - e2)] if sde else [-(a_n * (e - 1.0))]
    elif order == 2:
        r0 = (lam(k) - lam(k - 1)) / h
        D = [m0, (1.0 / r0) * (m0 - history[-2])]
        if sde:
            c = [a_n * (1 - e2), 0.5 * a_n * (1 - e2) if cfg["solver_type"] == "midpoint"
                 else a_n * ((1.0 - e2) / (-2.0 * h) + 1.0)]
        else:
            c = [-(a_n * (e - 1.0)), -0.5 * (a_n * (e - 1.0)) if cfg["solver_type"] == "midpoint"
                 else a_n * ((e - 1.0) / h + 1.0)]
    else:
        r0, r1 = (lam(k) - lam(k - 1)) / h, (lam(k - 1) - lam(k - 2)) / h
        d10, d11 = (1.0 / r0) * (m0 - history[-2]), (1.0 / r1) * (history[-2] - history[-3])
        D = [m0, d10 + (r0 / (r0 + r1)) * (d10 - d11), (1.0 / (r0 + r1)) * (d10 - d11)]
        if sde:
            c = [a_n * (1.0 - e2), a_n * ((1.0 - e2) / (-2.0 * h) + 1.0),
                 a_n * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)]
        else:
            c = [-(a_n * (e - 1.0)), a_n * ((e - 1.0) / h + 1.0), -(a_n * ((e - 1.0 + h) / h**2 - 0.5))]
    out = (s_n / s_t * (e if sde else 1.0)) * x
    for ci, di in zip(c, D):
        out = out + ci * di
    if sde:
        out = out + s_n * math.sqrt(1.0 - e2) * z
    del history[:-3]
    return out


def euler_step(scheduler, m, t: int, x, z, ancestral: bool):
    """diffusers' EulerDiscreteScheduler.step (s_churn = 0) / EulerAncestralDiscreteScheduler.step
    with the noise z given, on diffusers' sample_k = x * sqrt(sigma^2 + 1); returns the next x
    (the next sample_k over sqrt(sigma_next^2 + 1), what diffusers' scale_model_input feeds the model)."""
    k = scheduler.row_index(t)
    sigma, nxt = float(scheduler._sigmas[k]), float(scheduler._sigmas[k + 1])
    sample = x * math.sqrt(sigma**2 + 1)
    prediction = scheduler.config["prediction_type"]
    if prediction == "epsilon":
        x0 = sample - sigma * m
    elif prediction == "v_prediction":
        x0 = m * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    else:
        x0 = m
    derivative = (sample - x0) / sigma
    if ancestral:
        up = (nxt**2 * (sigma**2 - nxt**2) / sigma**2) ** 0.5
        down = (nxt**2 - up**2) ** 0.5
        prev = sample + derivative * (down - sigma) + z * up
    else:
        prev = sample + derivative * (nxt - sigma)
    return prev / math.sqrt(nxt**2 + 1)


def cm_step(scheduler, m, t, x, z):
    """diffusers' CMStochasticIterativeScheduler.step with the noise z given (None: none), on its
    sample = x * sqrt(sigma^2 + sigma_data^2); returns the next x (the next sample over the next
    sqrt(sigma^2 + sigma_data^2)), or at the last step the sample itself."""
    k = scheduler.row_index(t)
    cfg = scheduler.config
    sigma, nxt = float(scheduler._sigmas[k]), float(scheduler._sigmas[k + 1])
    lo, hi, sd = cfg["sigma_min"], cfg["sigma_max"], cfg["sigma_data"]
    sample = x * math.sqrt(sigma**2 + sd**2)
    c_skip = sd**2 / ((sigma - lo) ** 2 + sd**2)                      # the boundary condition (Appendix C)
    c_out = (sigma - lo) * sd / (sigma**2 + sd**2) ** 0.5
    denoised = c_out * m + c_skip * sample
    if cfg["clip_denoised"]:
        denoised = denoised.clamp(-1, 1)
    sigma_hat = min(max(nxt, lo), hi)
    prev = denoised if z is None else denoised + z * cfg["s_noise"] * (sigma_hat**2 - lo**2) ** 0.5
    return prev if k == len(scheduler.timesteps) - 1 else prev / math.sqrt(nxt**2 + sd**2)


def _cm(scheduler, eta):
    last = len(scheduler.timesteps) - 1   # one-step sampling draws no noise, and the last step adds none
    return (lambda m, t, x, z: cm_step(scheduler, m, t, x, z)), (lambda t: scheduler.row_index(t) < last)


def _euler(scheduler, eta):
    return (lambda m, t, x, z: euler_step(scheduler, m, t, x, z, False)), (lambda t: False)


def _euler_ancestral(scheduler, eta):
    return (lambda m, t, x, z: euler_step(scheduler, m, t, x, z, True)), (lambda t: True)


def _ddpm(scheduler, eta):
    return (lambda m, t, x, z: ddpm_step(scheduler, m, t, x, z)), (lambda t: t > 0)


def _ddim(scheduler, eta):
    return (lambda m, t, x, z: ddim_step(scheduler, m, t, x, z, eta)), (lambda t: eta > 0)


def _dpm_solver(scheduler, eta):
    history: list = []
    sde = scheduler.config["algorithm_type"] == "sde-dpmsolver++"
    return (lambda m, t, x, z: dpm_solver_step(scheduler, history, m, t, x, z)), (lambda t: sde)


# The oracle per scheduler class: (scheduler, eta) -> (step(m, t, x, z), needs_noise(t)). The
# reference is written per sampler from the papers and diffusers, on purpose: it never reads the table.
FORMULAS = {"DDPMScheduler": _ddpm, "DDIMScheduler": _ddim, "DPMSolverMultistepScheduler": _dpm_solver,
            "EulerDiscreteScheduler": _euler, "EulerAncestralDiscreteScheduler": _euler_ancestral,
            "CMStochasticIterativeScheduler": _cm}


def per_sample(unet: Callable, class_emb: torch.Tensor | None = None) -> Callable:
    """unet applied one sample at a time: torch picks conv algorithms by batch size, so batched
    calls would break batch invariance (sample(n=N)[:k] == sample(n=k)). ``class_emb`` [N, D]: a
    class-conditional U-Net's class embedding, row i with sample i."""
    def forward(x, t):   # x: [N, C, H, W] tensor -> model output [N, C', H, W]
        if class_emb is None:
            return torch.cat([unet(x[i:i + 1], t) for i in range(x.shape[0])])
        return torch.cat([unet(x[i:i + 1], t, class_emb=class_emb[i:i + 1]) for i in range(x.shape[0])])
    return forward


def guided(unet: Callable, scale: float) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022) as the papers write it: the model evaluated on
    [x, x], whose class rows are the labels then the null class, and the guided output
    m_u + w (m_c - m_u) handed to the sampler's formula as its model output."""
    def forward(x, t):
        n = x.shape[0]
        out = unet(torch.cat([x, x]), t)
        m_c, m_u = out[:n], out[n:]
        return m_u + scale * (m_c - m_u)
    return forward


@torch.no_grad()
def reference_sample(unet: Callable, scheduler, shape: tuple, *, seed: int, eta: float = 0.0,
                     first_index: int = 0, keep: Iterable[int] = (), device="cpu",
                     noise_fn: Callable = spec_noise, callback: Callable | None = None, every: int = 1,
                     guidance: float | None = None, schedule=None):
    """Run the loop over ``scheduler.timesteps``; returns (x_0 [N, C, H, W] float32, frames).
    ``schedule``: the loop's StepSchedule of the scheduler (default: scheduler.schedule(eta)), whose
    noise keys, model times and x_T scale the loop takes; the step formulas read the scheduler.

    unet(x, t) -> model output. ``keep``: loop positions to copy out (0 = x_T, k = after k steps).
    ``noise_fn(seed, shape, step, first_index, device)``: the spec's noise by default (the
    benchmark swaps in torch.randn to time what a plain torch sampler does). ``guidance`` w:
    classifier-free guidance of the N samples of ``shape``; unet then takes 2N rows (``guided``).
    """
    name = type(scheduler).__name__
    if name not in FORMULAS:
        raise ValueError(f"the reference sampler has no formula for {name}")
    formula, needs_noise = FORMULAS[name](scheduler, eta)
    model = unet if guidance is None else guided(unet, guidance)

    def step(k, t, x, m):
        z = noise_fn(seed, shape, t, first_index, device) if needs_noise(t) else None
        return formula(m, t, x, z)

    x = noise_fn(seed, shape, -1, first_index, device)                  # unscaled x_T: [N, C, H, W]
    # a fractional schedule: the model sees diffusers' float32 timesteps, the noise keys stay integers
    if schedule is None:
        schedule = scheduler.schedule(eta=eta)
    return run_loop(schedule.timesteps, x, model, step, keep=set(keep), callback=callback, every=every,
                    **schedule_loop(schedule))
