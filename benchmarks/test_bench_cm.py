"""One-step consistency-model sampling of the ImageNet-64 CM U-Net shape (diffusers' conversion
of openai's cd_imagenet64 models: ADM blocks, scale_shift, 1000 classes, 296M parameters; random
weights), batch 1, one class label: fastddpm.sample against diffusers' ConsistencyModelPipeline
eager, the same pipeline with its U-Net under torch.compile, and ONNX Runtime running the exported
U-Net with the same scheduler step in NumPy. Every implementation starts from the same x_T; the
images are checked against fastddpm's before anything is timed. Rounds are interleaved (the order
rotates), each timed call right after an untimed one of the same implementation, and a speed-up is
the median of the per-round ratios, as in test_bench_unet_paired.py.

    FASTDDPM_BENCH_CM_ROUNDS=5 pytest -s benchmarks/test_bench_cm.py
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pytest

import fastddpm
from fastddpm.philox import noise as spec_noise
from fastddpm.unet_config import CM_IMAGENET64, UNetConfig, flops, random_weights

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(2)

LABEL, SEED = 207, 3
TOL = 1e-4   # max abs on the [-1, 1] image (measured ~6e-6 between the engines and diffusers)


def _onnx_step(sess, x_t: np.ndarray, sched) -> np.ndarray:
    """One CM step around the ONNX U-Net: diffusers' scale_model_input, the model, its step (float32)."""
    s, sd, lo = float(sched._sigmas[0]), sched.config["sigma_data"], sched.config["sigma_min"]
    sample = x_t * np.float32(sched.init_noise_sigma)
    x_in = sample / np.float32(np.sqrt(s * s + sd * sd))
    m = sess.run(None, {"x": x_in, "t": np.array([sched.timesteps[0]], np.float32),
                        "label": np.array([LABEL], np.int64)})[0]
    c_skip, c_out = sched.boundary_scalings(s)
    return np.clip(np.float32(c_out) * m + np.float32(c_skip) * sample, -1, 1)


def _export(unet, path: str, shape) -> None:
    class Out(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t, label):
            return self.m(x, t, class_labels=label).sample

    torch.onnx.export(Out(unet), (torch.zeros(shape), torch.tensor([1.0]), torch.tensor([1])), path,
                      input_names=["x", "t", "label"], output_names=["out"], dynamo=False, opset_version=17)


def test_cm_imagenet64_one_step_paired(benchmark):
    cfg = UNetConfig.from_dict(CM_IMAGENET64)
    w = random_weights(cfg, seed=0)
    shape = (1, 3, 64, 64)
    normals = spec_noise(SEED, shape, -1)
    unet = diffusers.UNet2DModel.from_config(cfg.to_dict())
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    unet.eval()
    sched_d = diffusers.CMStochasticIterativeScheduler()
    pipe_d = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=sched_d)
    pipe_d.set_progress_bar_config(disable=True)
    ours = fastddpm.Pipeline(cfg, w, fastddpm.CMStochasticIterativeScheduler(), name="cm-imagenet64")

    def diffusers_run(p):
        with torch.no_grad():
            out = p(batch_size=1, class_labels=torch.tensor([LABEL]), latents=torch.from_numpy(normals),
                    num_inference_steps=1, output_type="pt").images
        return (out.permute(0, 3, 1, 2) if out.shape[-1] == 3 else out).numpy() * 2 - 1

    fns = {"fastddpm": lambda: ours(1, seed=SEED, labels=[LABEL], output="float", backend="native-cpu"),
           "diffusers-eager": lambda: diffusers_run(pipe_d)}
    skipped = {}
    compiled = diffusers.ConsistencyModelPipeline(unet=torch.compile(unet), scheduler=diffusers.CMStochasticIterativeScheduler())
    compiled.set_progress_bar_config(disable=True)
    fns["diffusers-compile"] = lambda: diffusers_run(compiled)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        from _onnx import session
        tmp = tempfile.TemporaryDirectory(prefix="fastddpm-bench-cm-")
        path = os.path.join(tmp.name, "cm64.onnx")
        _export(unet, path, shape)
        sess = session(path)
        sched = fastddpm.CMStochasticIterativeScheduler()
        sched.set_timesteps(1)
        fns["onnxruntime"] = lambda: _onnx_step(sess, normals, sched)
    except ImportError as e:
        skipped["onnxruntime"] = f"not installed: {e}"
    want = fns["fastddpm"]()
    setup = {}
    for name, fn in fns.items():   # the answers (and the first, compiling / exporting, calls)
        t0 = time.perf_counter()
        err = float(np.abs(fn() - want).max())
        setup[name] = time.perf_counter() - t0
        assert err <= TOL, f"{name}: max abs {err:.2e} against fastddpm"
    times = {name: [] for name in fns}
    order = list(fns)
    warm = []

    def one_round():
        for name in order:
            fns[name]()   # untimed, as in test_bench_unet_paired.py: other implementations' threads stop spinning
            t0 = time.perf_counter()
            fns[name]()
            if warm:
                times[name].append(time.perf_counter() - t0)
        warm.append(True)
        order.append(order.pop(0))

    rounds = int(os.environ.get("FASTDDPM_BENCH_CM_ROUNDS", "5"))
    benchmark.group = "cm imagenet64 one step b1"
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    t = {name: np.array(v) for name, v in times.items()}
    medians = {name: float(np.median(v) * 1e3) for name, v in t.items()}
    paired = {name: float(np.median(t[name] / t["fastddpm"])) for name in t if name != "fastddpm"}
    benchmark.extra_info.update(kind="paired-cm", model="cm-imagenet64", batch=1, gflop=flops(cfg, 1) / 1e9,
                                rounds=rounds, medians_ms=medians, paired=paired, skipped=skipped,
                                first_call_s={k: round(v, 2) for k, v in setup.items()})
    print(f"\nCM ImageNet-64 one step, b1: medians ms {medians}; fastddpm's speed-up {paired}; first calls s {setup}")
