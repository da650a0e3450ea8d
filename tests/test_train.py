"""Training: the loss goes down, the output loads in fastddpm and diffusers, resume is exact."""
import csv
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastddpm
from fastddpm.data import DatasetError, load_digits, load_image_folder, digit_labels, downscale_to_digits
from fastddpm.train import TRAIN_PRESETS, TrainConfig, TrainError, train

# a tiny U-Net on 8x8 digits: a handful of steps take about a second
TINY_UNET = dict(TRAIN_PRESETS["digits"]["unet"], block_out_channels=[8, 16], norm_num_groups=4,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])


def tiny_config(**kw):
    base = dict(dataset="digits", image_size=8, unet=TINY_UNET, num_train_timesteps=50,
                beta_schedule="squaredcos_cap_v2", lr=3e-3, warmup_steps=2, batch_size=32, steps=40,
                ema_decay=0.9, seed=3, threads=1, checkpoint_every=0, log_every=5)
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "model"
    res = train(tiny_config(), out, quiet=True)
    return out, res


def test_loss_goes_down(trained):
    _, res = trained
    assert res.steps == 40 and len(res.losses) == 40
    first, last = np.mean(res.losses[:5]), np.mean(res.losses[-5:])
    assert last < 0.7 * first, (first, last)


def test_writes_diffusers_layout_and_curves(trained):
    out, res = trained
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json", "training/checkpoint.pt", "training/loss.csv",
                "training/loss.png", "training/train_config.json"):
        assert (out / rel).is_file(), rel
    rows = list(csv.reader(open(out / "training" / "loss.csv")))
    assert rows[0] == ["step", "loss", "lr"] and len(rows) == 41
    assert (out / "training" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.startswith(".")], "temporary files left behind"


def test_output_loads_in_fastddpm_and_diffusers(trained):
    out, _ = trained
    pipe = fastddpm.load(str(out))
    assert pipe.image_size == (8, 8) and pipe.scheduler.config["beta_schedule"] == "squaredcos_cap_v2"
    imgs = pipe(2, steps=5, seed=0)
    assert imgs.shape == (2, 8, 8, 1) and imgs.dtype == np.uint8
    diffusers = pytest.importorskip("diffusers")
    dp = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert dp.scheduler.config.num_train_timesteps == 50
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32))
    with torch.no_grad():
        ref = dp.unet(x, 7).sample
    ours = pipe.unet(x.numpy(), 7, backend="torch")
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-5)
    # the EMA weights are what was saved
    ck = torch.load(out / "training" / "checkpoint.pt", weights_only=True)
    np.testing.assert_array_equal(pipe.weights["conv_in.weight"], ck["ema"]["conv_in.weight"].numpy())


def test_resume_matches_an_uninterrupted_run(tmp_path, trained):
    """Stop after 17 steps (checkpoint), resume to 40: the same losses, weights, EMA and optimizer
    state as the uninterrupted run, bit for bit (same torch build, one thread)."""
    _, full = trained
    out = tmp_path / "m"
    part = train(tiny_config(), out, quiet=True, stop_after=17)
    assert part.steps == 17 and not (out / "unet").exists()   # no model until training ends
    res = train(tiny_config(), out, quiet=True, resume=True)
    assert res.resumed_from == 17 and res.steps == 40
    assert res.losses == full.losses
    a = torch.load(out / "training" / "checkpoint.pt", weights_only=True)
    b = torch.load(full.work_dir + "/checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def _sigint_at_step(monkeypatch, at: int):
    """Make training raise SIGINT at the start of step ``at``; returns a function that undoes it."""
    import signal
    import fastddpm.train as tr
    orig = tr._lr_at

    def lr_at(cfg, step, total):
        if step == at:
            signal.raise_signal(signal.SIGINT)
        return orig(cfg, step, total)

    monkeypatch.setattr(tr, "_lr_at", lr_at)
    return lambda: monkeypatch.setattr(tr, "_lr_at", orig)


def test_ctrl_c_checkpoints_whole_steps_and_resumes(tmp_path, trained, monkeypatch, sigint_handled):
    """SIGINT during step 12: that step finishes, is checkpointed, KeyboardInterrupt propagates;
    resuming gives the uninterrupted run's losses."""
    import signal
    _, full = trained
    undo = _sigint_at_step(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), tmp_path / "m", quiet=True)
    undo()
    ck = torch.load(tmp_path / "m" / "training" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 13 and len(ck["losses"]) == 13
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored
    res = train(tiny_config(), tmp_path / "m", quiet=True, resume=True)
    assert res.losses == full.losses


def test_training_leaves_an_ignored_sigint_ignored(tmp_path, monkeypatch):
    """A run started with SIGINT ignored (nohup, a background job) is not made interruptible."""
    import signal
    _sigint_at_step(monkeypatch, 2)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        res = train(tiny_config(steps=5), tmp_path / "m", quiet=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
    assert res.steps == 5 and len(res.losses) == 5


def test_same_seed_same_run_other_seed_differs(tmp_path, trained):
    _, full = trained
    again = train(tiny_config(), tmp_path / "a", quiet=True, stop_after=10)   # same config, 10 steps
    assert again.losses == full.losses[:10]
    other = train(tiny_config(seed=4), tmp_path / "b", quiet=True, stop_after=10)
    assert other.losses != again.losses


def test_resume_refusals(tmp_path):
    with pytest.raises(TrainError, match="no checkpoint"):
        train(tiny_config(steps=2), tmp_path / "x", quiet=True, resume=True)
    train(tiny_config(steps=2), tmp_path / "y", quiet=True, stop_after=1)
    with pytest.raises(TrainError, match="exists: pass resume=True"):
        train(tiny_config(steps=2), tmp_path / "y", quiet=True)
    with pytest.raises(TrainError, match="different lr"):
        train(tiny_config(steps=2, lr=1e-4), tmp_path / "y", quiet=True, resume=True)


@pytest.mark.parametrize("bad, match", [
    (dict(lr=0), "lr"), (dict(batch_size=0), "batch_size"), (dict(steps=None), "exactly one"),
    (dict(steps=5, epochs=1.0), "exactly one"), (dict(ema_decay=1.0), "ema_decay"),
    (dict(prediction_type="noise"), "prediction_type"), (dict(beta_schedule="cubic"), "beta_schedule"),
    (dict(unet=dict(TINY_UNET, norm_num_groups=3)), "norm_num_groups"), (dict(colour=1), "unknown"),
])
def test_bad_knobs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_prediction_types_and_epochs(tmp_path):
    for pt in ("sample", "v_prediction"):
        res = train(tiny_config(prediction_type=pt, steps=3), tmp_path / pt, quiet=True)
        assert fastddpm.load(str(tmp_path / pt)).scheduler.config["prediction_type"] == pt
        assert np.isfinite(res.losses).all()
    cfg = tiny_config(steps=None, epochs=0.1)
    assert cfg.total_steps(1797) == 6


# ---------------------------------------------------------------------- datasets

def test_digits_dataset():
    x = load_digits(16)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() <= 1.0
    x8 = load_digits(8)
    assert x8.shape == (1797, 1, 8, 8)
    # downscaling the upscaled digits gives the originals back, blurred a little by the bilinear
    # filter (mean error ~1.1 on the 0..16 scale, correlation > 0.95)
    from sklearn.datasets import load_digits as sk
    back, orig = downscale_to_digits(x), sk().data
    assert np.abs(back - orig).mean() < 1.5
    assert np.corrcoef(back.ravel(), orig.ravel())[0, 1] > 0.95
    assert digit_labels().shape == (1797,)


def test_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8)).save(tmp_path / "tall.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        x = load_image_folder(tmp_path, 16, channels=3)
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    with pytest.warns(UserWarning):
        g = load_image_folder(tmp_path, 8, channels=1)
    assert g.shape == (2, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="no image files"):
        load_image_folder(tmp_path, 16)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 16)
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="bad.png"), pytest.raises(DatasetError, match="could be read"):
        load_image_folder(tmp_path, 16)
    with pytest.raises(DatasetError, match="channels"):
        load_image_folder(tmp_path, 16, channels=2)


def test_train_on_a_folder(tmp_path):
    from PIL import Image
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    res = train(tiny_config(dataset=str(d), channels=3, steps=2, batch_size=4), tmp_path / "m", quiet=True)
    pipe = fastddpm.load(str(tmp_path / "m"))
    assert res.steps == 2 and pipe.unet_config.in_channels == 3


# ---------------------------------------------------------------------- class conditioning

COND_UNET = dict(TINY_UNET, num_class_embeds=11)


def cond_config(**kw):
    return tiny_config(**{**dict(unet=COND_UNET, cond_drop=0.25, guidance_scale=2.5, steps=12), **kw})


@pytest.fixture(scope="module")
def cond_trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "model"
    return out, train(cond_config(), out, quiet=True)


def test_conditional_training_saves_the_null_class(cond_trained):
    import json
    out, res = cond_trained
    assert res.steps == 12 and np.isfinite(res.losses).all()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_fastddpm_null_class"] == 10 and index["_fastddpm_guidance_scale"] == 2.5
    pipe = fastddpm.load(str(out))
    assert pipe.unet_config.num_class_embeds == 11 and pipe.null_class == 10 and pipe.guidance_scale == 2.5
    assert pipe.weights["class_embedding.weight"].shape == (11, pipe.unet_config.time_embed_dim)


def test_the_labels_reach_the_model(cond_trained, monkeypatch):
    """Every step feeds the model the images' digit labels, each replaced by the null class (10)
    exactly where _dropped(seed, step) says, and nothing else."""
    import fastddpm.train as tr
    from fastddpm.reference import ReferenceUNet
    seen = []
    orig = ReferenceUNet.forward

    def forward(self, sample, timestep, class_labels=None, **kw):
        if self.training:
            seen.append(class_labels.clone())
        return orig(self, sample, timestep, class_labels, **kw)

    monkeypatch.setattr(ReferenceUNet, "forward", forward)
    cfg = cond_config(steps=4)
    train(cfg, cond_trained[0].parent / "labels", quiet=True)
    truth = digit_labels()
    assert len(seen) == 4
    for step, y in enumerate(seen):
        want = truth[tr._batch_indices(cfg.seed, step, len(truth), cfg.batch_size)]
        drop = tr._dropped(cfg.seed, step, cfg.batch_size, cfg.cond_drop)
        np.testing.assert_array_equal(y.numpy(), np.where(drop, 10, want))
    # the dropout is a function of (seed, step): the same mask again, another for another step or seed
    a = tr._dropped(3, 5, 4096, 0.25)
    np.testing.assert_array_equal(a, tr._dropped(3, 5, 4096, 0.25))
    assert not np.array_equal(a, tr._dropped(3, 6, 4096, 0.25)) and not np.array_equal(a, tr._dropped(4, 5, 4096, 0.25))
    assert 0.2 < a.mean() < 0.3


def test_conditional_resume_matches_an_uninterrupted_run(tmp_path, cond_trained):
    """Stopped after 5 steps and resumed: the same losses and the same model bytes as the
    uninterrupted run (the dropped labels are drawn from (seed, step), not a running stream)."""
    out0, full = cond_trained
    out = tmp_path / "m"
    train(cond_config(), out, quiet=True, stop_after=5)
    res = train(cond_config(guidance_scale=4.0), out, quiet=True, resume=True)   # may change on resume
    assert res.resumed_from == 5 and res.losses == full.losses
    rel = "unet/diffusion_pytorch_model.safetensors"
    assert (out / rel).read_bytes() == (out0 / rel).read_bytes()
    assert fastddpm.load(str(out)).guidance_scale == 4.0


def test_conditional_training_on_arrays_with_labels(tmp_path):
    x = load_digits(8)[:40]
    y = digit_labels()[:40]
    res = train(cond_config(steps=2, batch_size=8), tmp_path / "a", quiet=True, dataset=x, labels=y)
    assert res.steps == 2
    with pytest.raises(TrainError, match="pass labels="):
        train(cond_config(steps=2), tmp_path / "b", quiet=True, dataset=x)
    with pytest.raises(TrainError, match="integer classes"):
        train(cond_config(steps=2), tmp_path / "c", quiet=True, dataset=x, labels=y[:10])
    with pytest.raises(TrainError, match="num_class_embeds must be 13: the 12 classes"):
        train(cond_config(steps=2), tmp_path / "d", quiet=True, dataset=x, labels=np.arange(40) % 12)
    with pytest.raises(TrainError, match="unconditional"):
        train(tiny_config(steps=2), tmp_path / "e", quiet=True, dataset=x, labels=y)


def test_unconditional_runs_are_unchanged_by_the_conditional_knobs(trained, tmp_path):
    """cond_drop = 0 and no class table: the same run as before these knobs existed (no extra
    draws), so the bundled digits model is still what its preset makes."""
    _, full = trained
    res = train(tiny_config(cond_drop=0.0, guidance_scale=None), tmp_path / "u", quiet=True, stop_after=10)
    assert res.losses == full.losses[:10]


@pytest.mark.parametrize("bad, match", [
    (dict(cond_drop=1.0), r"cond_drop must be a number in \[0, 1\)"),
    (dict(cond_drop=-0.1), r"cond_drop must be a number in \[0, 1\)"),
    (dict(cond_drop=True), r"cond_drop must be"),
    (dict(unet=TINY_UNET), "needs a class-conditional unet"),
    (dict(unet=dict(TINY_UNET, num_class_embeds=10)), r"num_class_embeds must be 11: the 10 classes and the null class"),
    (dict(unet=dict(TINY_UNET, num_class_embeds=12)), "num_class_embeds must be 11"),
    (dict(cond_drop=0.0), r"num_class_embeds must be 10: the 10 classes \(cond_drop = 0"),
    (dict(cond_drop=0.0, unet=dict(TINY_UNET, num_class_embeds=10)), "guidance_scale = 2.5 needs a null class"),
    (dict(guidance_scale=-1.0), "guidance_scale must be"),
    (dict(unet=dict(TINY_UNET, class_embed_type="timestep")), "class table"),
])
def test_conditional_knobs_are_checked(bad, match):
    with pytest.raises(TrainError, match=match):
        cond_config(**bad)


def test_a_folder_has_no_labels_for_a_conditional_unet(tmp_path):
    with pytest.raises(TrainError, match="folder of images, which has no labels"):
        cond_config(dataset=str(tmp_path), channels=3)


def test_conditional_without_dropout_has_no_null_class(tmp_path):
    out = tmp_path / "m"
    train(cond_config(cond_drop=0.0, guidance_scale=None, unet=dict(TINY_UNET, num_class_embeds=10), steps=2),
          out, quiet=True)
    pipe = fastddpm.load(str(out))
    assert pipe.unet_config.num_class_embeds == 10 and pipe.null_class is None


def test_the_digits_cond_preset():
    cfg = TrainConfig.preset("digits-cond")
    base = TrainConfig.preset("digits")
    assert cfg.unet == dict(base.unet, num_class_embeds=11) and cfg.cond_drop == 0.1 and cfg.null_class == 10
    assert cfg.guidance_scale == 3.0
    same = {k: v for k, v in cfg.to_dict().items() if k not in ("unet", "cond_drop", "guidance_scale")}
    assert same == {k: v for k, v in base.to_dict().items() if k not in ("unet", "cond_drop", "guidance_scale")}
