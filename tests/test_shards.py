"""sample_to_disk: shards whose union is one sample(n, seed) call bit for bit, in-process and on a
local Ray cluster started here (loopback only); resumable after a killed driver, a killed worker
or a corrupted shard; a directory of another request is refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastddpm
from fastddpm.shards import ManifestMismatchError, read_shards, sample_to_disk, shard_name

N, OPTS = 23, dict(seed=3, sampler="ddim", steps=5)


@pytest.fixture(scope="module")
def want():
    return fastddpm.sample(n=N, **OPTS)   # uint8 [23, 16, 16, 1]


def _shard_files(d):
    return sorted(f for f in os.listdir(d) if f.startswith("shard-"))


@pytest.mark.parametrize("shard_size", [1, 7, N])
def test_local_shards_are_the_single_call(tmp_path, want, shard_size):
    data = sample_to_disk("digits", N, tmp_path, shard_size=shard_size, **OPTS)
    np.testing.assert_array_equal(read_shards(tmp_path), want)
    count = -(-N // shard_size)
    assert len(data["shards"]) == count and len(_shard_files(tmp_path)) == count
    with np.load(tmp_path / shard_name(0)) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (min(shard_size, N), 16, 16, 1)


def test_rerun_skips_finished_shards_and_redoes_a_corrupt_one(tmp_path, want):
    sample_to_disk("digits", N, tmp_path, shard_size=7, **OPTS)
    before = {f: os.stat(tmp_path / f).st_ino for f in _shard_files(tmp_path)}   # a rewrite is a new inode
    bad = tmp_path / shard_name(2)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its checksum"):
        read_shards(tmp_path)
    sample_to_disk("digits", N, tmp_path, shard_size=7, **OPTS)
    after = {f: os.stat(tmp_path / f).st_ino for f in _shard_files(tmp_path)}
    assert [f for f in after if after[f] != before[f]] == [shard_name(2)]   # only the corrupt one redone
    np.testing.assert_array_equal(read_shards(tmp_path), want)


def test_another_request_in_the_same_directory_is_an_error(tmp_path):
    sample_to_disk("digits", 4, tmp_path, shard_size=2, **OPTS)
    for change in ({"seed": 4}, {"steps": 6}, {"sampler": "ddpm", "steps": 5}):
        with pytest.raises(ManifestMismatchError, match="holds shards of another request"):
            sample_to_disk("digits", 4, tmp_path, shard_size=2, **{**OPTS, **change})
    with pytest.raises(ManifestMismatchError, match="model_hash"):
        sample_to_disk("bench-small", 4, tmp_path, shard_size=2, **OPTS)
    with pytest.raises(ManifestMismatchError, match="shard_size"):
        sample_to_disk("digits", 4, tmp_path, shard_size=1, **OPTS)
    with pytest.raises(ManifestMismatchError, match="backend: 'native-cpu' there, 'numba' asked"):
        sample_to_disk("digits", 4, tmp_path, shard_size=2, backend="numba", **OPTS)


def test_one_driver_per_directory(tmp_path):
    from fastddpm.shards import _DirectoryLock
    with _DirectoryLock(str(tmp_path)):
        with pytest.raises(RuntimeError, match="another sample_to_disk is writing to"):
            sample_to_disk("digits", 2, tmp_path, shard_size=1, **OPTS)
    sample_to_disk("digits", 2, tmp_path, shard_size=1, **OPTS)   # released


def test_png_on_a_rerun_fills_in_the_finished_shards(tmp_path, want):
    sample_to_disk("digits", N, tmp_path, shard_size=10, **OPTS)
    assert not (tmp_path / "png").exists()
    sample_to_disk("digits", N, tmp_path, shard_size=10, png=True, **OPTS)
    assert len(os.listdir(tmp_path / "png")) == N


def test_a_malformed_manifest_entry_is_redone_and_never_followed(tmp_path, want):
    sample_to_disk("digits", N, tmp_path, shard_size=10, **OPTS)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"]["1"]["file"] = "../../etc/passwd"
    m["shards"]["2"] = "nonsense"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="shard 1 of 3 is not finished"):
        read_shards(tmp_path)
    sample_to_disk("digits", N, tmp_path, shard_size=10, **OPTS)
    np.testing.assert_array_equal(read_shards(tmp_path), want)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_to_disk("digits", 0, tmp_path)
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        sample_to_disk("digits", 2, tmp_path, shard_size=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        sample_to_disk("digits", 2, tmp_path, seed=None)
    with pytest.raises(TypeError, match="seed must be an int"):
        sample_to_disk("digits", 2, tmp_path, seed=1.5)


def test_png_folder_and_a_pipeline_object(tmp_path, want):
    pipe = fastddpm.load("digits")
    sample_to_disk(pipe, N, tmp_path, shard_size=10, png=True, **OPTS)
    pngs = sorted(os.listdir(tmp_path / "png"))
    assert pngs == [f"{i:09d}.png" for i in range(N)]
    from PIL import Image
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / pngs[5])), want[5, :, :, 0])
    np.testing.assert_array_equal(read_shards(tmp_path), want)


def _cli(out, *extra):
    return [sys.executable, "-m", "fastddpm.cli", "sample", "--out", str(out), "--n", "40", "--shard-size", "4",
            "--sampler", "ddim", "--steps", "40", "--seed", "3", "-q", *extra]


def _kill_after_shards(cmd, manifest, shards=2, timeout=120):
    """Start cmd, SIGKILL it once the manifest records `shards` finished shards."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                break
            try:
                done = len(json.loads(manifest.read_text())["shards"])
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= shards:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return json.loads(manifest.read_text())["shards"]


@pytest.mark.slow
def test_a_killed_driver_resumes_to_every_image_once(tmp_path):
    out = tmp_path / "run"
    partial = _kill_after_shards(_cli(out), out / "manifest.json")
    assert 2 <= len(partial) < 10
    subprocess.run(_cli(out), check=True, capture_output=True, timeout=300)
    files = _shard_files(out)
    assert files == [shard_name(i) for i in range(10)]   # every shard once, nothing else
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    np.testing.assert_array_equal(read_shards(out), fastddpm.sample(n=40, seed=3, sampler="ddim", steps=40))


# ------------------------------------------------------------------ Ray

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is the optional extra fastddpm[ray]")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("shard_size", [1, 7, N])
def test_ray_shards_are_the_single_call(tmp_path, want, ray_cluster, shard_size):
    sample_to_disk("digits", N, tmp_path, shard_size=shard_size, cluster="ray", **OPTS)
    np.testing.assert_array_equal(read_shards(tmp_path), want)
    assert len(_shard_files(tmp_path)) == -(-N // shard_size)


@pytest.mark.slow
def test_ray_worker_killed_mid_task_is_retried(tmp_path, want, ray_cluster, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("FASTDDPM_SHARD_FAULT_DIR", str(faults))
    monkeypatch.setenv("FASTDDPM_SHARD_FAULT_SHARDS", "1,2")
    out = tmp_path / "run"
    sample_to_disk("digits", N, out, shard_size=7, cluster="ray", **OPTS)
    assert sorted(os.listdir(faults)) == ["fault-1", "fault-2"]   # two workers died mid-task ...
    assert _shard_files(out) == [shard_name(i) for i in range(4)]   # ... and every shard is there once
    np.testing.assert_array_equal(read_shards(out), want)


@pytest.mark.slow
def test_ray_driver_killed_and_restarted(tmp_path, ray_cluster):
    address = ray_cluster.get_runtime_context().gcs_address   # the cluster outlives the driver
    out = tmp_path / "run"
    partial = _kill_after_shards(_cli(out, "--ray", address), out / "manifest.json")
    assert 2 <= len(partial) < 10
    subprocess.run(_cli(out, "--ray", address), check=True, capture_output=True, timeout=300)
    assert _shard_files(out) == [shard_name(i) for i in range(10)]
    np.testing.assert_array_equal(read_shards(out), fastddpm.sample(n=40, seed=3, sampler="ddim", steps=40))


def test_cli_refuses_cluster_options_without_out(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastddpm.cli", "sample", "--n", "2", "--ray"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "--ray, --threads and --png need --out DIR" in proc.stderr


# ------------------------------------------------------------------ class-conditional models

@pytest.fixture(scope="module")
def cond():
    """A small class-conditional model trained for guidance (classes 0-9, null class 10, w = 3)."""
    from fastddpm.pipeline import Pipeline
    from fastddpm.train import DIGITS_UNET
    from fastddpm.unet_config import UNetConfig, random_weights
    cfg = UNetConfig.from_dict({**DIGITS_UNET, "num_class_embeds": 11})
    return Pipeline(cfg, random_weights(cfg, seed=0), fastddpm.DDPMScheduler(num_train_timesteps=50),
                    name="cond", null_class=10, guidance_scale=3.0)


COND_OPTS = dict(seed=3, sampler="ddim", steps=3, backend="numba")
COND_LABELS = [3, 1, 4, 1, 5, 9, 2]


def test_shards_with_labels_are_the_single_call(tmp_path, cond):
    """Each shard gets its slice of the labels (noise keyed by the image index as before): the
    union is the one guided call; a scalar label labels every image; the manifest names both."""
    sample_to_disk(cond, 7, tmp_path / "list", shard_size=3, labels=COND_LABELS, guidance_scale=2.0, **COND_OPTS)
    np.testing.assert_array_equal(read_shards(tmp_path / "list"),
                                  cond(7, labels=COND_LABELS, guidance_scale=2.0, **COND_OPTS))
    req = json.loads((tmp_path / "list" / "manifest.json").read_text())["request"]
    assert req["labels"].startswith("sha256:") and req["guidance_scale"] == 2.0 and req["null_class"] == 10
    data = sample_to_disk(cond, 5, tmp_path / "one", shard_size=2, labels=7, **COND_OPTS)   # the model's w = 3
    assert data["request"]["labels"] == 7 and data["request"]["guidance_scale"] == 3.0
    np.testing.assert_array_equal(read_shards(tmp_path / "one"), cond(5, labels=7, **COND_OPTS))


def test_a_rerun_with_other_labels_or_guidance_is_refused(tmp_path, cond):
    sample_to_disk(cond, 7, tmp_path, shard_size=4, labels=COND_LABELS, **COND_OPTS)
    for change, field in (({"labels": COND_LABELS[::-1]}, "labels"), ({"labels": 3}, "labels"),
                          ({"labels": COND_LABELS, "guidance_scale": 5.0}, "guidance_scale")):
        with pytest.raises(ManifestMismatchError, match=f"{field}: "):
            sample_to_disk(cond, 7, tmp_path, shard_size=4, **{**COND_OPTS, **change})
    before = {f: os.stat(tmp_path / f).st_ino for f in _shard_files(tmp_path)}
    sample_to_disk(cond, 7, tmp_path, shard_size=4, labels=list(COND_LABELS), guidance_scale=3.0, **COND_OPTS)
    assert {f: os.stat(tmp_path / f).st_ino for f in _shard_files(tmp_path)} == before   # the same request


def test_bad_labels_are_refused_before_anything_is_written(tmp_path, cond):
    for labels, match in ((None, "class-conditional: pass labels="), ([1, 2], "one label or 7"),
                          (11, "out of range")):
        with pytest.raises(ValueError, match=match):
            sample_to_disk(cond, 7, tmp_path, labels=labels, **COND_OPTS)
    with pytest.raises(ValueError, match="labels were given but this model is unconditional"):
        sample_to_disk("digits", 2, tmp_path, labels=1, **OPTS)
    assert not (tmp_path / "manifest.json").exists()
