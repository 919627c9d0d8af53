"""Quadrature rules for the integrated-gradients path integral.

IG integrates the gradient along the straight line from the baseline x' to the
input x: IG(x) = (x - x') * int_0^1 dF(x' + a (x - x')) / dx da. A rule turns the
integral into sum_k w_k * grad(x' + a_k (x - x')). The nodes ``a_k`` and weights
``w_k`` are exactly Captum's (``captum.attr._utils.approximation_methods``), so
``rule="gausslegendre", n_steps=50`` here is Captum's default and the paper's setting:

* ``gausslegendre``: Gauss-Legendre nodes/weights of numpy's ``leggauss(n)``
  mapped from [-1, 1] to [0, 1] (weights halved); exact for polynomials of degree
  2n - 1, so by far the most accurate rule per step.
* ``riemann_left|right|middle``: n equal steps of width 1/n, nodes at the left
  ends, right ends or midpoints of the intervals.
* ``riemann_trapezoid``: n nodes from 0 to 1 inclusive, widths 1/n with the two
  end weights halved (Captum's definition, whose weights sum to 1 - 1/n).
"""

from __future__ import annotations

import numpy as np
import torch

from igkd.errors import IgkdError

RULES: tuple[str, ...] = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(rule: str, n_steps: int) -> tuple[list[float], list[float]]:
    """(alphas, weights) of ``rule`` with ``n_steps`` nodes, as Python floats."""
    if rule not in RULES:
        raise IgkdError(f"unknown integration rule {rule!r}: use one of {', '.join(RULES)}")
    minimum = 1 if rule == "gausslegendre" else 2
    if not isinstance(n_steps, int) or n_steps < minimum:
        raise IgkdError(f"rule {rule} needs at least {minimum} steps, got {n_steps!r}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    n = n_steps
    weights = [1 / n] * n
    if rule == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        alphas = torch.linspace(0, 1, n)
    elif rule == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n)
    elif rule == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    else:  # riemann_right
        alphas = torch.linspace(1 / n, 1, n)
    return alphas.tolist(), weights
