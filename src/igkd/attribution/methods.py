"""Attribution methods by name, and ``attribute``: one verb for all of them.

Each method is our own batched code; where Captum has the method, the result is
Captum's (same definitions, same random-draw order), which the tests check:

* ``ig``: integrated gradients (:mod:`igkd.attribution.integrated_gradients`).
* ``saliency``: |d F_t / d x| (Captum ``Saliency(abs=True)``).
* ``input_x_gradient``: x * d F_t / d x (Captum ``InputXGradient``).
* ``smoothgrad``: IG averaged over ``nt_samples`` noisy copies x + N(0, stdevs^2) of each
  image, the baseline unchanged (Captum ``NoiseTunnel(IntegratedGradients)``,
  ``nt_type="smoothgrad"``). The noise is drawn as one [B * nt_samples, C, H, W] normal
  tensor from a generator seeded with ``seed``, image-major, as Captum draws it from the
  global generator. ``stdevs`` is in [0, 1] pixel units (default 0.15: 15% of the range).
* ``gradient_shap``: E over k of (x_k - b_k) * d F_t(b_k + a_k (x_k - b_k)) / dx with
  x_k = x + noise (``stdevs``), a_k ~ U(0, 1) and b_k the image's baseline (string
  baselines) or drawn uniformly from a [K, C, H, W] baseline tensor (Captum
  ``GradientShap``). Draws from one generator seeded with ``seed``: baseline indices,
  noise, then alphas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from igkd.attribution.baselines import DEFAULT_BLUR_SIGMA, make_baseline
# the engine's pieces, as integrated_gradients imports them: every method is built from them, nothing is repeated
from igkd.attribution.engine import (
    Attribution,
    autocast_for,
    check_inputs,
    default_max_batch,
    execution_defaults,
    input_gradient_mode,
    input_gradients,
    logits,
    model_device,
    resolve_precision,
    target_indices,
)
from igkd.attribution.integrated_gradients import integrated_gradients_attribution
from igkd.errors import IgkdError

# Accepted by every method: how to run, not what to compute.
EXECUTION_OPTIONS: tuple[str, ...] = ("max_batch", "precision", "channels_last")


def _single_pass_precision(precision: str, device: torch.device) -> str:
    """One gradient per sample leaves nothing to check bf16 against: ``auto`` means fp32 here."""
    resolved = resolve_precision(precision, device)
    return "fp32" if resolved == "auto" else resolved


def _gradient_method(model, inputs, target, *, times_input: bool, max_batch=None, precision="auto", channels_last=None) -> Attribution:
    check_inputs(inputs)
    device = model_device(model)
    x = inputs.detach().to(device, torch.float32)
    precision = _single_pass_precision(precision, device)
    max_batch, channels_last = execution_defaults(device, x, max_batch, channels_last)
    with input_gradient_mode(model):
        targets = target_indices(model, x, target, max_batch)
        with autocast_for(precision, device):
            grads = input_gradients(model, x, targets, max_batch, channels_last=channels_last)
    values = grads * x if times_input else grads.abs()
    return Attribution(values.to(inputs.device), None, precision)


def saliency(model, inputs, target, **options) -> Attribution:
    return _gradient_method(model, inputs, target, times_input=False, **options)


def input_x_gradient(model, inputs, target, **options) -> Attribution:
    return _gradient_method(model, inputs, target, times_input=True, **options)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _sampling_setup(model, inputs, target, method: str, count_name: str, count: int, options: dict):
    """What smoothgrad and gradient_shap start with: checks, then (device, fp32 inputs on it, class indices)."""
    check_inputs(inputs)
    if count < 1:
        raise IgkdError(f"{method} needs {count_name} >= 1, got {count}")
    device = model_device(model)
    x = inputs.detach().to(device, torch.float32)
    with input_gradient_mode(model):
        targets = target_indices(model, x, target, options.get("max_batch") or default_max_batch(device, *x.shape[-2:]))
    return device, x, targets


def smoothgrad(
    model,
    inputs,
    target,
    *,
    nt_samples: int = 5,
    stdevs: float = 0.15,
    seed: int = 0,
    n_steps: int = 50,
    baseline="black",
    rule: str = "gausslegendre",
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    **options,
) -> Attribution:
    device, x, targets = _sampling_setup(model, inputs, target, "smoothgrad", "nt_samples", nt_samples, options)
    n = x.shape[0]
    base = make_baseline(model, x, baseline, blur_sigma)
    noise = torch.randn((n * nt_samples, *x.shape[1:]), generator=_generator(seed, device), device=device) * stdevs
    noisy = x.repeat_interleave(nt_samples, 0) + noise
    result = integrated_gradients_attribution(
        model,
        noisy,
        targets.repeat_interleave(nt_samples),
        baseline=base.repeat_interleave(nt_samples, 0),
        n_steps=n_steps,
        rule=rule,
        **options,
    )
    values = result.values.view(n, nt_samples, *x.shape[1:]).mean(1)
    delta = result.delta.view(n, nt_samples).mean(1)
    return Attribution(values.to(inputs.device), delta.to(inputs.device), result.precision)


def gradient_shap_from_draws(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    baselines: torch.Tensor,
    noise: torch.Tensor,
    alphas: torch.Tensor,
    *,
    max_batch: int | None = None,
    precision: str = "auto",
    channels_last: bool | None = None,
) -> Attribution:
    """GradientSHAP for given draws: ``baselines``/``noise`` [B * n, C, H, W] and ``alphas`` [B * n],
    n samples per image, image-major. Separate from the drawing so it can be checked against Captum."""
    device = model_device(model)
    x = inputs.detach().to(device, torch.float32)
    n_images, samples = x.shape[0], noise.shape[0] // x.shape[0]
    precision = _single_pass_precision(precision, device)
    max_batch, channels_last = execution_defaults(device, x, max_batch, channels_last)
    noisy = x.repeat_interleave(samples, 0) + noise.to(device)
    baselines = baselines.to(device, torch.float32)
    a = alphas.to(device, torch.float32).view(-1, 1, 1, 1)
    expanded = targets.to(device).repeat_interleave(samples)
    with input_gradient_mode(model):
        with autocast_for(precision, device):
            grads = input_gradients(model, a * noisy + (1.0 - a) * baselines, expanded, max_batch, channels_last=channels_last)
        gain = (logits(model, noisy, max_batch) - logits(model, baselines, max_batch)).gather(1, expanded[:, None]).squeeze(1)
    per_sample = (noisy - baselines) * grads
    values = per_sample.view(n_images, samples, *x.shape[1:]).mean(1)
    delta = (per_sample.sum((1, 2, 3)) - gain).view(n_images, samples).mean(1)
    return Attribution(values.to(inputs.device), delta.to(inputs.device), precision)


def gradient_shap(
    model,
    inputs,
    target,
    *,
    baseline="black",
    n_samples: int = 5,
    stdevs: float = 0.0,
    seed: int = 0,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    **options,
) -> Attribution:
    device, x, targets = _sampling_setup(model, inputs, target, "gradient_shap", "n_samples", n_samples, options)
    n = x.shape[0]
    generator = _generator(seed, device)
    if isinstance(baseline, torch.Tensor) and baseline.ndim == 4:
        distribution = baseline.to(device, torch.float32)
        index = torch.randint(distribution.shape[0], (n * n_samples,), generator=generator, device=device)
        baselines = distribution[index]
    else:
        baselines = make_baseline(model, x, baseline, blur_sigma).repeat_interleave(n_samples, 0)
    noise = torch.randn((n * n_samples, *x.shape[1:]), generator=generator, device=device) * stdevs
    alphas = torch.rand(n * n_samples, generator=generator, device=device)
    result = gradient_shap_from_draws(model, x, targets, baselines, noise, alphas, **options)
    return Attribution(result.values.to(inputs.device), result.delta.to(inputs.device), result.precision)


@dataclass(frozen=True)
class AttributionMethod:
    """A method: its function, the parameters that define its result (with defaults,
    recorded in cache manifests) and whether it has a completeness error."""

    name: str
    run: Callable[..., Attribution]
    defaults: dict = field(default_factory=dict)
    has_delta: bool = False
    summary: str = ""


_IG_DEFAULTS = {"n_steps": 50, "baseline": "black", "rule": "gausslegendre", "blur_sigma": DEFAULT_BLUR_SIGMA}

ATTRIBUTION_METHODS: dict[str, AttributionMethod] = {
    m.name: m
    for m in (
        AttributionMethod("ig", integrated_gradients_attribution, dict(_IG_DEFAULTS), True, "integrated gradients"),
        AttributionMethod("saliency", saliency, {}, False, "|gradient| (Captum Saliency, abs=True)"),
        AttributionMethod("input_x_gradient", input_x_gradient, {}, False, "input * gradient"),
        AttributionMethod(
            "smoothgrad", smoothgrad, {**_IG_DEFAULTS, "nt_samples": 5, "stdevs": 0.15, "seed": 0}, True, "IG averaged over noisy copies"
        ),
        AttributionMethod(
            "gradient_shap",
            gradient_shap,
            {"baseline": "black", "n_samples": 5, "stdevs": 0.0, "seed": 0, "blur_sigma": DEFAULT_BLUR_SIGMA},
            True,
            "expected gradients over random path points",
        ),
    )
}


def get_method(name: str) -> AttributionMethod:
    if name not in ATTRIBUTION_METHODS:
        raise IgkdError(f"unknown attribution method {name!r}: use one of {', '.join(ATTRIBUTION_METHODS)}")
    return ATTRIBUTION_METHODS[name]


def method_parameters(name: str, **given) -> dict:
    """The full parameter set of method ``name`` (defaults overridden by ``given``); refuses unknown names.

    ``blur_sigma`` only matters for the blur baseline and is dropped otherwise, so a
    manifest records exactly what shaped its maps.
    """
    method = get_method(name)
    unknown = sorted(set(given) - set(method.defaults))
    if unknown:
        accepted = ", ".join(method.defaults) or "none"
        raise IgkdError(f"method {name!r} takes no parameter {', '.join(unknown)} (its parameters: {accepted})")
    params = {**method.defaults, **given}
    if "blur_sigma" in params and params.get("baseline") != "blur":
        del params["blur_sigma"]
    return params


def run_method(model, inputs, target, method: str = "ig", **kwargs) -> Attribution:
    """Run ``method`` with its parameters and execution options (``max_batch``, ``precision``, ``channels_last``)."""
    options = {k: kwargs.pop(k) for k in EXECUTION_OPTIONS if k in kwargs}
    params = method_parameters(method, **kwargs)
    return get_method(method).run(model, inputs, target, **params, **options)


def attribute(model, inputs, target, method: str = "ig", *, return_delta: bool = False, **kwargs):
    """Attributions of ``model``'s output for ``target`` w.r.t. ``inputs`` [B, 3, H, W] by ``method``.

    ``kwargs``: the method's parameters (see ``ATTRIBUTION_METHODS[method].defaults``) and
    ``max_batch``/``precision``/``channels_last``. With ``return_delta`` (methods with a
    completeness error only) returns ``(attributions, delta)``.
    """
    if return_delta and not get_method(method).has_delta:
        raise IgkdError(f"method {method!r} has no completeness error: call it without return_delta")
    result = run_method(model, inputs, target, method, **kwargs)
    return (result.values, result.delta) if return_delta else result.values
