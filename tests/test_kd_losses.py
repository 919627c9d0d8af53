"""DKD, DIST and logit standardisation against literal, per-sample implementations of the published
equations (plain Python loops over samples and classes, torch scalars for autograd): values and
gradients, for one member and for three members with different constants."""

import math

import pytest
import torch

from igkd.distill.losses.dist import dist_members, dist_relations
from igkd.distill.losses.dkd import dkd_members, dkd_warmup_factor
from igkd.distill.losses.kd import kd_members, mixed_cross_entropy_members, cross_entropy_members, soft_target_members
from igkd.distill.losses.logit_standardization import standardize_logits, standardize_members

# -- literal implementations: one sample (a list of K torch scalars) at a time ----------------------


def softmax(z, T):
    e = [torch.exp(v / T) for v in z]
    s = sum(e)
    return [v / s for v in e]


def kl(p, q):
    return sum(a * torch.log(a / b) for a, b in zip(p, q))


def zscore(z):
    K = len(z)
    m = sum(z) / K
    sd = torch.sqrt(sum((v - m) ** 2 for v in z) / (K - 1))  # unbiased, as the authors' code
    return [(v - m) / (sd + 1e-7) for v in z]


def dkd_literal(s_rows, t_rows, labels, alpha, beta, T):
    """Zhao et al. 2022: T^2 (alpha TCKD + beta NCKD), batch mean."""
    total = 0
    for s, t, y in zip(s_rows, t_rows, labels):
        ps, pt = softmax(s, T), softmax(t, T)
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        tckd = kl(bt, bs)
        others = [k for k in range(len(s)) if k != y]
        hs = softmax([s[k] for k in others], T)
        ht = softmax([t[k] for k in others], T)
        nckd = kl(ht, hs)
        total = total + T * T * (alpha * tckd + beta * nckd)
    return total / len(labels)


def pearson_literal(u, v):
    n = len(u)
    mu, mv = sum(u) / n, sum(v) / n
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    return cov / (torch.sqrt(sum((a - mu) ** 2 for a in u)) * torch.sqrt(sum((b - mv) ** 2 for b in v)))


def dist_literal(s_rows, t_rows, beta, gamma, tau):
    """Huang et al. 2022: beta tau^2 (1 - mean_i rho(rows)) + gamma tau^2 (1 - mean_k rho(columns))."""
    ys = [softmax(s, tau) for s in s_rows]
    yt = [softmax(t, tau) for t in t_rows]
    B, K = len(ys), len(ys[0])
    inter = 1 - sum(pearson_literal(ys[i], yt[i]) for i in range(B)) / B
    intra = 1 - sum(pearson_literal([ys[i][k] for i in range(B)], [yt[i][k] for i in range(B)]) for k in range(K)) / K
    return beta * tau**2 * inter + gamma * tau**2 * intra


def rows(x):
    """A [B, K] leaf tensor as a list of rows of torch scalars (so autograd reaches the leaf)."""
    return [[x[i, k] for k in range(x.shape[1])] for i in range(x.shape[0])]


def members(G, B=6, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(G, B, K, generator=g, dtype=torch.float64) * 3).float().requires_grad_(True)
    t = (torch.randn(G, B, K, generator=g, dtype=torch.float64) * 3).float().requires_grad_(True)
    y = torch.randint(K, (G, B), generator=g)
    return s, t, y


def check(batched, literal, s, t):
    """batched: [G]; literal: list of G scalars; compare values and the gradients of sum_g w_g * loss_g."""
    w = torch.arange(1, batched.shape[0] + 1, dtype=torch.float32)
    assert batched.shape == (len(literal),)
    for g in range(len(literal)):
        assert batched[g].item() == pytest.approx(literal[g].item(), rel=1e-4, abs=1e-6)
    gs, gt = torch.autograd.grad((w * batched).sum(), (s, t))
    ls, lt = torch.autograd.grad(sum(wi * li for wi, li in zip(w, literal)), (s, t))
    assert torch.allclose(gs, ls, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gt, lt, rtol=1e-4, atol=1e-6)


DKD_CONSTANTS = [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.5)]
DIST_CONSTANTS = [(2.0, 2.0, 4.0), (1.0, 0.5, 1.0), (0.0, 3.0, 2.0)]


@pytest.mark.parametrize("G", [1, 3])
def test_dkd_matches_published_equations(G):
    s, t, y = members(G)
    consts = DKD_CONSTANTS[:G]
    a, b, T = (torch.tensor(c) for c in zip(*consts))
    batched = dkd_members(s, t, y, a, b, T) if G > 1 else dkd_members(s, t, y, *consts[0])
    literal = [dkd_literal(rows(s[g]), rows(t[g]), y[g].tolist(), *consts[g]) for g in range(G)]
    check(batched, literal, s, t)


def test_dkd_sums_to_kd_with_the_published_weighting():
    """TCKD + (1 - p_t^teacher) NCKD = KD's KL (the paper's eq. 7), checked per sample (B = 1)."""
    s, t, y = members(1, B=1, K=7, seed=3)
    T = 2.0
    pt = torch.softmax(t[0, 0] / T, -1)[y[0, 0]]
    tckd = dkd_members(s, t, y, 1.0, 0.0, T)
    nckd = dkd_members(s, t, y, 0.0, 1.0, T)
    assert (tckd + (1 - pt) * nckd).item() == pytest.approx(soft_target_members(s, t, T).item(), rel=1e-5)


def test_dkd_warmup_factor():
    assert dkd_warmup_factor(1, 20) == pytest.approx(0.05)
    assert dkd_warmup_factor(20, 20) == 1.0 and dkd_warmup_factor(35, 20) == 1.0 and dkd_warmup_factor(1, 0) == 1.0
    w = dkd_warmup_factor(5, torch.tensor([20.0, 0.0, 4.0, 10.0]))
    assert torch.allclose(w, torch.tensor([0.25, 1.0, 1.0, 0.5]))


@pytest.mark.parametrize("G", [1, 3])
def test_dist_matches_published_equations(G):
    s, t, y = members(G)
    consts = DIST_CONSTANTS[:G]
    beta, gamma, tau = (torch.tensor(c) for c in zip(*consts))
    batched = dist_members(s, t, beta, gamma, tau) if G > 1 else dist_members(s, t, *consts[0])
    literal = [dist_literal(rows(s[g]), rows(t[g]), *consts[g]) for g in range(G)]
    check(batched, literal, s, t)


def test_dist_is_zero_for_identical_logits_and_per_member():
    s, _, _ = members(3, seed=4)
    inter, intra = dist_relations(s, s.detach().clone(), 4.0)
    assert torch.allclose(inter, torch.zeros(3), atol=1e-5) and torch.allclose(intra, torch.zeros(3), atol=1e-5)
    # a member's loss depends only on its own batch
    s2 = s.detach().clone()
    t = torch.randn_like(s2)
    before = dist_members(s2, t, 2.0, 2.0, 4.0)
    s2[1] += torch.randn_like(s2[1])
    after = dist_members(s2, t, 2.0, 2.0, 4.0)
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]


def test_standardize_matches_zscore_and_is_scale_free():
    s, _, _ = members(2, seed=5)
    z = standardize_logits(s)
    for g in range(2):
        for i in range(s.shape[1]):
            literal = torch.stack(zscore([s[g, i, k] for k in range(s.shape[2])]))
            assert torch.allclose(z[g, i], literal, rtol=1e-5, atol=1e-6)
    assert torch.allclose(standardize_logits(3 * s + 7), z, atol=1e-5)
    mixed = standardize_members(s, torch.tensor([True, False]))
    assert torch.allclose(mixed[0], z[0]) and torch.equal(mixed[1], s[1].float())


@pytest.mark.parametrize("G", [1, 3])
def test_logit_standardised_kd_dkd_dist_match_literal(G):
    """Each term with z-scored logits (Sun et al. 2024): the literal loss applied to zscore(s), zscore(t)."""
    s, t, y = members(G, seed=6)
    taus = [2.0, 3.0, 1.5][:G]
    tau = torch.tensor(taus)
    z = lambda: (standardize_logits(s), standardize_logits(t))  # noqa: E731  (a fresh graph per check)
    lit_rows = lambda x, g: [zscore(r) for r in rows(x[g])]  # noqa: E731
    # KD: T^2 KL(softmax(Z(t)/tau) || softmax(Z(s)/tau)), batch mean
    kd = soft_target_members(*z(), tau)
    literal = [
        sum(taus[g] ** 2 * kl(softmax(ti, taus[g]), softmax(si, taus[g])) for si, ti in zip(lit_rows(s, g), lit_rows(t, g))) / s.shape[1]
        for g in range(G)
    ]
    check(kd, literal, s, t)
    dkd = dkd_members(*z(), y, 1.0, 8.0, tau)
    check(dkd, [dkd_literal(lit_rows(s, g), lit_rows(t, g), y[g].tolist(), 1.0, 8.0, taus[g]) for g in range(G)], s, t)
    dist = dist_members(*z(), 2.0, 2.0, tau)
    check(dist, [dist_literal(lit_rows(s, g), lit_rows(t, g), 2.0, 2.0, taus[g]) for g in range(G)], s, t)


def test_mixed_cross_entropy_and_kd_members_unchanged():
    s, t, y = members(3, seed=7)
    yb = torch.roll(y, 1, dims=1)
    lam = torch.tensor([1.0, 0.3, 0.0])
    mixed = mixed_cross_entropy_members(s, y, yb, lam)
    ce_a, ce_b = cross_entropy_members(s, y), cross_entropy_members(s, yb)
    assert torch.allclose(mixed, lam * ce_a + (1 - lam) * ce_b)
    assert mixed[0] == ce_a[0] and mixed[2] == ce_b[2]
    from igkd.distill.losses import kd_loss

    for g, (a, T) in enumerate([(0.01, 2.5), (0.5, 4.0), (0.0, 1.0)]):
        assert kd_members(s[g : g + 1], t[g : g + 1], y[g : g + 1], a, T).item() == pytest.approx(kd_loss(s[g], t[g], y[g], a, T).item(), rel=1e-6)


# -- the cohort objective: one call, per-member method selection ------------------------------------

from igkd.distill.config import resolve_config  # noqa: E402
from igkd.distill.objective import Objective  # noqa: E402


def single_run_loss(config, s, t, y, epoch):
    """One member's loss written out from its config, with the literal per-sample equations."""
    ce = sum(-torch.log(softmax(r, 1.0)[c]) for r, c in zip(rows(s), y.tolist())) / len(y)
    srows, trows = rows(s), rows(t)
    if config.logit_std:
        srows, trows = [zscore(r) for r in srows], [zscore(r) for r in trows]
    if config.logit_loss == "kd":
        T = config.logit_std_temperature if config.logit_std else config.temperature
        soft = sum(T * T * kl(softmax(tr, T), softmax(sr, T)) for sr, tr in zip(srows, trows)) / len(y)
        return (1 - config.alpha) * ce + config.alpha * soft
    if config.logit_loss == "dkd":
        T = config.logit_std_temperature if config.logit_std else config.dkd_temperature
        w = min(epoch / config.dkd_warmup, 1.0)
        return ce + w * dkd_literal(srows, trows, y.tolist(), config.dkd_alpha, config.dkd_beta, T)
    T = config.logit_std_temperature if config.logit_std else config.dist_temperature
    return ce + dist_literal(srows, trows, config.dist_beta, config.dist_gamma, T)


COHORT = [
    ("student", {}),
    ("kd", {}),
    ("dkd", {}),
    ("dist_ig", {"logit_std": True}),
    ("kd", {"logit_std": True, "alpha": 0.9}),
    ("dkd", {"dkd_beta": 2.0, "dkd_warmup": 2, "logit_std": True}),
    ("dist", {"dist_beta": 1.0, "dist_gamma": 0.5, "dist_temperature": 1.0}),
]


@pytest.mark.parametrize("picks", [[2], [3], [1, 2, 3], list(range(len(COHORT)))])
def test_objective_selects_each_members_method(picks):
    configs = [resolve_config(COHORT[i][0], **COHORT[i][1]) for i in picks]
    G = len(configs)
    s, t, y = members(G, seed=11)
    objective = Objective.from_configs(configs, "cpu")
    assert objective.uses_dkd == any(c.logit_loss == "dkd" for c in configs)
    epoch = 3
    batched = objective.logit_losses(s, t, y, epoch=epoch)
    literal = [single_run_loss(c, s[g], t[g], y[g], epoch) for g, c in enumerate(configs)]
    check(batched, literal, s, t)


def test_objective_member_losses_are_independent_and_need_epoch_for_dkd():
    configs = [resolve_config(m) for m in ("kd", "dkd", "dist")]
    s, t, y = members(3, seed=12)
    objective = Objective.from_configs(configs, "cpu")
    loss = objective.logit_losses(s, t, y, epoch=1)
    (grad,) = torch.autograd.grad(loss[1], s)
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0 and grad[1].abs().sum() > 0
    with pytest.raises(ValueError, match="epoch"):
        objective.logit_losses(s, t, y)
    # warm-up: DKD's term at epoch 1 of 20 is 1/20 of the full one
    ce = cross_entropy_members(s, y)
    early = objective.logit_losses(s, t, y, epoch=1) - ce
    full = objective.logit_losses(s, t, y, epoch=20) - ce
    assert early[1].item() == pytest.approx(full[1].item() / 20, rel=1e-5)
    assert early[0] == full[0] and early[2] == full[2]
    # no teacher: the CE alone; mixed labels: lam-weighted CE
    assert torch.equal(objective.logit_losses(s, None, y), ce)
    yb, lam = torch.roll(y, 1, 1), torch.tensor([0.25, 1.0, 0.5])
    assert torch.allclose(objective.logit_losses(s, None, y, labels_b=yb, lam=lam), mixed_cross_entropy_members(s, y, yb, lam))
