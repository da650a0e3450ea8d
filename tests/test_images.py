"""Pictures: sizes, modes, frame counts, order, atomic writes and clear errors."""
import os

import numpy as np
import pytest
from PIL import Image

import fastddpm
from fastddpm.images import grid, save_grid, save_trajectory, to_pil, trajectory_steps, to_uint8_images
from fastddpm.pipeline import SampleResult


def u8(n=5, h=16, w=16, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_public_names():
    assert fastddpm.save_grid is save_grid and fastddpm.save_trajectory is save_trajectory
    assert fastddpm.to_pil is to_pil
    for name in ("save_grid", "save_trajectory", "to_pil"):
        assert name in fastddpm.__all__


def test_to_pil_modes_and_float_input():
    assert to_pil(u8(1)[0]).mode == "L" and to_pil(u8(1)[0]).size == (16, 16)
    pics = to_pil(u8(3, 8, 12, 3))
    assert len(pics) == 3 and pics[0].mode == "RGB" and pics[0].size == (12, 8)
    assert to_pil(u8(1, c=4)[0]).mode == "RGBA"
    f = np.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4).astype(np.float32)
    a = to_uint8_images(f)
    assert a.shape == (2, 4, 4, 1) and a[0, 0, 0, 0] == 0 and a[1, 3, 3, 0] == 255
    assert to_pil(u8(1)[0], scale=3).size == (48, 48)
    with pytest.raises(ValueError, match="C in 1/3/4"):
        to_pil(np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_images(np.full((1, 1, 2, 2), np.nan, np.float32))


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    a = u8(2)
    np.testing.assert_array_equal(grid(torch.from_numpy(a), scale=1), grid(a, scale=1))


def test_grid_layout_and_size():
    imgs = u8(5)
    g = grid(imgs, nrow=3, padding=1, scale=1)
    assert g.shape == (2 * 16 + 3, 3 * 16 + 4, 1)
    np.testing.assert_array_equal(g[1:17, 1:17], imgs[0])
    np.testing.assert_array_equal(g[18:34, 18:34], imgs[4])
    assert grid(imgs, scale=None).shape == (4 * (2 * 16 + 3), 4 * (3 * 16 + 4), 1)   # auto: 16 px -> x4


def test_save_grid_writes_the_right_picture(tmp_path):
    p = save_grid(u8(16), tmp_path / "g.png", scale=2)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (2 * (4 * 16 + 5),) * 2 and im.mode == "L"
    save_grid(u8(4, c=3), tmp_path / "g.jpg")
    assert Image.open(tmp_path / "g.jpg").format == "JPEG"
    assert sorted(os.listdir(tmp_path)) == ["g.jpg", "g.png"]   # no temporary files left


def test_save_errors_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        save_grid(u8(2), tmp_path / "g.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_grid(u8(2), tmp_path / "missing" / "g.png")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(IsADirectoryError):
        save_grid(u8(2), tmp_path / "d.png")
    with pytest.raises(ValueError, match="suffix"):
        save_trajectory(np.zeros((2, 1, 4, 4, 1), np.uint8), tmp_path / "t.mp4")
    assert os.listdir(tmp_path) == ["d.png"]


def _result(k=4, n=3):
    steps = list(range(k))
    frames = np.stack([np.full((n, 8, 8, 1), 40 * i, np.uint8) for i in steps])
    # give the steps out of order: save_trajectory puts the static (0) first, the finished last
    order = [2, 0, 3, 1][:k] if k == 4 else steps
    return SampleResult(images=frames[-1], trajectory=frames[order], trajectory_steps=[steps[i] for i in order],
                        timesteps=[])


def test_trajectory_gif_frames_and_order(tmp_path):
    res = _result()
    p = save_trajectory(res, tmp_path / "t.gif", scale=1)
    with Image.open(p) as im:
        assert im.n_frames == 4 and im.size == (2 * 8 + 3, 2 * 8 + 3)
        firsts = []
        for i in range(im.n_frames):
            im.seek(i)
            firsts.append(np.asarray(im.convert("L"))[1, 1])
            if i == im.n_frames - 1:
                assert im.info["duration"] >= 1000   # the finished picture is held
    assert firsts == [0, 40, 80, 120]


def test_trajectory_png_strip(tmp_path):
    res = _result()
    p = save_trajectory(res, tmp_path / "t.png", scale=1)
    a = np.asarray(Image.open(p))
    assert a.shape == (3 * 8 + 4, 4 * 8 + 5)        # rows = 3 samples, columns = 4 steps
    assert [a[1, 1 + 9 * j] for j in range(4)] == [0, 40, 80, 120]   # static left, finished right


def test_trajectory_from_sampling(tmp_path):
    pipe = fastddpm.load("bench-small")
    res = pipe(2, steps=4, seed=0, trajectory=trajectory_steps(4, 5))
    assert res.trajectory_steps == [0, 1, 2, 3, 4]
    save_trajectory(res, tmp_path / "t.gif")
    with Image.open(tmp_path / "t.gif") as im:
        assert im.n_frames == 5
        im.seek(4)
        last = np.asarray(im.convert("L"))
    # 32x32 images are enlarged x2; padding 1 -> 2 px
    np.testing.assert_array_equal(last[2:2 + 64:2, 2:2 + 64:2], res.images[0, :, :, 0])
    with pytest.raises(ValueError, match="no frames"):
        save_trajectory(np.zeros((0, 1, 4, 4, 1), np.uint8), tmp_path / "e.gif")


def test_trajectory_steps():
    assert trajectory_steps(200, 5) == [0, 50, 100, 150, 200]
    assert trajectory_steps(3, 10) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        trajectory_steps(0, 5)
