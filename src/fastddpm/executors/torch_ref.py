"""The torch backend: the fused step written as plain, unfused torch ops (CPU or CUDA tensors).

It is the slow, obviously-right executor: the baseline of the step benchmarks and the fallback when
nothing compiled and numba is missing. Its noise is the spec itself (fastddpm.noise, float64 NumPy
rounded to float32), moved to the arrays' device, so it matches every other backend exactly.
"""
from __future__ import annotations

import warnings

import numpy as np

from .. import philox as noise_spec
from ..philox import INITIAL_STEP
from ..coefficients import A_M, A_X, C_X0, CLIP, D_M, D_X, H1, H2, SIGMA
from .base import Backend, Engine, EngineLock

try:
    import torch
    _TORCH_ERROR = None
except ImportError as exc:
    torch, _TORCH_ERROR = None, f"PyTorch is not installed ({exc})"


def guided_output(m, m_u, w):
    """The model output of a classifier-free guided step, m_u + w (m - m_u), in float32 and in that
    order (step.h step_guided_output): m the conditional output, m_u the null class's."""
    return m_u + float(np.float32(w)) * (m - m_u)


def reference_step(x, m, row, z, h1=None, h2=None, x0_out=None, guide=None):
    """Mirrors the fused step kernel (csrc/include/fastddpm/step.h) in plain torch ops.

    x, m, z: [N, ...] float32 tensors; row: a coefficient row (coefficients.py's columns);
    h1, h2: the previous x0 predictions or None; x0_out: where this step's x0 goes, or None;
    guide: None or (m_u, w): the step reads guided_output(m, m_u, w) for its model output.
    """
    a_x, a_m, c_x0, d_x, d_m, sigma, clip = (float(row[c]) for c in (A_X, A_M, C_X0, D_X, D_M, SIGMA, CLIP))
    if guide is not None:
        m = guided_output(m, *guide)
    x0 = a_x * x + a_m * m
    if clip > 0:
        x0 = torch.clamp(x0, -clip, clip)   # clamp propagates NaN, as the kernels do
    out = c_x0 * x0 + d_x * x + d_m * m
    if h1 is not None:
        out = out + float(row[H1]) * h1
    if h2 is not None:
        out = out + float(row[H2]) * h2
    if sigma != 0.0:
        out = out + sigma * z
    if x0_out is not None:
        x0_out.copy_(x0)
    return out


def reference_step_randn(x, m, row, generator=None):
    """The benchmark baseline: reference_step with z = torch.randn (what a plain torch sampler does)."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return reference_step(x, m, row, z)


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda")

    def unavailable(self) -> list[str]:
        return [_TORCH_ERROR] if _TORCH_ERROR else []

    def supports(self, device: str) -> list[str]:
        reasons = super().supports(device)
        if device == "cuda" and not reasons and not torch.cuda.is_available():
            reasons.append("torch.cuda.is_available() is False")
        return reasons

    def step(self, x, m, out, table, row, seed, noise_step, first_index, noise, history=None, guide=None) -> None:
        is_numpy = isinstance(x, np.ndarray)
        xt, mt = (_read_only_view(x), _read_only_view(m)) if is_numpy else (x, m)
        if guide is not None and is_numpy:
            guide = (_read_only_view(guide[0]), guide[1])
        h1, h2, x0_out = history if history is not None else (None, None, None)
        if is_numpy:
            h1, h2 = (None if h is None else _read_only_view(h) for h in (h1, h2))
            x0_out = None if x0_out is None else torch.from_numpy(x0_out)
        coef = table[row]
        if noise is not None:
            z = _read_only_view(noise) if is_numpy else noise
        elif coef[SIGMA] != 0:
            z = torch.from_numpy(noise_spec.noise(seed, tuple(xt.shape), noise_step, first_index)).to(xt.device)
        else:
            z = None
        with torch.no_grad():
            result = reference_step(xt, mt, coef, z, h1, h2, x0_out, guide)
            (torch.from_numpy(out) if is_numpy else out).copy_(result)

    def noise(self, seed, shape, step, first_index=0, device="cpu"):
        z = noise_spec.noise(seed, shape, step, first_index)
        return z if device == "cpu" else torch.from_numpy(z).to(device)

    def philox_uint32(self, seed, batch, per_sample, step, first_index=0):
        return noise_spec.philox_uint32(seed, batch, per_sample, step, first_index)

    def describe(self) -> dict:
        return {"torch": torch.__version__, "threads": torch.get_num_threads()}

    def loop_description(self) -> str:
        return "reference U-Net and step"

    def make_engine(self, config, weights, batch, height, width, options=None) -> "ReferenceEngine":
        """The all-PyTorch reference sampler: the reference U-Net and the papers' formulas."""
        return ReferenceEngine(config, weights, batch, height, width, options)


class ReferenceEngine(Engine):
    """The reference U-Net (PyTorch, CPU) run by loop.py. Its step is the papers' formulas
    (reference/sampler.py: the backend="torch" sampler), or, given ``step_backend``, that
    backend's fused step (for a backend with no U-Net engine of its own). Class conditioning:
    the U-Net adds class_emb; guidance: the formulas get the guided model output (the papers'
    way), the fused step its guide (loop.py)."""

    history = 2
    supports_conditioning = True

    def __init__(self, config, weights, batch, height, width, options=None, step_backend=None):
        if torch is None:
            raise RuntimeError(_TORCH_ERROR)
        super().__init__(config, weights, batch, height, width, options)
        self.dtype = (step_backend or BACKEND).check_dtype(self.options.dtype)
        from ..reference import ReferenceUNet
        self._unet = ReferenceUNet.from_weights(self.config, self.weights).eval()
        self._step_backend = step_backend
        self._lock = EngineLock("reference engine")

    def _forward(self, x, t, class_emb=None):
        ce = None if class_emb is None else torch.from_numpy(class_emb)
        with self._lock, torch.no_grad():
            return self._unet(torch.from_numpy(x), torch.from_numpy(t), class_emb=ce).numpy()

    def _run(self, schedule, seed, first_index, keep, callback, class_emb=None, guidance=None):
        from ..reference.sampler import per_sample, reference_sample
        unet = per_sample(self._unet, None if class_emb is None else torch.from_numpy(class_emb))
        shape = (self.samples(guidance),) + self.input_shape[1:]     # the samples: [n, C, H, W]
        with self._lock, torch.no_grad():
            if self._step_backend is None:
                x, frames = reference_sample(unet, schedule.scheduler, shape, seed=seed,
                                             eta=dict(schedule.options).get("eta", 0.0), first_index=first_index,
                                             keep=keep, callback=callback, every=self.callback_every,
                                             guidance=guidance, schedule=schedule)
                return x.numpy(), {k: v.numpy() for k, v in frames.items()}
            return self._run_fused_steps(unet, schedule, shape, seed, first_index, keep, callback, guidance)

    def _run_fused_steps(self, unet, schedule, shape, seed, first_index, keep, callback, guidance=None):
        from ..loop import fused_steps, run_loop, schedule_loop
        be = self._step_backend
        try:
            x = be.noise(seed, shape, INITIAL_STEP, first_index)     # x_T: [n, C, H, W]
        except NotImplementedError:
            x = noise_spec.noise(seed, shape, -1, first_index)
        x = np.ascontiguousarray(x, dtype=np.float32)
        xt = torch.from_numpy(x)   # the same memory: the steps update x in place

        def forward(x, t):         # the model output of every engine row: [x] or, guided, [x, x]
            return unet(xt if guidance is None else torch.cat([xt, xt]), t).numpy()

        step = fused_steps(be, schedule, seed, first_index, x, guidance)

        return run_loop(schedule.timesteps, x, forward, step, keep=keep, callback=callback,
                        every=self.callback_every, **schedule_loop(schedule))


def _read_only_view(a: np.ndarray):
    """torch.from_numpy of an input the step only reads: a read-only array is fine (torch would
    warn that writing through the tensor is undefined; nothing writes)."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


BACKEND = TorchBackend()
