"""fastddpm.load() of hostile model directories: every malformed, truncated, oversized, absurd or
escaping file is a clear exception (a ValueError, TypeError or OSError subclass naming the file
and the field), never a crash, a hang or a huge allocation; plus a seeded fuzz run in a child
process. No loader unpickles anything."""
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import fastddpm
from fastddpm._files import ModelFileError
from fastddpm.schedulers import SchedulerConfigError
from fastddpm.unet_config import (MAX_PARAMETERS, MAX_RESNET_BLOCKS, MAX_SAMPLE_FLOATS,
                                  UNetConfigError)
from fastddpm.weights import WeightsError

sys.path.insert(0, os.path.dirname(__file__))
from _hostile import SCHED, UNET, WEIGHTS, join, pack, split, tensors_of  # noqa: E402

CLEAR = (ValueError, TypeError, OSError)
PACKAGE = pathlib.Path(fastddpm.__file__).parent


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The bundled digits model, saved: a valid diffusers-layout directory."""
    return fastddpm.load("digits").save(tmp_path_factory.mktemp("base") / "digits")


@pytest.fixture
def model(base, tmp_path):
    """A fresh copy of the valid model to damage."""
    return shutil.copytree(base, tmp_path / "m")


def _load_fails(model, rel, *phrases, kind=CLEAR):
    """fastddpm.load(model) raises ``kind``; the message names model/rel and every phrase."""
    with pytest.raises(kind) as e:
        fastddpm.load(model)
    msg = str(e.value)
    assert os.path.join(model, rel) in msg, msg
    for p in phrases:
        assert p in msg, (p, msg)
    return msg


# ---------------------------------------------------------------------- editing helpers

def _weights(model) -> bytes:
    return pathlib.Path(model, WEIGHTS).read_bytes()


def _put(model, rel, raw):
    p = pathlib.Path(model, rel)
    p.write_bytes(raw if isinstance(raw, bytes) else raw.encode())


def _edit_header(model, fn):
    header, data = split(_weights(model))
    fn(header)
    _put(model, WEIGHTS, join(header, data))


def _set_entry(field, value, name="conv_in.bias"):
    return lambda h: h[name].__setitem__(field, value)


def _edit_json(model, rel, **changes):
    p = pathlib.Path(model, rel)
    obj = json.loads(p.read_text())
    obj.update(changes)
    p.write_text(json.dumps(obj))


def _replace_text(model, rel, old, new):
    p = pathlib.Path(model, rel)
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new))


# ---------------------------------------------------------------------- the weights file

def _retyped(model, name, dtype, itemsize):
    """The weights with tensor ``name`` stored as ``dtype`` (zeros), the file otherwise valid."""
    t = tensors_of(_weights(model))
    _, shape, raw = t[name]
    t[name] = (dtype, shape, b"\0" * (len(raw) // 4 * itemsize))
    _put(model, WEIGHTS, pack(t))


def _dup_name(model):
    header, data = split(_weights(model))
    text = json.dumps(header)
    dup = json.dumps({"conv_in.bias": header["conv_in.bias"]})[1:-1]
    _put(model, WEIGHTS, join(None, data, text=(text[:-1] + ", " + dup + "}").encode()))


def _overlap(h):
    a = h["conv_in.bias"]["data_offsets"][0]
    h["conv_in.weight"]["data_offsets"] = [a, a + 576]


def _nan_offset(model):
    header, data = split(_weights(model))
    text = json.dumps(header).replace('"data_offsets": [0, 64]', '"data_offsets": [0, NaN]', 1)
    assert "NaN" in text
    _put(model, WEIGHTS, join(None, data, text=text.encode()))


def _value_at(model, name, value):
    header, data = split(_weights(model))
    b = header[name]["data_offsets"][0]
    data = data[:b] + struct.pack("<f", value) + data[b + 4:]
    _put(model, WEIGHTS, join(header, data))


def _drop_tensor(model, name):
    t = tensors_of(_weights(model))
    del t[name]
    _put(model, WEIGHTS, pack(t))


def _add_tensor(model, name):
    t = tensors_of(_weights(model))
    t[name] = ("F32", [2], b"\0" * 8)
    _put(model, WEIGHTS, pack(t))


def _reshape_tensor(model, name, shape):
    t = tensors_of(_weights(model))
    t[name] = (t[name][0], shape, t[name][2])
    _put(model, WEIGHTS, pack(t))


WEIGHT_CASES = {
    # name: (damage(model), phrases the message must hold besides the file)
    "truncated data": (lambda m: _put(m, WEIGHTS, _weights(m)[:-100]), ["truncated"]),
    "cut inside the header": (lambda m: _put(m, WEIGHTS, _weights(m)[:100]), ["header length"]),
    "empty": (lambda m: _put(m, WEIGHTS, b""), ["too short"]),
    "7 bytes": (lambda m: _put(m, WEIGHTS, b"\x10" * 7), ["too short"]),
    "header length 2**60": (lambda m: _put(m, WEIGHTS, struct.pack("<Q", 2**60) + _weights(m)[8:]),
                            ["header length 1152921504606846976", "exceeds the file size"]),
    "header length 2**64-1": (lambda m: _put(m, WEIGHTS, struct.pack("<Q", 2**64 - 1) + _weights(m)[8:]),
                              ["exceeds the file size"]),
    "header length past the end": (
        lambda m: _put(m, WEIGHTS, struct.pack("<Q", len(_weights(m))) + _weights(m)[8:]),
        ["exceeds the file size"]),
    "header length 0": (lambda m: _put(m, WEIGHTS, struct.pack("<Q", 0) + _weights(m)[8:]),
                        ["not valid JSON"]),
    "header not JSON": (lambda m: _put(m, WEIGHTS, join(None, b"", text=b"{not json")),
                        ["not valid JSON"]),
    "header not UTF-8": (lambda m: _put(m, WEIGHTS, join(None, b"", text=b'{"\xff": 1}')),
                         ["not valid JSON"]),
    "header a list": (lambda m: _put(m, WEIGHTS, join([1, 2], b"")), ["not an object"]),
    "header nested 100000 deep": (
        lambda m: _put(m, WEIGHTS, join(None, b"", text=b"[" * 100000 + b"]" * 100000)),
        ["nested too deeply"]),
    "entry not an object": (lambda m: _edit_header(m, lambda h: h.__setitem__("conv_in.bias", [1])),
                            ["'conv_in.bias'", "dtype, shape and data_offsets"]),
    "entry with an extra key": (lambda m: _edit_header(m, _set_entry("extra", 1)),
                                ["'conv_in.bias'", "exactly"]),
    "dtype an int": (lambda m: _edit_header(m, _set_entry("dtype", 5)), ["'conv_in.bias'", "dtype 5"]),
    "dtype a list": (lambda m: _edit_header(m, _set_entry("dtype", ["F32"])),
                     ["'conv_in.bias'", "dtype ['F32']"]),
    "dtype unknown": (lambda m: _edit_header(m, _set_entry("dtype", "F128")), ["dtype 'F128'"]),
    "dtype I64": (lambda m: _retyped(m, "conv_out.weight", "I64", 8), ["'conv_out.weight' (I64)"]),
    "dtype U8": (lambda m: _retyped(m, "conv_out.weight", "U8", 1), ["'conv_out.weight' (U8)"]),
    "dtype BOOL": (lambda m: _retyped(m, "conv_out.weight", "BOOL", 1), ["'conv_out.weight' (BOOL)"]),
    "dtype F8": (lambda m: _retyped(m, "conv_out.weight", "F8_E4M3", 1), ["(F8_E4M3)"]),
    "shape a string": (lambda m: _edit_header(m, _set_entry("shape", "16")), ["'conv_in.bias'", "shape"]),
    "shape of floats": (lambda m: _edit_header(m, _set_entry("shape", [16.0])), ["shape"]),
    "shape of bools": (lambda m: _edit_header(m, _set_entry("shape", [True])), ["shape"]),
    "shape negative": (lambda m: _edit_header(m, _set_entry("shape", [-16])), ["shape"]),
    "shape of 1000-digit dims": (lambda m: _edit_header(m, _set_entry("shape", [10**999] * 50)),
                                 ["'conv_in.bias'", "more than the whole file"]),
    "shape disagrees with the byte length": (
        lambda m: _edit_header(m, _set_entry("shape", [17])), ["'conv_in.bias'", "needs 68"]),
    "shape disagrees with the config": (
        lambda m: _reshape_tensor(m, "conv_in.bias", [8, 2]),
        ["'conv_in.bias'", "shape (8, 2), expected (16,)", UNET]),
    "offsets a string": (lambda m: _edit_header(m, _set_entry("data_offsets", "0,64")), ["data_offsets"]),
    "offsets of three": (lambda m: _edit_header(m, _set_entry("data_offsets", [0, 64, 128])),
                         ["data_offsets"]),
    "offsets of floats": (lambda m: _edit_header(m, _set_entry("data_offsets", [0.0, 64.0])),
                          ["data_offsets"]),
    "offsets NaN": (lambda m: _nan_offset(m), ["'conv_in.bias'", "data_offsets"]),
    "offsets negative": (lambda m: _edit_header(m, _set_entry("data_offsets", [-64, 0])), ["negative"]),
    "offsets reversed": (lambda m: _edit_header(m, _set_entry("data_offsets", [64, 0])), ["reversed"]),
    "offsets out of range": (lambda m: _edit_header(m, _set_entry("data_offsets", [2**40, 2**40 + 64])),
                             ["'conv_in.bias'", "outside"]),
    "offsets past 2**64": (lambda m: _edit_header(m, _set_entry("data_offsets", [0, 2**70])), ["outside"]),
    "overlapping tensors": (lambda m: _edit_header(m, _overlap), ["overlap"]),
    "a gap between tensors": (lambda m: _edit_header(m, lambda h: h.pop("conv_in.weight")),
                              ["belong to no tensor"]),
    "trailing bytes": (lambda m: _put(m, WEIGHTS, _weights(m) + b"\0" * 64),
                       ["64 bytes after the last tensor"]),
    "duplicate tensor name": (_dup_name, ["duplicate key 'conv_in.bias'"]),
    "missing tensor": (lambda m: _drop_tensor(m, "conv_out.bias"), ["missing 'conv_out.bias'"]),
    "extra tensor": (lambda m: _add_tensor(m, "extra.weight"), ["unexpected 'extra.weight'"]),
    "NaN value": (lambda m: _value_at(m, "conv_out.weight", float("nan")),
                  ["'conv_out.weight'", "non-finite"]),
    "inf value": (lambda m: _value_at(m, "conv_out.weight", float("-inf")),
                  ["'conv_out.weight'", "non-finite"]),
    "__metadata__ not strings": (lambda m: _edit_header(m, lambda h: h.update(__metadata__={"a": 1})),
                                 ["__metadata__"]),
    "a directory": (lambda m: (os.remove(os.path.join(m, WEIGHTS)), os.mkdir(os.path.join(m, WEIGHTS))),
                    ["directory"]),
}


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_hostile_weights_file(model, case):
    damage, phrases = WEIGHT_CASES[case]
    damage(model)
    _load_fails(model, WEIGHTS, *phrases, kind=WeightsError)


def test_weights_problems_are_weights_errors_and_value_errors():
    assert issubclass(WeightsError, ValueError) and issubclass(UNetConfigError, ValueError)
    assert issubclass(SchedulerConfigError, ValueError) and issubclass(ModelFileError, ValueError)


def test_float_dtypes_load(model):
    # F16, BF16 and F64 tensors load (as float32): the dtype checks refuse only the others
    t = tensors_of(_weights(model))
    f32 = {k: np.frombuffer(raw, "<f4") for k, (_, _, raw) in t.items()}
    kinds = ["F16", "BF16", "F64"]
    for i, (k, a) in enumerate(f32.items()):
        dtype = kinds[i % 3]
        if dtype == "F16":
            raw = a.astype("<f2").tobytes()
        elif dtype == "F64":
            raw = a.astype("<f8").tobytes()
        else:
            raw = (a.view("<u4") >> 16).astype("<u2").tobytes()
        t[k] = (dtype, t[k][1], raw)
    _put(model, WEIGHTS, pack(t))
    p = fastddpm.load(model)
    for i, (k, a) in enumerate(f32.items()):
        np.testing.assert_allclose(p.weights[k].ravel(), a, rtol=[1e-3, 1e-2, 0][i % 3], atol=1e-4)


def test_weights_read_without_mmap_or_pickle(model):
    # a file that shrinks after its header was checked: a clear error, not SIGBUS from an mmap
    from fastddpm import weights as W
    header, start = W.read_header(os.path.join(model, WEIGHTS))
    _put(model, WEIGHTS, _weights(model)[:start + 100])
    with open(os.path.join(model, WEIGHTS), "rb") as f, pytest.raises(WeightsError, match="shorter"):
        W._read_tensor(f, os.path.join(model, WEIGHTS), start, header["conv_out.weight"])


# ---------------------------------------------------------------------- symlinks and special files

def _replace_with_link(model, rel, target):
    p = pathlib.Path(model, rel)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()
    p.symlink_to(target)


def _outside_copy(model, rel, tmp_path):
    src = pathlib.Path(model, rel)
    dst = tmp_path / "outside" / src.name
    dst.parent.mkdir(exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


@pytest.mark.parametrize("rel", [UNET, WEIGHTS, SCHED])
def test_symlink_to_etc_passwd_is_refused(model, rel):
    _replace_with_link(model, rel, "/etc/passwd")
    _load_fails(model, rel, "/etc/passwd", "outside the model directory", kind=ModelFileError)


@pytest.mark.parametrize("rel", [UNET, WEIGHTS, SCHED])
def test_symlink_to_a_valid_file_outside_is_refused(model, rel, tmp_path):
    _replace_with_link(model, rel, _outside_copy(model, rel, tmp_path))
    _load_fails(model, rel, "outside the model directory", kind=ModelFileError)


def test_symlinked_subdirectory_outside_is_refused(model, tmp_path):
    _replace_with_link(model, "unet", _outside_copy(model, "unet", tmp_path))
    _load_fails(model, UNET, "outside the model directory", kind=ModelFileError)


def test_relative_symlink_escaping_is_refused(model, tmp_path):
    outside = _outside_copy(model, SCHED, tmp_path)
    _replace_with_link(model, SCHED, os.path.relpath(outside, os.path.join(model, "scheduler")))
    _load_fails(model, SCHED, "outside the model directory", kind=ModelFileError)


def test_dangling_symlink_is_refused(model):
    _replace_with_link(model, UNET, "/nonexistent/config.json")
    _load_fails(model, UNET, "outside", kind=ModelFileError)
    _replace_with_link(model, UNET, "missing.json")  # inside, but points at nothing
    _load_fails(model, UNET, "missing or a broken symlink", kind=FileNotFoundError)


def test_symlinks_inside_the_directory_load(model, tmp_path):
    # a file linked to another file of the same directory, and the directory itself a link
    shutil.move(os.path.join(model, UNET), os.path.join(model, "unet-config.json"))
    os.symlink("../unet-config.json", os.path.join(model, UNET))
    fastddpm.load(model)
    link = tmp_path / "link-to-model"
    link.symlink_to(model)
    fastddpm.load(link)


def test_hugging_face_cache_snapshot_loads(base, tmp_path):
    # huggingface_hub's cache: snapshots/<revision>/<file> are symlinks into the repo's blobs/
    repo = tmp_path / "models--org--digits"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    for i, rel in enumerate((UNET, WEIGHTS, SCHED)):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(os.path.join(base, rel), blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    fastddpm.load(snap)
    # ... but not out of the repo
    _replace_with_link(snap, UNET, "/etc/passwd")
    _load_fails(str(snap), UNET, "outside", kind=ModelFileError)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
@pytest.mark.parametrize("rel", [UNET, WEIGHTS, SCHED])
def test_fifo_is_refused_without_blocking(model, rel):
    os.remove(os.path.join(model, rel))
    os.mkfifo(os.path.join(model, rel))  # opening it would block until a writer came
    _load_fails(model, rel, "not a regular file")


def test_oversized_json_is_refused_unread(model):
    with open(os.path.join(model, UNET), "ab") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of NULs after the JSON
    _load_fails(model, UNET, "over the", "limit", kind=ModelFileError)


def test_missing_files_are_named(model):
    os.remove(os.path.join(model, SCHED))
    _load_fails(model, SCHED, "missing", kind=FileNotFoundError)


# ---------------------------------------------------------------------- unet/config.json

CONFIG_CASES = [
    # (changes, phrases) -- each change alone makes the config unusable
    (dict(layers_per_block="1"), ["layers_per_block", "positive integer"]),
    (dict(in_channels=1.0), ["in_channels"]),
    (dict(in_channels=True), ["in_channels"]),
    (dict(sample_size=False), ["sample_size"]),
    (dict(flip_sin_to_cos=0), ["flip_sin_to_cos", "true or false"]),
    (dict(add_attention="yes"), ["add_attention"]),
    (dict(norm_num_groups=None), ["norm_num_groups"]),
    (dict(block_out_channels="16,32,64"), ["block_out_channels"]),
    (dict(block_out_channels=[16, 32]), ["block_out_channels has 2"]),
    (dict(block_out_channels=[16, 32, 64, 64]), ["block_out_channels has 4"]),
    (dict(block_out_channels=[]), ["block_out_channels"]),
    (dict(block_out_channels=[16, -32, 64]), ["block_out_channels[1]"]),
    (dict(block_out_channels=[16, 0, 64]), ["block_out_channels[1]"]),
    (dict(block_out_channels=[16, 32, "64"]), ["block_out_channels[2]"]),
    (dict(block_out_channels=[16, 32, 10**9]), ["block_out_channels", "parameters", "over the limit"]),
    (dict(block_out_channels=[10**9] * 3), ["parameters", "over the limit"]),
    (dict(time_embedding_dim=10**9), ["time_embedding_dim = 1000000000", "parameters"]),
    (dict(sample_size=10**7), ["sample_size = 10000000", "floats", "over the limit"]),
    (dict(sample_size=[16, 10**7]), ["sample_size", "over the limit"]),
    (dict(sample_size=0), ["sample_size"]),
    (dict(sample_size=-16), ["sample_size"]),
    (dict(sample_size=[16, 16, 16]), ["sample_size"]),
    (dict(sample_size=18), ["sample_size = 18", "multiple of 4"]),
    (dict(layers_per_block=10**6), ["layers_per_block = 1000000", "resnet blocks", "over the limit"]),
    (dict(layers_per_block=0), ["layers_per_block"]),
    (dict(norm_num_groups=7), ["norm_num_groups = 7"]),
    (dict(norm_num_groups=32), ["norm_num_groups = 32"]),
    (dict(norm_num_groups=0), ["norm_num_groups"]),
    (dict(attn_norm_num_groups=5), ["attn_norm_num_groups = 5"]),
    (dict(attention_head_dim=3), ["attention_head_dim = 3"]),
    (dict(norm_eps=-1e-6), ["norm_eps"]),
    (dict(dropout=2.0), ["dropout"]),
    (dict(freq_shift=8), ["freq_shift"]),
    (dict(downsample_padding=2), ["downsample_padding"]),
    (dict(act_fn="elu"), ["act_fn"]),
    (dict(down_block_types=[["DownBlock2D"], "AttnDownBlock2D", "DownBlock2D"]), ["down_block_types[0]"]),
    (dict(up_block_types="UpBlock2D"), ["up_block_types"]),
    (dict(mid_block_type={"a": 1}), ["mid_block_type"]),
    (dict(bogus=1), ["unknown U-Net config key 'bogus'"]),
    # ints beyond float range (JSON allows 4300 digits): refused, not an OverflowError
    (dict(norm_eps=10**400), ["norm_eps", "finite"]),
    (dict(freq_shift=-10**400), ["freq_shift", "finite"]),
    (dict(dropout=10**400), ["dropout"]),
    (dict(sample_size=10**400), ["sample_size", "over the limit"]),
    (dict(block_out_channels=[16, 32, 10**400]), ["block_out_channels[2]", "over the limit"]),
    (dict(in_channels=2**31), ["in_channels = 2147483648", "over the limit"]),
]


@pytest.mark.parametrize("changes,phrases", CONFIG_CASES, ids=[str(c)[:60] for c, _ in CONFIG_CASES])
def test_hostile_unet_config(model, changes, phrases):
    _edit_json(model, UNET, **changes)
    _load_fails(model, UNET, *phrases, kind=UNetConfigError)


def test_config_with_100000_blocks_is_refused_before_walking_them(model):
    n = 100_000  # ~3 MB of JSON: under the file limit, so the block bound must catch it
    _edit_json(model, UNET, block_out_channels=[16] * n, down_block_types=["DownBlock2D"] * n,
               up_block_types=["UpBlock2D"] * n, sample_size=None)
    _load_fails(model, UNET, "resnet blocks", str(MAX_RESNET_BLOCKS), kind=UNetConfigError)


def test_config_changes_that_only_the_weights_contradict(model):
    _edit_json(model, UNET, in_channels=2)  # a valid config; the weights were made for 1 channel
    _load_fails(model, WEIGHTS, UNET, "'conv_in.weight'", "expected (16, 2, 3, 3)", kind=WeightsError)


@pytest.mark.parametrize("text,phrases", [
    ("{oops", ["not valid JSON"]),
    ("[1, 2]", ["JSON object", "array"]),
    ('"config"', ["JSON object", "string"]),
    ("", ["not valid JSON"]),
    ("[" * 100000 + "]" * 100000, ["nested too deeply"]),
    (b'{"in_channels\xff": 1}', ["not valid JSON", "utf-8"]),
    ('{"sample_size": 16, "sample_size": 32}', ["duplicate key 'sample_size'"]),
    ('{"in_channels": 1' + "0" * 5000 + "}", ["not valid JSON", "digits"]),
])
@pytest.mark.parametrize("rel", [UNET, SCHED])
def test_unparsable_json(model, rel, text, phrases):
    _put(model, rel, text)
    _load_fails(model, rel, *phrases, kind=ModelFileError)


def test_non_finite_config_numbers(model):
    _replace_text(model, UNET, '"norm_eps": 1e-06', '"norm_eps": NaN')
    _load_fails(model, UNET, "norm_eps", "finite", kind=UNetConfigError)
    _replace_text(model, UNET, '"norm_eps": NaN', '"norm_eps": 1e999')
    _load_fails(model, UNET, "norm_eps", "finite", kind=UNetConfigError)


def test_config_bounds_allow_real_models():
    from fastddpm.unet_config import PRESETS, UNetConfig, parameter_count
    cifar = UNetConfig.from_dict(PRESETS["ddpm-cifar10"])
    assert parameter_count(cifar) < MAX_PARAMETERS / 100
    # google/ddpm-church-256's architecture (256x256, 6 levels, attention at 16x16)
    UNetConfig.from_dict(dict(
        sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512], layers_per_block=2,
        down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4))
    # 1024x1024 with 128 channels at full resolution still fits the per-sample bound
    assert 256 * 1024 * 1024 < MAX_SAMPLE_FLOATS


# ---------------------------------------------------------------------- scheduler_config.json

SCHED_CASES = [
    (dict(num_train_timesteps=0), ["num_train_timesteps", "positive integer"]),
    (dict(num_train_timesteps=-5), ["num_train_timesteps"]),
    (dict(num_train_timesteps=10**12), ["num_train_timesteps = 1000000000000", "over the limit"]),
    (dict(num_train_timesteps=10**12, beta_schedule="linear"), ["over the limit"]),
    (dict(num_train_timesteps=2**70, beta_schedule="linear"), ["over the limit"]),
    (dict(num_train_timesteps="1000"), ["num_train_timesteps"]),
    (dict(num_train_timesteps=1000.0), ["num_train_timesteps"]),
    (dict(num_train_timesteps=True), ["num_train_timesteps"]),
    (dict(beta_start=0.02, beta_end=0.0001, beta_schedule="linear"), ["beta_start = 0.02", "beta_end"]),
    (dict(beta_start=0.02, beta_end=0.0001), ["beta_start", "greater than"]),
    (dict(beta_start="0.0001"), ["beta_start"]),
    (dict(beta_end=None), ["beta_end"]),
    (dict(beta_end=1.0, beta_schedule="linear"), ["beta_end", "[0, 1)"]),
    (dict(beta_start=-0.1), ["beta_start"]),
    (dict(beta_schedule="cosine"), ["beta_schedule"]),
    (dict(beta_schedule=["linear"]), ["beta_schedule"]),
    (dict(trained_betas=["a", "b"]), ["trained_betas"]),
    (dict(trained_betas=[[0.1], [0.2]]), ["trained_betas"]),
    (dict(trained_betas={"a": 0.1}), ["trained_betas"]),
    (dict(trained_betas=[]), ["trained_betas"]),
    (dict(trained_betas=[0.1, 1.5]), ["trained_betas"]),
    (dict(clip_sample_range=True), ["clip_sample_range"]),
    (dict(clip_sample_range=0), ["clip_sample_range"]),
    (dict(clip_sample="yes"), ["clip_sample"]),
    (dict(steps_offset=10**12), ["steps_offset", "[0, num_train_timesteps = 200)"]),
    (dict(steps_offset=1.5), ["steps_offset"]),
    (dict(prediction_type=7), ["prediction_type"]),
    (dict(variance_type=[1]), ["variance_type"]),
    (dict(timestep_spacing=None), ["timestep_spacing"]),
    (dict(rescale_betas_zero_snr=True, num_train_timesteps=1), ["rescale_betas_zero_snr"]),
    (dict(thresholding="false"), ["thresholding"]),
    (dict(bogus=1), ["unknown DDPMScheduler config key 'bogus'"]),
    (dict(_class_name="PNDMScheduler"), ["_class_name", "PNDMScheduler"]),
    (dict(_class_name=["DDPMScheduler"]), ["_class_name"]),
    (dict(beta_start=10**400), ["beta_start", "finite"]),
    (dict(clip_sample_range=10**400), ["clip_sample_range"]),
    (dict(trained_betas=[0.1, 10**400]), ["trained_betas"]),
    (dict(num_train_timesteps=10**400), ["num_train_timesteps", "over the limit"]),
    (dict(steps_offset=-10**400), ["steps_offset"]),
]


@pytest.mark.parametrize("changes,phrases", SCHED_CASES, ids=[str(c)[:60] for c, _ in SCHED_CASES])
def test_hostile_scheduler_config(model, changes, phrases):
    _edit_json(model, SCHED, **changes)
    _load_fails(model, SCHED, *phrases, kind=SchedulerConfigError)


@pytest.mark.parametrize("old,new,field", [
    ('"beta_start": 0.0001', '"beta_start": NaN', "beta_start"),
    ('"beta_end": 0.02', '"beta_end": Infinity', "beta_end"),
    ('"beta_end": 0.02', '"beta_end": -Infinity', "beta_end"),
    ('"trained_betas": null', '"trained_betas": [0.1, NaN]', "trained_betas"),
])
def test_non_finite_scheduler_numbers(model, old, new, field):
    _replace_text(model, SCHED, old, new)
    _load_fails(model, SCHED, field, kind=SchedulerConfigError)


def test_too_many_trained_betas(model):
    from fastddpm.schedulers import MAX_TRAIN_TIMESTEPS
    _put(model, SCHED, json.dumps({"_class_name": "DDPMScheduler",
                                   "trained_betas": [0.01] * (MAX_TRAIN_TIMESTEPS + 1)}))
    _load_fails(model, SCHED, "trained_betas", "over the limit", kind=SchedulerConfigError)


def test_scheduler_from_config_file_names_the_file(model):
    path = os.path.join(model, SCHED)
    _edit_json(model, SCHED, num_train_timesteps=0)
    with pytest.raises(SchedulerConfigError, match=re.escape(path) + ": num_train_timesteps"):
        fastddpm.DDPMScheduler.from_config(path)


# ---------------------------------------------------------------------- no pickle anywhere

def test_no_unpickling_in_the_loaders():
    # weights come from safetensors only; nothing on the load path can run pickled code
    loaders = ["weights.py", "pipeline.py", "unet_config.py", "schedulers.py", "_files.py"]
    for name in loaders:
        text = (PACKAGE / name).read_text()
        for bad in (r"\bpickle\b", r"torch\.load", "allow_pickle", r"np\.load\(", r"numpy\.load\("):
            assert not re.search(bad, text), (name, bad)
    # the only torch.load in the package: train.py's own checkpoints, with weights_only=True
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), (path, m.group(0))


# ---------------------------------------------------------------------- the fuzzer

FUZZ_SEED, FUZZ_CASES = 20240601, 400


def _limit_memory():  # the child: a huge allocation fails (MemoryError) instead of swapping
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_fuzzed_model_files_load_or_fail_clearly(base, tmp_path):
    # ~2 s: 400 cases in one child process (a crash or abort there fails this test, with the
    # case that caused it, instead of killing the suite); a 4 GiB address-space limit turns a
    # huge allocation into a failure instead of swapping
    script = os.path.join(os.path.dirname(__file__), "_hostile.py")
    cmd = [sys.executable, script, str(base), str(tmp_path / "work"), str(FUZZ_SEED), str(FUZZ_CASES)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           preexec_fn=_limit_memory if os.name == "posix" else None)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = [ln for ln in out.splitlines() if ln.startswith("case ")][-1:]
        pytest.fail(f"the fuzz run hung (120 s); last case started: {last}")
    lines = r.stdout.splitlines()
    if r.returncode != 0:
        last = [ln for ln in lines if ln.startswith("case ")][-1:]
        pytest.fail(f"the fuzz child crashed (exit {r.returncode}) at {last}:\n{r.stderr[-3000:]}")
    counts = json.loads(lines[-1])
    print(f"fuzz seed {FUZZ_SEED}: {counts['cases']} cases tried, {counts['loaded']} loaded, "
          f"{counts['clear_errors']} clear errors, {counts['unclear']} unclear errors, "
          f"0 crashes, 0 hangs; slowest case {counts['max_case_s']:.2f} s")
    assert counts["cases"] == FUZZ_CASES
    assert counts["unclear"] == 0, "\n".join(counts["failures"])
    assert counts["loaded"] + counts["clear_errors"] == FUZZ_CASES
    assert counts["loaded"] > 0 and counts["clear_errors"] > FUZZ_CASES // 2  # the mutations bite
    assert counts["max_case_s"] < 10
