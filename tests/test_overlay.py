import math

import numpy as np
import torch

from igkd.distill.overlay import apply_overlay, ig_overlay, overlay_draws


def literal_overlay(x, ig, apply, s):
    """Paper eq. 5-7 for one sample, written out with numpy."""
    if not apply:
        return x
    scaled = ig ** s
    normed = (scaled - scaled.min()) / (scaled.max() - scaled.min())
    return 0.5 * x + 0.5 * np.repeat(normed[None], 3, axis=0)


def test_batched_overlay_equals_per_sample_equations():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 8, 8, generator=generator)
    maps = torch.rand(64, 8, 8, generator=generator) * 5
    apply, s = overlay_draws(64, 0.5, 1.0, 2.0, torch.Generator().manual_seed(1), "cpu")
    batched = apply_overlay(images, maps, apply, s)
    for i in range(64):
        expected = literal_overlay(images[i].double().numpy(), maps[i].double().numpy(), bool(apply[i]), float(s[i]))
        np.testing.assert_allclose(batched[i].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert 10 < int(apply.sum()) < 54
    assert (s >= 1).all() and (s <= 2).all()
    # ig_overlay draws from the generator exactly as overlay_draws does
    again = ig_overlay(images, maps, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(again, batched)


def test_exponent_is_log_uniform():
    _, s = overlay_draws(20000, 1.0, 1.0, 2.0, torch.Generator().manual_seed(2), "cpu")
    logs = torch.log(s)
    assert abs(logs.mean().item() - math.log(2) / 2) < 0.01  # uniform on [ln 1, ln 2]
    assert ig_overlay(torch.ones(3, 3, 4, 4), torch.rand(3, 4, 4), 0.0, torch.Generator()).eq(1).all()
