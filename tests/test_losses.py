import math

import pytest
import torch

from igkd.distill.losses import FeatureTap, attention_map, attention_transfer_loss, kd_loss
from igkd.errors import IgkdError
from igkd.models import build_model


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    alpha, T = 0.3, 2.5
    ce = 0.0
    kl = 0.0
    for i in range(2):
        ps = [math.exp(v) for v in s[i].tolist()]
        ce += -math.log(ps[y[i]] / sum(ps)) / 2
        qs = [math.exp(v / T) for v in s[i].tolist()]
        qt = [math.exp(v / T) for v in t[i].tolist()]
        qs = [q / sum(qs) for q in qs]
        qt = [q / sum(qt) for q in qt]
        kl += sum(a * math.log(a / b) for a, b in zip(qt, qs)) / 2  # summed over classes, batch mean
    expected = (1 - alpha) * ce + alpha * T * T * kl
    assert kd_loss(s, t, y, alpha, T).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(s, t, y, 0.0, T).item() == pytest.approx(ce, rel=1e-6)


def test_attention_map_and_loss_match_hand_computation():
    f_s = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]]])  # [1, 2, 2, 2]
    f_t = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]], [[2.0, 2.0], [0.0, 0.0]]]])
    a_s = torch.tensor([(1 + 9) / 2, (4 + 0) / 2, 0.5, 1.0])
    a_t = torch.tensor([2.0, 2.5, 0.5, 0.0])
    a_s, a_t = a_s / a_s.norm(), a_t / a_t.norm()
    assert torch.allclose(attention_map(f_s)[0], a_s)
    expected = 0.8 * ((a_s - a_t) ** 2).mean()
    assert attention_transfer_loss(f_s, f_t, 0.8).item() == pytest.approx(expected.item(), rel=1e-6)


def test_attention_resizes_and_hooks_read_named_modules():
    teacher, student = build_model("teacher", width=0.25), build_model("k15")
    t_tap, s_tap = FeatureTap(teacher, "features.9"), FeatureTap(student, "features.3")
    x = torch.rand(2, 3, 32, 32)
    teacher(x), student(x)
    t_feat, s_feat = t_tap.take(), s_tap.take()
    assert t_feat.shape[-1] == 8 and s_feat.shape[-1] == 32
    assert attention_transfer_loss(s_feat, t_feat, 1.0).item() > 0
    with pytest.raises(IgkdError, match="no module named 'features.99'"):
        FeatureTap(student, "features.99")
