"""Overlay controls (shuffled / random maps) and CutMix / Mixup on member-major batches."""


import pytest
import torch

from igkd.distill.config import resolve_config
from igkd.distill.controls import (
    apply_mix,
    cutmix_boxes,
    derangement,
    expected_attribution_method,
    mix_draws,
    overlay_maps_for,
    random_maps,
    shuffled_maps,
)
from igkd.distill.losses.kd import mixed_cross_entropy_members
from igkd.distill.objective import Objective
from igkd.errors import IgkdError


@pytest.mark.parametrize("n", [2, 3, 7, 100, 5000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_derangement_never_pairs_an_image_with_itself(n, seed):
    d = derangement(n, seed)
    assert sorted(d.tolist()) == list(range(n))
    assert (d != torch.arange(n)).all()
    assert torch.equal(d, derangement(n, seed))


def test_derangement_within_groups_and_refusals():
    groups = torch.tensor([0, 1, 0, 2, 1, 2, 2, 0, 1, 1])
    for seed in range(20):
        d = derangement(10, seed, groups)
        assert (d != torch.arange(10)).all() and torch.equal(groups[d], groups)
        assert sorted(d.tolist()) == list(range(10))
    assert len({tuple(derangement(50, s).tolist()) for s in range(5)}) == 5
    with pytest.raises(IgkdError, match="at least 2"):
        derangement(1, 0)
    with pytest.raises(IgkdError, match="single item"):
        derangement(3, 0, torch.tensor([0, 0, 1]))


def test_shuffled_maps_are_other_images_maps():
    maps = torch.arange(40, dtype=torch.float16).view(40, 1, 1).expand(40, 4, 4).clone()
    out = shuffled_maps(maps, seed=3)
    own = out[:, 0, 0].long()
    assert (own != torch.arange(40)).all() and sorted(own.tolist()) == list(range(40))


def test_random_maps_keep_each_histogram_and_are_smooth_and_seeded():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2100, 16, 16, generator=g).pow(3).to(torch.float16)  # speckled, skewed
    out = random_maps(maps, seed=5, sigma=2.0)
    assert out.shape == maps.shape and out.dtype == maps.dtype
    assert torch.equal(torch.sort(out.flatten(1), 1).values, torch.sort(maps.flatten(1), 1).values)
    assert not torch.equal(out, maps)
    assert torch.equal(out, random_maps(maps, seed=5, sigma=2.0))
    assert not torch.equal(out, random_maps(maps, seed=6, sigma=2.0))
    assert torch.equal(out[:10], random_maps(maps[:10], seed=5, sigma=2.0))  # row i does not depend on N

    def neighbour_correlation(x):
        x = x.float()
        a, b = x[:, :, :-1].flatten(), x[:, :, 1:].flatten()
        return torch.corrcoef(torch.stack((a, b)))[0, 1].item()

    assert neighbour_correlation(out) > 0.5 > abs(neighbour_correlation(maps))


def test_overlay_maps_for_each_control():
    maps = torch.rand(30, 8, 8).half()
    cfg = lambda m: resolve_config("kd_ig" if m == "ig" else {"shuffled": "kd_shuffled", "saliency": "kd_saliency", "random": "kd_random_map"}[m], seed=4)  # noqa: E731
    assert overlay_maps_for(cfg("ig"), maps) is maps and overlay_maps_for(cfg("saliency"), maps) is maps
    assert torch.equal(overlay_maps_for(cfg("shuffled"), maps), shuffled_maps(maps, 4))
    assert torch.equal(overlay_maps_for(cfg("random"), maps), random_maps(maps, 4, 2.0))
    assert expected_attribution_method("saliency") == "saliency" and expected_attribution_method("shuffled") == "ig"


def cohort(kinds, seed0=0, **extra):
    names = {"none": "kd", "cutmix": "kd_cutmix", "mixup": "kd_mixup"}
    return [resolve_config(names[k], seed=seed0 + i, **extra) for i, k in enumerate(kinds)]


def batch(G, B, C=3, H=12, W=10):
    g = torch.Generator().manual_seed(1)
    # every image distinct and identifiable: pixel values encode (member, image)
    images = torch.rand(G, B, C, H, W, generator=g)
    labels = torch.randint(10, (G, B), generator=g)
    return images, labels


def test_cutmix_labels_lambda_and_views_are_consistent():
    configs = cohort(["cutmix", "cutmix", "cutmix"], mix_prob=1.0)
    G, B, H, W = 3, 16, 12, 10
    draws = mix_draws(configs, epoch=0, steps=5, batch_size=B)
    images, labels = batch(G, B, H=H, W=W)
    lams = set()
    for step in range(5):
        mixed, (ya, yb, lam) = apply_mix(images, labels, draws, step)
        perm = torch.argsort(draws.keys[step, :, :B], 1)
        assert torch.equal(ya, labels)
        for g in range(G):
            assert torch.equal(yb[g], labels[g][perm[g]])
            from_a = (mixed[g] == images[g]).all(1)  # [B, H, W]: pixel from the image itself
            from_b = (mixed[g] == images[g][perm[g]]).all(1)
            assert (from_a | from_b).all()
            y1, y2, x1, x2 = cutmix_boxes(draws.lam[step], draws.cx[step], draws.cy[step], H, W)[g].tolist()
            inside = torch.zeros(H, W, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            differs = perm[g] != torch.arange(B)
            assert from_b[:, inside].all() and from_a[:, ~inside].all()
            assert (~from_a[differs][:, inside]).all()  # the box really holds the partner's pixels
            assert lam[g].item() == pytest.approx(1 - inside.sum().item() / (H * W))  # lambda from the actual box
            lams.add(round(lam[g].item(), 6))
    assert len(lams) > 3  # one lambda per member batch, not one for the cohort


def test_mixup_and_no_mix_members_in_one_call():
    configs = cohort(["mixup", "none", "cutmix", "mixup"])
    configs[2].mix_prob = 0.0
    G, B = 4, 8
    draws = mix_draws(configs, epoch=2, steps=3, batch_size=B)
    images, labels = batch(G, B)
    # a smaller last batch uses the first b keys of each member
    for b in (B, 5):
        mixed, (ya, yb, lam) = apply_mix(images[:, :b], labels[:, :b], draws, 1)
        perm = torch.argsort(draws.keys[1, :, :b], 1)
        for g in (0, 3):
            lam_g = draws.lam[1, g]
            assert lam[g] == lam_g and 0 < lam_g < 1
            assert torch.allclose(mixed[g], lam_g * images[g, :b] + (1 - lam_g) * images[g, :b][perm[g]])
            assert torch.equal(yb[g], labels[g, :b][perm[g]])
        for g in (1, 2):  # no mixing: images, labels and lambda unchanged
            assert torch.equal(mixed[g], images[g, :b]) and torch.equal(yb[g], labels[g, :b]) and lam[g] == 1
    # the loss of a mixed batch: lam * CE(y_a) + (1 - lam) * CE(y_b) per member; the teacher sees `mixed`
    generator = torch.Generator().manual_seed(3)
    logits, teacher_logits = torch.randn(G, 5, 10, generator=generator), torch.randn(G, 5, 10, generator=generator)
    objective = Objective.from_configs(configs, "cpu")
    total = objective.logit_losses(logits, teacher_logits, ya, labels_b=yb, lam=lam)
    plain = objective.logit_losses(logits, teacher_logits, ya)
    expected_ce = mixed_cross_entropy_members(logits, ya, yb, lam)
    from igkd.distill.losses.kd import cross_entropy_members

    # a difference of two losses: float32 cancellation, hence an absolute tolerance
    assert torch.allclose(total - plain, objective.ce_weight * (expected_ce - cross_entropy_members(logits, ya)), atol=1e-5)


def test_mix_draws_are_per_member_and_reproducible():
    a = mix_draws(cohort(["cutmix", "mixup"], seed0=10), epoch=3, steps=4, batch_size=6)
    b = mix_draws(cohort(["mixup"], seed0=11), epoch=3, steps=4, batch_size=6)
    assert torch.equal(a.lam[:, 1], b.lam[:, 0]) and torch.equal(a.keys[:, 1], b.keys[:, 0])  # same member, any cohort
    c = mix_draws(cohort(["cutmix", "mixup"], seed0=10), epoch=4, steps=4, batch_size=6)
    assert not torch.equal(a.lam, c.lam)
    half = mix_draws(cohort(["cutmix"]), epoch=0, steps=2000, batch_size=2)
    assert 0.4 < half.apply.float().mean().item() < 0.6  # kd_cutmix: mix_prob 0.5 (CutMix's CIFAR setting)
    none = mix_draws(cohort(["none"]), epoch=0, steps=10, batch_size=2)
    assert not none.apply.any()
