"""The fastddpm command: each subcommand, and its error paths (message, exit code, no files)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fastddpm
from fastddpm.cli import main
from fastddpm.pipeline import Pipeline
from fastddpm.schedulers import DDPMScheduler
from fastddpm.unet_config import UNetConfig, random_weights

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            norm_num_groups=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = UNetConfig.from_dict(TINY)
    path = tmp_path_factory.mktemp("cli") / "tiny"
    Pipeline(cfg, random_weights(cfg, 0), DDPMScheduler(num_train_timesteps=10)).save(path)
    return str(path)


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_sample_grid_and_trajectory(tmp_path, model_dir, capsys):
    out = tmp_path / "s.png"
    rc, so, _ = run(["sample", "-m", model_dir, "-n", "4", "-o", str(out), "--trajectory", str(tmp_path / "t.gif"),
                     "--frames", "6", "--npy", str(tmp_path / "s.npy"), "--scale", "2"], capsys)
    assert rc == 0
    assert "4 images" in so and "wrote" in so
    assert Image.open(out).size == (2 * (2 * 8 + 3),) * 2
    with Image.open(tmp_path / "t.gif") as im:
        assert im.n_frames == 6
    assert Image.open(tmp_path / "t.png").size == (2 * (6 * 8 + 7), 2 * (4 * 8 + 5))
    a = np.load(tmp_path / "s.npy")
    np.testing.assert_array_equal(a, fastddpm.load(model_dir)(4, seed=0))


def test_sample_quiet_ddim(tmp_path, model_dir, capsys):
    rc, so, se = run(["sample", "-m", model_dir, "-n", "2", "--sampler", "ddim", "--steps", "3", "--eta", "0.5",
                      "-o", str(tmp_path / "s.png"), "-q"], capsys)
    assert rc == 0 and so == "" and (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++3m", "dpm++2m-sde"])
def test_sample_with_a_dpm_solver(sampler, tmp_path, model_dir, capsys):
    rc, so, se = run(["sample", "-m", model_dir, "-n", "2", "--sampler", sampler, "--steps", "4", "--seed", "3",
                      "-o", str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy"), "-q"], capsys)
    assert rc == 0 and (tmp_path / "s.png").is_file()
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"),
                                  fastddpm.load(model_dir)(2, sampler=sampler, steps=4, seed=3))


@pytest.mark.parametrize("argv, match", [
    (["-n", "0"], "positive integer"), (["-n", "x"], "positive integer"), (["--sampler", "plms"], "invalid choice"),
    (["--eta", "-1"], ">= 0"), (["--seed", "-3"], ">= 0"), (["--steps", "nan"], "positive integer"),
])
def test_sample_bad_arguments_exit_2(argv, match, tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "-m", model_dir, "-o", str(tmp_path / "s.png")] + argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, match", [
    (["-m", "/no/such/model"], "no model '/no/such/model'"),
    (["--eta", "0.3"], "DDIM parameter"),
    (["--backend", "fastest"], "unknown backend"),
    (["--steps", "11"], "num_inference_steps|steps"),
    (["--trajectory", "t.mp4"], "must be .gif or .png"),
])
def test_sample_failures_exit_1_and_write_nothing(extra, match, tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["sample", "-o", "s.png", "-q"] + (["-m", model_dir] if "-m" not in extra else []) + extra
    rc, _, err = run(argv, capsys)
    assert rc == 1 and "error:" in err
    import re
    assert re.search(match, err), err
    assert os.listdir(tmp_path) == []


def test_sample_unwritable_outputs(tmp_path, model_dir, capsys):
    for out in (str(tmp_path / "nodir" / "s.png"), str(tmp_path / "s.txt")):
        rc, _, err = run(["sample", "-m", model_dir, "-o", out, "-q"], capsys)
        assert rc == 1 and "cannot write" in err
    rc, _, err = run(["sample", "-m", model_dir, "-o", str(tmp_path / "s.png"), "-q",
                      "--trajectory", str(tmp_path / "nodir" / "t.gif")], capsys)
    assert rc == 1 and "does not exist" in err
    assert os.listdir(tmp_path) == []


def test_sample_missing_model_files(tmp_path, capsys):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    rc, _, err = run(["sample", "-m", str(tmp_path / "m"), "-o", str(tmp_path / "s.png")], capsys)
    assert rc == 1 and "config.json is missing" in err
    assert not (tmp_path / "s.png").exists()


def test_train_command(tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["train", "--dataset", "digits", "--image-size", "8", "--block-out-channels", "8,16", "--norm-groups", "4",
            "--attention-levels", "1", "--layers-per-block", "1", "--num-train-timesteps", "20",
            "--beta-schedule", "squaredcos_cap_v2", "--batch-size", "8", "--steps", "3", "--lr", "1e-3",
            "--warmup-steps", "1", "--threads", "1", "--out", str(out)]
    rc, so, _ = run(argv, capsys)
    assert rc == 0 and "done: 3 steps" in so and "model:" in so
    pipe = fastddpm.load(str(out))
    assert pipe.unet_config.block_out_channels == (8, 16)
    assert pipe.unet_config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    assert pipe.scheduler.num_train_timesteps == 20
    # the checkpoint exists: without --resume that is an error; with it, more steps continue the run
    rc, _, err = run(argv + ["-q"], capsys)
    assert rc == 1 and "--resume" in err
    rc, so, _ = run(argv[:-4] + ["--steps", "5", "--out", str(out), "--resume"], capsys)
    assert rc == 0 and "resumed at step 3" in so


def test_train_command_class_conditional(tmp_path, capsys):
    """--num-class-embeds K --cond-drop P --guidance-scale W: a model for classifier-free guidance."""
    import json
    out = tmp_path / "model"
    argv = ["train", "--dataset", "digits", "--image-size", "8", "--block-out-channels", "8,16", "--norm-groups", "4",
            "--attention-levels", "1", "--num-train-timesteps", "20", "--batch-size", "8", "--steps", "2",
            "--warmup-steps", "1", "--threads", "1", "--num-class-embeds", "11", "--cond-drop", "0.1",
            "--guidance-scale", "2", "--out", str(out)]
    rc, so, _ = run(argv, capsys)
    assert rc == 0 and "11 class embeddings, cond_drop 0.1" in so
    index = json.loads((out / "model_index.json").read_text())
    assert index["_fastddpm_null_class"] == 10 and index["_fastddpm_guidance_scale"] == 2.0
    assert fastddpm.load(str(out)).unet_config.num_class_embeds == 11


@pytest.mark.parametrize("argv, code, match", [
    (["train", "--steps", "3"], 1, "--out is required"),
    (["train", "--out", "{tmp}/m", "--cond-drop", "0.1"], 1, "needs a class-conditional unet"),
    (["train", "--out", "{tmp}/m", "--num-class-embeds", "11", "--cond-drop", "1"], 1, "cond_drop must be"),
    (["train", "--out", "{tmp}/m", "--num-class-embeds", "10", "--cond-drop", "0.1"], 1, "num_class_embeds must be 11"),
    (["train", "--preset", "mnist"], 1, "unknown preset"),
    (["train", "--out", "{tmp}/m", "--resume"], 1, "no checkpoint"),
    (["train", "--out", "{tmp}/m", "--lr", "0"], 1, "lr must be"),
    (["train", "--out", "{tmp}/m", "--dataset", "{tmp}/nothing-here", "--channels", "3", "-q", "--steps", "1"],
     1, "does not exist"),
    (["train", "--out", "{tmp}/m", "--block-out-channels", "8,x"], 2, "comma-separated"),
    (["train", "--out", "{tmp}/m", "--steps", "3", "--epochs", "2"], 2, "not allowed with"),
    (["train", "--out", "{tmp}/m", "--attention-levels", "5"], 1, "levels"),
])
def test_train_errors(argv, code, match, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
    else:
        rc, _, err = run(argv, capsys)
        assert rc == 1
    assert match in err, err
    assert not (tmp_path / "m" / "unet").exists()


def test_info_and_bench_errors(capsys, tmp_path):
    rc, so, _ = run(["info"], capsys)
    assert rc == 0 and "backends:" in so and "native-cpu" in so
    rc, _, err = run(["bench", "--benchmarks", str(tmp_path / "none")], capsys)
    assert rc == 1 and "not a directory" in err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastddpm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "sample" in r.stdout and "train" in r.stdout and "bench" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastddpm", "sample", "-m", "/no/such"], capture_output=True, text=True)
    assert r.returncode == 1 and "no model" in r.stderr


def test_demo_writes_its_pictures(tmp_path, capsys):
    from fastddpm.demo import main as demo
    assert demo(["--out", str(tmp_path), "-n", "2", "--frames", "3", "--steps", "10", "-q"]) == 0
    so = capsys.readouterr().out
    assert "samples.png" in so and "10 steps" in so and "s on " in so
    assert sorted(os.listdir(tmp_path)) == ["samples.png", "trajectory.gif", "trajectory.png"]
    with Image.open(tmp_path / "trajectory.gif") as im:
        assert im.n_frames == 3
    assert demo(["--out", str(tmp_path / "missing"), "-q"]) == 1


# ---------------------------------------------------------------------- class-conditional models

@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory):
    """A class-conditional model trained for guidance: classes 0-9, null class 10, default w = 3."""
    cfg = UNetConfig.from_dict({**TINY, "num_class_embeds": 11})
    path = tmp_path_factory.mktemp("cli-cond") / "cond"
    Pipeline(cfg, random_weights(cfg, 0), DDPMScheduler(num_train_timesteps=10), null_class=10,
             guidance_scale=3.0).save(path)
    return str(path)


def test_sample_with_a_label_and_guidance(tmp_path, cond_dir, capsys):
    rc, so, _ = run(["sample", "-m", cond_dir, "-n", "3", "--label", "7", "--guidance", "2", "--backend", "numba",
                     "-o", str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy")], capsys)
    assert rc == 0 and "3 images" in so and "label 7, guidance 2" in so
    pipe = fastddpm.load(cond_dir)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), pipe(3, labels=7, guidance_scale=2, backend="numba"))
    rc, so, _ = run(["sample", "-m", cond_dir, "-n", "2", "--label", "4", "--backend", "numba", "-o",
                     str(tmp_path / "d.png"), "--npy", str(tmp_path / "d.npy")], capsys)
    assert rc == 0 and "guidance 3" in so                                     # the model's default
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), pipe(2, labels=4, backend="numba"))


def test_sample_a_label_list_and_all_labels_one_grid_row_per_class(tmp_path, cond_dir, capsys):
    rc, so, _ = run(["sample", "-m", cond_dir, "-n", "2", "--label", "1,5", "--backend", "numba", "--scale", "1",
                     "-o", str(tmp_path / "l.png"), "--npy", str(tmp_path / "l.npy"), "-q"], capsys)
    assert rc == 0
    pipe = fastddpm.load(cond_dir)
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), pipe(4, labels=[1, 1, 5, 5], backend="numba"))
    assert Image.open(tmp_path / "l.png").size == (2 * 8 + 3, 2 * 8 + 3)
    rc, so, _ = run(["sample", "-m", cond_dir, "-n", "3", "--label", "all", "--guidance", "1", "--backend", "numba",
                     "--scale", "1", "-o", str(tmp_path / "a.png"), "--npy", str(tmp_path / "a.npy")], capsys)
    assert rc == 0 and "30 images" in so and "labels 0,1,2,3,4,5,6,7,8,9, guidance 1" in so   # not the null class
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"),
                                  pipe(30, labels=np.repeat(np.arange(10), 3), guidance_scale=1, backend="numba"))
    assert Image.open(tmp_path / "a.png").size == (3 * 8 + 4, 10 * 8 + 11)    # 10 rows of 3


@pytest.mark.parametrize("argv, match", [
    (["--label", "x"], "expected a class label, a comma list of labels or 'all'"),
    (["--label", ","], "expected a class label"),
    (["--label", "1,nan"], "expected a class label"),
    (["--guidance", "-1"], ">= 0"),
    (["--guidance", "inf"], "finite"),
])
def test_sample_bad_label_arguments_exit_2(argv, match, tmp_path, cond_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "-m", cond_dir, "-o", str(tmp_path / "s.png")] + argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("model, extra, match", [
    ("cond", ["--label", "11"], "error: --label 11 is out of range: this model has classes 0 .. 10"),
    ("cond", ["--label", "3,12"], "error: --label 12 is out of range"),
    ("cond", ["--label", "2.5"], "--label 2.5: .*integer class indices"),
    ("cond", [], "is class-conditional: pass --label"),
    ("cond", ["--label", "1,2", "--nrow", "3", "-n", "2"], "one row of -n 2 images per class"),
    ("cond", ["--label", "1", "--out", "{tmp}/shards", "-n", "2", "--guidance", "nan"], "expected a finite"),
    ("plain", ["--label", "1"], "--label: .* is unconditional"),
    ("plain", ["--label", "all"], "--label: .* is unconditional"),
    ("plain", ["--guidance", "2"], "--guidance: guidance_scale=2.0 needs a model trained for classifier-free"),
    ("plain", ["--guidance", "2", "--out", "{tmp}/shards"], "--guidance: .*needs a model trained"),
])
def test_sample_bad_labels_exit_1_and_write_nothing(model, extra, match, tmp_path, model_dir, cond_dir, capsys):
    import re
    argv = ["sample", "-m", cond_dir if model == "cond" else model_dir, "-o", str(tmp_path / "s.png"), "-q",
            "--backend", "numba"] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if "nan" in extra:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and re.search(match, capsys.readouterr().err)
        return
    rc, so, err = run(argv, capsys)
    assert rc == 1 and re.search(match, err), err
    assert "Traceback" not in err and err.count("\n") == 1   # one line, no traceback
    assert os.listdir(tmp_path) == []


def test_sample_labels_into_shards(tmp_path, cond_dir, capsys):
    from fastddpm.shards import read_shards
    out = tmp_path / "run"
    argv = ["sample", "-m", cond_dir, "-n", "3", "--label", "2,6", "--guidance", "1.5", "--backend", "numba",
            "--out", str(out), "--shard-size", "4"]
    rc, so, _ = run(argv, capsys)
    assert rc == 0 and "6 images, labels 2,6, guidance 1.5 in 2 shards" in so
    pipe = fastddpm.load(cond_dir)
    np.testing.assert_array_equal(read_shards(out), pipe(6, labels=[2, 2, 2, 6, 6, 6], guidance_scale=1.5,
                                                          backend="numba"))
    rc, _, err = run(argv[:6] + ["6,2"] + argv[7:], capsys)                   # other labels: refused
    assert rc == 1 and "holds shards of another request" in err and "labels" in err
    rc, _, err = run(["sample", "-m", cond_dir, "-n", "2", "--label", "all", "--backend", "numba", "--out",
                      str(tmp_path / "all"), "-q"], capsys)
    assert rc == 0
    np.testing.assert_array_equal(read_shards(tmp_path / "all"), pipe(20, labels=np.repeat(np.arange(10), 2),
                                                                     backend="numba"))
