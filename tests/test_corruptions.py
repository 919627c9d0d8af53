"""Each corruption against its defining property, on small synthetic images."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from igkd.errors import IgkdError
from igkd.evaluate.corruptions import CORRUPTIONS, corrupt, parse_corruption_spec


def smooth_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-ish uint8 images: random low-frequency colour fields, values well inside [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    fields = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (40 + 175 * fields.clamp(0, 1)).round().to(torch.uint8)


def grey(n: int, value: int = 128, size: int = 32) -> torch.Tensor:
    return torch.full((n, 3, size, size), value, dtype=torch.uint8)


def test_the_suite_has_five_levels_each():
    assert set(CORRUPTIONS) == {"jpeg", "gaussian_noise", "shot_noise", "gaussian_blur", "contrast", "brightness", "pixelate"}
    assert all(len(c.levels) == 5 for c in CORRUPTIONS.values())


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_severity_zero_is_identity_and_output_is_uint8_same_shape(name):
    images = smooth_images(4, size=20)
    assert torch.equal(corrupt(images, name, 0), images)
    out = corrupt(images, name, 3)
    assert out.dtype == torch.uint8 and out.shape == images.shape


@pytest.mark.parametrize("severity", [1, 5])
def test_jpeg_equals_a_pillow_round_trip(severity):
    images = smooth_images(5)
    quality = CORRUPTIONS["jpeg"].levels[severity - 1]
    out = corrupt(images, "jpeg", severity)
    for image, corrupted in zip(images, out):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
        expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        assert np.array_equal(corrupted.permute(1, 2, 0).numpy(), expected)
    assert not torch.equal(out, images)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_has_the_stated_sd(severity):
    # Mid-grey: with sd <= 0.1 the clamp at 0 and 1 (5 sd away) is never reached.
    images = grey(64, 128)
    out = corrupt(images, "gaussian_noise", severity).float() / 255
    sd = CORRUPTIONS["gaussian_noise"].levels[severity - 1]
    # Rounding to 1/255 adds uniform noise of variance (1/255)^2 / 12.
    measured = out.std().item()
    expected = (sd**2 + (1 / 255) ** 2 / 12) ** 0.5
    assert measured == pytest.approx(expected, rel=0.01)  # 196k samples: relative s.e. of the sd ~0.16%
    assert out.mean().item() == pytest.approx(128 / 255, abs=1e-3)


@pytest.mark.parametrize("severity", [1, 5])
def test_shot_noise_preserves_the_mean_with_poisson_variance(severity):
    images = grey(64, 100)
    x = 100 / 255
    photons = CORRUPTIONS["shot_noise"].levels[severity - 1]
    out = corrupt(images, "shot_noise", severity).float() / 255
    assert out.mean().item() == pytest.approx(x, abs=2e-3)
    assert out.var().item() == pytest.approx(x / photons + (1 / 255) ** 2 / 12, rel=0.05)


@pytest.mark.parametrize("severity", [1, 5])
def test_blur_keeps_a_constant_image_and_the_mean(severity):
    assert torch.equal(corrupt(grey(2, 77), "gaussian_blur", severity), grey(2, 77))
    images = smooth_images(6)
    out = corrupt(images, "gaussian_blur", severity)
    assert out.float().mean((2, 3)).sub(images.float().mean((2, 3))).abs().max() < 0.5  # rounding only


def test_blur_equals_scipy_gaussian_filter_with_reflect_padding():
    images = torch.randint(0, 256, (3, 3, 16, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    for severity in (1, 5):
        sigma = CORRUPTIONS["gaussian_blur"].levels[severity - 1]
        expected = ndimage.gaussian_filter(images.double().numpy() / 255, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=4.0)
        expected = np.round(np.clip(expected, 0, 1) * 255)
        difference = np.abs(corrupt(images, "gaussian_blur", severity).numpy().astype(float) - expected)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01  # only float ties at .5 may round apart


@pytest.mark.parametrize("severity", [1, 5])
def test_contrast_scales_the_deviation_from_the_channel_mean(severity):
    images = smooth_images(4)
    c = CORRUPTIONS["contrast"].levels[severity - 1]
    x = images.double() / 255
    mean = x.mean((2, 3), keepdim=True)
    out = corrupt(images, "contrast", severity).double() / 255
    # Images lie in [40, 215]/255, so no clamping: the only error is the final rounding.
    assert (out - ((x - mean) * c + mean)).abs().max().item() <= 0.5 / 255 + 1e-9
    assert (out - mean).std().item() == pytest.approx(c * (x - mean).std().item(), rel=0.02)


def test_brightness_adds_to_the_hsv_value():
    images = torch.randint(0, 256, (2, 3, 6, 6), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    images[0, :, 0, 0] = 0  # a black pixel turns grey
    severity = 4
    shift = CORRUPTIONS["brightness"].levels[severity - 1]
    out = corrupt(images, "brightness", severity)
    for n, i, j in np.ndindex(2, 6, 6):
        h, s, v = colorsys.rgb_to_hsv(*(images[n, :, i, j].double() / 255).tolist())
        expected = np.round(np.array(colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))) * 255)
        assert np.abs(out[n, :, i, j].numpy() - expected).max() <= 1


def test_pixelate_makes_blocks_and_keeps_the_mean():
    images = smooth_images(4)
    severity = 5
    side = int(32 * CORRUPTIONS["pixelate"].levels[severity - 1])  # 20
    out = corrupt(images, "pixelate", severity)
    for image in out:
        assert len(torch.unique(image, dim=1)) <= side and len(torch.unique(image, dim=2)) <= side
    assert torch.equal(corrupt(grey(2, 200), "pixelate", severity), grey(2, 200))
    assert out.float().mean().item() == pytest.approx(images.float().mean().item(), abs=1.0)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise"])
def test_noise_is_deterministic_under_a_seed(name):
    images = smooth_images(4)
    assert torch.equal(corrupt(images, name, 2, seed=7), corrupt(images, name, 2, seed=7))
    assert not torch.equal(corrupt(images, name, 2, seed=7), corrupt(images, name, 2, seed=8))
    assert not torch.equal(corrupt(images, name, 2, seed=7), corrupt(images, name, 3, seed=7))


def test_corrupt_rejects_bad_input():
    images = smooth_images(1)
    with pytest.raises(IgkdError, match="unknown corruption 'fog'.*jpeg, gaussian_noise"):
        corrupt(images, "fog", 1)
    for severity in (6, -1, 1.5, True):
        with pytest.raises(IgkdError, match="0..5"):
            corrupt(images, "jpeg", severity)
    with pytest.raises(IgkdError, match="uint8"):
        corrupt(images.float(), "contrast", 1)


def test_spec_grammar():
    everything = parse_corruption_spec("all")
    assert everything == [(name, s) for name in CORRUPTIONS for s in range(1, 6)]
    assert parse_corruption_spec("jpeg") == [("jpeg", s) for s in range(1, 6)]
    assert parse_corruption_spec("jpeg:1,3,5") == [("jpeg", 1), ("jpeg", 3), ("jpeg", 5)]
    assert parse_corruption_spec("gaussian_noise:2;contrast") == [("gaussian_noise", 2)] + [("contrast", s) for s in range(1, 6)]
    assert parse_corruption_spec(" Pixelate : 0, 2-3 ; pixelate:2 ;") == [("pixelate", 0), ("pixelate", 2), ("pixelate", 3)]
    assert parse_corruption_spec("all:3") == [(name, 3) for name in CORRUPTIONS]


@pytest.mark.parametrize(
    "spec, message",
    [("", "empty"), ("fog", "unknown corruption 'fog'"), ("jpeg:6", "0..5"), ("jpeg:x", "bad severity"), ("jpeg:3-1", "bad severity"), (";", "names nothing")],
)
def test_bad_specs_raise_igkd_error(spec, message):
    with pytest.raises(IgkdError, match=message):
        parse_corruption_spec(spec)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_pixelate_equals_pillow_box_resize_down_and_up_within_rounding(severity):
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    side = int(32 * CORRUPTIONS["pixelate"].levels[severity - 1])
    out = corrupt(images, "pixelate", severity)
    for image, corrupted in zip(images, out):
        small = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((side, side), Image.BOX)
        expected = np.asarray(small.resize((32, 32), Image.BOX)).astype(int)
        # Pillow rounds to uint8 after each 1-D pass, we round once at the end.
        assert np.abs(corrupted.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1
