"""Few-step samplers on the bundled digits model.

- test_quality_by_sampler_and_steps: the table sampler x steps (5, 10, 15, 20, 50) of the
  project's digit-quality measures (fastddpm.metrics: confident share, classes present, Fréchet
  ratio) with each cell's wall time, beside DDPM with all 200 steps, FASTDDPM_BENCH_QUALITY_N
  images (default 500) of seed 0 per cell, on the best backend. extra_info["table"] holds it and
  "target_dpm2m_15" says whether DPM-Solver++ 2M at 15 steps is within 10% of DDPM-200's Fréchet
  ratio with 10/10 classes and a confident share within 3 points.
- test_time_to_16_digits: 16 digits at DDPM-200 quality: fastddpm's DPM-Solver++ 2M at 15 steps
  against diffusers' DDPMPipeline with DDPM and 200 steps and against diffusers with
  DPMSolverMultistepScheduler at 15 steps (the same config as fastddpm's), same model, interleaved
  rounds; the answer is checked first (diffusers' own scheduler and UNet2DModel from fastddpm's x_T
  against fastddpm's images).
"""
import os
import statistics
import tempfile
import time

import numpy as np
import pytest

import fastddpm
from fastddpm.metrics import evaluate_digits

N_QUALITY = int(os.environ.get("FASTDDPM_BENCH_QUALITY_N", "500"))
ROUNDS = int(os.environ.get("FASTDDPM_BENCH_SAMPLER_ROUNDS", "5"))
SAMPLERS = ("ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "euler", "euler-a")
STEPS = (5, 10, 15, 20, 50)


def _cell(pipe, n, **kw):
    t0 = time.perf_counter()
    images = pipe(n, seed=0, **kw)
    seconds = time.perf_counter() - t0
    assert images.shape == (n, 16, 16, 1) and images.dtype == np.uint8
    rep = evaluate_digits(images)
    return {"confident": rep.confident, "classes": rep.classes_present, "fd_ratio": rep.fd_ratio, "seconds": seconds}


def test_quality_by_sampler_and_steps(benchmark):
    pytest.importorskip("sklearn", reason="the digit classifier needs scikit-learn")
    pipe = fastddpm.load("digits")
    table = {}

    def run():
        table["ddpm-200"] = _cell(pipe, N_QUALITY)
        for sampler in SAMPLERS:
            for steps in STEPS:
                table[f"{sampler}-{steps}"] = _cell(pipe, N_QUALITY, sampler=sampler, steps=steps)

    benchmark.pedantic(run, rounds=1, iterations=1)
    base, cand = table["ddpm-200"], table["dpm++2m-15"]
    target = (cand["fd_ratio"] <= 1.1 * base["fd_ratio"] and cand["classes"] == 10
              and cand["confident"] >= base["confident"] - 0.03)
    benchmark.group = "samplers quality"
    benchmark.extra_info.update(kind="sampler-quality", images=N_QUALITY, table=table, target_dpm2m_15=target)
    print(f"\n{N_QUALITY} digits per cell; DDPM-200: confident {base['confident']:.3f}, classes {base['classes']}, "
          f"Fréchet ratio {base['fd_ratio']:.3f}, {base['seconds']:.2f} s")
    print("| sampler | " + " | ".join(f"{s} steps" for s in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for sampler in SAMPLERS:
        cells = [table[f"{sampler}-{s}"] for s in STEPS]
        print(f"| {sampler} | " + " | ".join(f"{c['fd_ratio']:.2f} / {c['confident']:.0%} / {c['classes']} / "
                                            f"{c['seconds']:.2f} s" for c in cells) + " |")
    print(f"DPM-Solver++ 2M at 15 steps within 10% of DDPM-200's Fréchet ratio, 10 classes, confidence "
          f"within 3 points: {target}")


def test_time_to_16_digits(benchmark):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the baseline")
    pipe = fastddpm.load("digits")
    ours = pipe.scheduler_for("dpm++2m", 15)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save(tmp)
        ddpm = diffusers.DDPMPipeline.from_pretrained(tmp)
        ours.save_config(os.path.join(tmp, "dpm"))
        dpm_sched = diffusers.DPMSolverMultistepScheduler.from_config(
            diffusers.DPMSolverMultistepScheduler.load_config(os.path.join(tmp, "dpm")))
    dpm = diffusers.DDPMPipeline(unet=ddpm.unet, scheduler=dpm_sched)
    ddpm.set_progress_bar_config(disable=True)
    dpm.set_progress_bar_config(disable=True)

    # the answer first: diffusers' scheduler and UNet2DModel from fastddpm's x_T give fastddpm's images
    got = pipe(16, sampler="dpm++2m", steps=15, seed=3, output="float")
    latents = torch.from_numpy(fastddpm.noise(3, (16, 1, 16, 16), -1))
    dpm_sched.set_timesteps(15)
    with torch.no_grad():
        for t in dpm_sched.timesteps:
            latents = dpm_sched.step(ddpm.unet(latents, t).sample, t, latents).prev_sample
    err = float(np.abs(got - latents.clamp(-1, 1).numpy()).max())
    assert err <= 2e-3, f"fastddpm's DPM-Solver++ 2M differs from diffusers' by {err:.3g}"

    runs = {
        "fastddpm dpm++2m 15": lambda i: pipe(16, sampler="dpm++2m", steps=15, seed=i),
        "diffusers ddpm 200": lambda i: ddpm(batch_size=16, num_inference_steps=200, output_type="np",
                                             generator=torch.Generator().manual_seed(i)),
        "diffusers dpm++2m 15": lambda i: dpm(batch_size=16, num_inference_steps=15, output_type="np",
                                              generator=torch.Generator().manual_seed(i)),
    }
    times = {k: [] for k in runs}

    def rounds():
        for r in range(ROUNDS):
            names = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in names:
                t0 = time.perf_counter()
                with torch.no_grad():
                    runs[name](r)
                times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    ours_t = times["fastddpm dpm++2m 15"]
    ratios = {k: statistics.median(t / o for t, o in zip(v, ours_t)) for k, v in times.items() if k != "fastddpm dpm++2m 15"}
    benchmark.group = "time to 16 digits"
    benchmark.extra_info.update(kind="time-to-16-digits", rounds=ROUNDS, torch_threads=torch.get_num_threads(),
                                seconds={k: v for k, v in times.items()},
                                medians={k: statistics.median(v) for k, v in times.items()},
                                speedup_vs=ratios, check_max_abs=err)
    print("\n" + "; ".join(f"{k}: {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()))
    print("fastddpm's speed-up (median of paired rounds): " + ", ".join(f"{v:.1f}x vs {k}" for k, v in ratios.items()))
