"""The U-Net description layer (unet_config.py) and weight files (weights.py).

diffusers' UNet2DModel is the oracle for config semantics and state-dict shapes; models built
for shape checks live on the meta device, so no memory is allocated and nothing is initialised.
"""
import inspect
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fastddpm.unet_config import (PRESETS, UNetConfig, UNetConfigError, flops, parameter_count,
                                  random_weights, weight_shapes)
from fastddpm.weights import WeightsError, check_weights, load_safetensors, save_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

BENCH = PRESETS["bench-small"]

# Configs that together use every supported option (the reference tests run the same ones).
CONFIGS = {
    "bench-small": BENCH,
    "ddpm-cifar10": PRESETS["ddpm-cifar10"],
    "rgb64-heads": dict(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=[16, 32, 32],
        layers_per_block=1, down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], attention_head_dim=8,
        norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1),
    "gray16-noattn": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=[8, 16],
        layers_per_block=2, down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"], add_attention=False,
        attention_head_dim=4, norm_num_groups=4, flip_sin_to_cos=False, freq_shift=1,
        downsample_padding=0, center_input_sample=True, mid_block_scale_factor=2.0,
        norm_eps=1e-6),
    "four-nonsquare": dict(
        sample_size=[16, 32], in_channels=4, out_channels=2, block_out_channels=[16, 24, 32],
        layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
        norm_num_groups=8, attn_norm_num_groups=4, time_embedding_dim=48,
        mid_block_scale_factor=1.5, freq_shift=1, flip_sin_to_cos=True, downsample_padding=0),
    "odd-width": dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=[9, 18],
        layers_per_block=1, down_block_types=["AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D"], attention_head_dim=3, norm_num_groups=3,
        freq_shift=0, flip_sin_to_cos=False, downsample_padding=1),
    "adm-learned": dict(   # the ADM options: scale_shift, resnet resampling, a learned time table, Mish
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=[16, 32, 32], layers_per_block=1,
        down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"], downsample_type="resnet",
        upsample_type="resnet", resnet_time_scale_shift="scale_shift", act_fn="mish",
        time_embedding_type="learned", num_train_timesteps=1000, attention_head_dim=8, norm_num_groups=8),
    "fourier-gelu": dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        time_embedding_type="fourier", act_fn="gelu", attention_head_dim=8, norm_num_groups=4),
}


def meta_diffusers(cfg: UNetConfig):
    with torch.device("meta"):
        return diffusers.UNet2DModel.from_config(cfg.to_dict())


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# ---------------------------------------------------------------------- config

def test_defaults_are_diffusers_defaults():
    sig = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    ours = UNetConfig().to_dict()
    for name, p in sig.items():
        if name == "self":
            continue
        assert name in ours, name
        assert _plain(ours[name]) == _plain(p.default), name
    assert set(ours) - {"_class_name"} == set(sig) - {"self"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weight_shapes_equal_diffusers_state_dict(name):
    cfg = UNetConfig.from_dict(CONFIGS[name])
    want = [(k, tuple(v.shape)) for k, v in meta_diffusers(cfg).state_dict().items()]
    assert list(weight_shapes(cfg).items()) == want  # keys, shapes and order


@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_dict_round_trips_and_diffusers_reads_it(name):
    cfg = UNetConfig.from_dict(CONFIGS[name])
    d = cfg.to_dict()
    assert d["_class_name"] == "UNet2DModel"
    assert UNetConfig.from_dict(json.loads(json.dumps(d))) == cfg
    model_cfg = meta_diffusers(cfg).config
    for k, v in d.items():
        if not k.startswith("_"):
            assert _plain(model_cfg[k]) == _plain(v), k


def test_underscore_keys_ignored():
    d = dict(BENCH, _diffusers_version="0.1.1", _name_or_path="x")
    assert UNetConfig.from_dict(d) == UNetConfig.from_dict(BENCH)


def test_parameter_counts():
    cifar = UNetConfig.from_dict(PRESETS["ddpm-cifar10"])
    n = parameter_count(cifar)
    assert n == sum(p.numel() for p in meta_diffusers(cifar).parameters())
    assert n == 35_746_307  # "35.7M"
    assert parameter_count(UNetConfig.from_dict(BENCH)) == 1_623_169


def test_preset_ddpm_cifar10_is_google_config():
    d = PRESETS["ddpm-cifar10"]
    assert d["block_out_channels"] == [128, 256, 256, 256]
    assert d["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert d["up_block_types"] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert (d["norm_eps"], d["attention_head_dim"], d["flip_sin_to_cos"], d["freq_shift"],
            d["downsample_padding"], d["sample_size"], d["in_channels"]) == (
            1e-6, None, False, 1, 0, 32, 3)


BAD = [
    ({"colour": 1}, ["colour"]),
    ({"act_fn": "elu"}, ["act_fn", "elu", "silu"]),
    ({"time_embedding_type": "rotary"}, ["time_embedding_type", "rotary", "fourier"]),
    ({"downsample_type": "fir"}, ["downsample_type", "fir", "resnet"]),
    ({"upsample_type": "fir"}, ["upsample_type", "fir", "resnet"]),
    ({"resnet_time_scale_shift": "spatial"}, ["resnet_time_scale_shift", "spatial", "scale_shift"]),
    ({"class_embed_type": "projection"}, ["class_embed_type", "projection"]),
    ({"num_class_embeds": 0}, ["num_class_embeds", "0"]),
    ({"num_class_embeds": 2.5}, ["num_class_embeds", "2.5"]),
    ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, ["mid_block_type", "UNetMidBlock2D"]),
    ({"mid_block_type": None}, ["mid_block_type", "None"]),
    ({"down_block_types": ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]},
     ["down_block_types[2]", "CrossAttnDownBlock2D", "AttnDownBlock2D"]),
    ({"up_block_types": ["UpBlock2D", "KUpBlock2D", "UpBlock2D"]},
     ["up_block_types[1]", "KUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D"]),
    ({"up_block_types": ["UpBlock2D", "SkipUpBlock2D", "UpBlock2D"]},
     ["up_block_types[2]", "'UpBlock2D'", "skip up blocks must be the last ones"]),
    ({"down_block_types": "DownBlock2D"}, ["down_block_types"]),
    ({"downsample_padding": 2}, ["downsample_padding", "2"]),
    ({"downsample_padding": True}, ["downsample_padding"]),
    ({"block_out_channels": [32, 60, 64]}, ["block_out_channels[1]", "norm_num_groups"]),
    ({"block_out_channels": [32, 0, 64]}, ["block_out_channels[1]"]),
    ({"block_out_channels": []}, ["block_out_channels"]),
    ({"block_out_channels": [32, 64]}, ["down_block_types", "block_out_channels"]),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, ["up_block_types", "down_block_types"]),
    ({"norm_num_groups": 0}, ["norm_num_groups"]),
    ({"norm_num_groups": 5}, ["norm_num_groups", "block_out_channels[0]"]),
    ({"attention_head_dim": 24}, ["attention_head_dim", "24"]),
    ({"attention_head_dim": 0}, ["attention_head_dim"]),
    ({"attn_norm_num_groups": 7}, ["attn_norm_num_groups"]),
    ({"layers_per_block": 0}, ["layers_per_block"]),
    ({"layers_per_block": True}, ["layers_per_block"]),
    ({"in_channels": -1}, ["in_channels"]),
    ({"out_channels": 2.5}, ["out_channels"]),
    ({"sample_size": 30}, ["sample_size", "4"]),
    ({"sample_size": [32]}, ["sample_size"]),
    ({"sample_size": 0}, ["sample_size"]),
    ({"sample_size": [32, 30]}, ["sample_size"]),
    ({"norm_eps": 0}, ["norm_eps"]),
    ({"norm_eps": float("nan")}, ["norm_eps"]),
    ({"mid_block_scale_factor": 0}, ["mid_block_scale_factor"]),
    ({"flip_sin_to_cos": "yes"}, ["flip_sin_to_cos"]),
    ({"center_input_sample": 1}, ["center_input_sample"]),
    ({"add_attention": None}, ["add_attention"]),
    ({"freq_shift": 16}, ["freq_shift"]),  # half of 32 channels: a zero divisor
    ({"freq_shift": "1"}, ["freq_shift"]),
    ({"time_embedding_dim": 0}, ["time_embedding_dim"]),
    ({"dropout": 2}, ["dropout"]),
    ({"num_train_timesteps": -1}, ["num_train_timesteps"]),
]


@pytest.mark.parametrize("change,fragments", BAD, ids=[json.dumps(c, default=str) for c, _ in BAD])
def test_bad_config_names_the_field(change, fragments):
    with pytest.raises(UNetConfigError) as e:
        UNetConfig.from_dict(dict(BENCH, **change))
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_bad_config_types():
    with pytest.raises(UNetConfigError):
        UNetConfig.from_dict([("sample_size", 32)])
    assert isinstance(UNetConfigError("x"), ValueError)


def test_ignored_fields_accepted():
    cfg = UNetConfig.from_dict(dict(BENCH, dropout=0.1, num_train_timesteps=1000))
    assert weight_shapes(cfg) == weight_shapes(UNetConfig.from_dict(BENCH))


def test_config_is_frozen():
    cfg = UNetConfig.from_dict(BENCH)
    with pytest.raises(Exception):
        cfg.in_channels = 4  # type: ignore[misc]
    assert cfg.replace(in_channels=4).in_channels == 4


def test_unet_config_and_weights_import_without_torch():
    # the native and numba backends plan from these modules on machines without PyTorch
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastddpm.unet_config as u, fastddpm.weights\n"
        "c = u.UNetConfig.from_dict(u.PRESETS['bench-small'])\n"
        "u.random_weights(c); u.flops(c)\n"
        "assert 'torch' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------- flops

def test_preset_flops():
    bench, cifar = UNetConfig.from_dict(BENCH), UNetConfig.from_dict(PRESETS["ddpm-cifar10"])
    assert flops(bench) == 835_600_384
    assert flops(cifar) == 12_443_713_536
    # DESIGN.md's "about 0.75" and "about 12.1" GFLOP leave out the attention matmuls
    assert round(flops(bench, attention_matmuls=False) / 1e9, 2) == 0.75
    assert round(flops(cifar, attention_matmuls=False) / 1e9, 1) == 12.1


@pytest.mark.parametrize("name,batch,hw", [("bench-small", 1, None), ("bench-small", 3, (16, 48)),
                                           ("ddpm-cifar10", 2, None), ("rgb64-heads", 1, None),
                                           ("four-nonsquare", 5, None), ("odd-width", 1, (24, 8))])
def test_flops_equal_torch_flop_counter(name, batch, hw):
    # an independent count: torch's FlopCounterMode over the reference forward on meta tensors
    from torch.utils.flop_counter import FlopCounterMode

    from fastddpm.reference import ReferenceUNet
    cfg = UNetConfig.from_dict(CONFIGS[name])
    h, w = hw or cfg.sample_hw
    with torch.device("meta"):
        model = ReferenceUNet(cfg, init_seed=None)
        x = torch.empty(batch, cfg.in_channels, h, w)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(batch, dtype=torch.long, device="meta"))
    assert flops(cfg, batch, h, w) == counter.get_total_flops()


def test_flops_checks_sizes():
    cfg = UNetConfig.from_dict(BENCH)
    with pytest.raises(ValueError, match="height"):
        flops(cfg, 1, 30, 32)
    with pytest.raises(ValueError, match="batch"):
        flops(cfg, 0)
    with pytest.raises(ValueError, match="sample_size"):
        flops(cfg.replace(sample_size=None))


# ---------------------------------------------------------------------- random weights

def test_random_weights_deterministic_and_well_formed():
    cfg = UNetConfig.from_dict(BENCH)
    a, b, c = random_weights(cfg, 0), random_weights(cfg, 0), random_weights(cfg, 1)
    shapes = weight_shapes(cfg)
    assert list(a) == list(shapes)
    for k, v in a.items():
        assert v.dtype == np.float32 and v.flags.c_contiguous and v.shape == shapes[k], k
        assert np.array_equal(v, b[k]), k
    assert not np.array_equal(a["conv_in.weight"], c["conv_in.weight"])
    w = a["down_blocks.0.resnets.0.conv1.weight"]  # fan-in 32 * 9
    assert np.abs(w).max() <= 1 / math.sqrt(32 * 9) and w.std() > 0.5 / math.sqrt(3 * 32 * 9)
    g = a["mid_block.attentions.0.group_norm.weight"]
    assert 0.5 < g.mean() < 1.5 and g.std() > 0.01 and np.abs(a["conv_norm_out.bias"]).max() > 0


# ---------------------------------------------------------------------- weight files

@pytest.fixture(scope="module")
def small_weights():
    return random_weights(UNetConfig.from_dict(CONFIGS["odd-width"]), 0)


def test_save_load_round_trip(tmp_path, small_weights):
    path = tmp_path / "w.safetensors"
    save_safetensors(small_weights, path)
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temp file left behind
    back = load_safetensors(path)
    assert set(back) == set(small_weights)
    for k, v in small_weights.items():
        assert back[k].dtype == np.float32 and back[k].flags.c_contiguous
        assert np.array_equal(back[k], v), k
    # diffusers' own loader reads our file
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(path))["conv_in.weight"],
                       torch.from_numpy(small_weights["conv_in.weight"]))


def test_save_is_atomic(tmp_path, small_weights, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_safetensors(small_weights, path)
    before = path.read_bytes()
    import safetensors.numpy

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"x": np.zeros(3, np.float32)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_save_rejects_non_float(tmp_path):
    with pytest.raises(WeightsError, match="'x'"):
        save_safetensors({"x": np.zeros(3, np.int32)}, tmp_path / "w.safetensors")


def test_load_converts_float_dtypes(tmp_path):
    from safetensors.torch import save_file
    t = {"h": torch.linspace(-2, 2, 7, dtype=torch.float16),
         "b": torch.linspace(-2, 2, 7, dtype=torch.bfloat16).reshape(7, 1),
         "d": torch.linspace(-2, 2, 7, dtype=torch.float64)}
    save_file(t, str(tmp_path / "m.safetensors"))
    back = load_safetensors(tmp_path / "m.safetensors")
    for k, v in t.items():
        assert back[k].dtype == np.float32 and back[k].shape == tuple(v.shape)
        assert np.array_equal(back[k], v.float().numpy()), k


def test_load_rejects_integer_tensor(tmp_path):
    from safetensors.numpy import save_file
    save_file({"steps": np.arange(4, dtype=np.int64)}, str(tmp_path / "i.safetensors"))
    with pytest.raises(WeightsError, match=r"'steps' \(I64\)"):
        load_safetensors(tmp_path / "i.safetensors")


def _header_file(path, header, data=b"", length=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _hostile_files(tmp_path, good: bytes):
    yield "truncated", lambda p: p.write_bytes(good[:-100])
    yield "cut in header", lambda p: p.write_bytes(good[:20])
    yield "empty", lambda p: p.write_bytes(b"")
    yield "garbage", lambda p: p.write_bytes(os.urandom(64))
    yield "length 2**60", lambda p: _header_file(p, {}, length=2 ** 60)
    yield "offsets past EOF", lambda p: _header_file(
        p, {"x": {"dtype": "F32", "shape": [2 ** 40], "data_offsets": [0, 2 ** 42]}}, b"\0" * 16)
    yield "offsets disagree with shape", lambda p: _header_file(
        p, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    yield "overlapping", lambda p: _header_file(
        p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    yield "unknown dtype", lambda p: _header_file(
        p, {"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16)
    yield "negative shape", lambda p: _header_file(
        p, {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})
    yield "header not an object", lambda p: _header_file(p, [1, 2, 3])
    yield "header not JSON", lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    yield "hole in data", lambda p: _header_file(
        p, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)


def test_hostile_files_raise_weights_error(tmp_path, small_weights):
    good_path = tmp_path / "good.safetensors"
    save_safetensors(small_weights, good_path)
    good = good_path.read_bytes()
    seen = 0
    for name, make in _hostile_files(tmp_path, good):
        p = tmp_path / f"bad-{seen}.safetensors"
        make(p)
        with pytest.raises(WeightsError) as e:
            load_safetensors(p)
        assert str(p) in str(e.value), (name, str(e.value))
        seen += 1
    assert seen == 13


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="directory"):
        load_safetensors(tmp_path)
    with pytest.raises(WeightsError, match="no such file"):
        load_safetensors(tmp_path / "nope.safetensors")
    if hasattr(os, "mkfifo"):  # opening a FIFO would block: it must be refused unopened
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(WeightsError, match="not a regular file"):
            load_safetensors(tmp_path / "fifo")


def test_check_weights_problems_each_named(small_weights):
    shapes = weight_shapes(UNetConfig.from_dict(CONFIGS["odd-width"]))
    w = dict(small_weights)
    del w["conv_out.bias"]
    w["extra.weight"] = np.zeros(3, np.float32)
    w["conv_in.weight"] = np.zeros((9, 3, 1, 1), np.float32)
    nan = w["time_embedding.linear_1.bias"].copy()
    nan[0] = np.nan
    w["time_embedding.linear_1.bias"] = nan
    inf = w["conv_out.weight"].copy()
    inf[0, 0, 0, 0] = -np.inf
    w["conv_out.weight"] = inf
    with pytest.raises(WeightsError) as e:
        check_weights(w, shapes)
    msg = str(e.value)
    for frag in ("missing 'conv_out.bias'", "unexpected 'extra.weight'", "'conv_in.weight': shape",
                 "'time_embedding.linear_1.bias': 1 non-finite", "'conv_out.weight': 1 non-finite"):
        assert frag in msg, (frag, msg)
    assert msg.startswith("5 problem(s)")


def test_check_weights_lists_at_most_20(small_weights):
    shapes = weight_shapes(UNetConfig.from_dict(CONFIGS["odd-width"]))
    with pytest.raises(WeightsError, match=rf"\.\.\. and {len(shapes) - 20} more"):
        check_weights({}, shapes)


def test_check_weights_converts(small_weights):
    shapes = weight_shapes(UNetConfig.from_dict(CONFIGS["odd-width"]))
    # float64, Fortran order, reversed key order and a torch tensor: all accepted
    w = {k: np.asfortranarray(v.astype(np.float64)) for k, v in reversed(small_weights.items())}
    w["conv_in.bias"] = torch.from_numpy(small_weights["conv_in.bias"])
    out = check_weights(w, shapes)
    assert list(out) == list(shapes)
    for k, v in out.items():
        assert v.dtype == np.float32 and v.flags.c_contiguous and np.array_equal(v, small_weights[k])
