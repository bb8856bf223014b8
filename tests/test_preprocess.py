import numpy as np
import pytest
import torch

from ichscan.preprocess import PreprocessSettings, preprocess, window


def test_window_maps_edges_to_0_and_1():
    hu = torch.tensor([[[[0.0, 40.0, 80.0, -1000.0, 3000.0]]]])
    out = window(hu, [(40.0, 80.0)])
    assert out.flatten().tolist() == pytest.approx([0.0, 0.5, 1.0, 0.0, 1.0])


def test_three_windows_and_size():
    pixels = [np.full((300, 300), 1064, dtype=np.uint16)]  # 40 HU with intercept -1024
    out = preprocess(pixels, [1.0], [-1024.0])
    assert out.shape == (1, 3, 224, 224)
    brain, subdural, bone = (out[0, c].mean().item() for c in range(3))
    assert brain == pytest.approx(0.5)
    assert subdural == pytest.approx((40 - (80 - 100)) / 200)
    assert bone == pytest.approx((40 - (600 - 1400)) / 2800)


def test_mixed_sizes_keep_order_and_rescale():
    a = np.full((512, 512), 40, dtype=np.int16)  # 40 HU, intercept 0
    b = np.full((400, 400), 1000 + 80, dtype=np.uint16)  # 80 HU with intercept -1000
    c = np.full((224, 224), 10, dtype=np.int16)  # slope 2 -> 20 HU, intercept 0... -> brain 0.25
    out = preprocess([a, b, c], [1.0, 1.0, 2.0], [0.0, -1000.0, 0.0])
    assert out[0, 0].mean().item() == pytest.approx(0.5)
    assert out[1, 0].mean().item() == pytest.approx(1.0)
    assert out[2, 0].mean().item() == pytest.approx(0.25)


def test_channels_last_same_values():
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 2000, (256, 256)).astype(np.uint16) for _ in range(3)]
    a = preprocess(pixels, [1.0] * 3, [-1024.0] * 3)
    b = preprocess(pixels, [1.0] * 3, [-1024.0] * 3, channels_last=True)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def test_settings_round_trip():
    settings = PreprocessSettings(windows=((40.0, 80.0), (50.0, 150.0)), size=128)
    assert PreprocessSettings.from_dict(settings.to_dict()) == settings
    out = preprocess([np.zeros((64, 64), np.int16)], [1.0], [0.0], settings)
    assert out.shape == (1, 2, 128, 128)


def test_rejects_non_2d():
    with pytest.raises(ValueError):
        preprocess([np.zeros((2, 8, 8), np.int16)], [1.0], [0.0])
