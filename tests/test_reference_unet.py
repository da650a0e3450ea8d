"""The reference U-Net against diffusers' UNet2DModel: same random weights, same inputs, fp32,
relative L2 error ||ours - diffusers|| / ||diffusers|| <= 1e-5."""
import numpy as np
import pytest

from fastddpm.unet_config import PRESETS, UNetConfig, random_weights, weight_shapes
from fastddpm.weights import WeightsError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fastddpm.reference import ReferenceUNet  # noqa: E402  (after the torch skip)

from test_unet_config import CONFIGS  # noqa: E402  (one list of configs for both files)

REL_TOL = 1e-5


def diffusers_unet(cfg: UNetConfig, weights: dict):
    # built on the meta device (no init cost), then every parameter assigned from `weights`
    with torch.device("meta"):
        model = diffusers.UNet2DModel.from_config(cfg.to_dict())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()},
                          strict=True, assign=True)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


# name, batch, (H, W) or None for sample_size, timestep: int, a 1-element list, or per-sample list
CASES = [
    ("bench-small", 3, None, [0, 417, 999]),
    ("bench-small", 1, (16, 48), 250),  # not the config's sample_size, non-square
    ("ddpm-cifar10", 1, None, 999),
    ("rgb64-heads", 1, None, 10),
    ("gray16-noattn", 5, None, [1, 2, 3, 500, 999]),
    ("four-nonsquare", 3, None, [7]),
    ("odd-width", 3, (24, 8), [0, 5, 900]),
]


@pytest.mark.parametrize("name,batch,hw,timestep", CASES,
                         ids=[f"{c[0]}-n{c[1]}-{c[2]}" for c in CASES])
def test_matches_diffusers(name, batch, hw, timestep):
    cfg = UNetConfig.from_dict(CONFIGS[name])
    weights = random_weights(cfg, seed=1)
    ours, theirs = ReferenceUNet.from_weights(cfg, weights), diffusers_unet(cfg, weights)
    h, w = hw or cfg.sample_hw
    gen = torch.Generator().manual_seed(batch * 1000 + h)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=gen)
    t = timestep if isinstance(timestep, int) else torch.tensor(timestep)
    with torch.no_grad():
        a = ours(x, t)
        b = theirs(x, t).sample
    assert a.shape == b.shape == (batch, cfg.out_channels, h, w)
    assert torch.isfinite(a).all()
    assert 0.05 < float(b.std()) < 20  # the random init gives a healthy output scale
    assert rel_err(a, b) <= REL_TOL


def test_fractional_timesteps_match_diffusers():
    cfg = UNetConfig.from_dict(CONFIGS["odd-width"])
    weights = random_weights(cfg, seed=2)
    ours, theirs = ReferenceUNet.from_weights(cfg, weights), diffusers_unet(cfg, weights)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([12.25, 700.5])
    with torch.no_grad():
        assert rel_err(ours(x, t), theirs(x, t).sample) <= REL_TOL


def test_state_dict_is_diffusers_layout():
    cfg = UNetConfig.from_dict(CONFIGS["four-nonsquare"])
    model = ReferenceUNet(cfg)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        list(weight_shapes(cfg).items())
    # a diffusers state dict loads strictly, and the default init is random_weights(cfg, 0)
    theirs = diffusers_unet(cfg, random_weights(cfg, 5))
    model.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(model.conv_in.weight, theirs.conv_in.weight)
    again = ReferenceUNet(cfg)
    for k, v in random_weights(cfg, 0).items():
        assert np.array_equal(again.state_dict()[k].numpy(), v), k
    assert list(again.numpy_weights()) == list(weight_shapes(cfg))


def test_timestep_forms_agree():
    cfg = UNetConfig.from_dict(CONFIGS["gray16-noattn"])
    model = ReferenceUNet(cfg, init_seed=3)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, 42)
        for t in (torch.tensor(42), torch.tensor([42]), torch.tensor([42, 42, 42]),
                  np.int64(42), torch.tensor(42.0)):
            assert torch.equal(model(x, t), ref), t
        # per-sample timesteps are per-sample: each row equals its own batch-1 forward
        per = model(x, torch.tensor([5, 42, 900]))
        for i, t in enumerate((5, 42, 900)):
            assert rel_err(per[i:i + 1], model(x[i:i + 1], t)) <= REL_TOL


def test_bad_inputs():
    cfg = UNetConfig.from_dict(CONFIGS["odd-width"])
    model = ReferenceUNet(cfg)
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.zeros(2, 4, 8, 8), 1)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.zeros(3, 8, 8), 1)
    with pytest.raises(ValueError, match="height"):
        model(torch.zeros(1, 3, 7, 8), 1)
    with pytest.raises(ValueError, match="width"):
        model(torch.zeros(1, 3, 8, 5), 1)
    with pytest.raises(ValueError, match=r"shape \[1\] or \[2\]"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.zeros(2, 1))


def test_from_weights_checks_the_dict():
    cfg = UNetConfig.from_dict(CONFIGS["odd-width"])
    w = random_weights(cfg)
    del w["conv_out.bias"]
    with pytest.raises(WeightsError, match="conv_out.bias"):
        ReferenceUNet.from_weights(cfg, w)


def test_config_dict_accepted_and_preset_builds():
    model = ReferenceUNet(PRESETS["bench-small"], init_seed=None)
    assert model.config == UNetConfig.from_dict(PRESETS["bench-small"])
