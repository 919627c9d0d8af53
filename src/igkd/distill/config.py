"""Training configuration: recipes (optimiser, schedule, epochs) x methods (loss terms, augmentations).

A training method is a combination of loss terms and augmentations, not a new loop:

=========  =====  ===  ====  =========================================
method     alpha   T    p    gamma   (paper values; all overridable)
=========  =====  ===  ====  =========================================
student      0          0      0     cross-entropy only
kd         0.01   2.5   0      0     + soft targets of the teacher
ig           0          0.1    0     + teacher IG maps overlaid on images
kd_ig      0.01   2.5   0.1    0
at           0          0     0.8    + attention transfer
kd_at      0.01   2.5   0     0.8
ig_at        0          0.1   0.8
kd_ig_at   0.01   2.5   0.1   0.8
=========  =====  ===  ====  =========================================

Issue 15 adds (defaults: each paper's CIFAR settings, docs/training.md):

* ``dkd`` / ``dkd_ig``: CE + decoupled KD (logit_loss dkd; dkd_alpha 1, dkd_beta 8, T 4, 20-epoch warm-up), p 0 / 0.1
* ``dist`` / ``dist_ig``: CE + DIST (logit_loss dist; dist_beta 2, dist_gamma 2, T 4), p 0 / 0.1
* ``kd_shuffled`` / ``kd_saliency`` / ``kd_random_map``: ``kd_ig`` with overlay_maps shuffled / saliency / random
* ``kd_cutmix`` / ``kd_mixup``: ``kd`` with mix cutmix (mix_prob 0.5) / mixup (mix_prob 1), mix_alpha 1
* ``logit_std: true`` on any method with a distillation term: logit standardisation (Sun et al. 2024)

Values are resolved in this order, each overriding the last: the recipe, the
method, a YAML file (``--config``), then command-line options. The resolved
configuration is saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from igkd.devices import CPU_BF16
from igkd.errors import IgkdError


METHODS: dict[str, dict] = {
    "student": {"alpha": 0.0, "p": 0.0, "gamma": 0.0},
    "kd": {"alpha": 0.01, "p": 0.0, "gamma": 0.0},
    "ig": {"alpha": 0.0, "p": 0.1, "gamma": 0.0},
    "kd_ig": {"alpha": 0.01, "p": 0.1, "gamma": 0.0},
    "at": {"alpha": 0.0, "p": 0.0, "gamma": 0.8},
    "kd_at": {"alpha": 0.01, "p": 0.0, "gamma": 0.8},
    "ig_at": {"alpha": 0.0, "p": 0.1, "gamma": 0.8},
    "kd_ig_at": {"alpha": 0.01, "p": 0.1, "gamma": 0.8},
    # issue 15 (appended: studies derive Monte Carlo seeds from a method's position in this dict).
    # Modern logit-distillation losses, alone and with the IG overlay (docs/training.md):
    "dkd": {"alpha": 0.0, "p": 0.0, "gamma": 0.0, "logit_loss": "dkd"},
    "dkd_ig": {"alpha": 0.0, "p": 0.1, "gamma": 0.0, "logit_loss": "dkd"},
    "dist": {"alpha": 0.0, "p": 0.0, "gamma": 0.0, "logit_loss": "dist"},
    "dist_ig": {"alpha": 0.0, "p": 0.1, "gamma": 0.0, "logit_loss": "dist"},
    # Controls for the overlay: kd_ig with another image's IG map, the teacher's |gradient|, or a
    # smooth random map with the IG map's value histogram; and KD with CutMix / Mixup instead.
    "kd_shuffled": {"alpha": 0.01, "p": 0.1, "gamma": 0.0, "overlay_maps": "shuffled"},
    "kd_saliency": {"alpha": 0.01, "p": 0.1, "gamma": 0.0, "overlay_maps": "saliency"},
    "kd_random_map": {"alpha": 0.01, "p": 0.1, "gamma": 0.0, "overlay_maps": "random"},
    "kd_cutmix": {"alpha": 0.01, "p": 0.0, "gamma": 0.0, "mix": "cutmix", "mix_alpha": 1.0, "mix_prob": 0.5},
    "kd_mixup": {"alpha": 0.01, "p": 0.0, "gamma": 0.0, "mix": "mixup", "mix_alpha": 1.0, "mix_prob": 1.0},
}

#: The paper's eight methods (its Table 3 ablation), the first eight of METHODS.
PAPER_METHODS: tuple[str, ...] = ("student", "kd", "ig", "kd_ig", "at", "kd_at", "ig_at", "kd_ig_at")

LOGIT_LOSSES = ("kd", "dkd", "dist")
OVERLAY_MAPS = ("ig", "shuffled", "saliency", "random")
MIXES = ("none", "cutmix", "mixup")

RECIPES: dict[str, dict] = {
    # The paper: Adam 1e-3, no schedule, 100 epochs, batch 64, crop + flip.
    "paper": {
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant", "warmup_fraction": 0.0, "warmup_epochs": 0,
        "epochs": 100, "batch_size": 64, "label_smoothing": 0.0,
    },
    # Ours for students (see docs/training.md): SGD + Nesterov, larger batch, linear warm-up over 70% of
    # the run, at most 2 epochs, then cosine decay to zero, weight decay on conv/linear weights only.
    "improved": {
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
        "schedule": "cosine", "warmup_fraction": 0.7, "warmup_epochs": 2, "epochs": 100, "batch_size": 128, "label_smoothing": 0.0,
    },
    # Teacher training: as 'improved' plus label smoothing 0.1.
    "teacher": {
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
        "schedule": "cosine", "warmup_fraction": 0.7, "warmup_epochs": 2, "epochs": 100, "batch_size": 128, "label_smoothing": 0.1,
    },
}


@dataclass
class TrainConfig:
    method: str = "student"
    recipe: str = "paper"
    student: str = "k5"  # the family's name (teacher, k3 ... k17), or "external" (student_arch or a Python factory)
    width: float = 1.0
    # an external architecture (igkd.models.external): package.module:factory, its keyword arguments and its
    # input normalisation (dataset: the training images' statistics, or the teacher's; model; or MEAN/STD)
    student_arch: str | None = None
    student_arch_args: dict = field(default_factory=dict)
    student_normalize: str = "dataset"
    # optimisation (from the recipe unless overridden)
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine
    # linear warm-up over min(warmup_fraction * epochs, warmup_epochs) epochs: a fraction of the run,
    # capped, so a short run is not all warm-up (warmup_fraction 1 makes warmup_epochs a fixed length)
    warmup_fraction: float = 0.0
    warmup_epochs: float = 0
    epochs: int = 100
    batch_size: int = 64
    label_smoothing: float = 0.0
    # method (from the method preset unless overridden)
    alpha: float = 0.0
    temperature: float = 2.5
    p: float = 0.0
    ig_scale_low: float = 1.0
    ig_scale_high: float = 2.0
    gamma: float = 0.0
    at_teacher_layer: str | None = None
    at_student_layer: str | None = None
    at_divider: int = 2
    # logit-distillation term (issue 15): kd = Hinton (alpha, temperature above), dkd or dist (below);
    # defaults are each paper's CIFAR settings, see docs/training.md
    logit_loss: str = "kd"
    dkd_alpha: float = 1.0  # TCKD weight (Zhao et al. 2022; mdistiller DKD.ALPHA)
    dkd_beta: float = 8.0  # NCKD weight (mdistiller DKD.BETA default; 2-8 by pair on CIFAR-100)
    dkd_temperature: float = 4.0
    dkd_warmup: float = 20  # epochs of linear warm-up of the DKD weight, min(epoch / warmup, 1)
    dist_beta: float = 2.0  # inter-class relation weight (Huang et al. 2022, CIFAR-100)
    dist_gamma: float = 2.0  # intra-class relation weight
    dist_temperature: float = 4.0
    # logit standardisation (Sun et al. 2024): z-score logits before the tempered softmax of the KD/DKD/DIST
    # term; then logit_std_temperature (the paper's base temperature) replaces that term's temperature
    logit_std: bool = False
    logit_std_temperature: float = 2.0
    # overlay map source (p > 0): ig (the teacher's IG maps), shuffled (another training image's IG map,
    # a seeded derangement), saliency (an attribution cache built with --method saliency), random
    # (smooth random maps with each IG map's value histogram, low-pass sigma random_map_sigma pixels)
    overlay_maps: str = "ig"
    random_map_sigma: float = 2.0
    # batch mixing: none | cutmix | mixup; lam ~ Beta(mix_alpha, mix_alpha), applied to a member's batch
    # with probability mix_prob; with KD the teacher sees the mixed images
    mix: str = "none"
    mix_alpha: float = 1.0
    mix_prob: float = 1.0
    # data
    augment: bool = True
    pad: int = 4
    val_fraction: float = 0.1
    split_seed: int = 0
    subset: float = 1.0
    subset_seed: int | None = None
    # run
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    # bf16 on a CPU with native bf16 (AVX512-BF16/AMX; docs/training.md, "Precision"): off | teacher (the
    # frozen teacher's forward, the KD targets) | all (also the student's forward); needs amp
    cpu_bf16: str = "off"
    compile: bool = False
    eval_batch_size: int = 1000
    # before each evaluation, BatchNorm running statistics are recomputed from up to this many
    # (un-augmented) training images with the current weights; 0 keeps the running averages
    bn_recalibration_images: int = 10_000
    extra: dict = field(default_factory=dict)

    @property
    def uses_logit_distillation(self) -> bool:
        """A teacher-logit term: KD with alpha > 0, DKD or DIST."""
        return self.alpha > 0 or self.logit_loss in ("dkd", "dist")

    @property
    def uses_teacher(self) -> bool:
        return self.uses_logit_distillation or self.gamma > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _check_keys(values: dict, where: str) -> None:
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise IgkdError(f"unknown key {unknown[0]!r} in {where} (valid keys: {', '.join(sorted(FIELDS - {'extra'}))})")


def _expected_type(name: str) -> tuple[str, tuple[type, ...], bool]:
    """(description, accepted types, None allowed) of a TrainConfig field, from its annotation."""
    annotation = str(_FIELD_TYPES[name])
    optional = "None" in annotation
    base = annotation.replace("| None", "").replace("None |", "").strip()
    return {
        "int": ("a whole number", (int,), optional),
        "float": ("a number", (int, float), optional),
        "bool": ("true or false", (bool,), optional),
        "str": ("a text value", (str,), optional),
        "dict": ("a mapping", (dict,), optional),
    }.get(base, (base, (object,), optional))


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def check_types(values: dict, where: str) -> dict:
    """``values`` with each value checked against its field's type; IgkdError naming key, value, place and type.

    Whole numbers only for int fields (1.5 and 'abc' are refused), ints or floats for float fields
    (also a numeric string such as '1e-3', which YAML 1.1 reads as text), true/false only for bools.
    """
    checked = dict(values)
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            continue
        described, accepted, optional = _expected_type(key)
        if value is None and optional:
            continue
        if float in accepted and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    checked[key] = value = number
        ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
        if float in accepted and ok and not math.isfinite(value):
            ok = False
        if not ok:
            default = TrainConfig.__dataclass_fields__[key].default
            example = f", e.g. {key}: {default}" if default is not dataclasses.MISSING and default is not None else ""
            raise IgkdError(f"{key} = {value!r} in {where} is not {described}{' (or null)' if optional else ''}{example}: fix that value")
    return checked


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise IgkdError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise IgkdError(f"config file {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise IgkdError(f"config file {path} must hold a mapping of keys to values")
    _check_keys(values, str(path))
    return check_types(values, f"config file {path}")


def resolve_config(
    method: str = "student", recipe: str = "paper", yaml_values: dict | None = None, *, check_unused: bool = True, **overrides
) -> TrainConfig:
    """recipe -> method preset -> YAML -> overrides (``None`` overrides are ignored).

    With ``check_unused`` (the default), a key set in ``yaml_values`` or ``overrides`` to a value other
    than its preset's, that has no effect on the resolved config (``mix_prob`` without mixing, DKD's
    weights with the KD loss ...), is refused (:func:`refuse_no_effect`). Studies, which share one
    config file among several methods, turn it off per run and check the file once
    (:func:`igkd.experiments.inputs.check_inputs`).
    """
    yaml_values = dict(yaml_values or {})
    method = str(yaml_values.pop("method", method) if overrides.get("method") is None else overrides.pop("method")).lower()
    recipe = str(yaml_values.pop("recipe", recipe) if overrides.get("recipe") is None else overrides.pop("recipe")).lower()
    if method not in METHODS:
        raise IgkdError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if recipe not in RECIPES:
        raise IgkdError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    values: dict = {"method": method, "recipe": recipe, **RECIPES[recipe], **METHODS[method], **yaml_values}
    given = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(given, "the command-line options")
    values.update(given)
    _check_keys(values, "the configuration")
    config = TrainConfig(**check_types(values, "the configuration"))
    validate(config)
    if check_unused:
        preset = preset_values(method, recipe)
        places = {k: "the --config file" for k in yaml_values} | {k: f"--{k.replace('_', '-')}" for k in given}
        refuse_no_effect([config], {k: where for k, where in places.items() if getattr(config, k) != preset.get(k)})
    return config


def preset_values(method: str, recipe: str) -> dict:
    """Every key's value before a config file or option sets it: the field default, then the recipe, then the method."""
    return {**TrainConfig().to_dict(), **RECIPES[recipe], **METHODS[method]}


#: Keys that act only under a condition of the config: key -> (whether it acts, what makes it act).
CONDITIONAL_KEYS: dict[str, tuple] = {
    "temperature": (lambda c: c.logit_loss == "kd" and c.alpha > 0 and not c.logit_std,
                    "Hinton KD (alpha > 0, logit_loss kd) without logit_std (which uses logit_std_temperature)"),
    **{key: (lambda c: c.logit_loss == "dkd", "logit_loss dkd") for key in ("dkd_alpha", "dkd_beta", "dkd_warmup")},
    "dkd_temperature": (lambda c: c.logit_loss == "dkd" and not c.logit_std, "logit_loss dkd without logit_std (which uses logit_std_temperature)"),
    **{key: (lambda c: c.logit_loss == "dist", "logit_loss dist") for key in ("dist_beta", "dist_gamma")},
    "dist_temperature": (lambda c: c.logit_loss == "dist" and not c.logit_std, "logit_loss dist without logit_std (which uses logit_std_temperature)"),
    "logit_std_temperature": (lambda c: c.logit_std, "logit_std true"),
    **{key: (lambda c: c.p > 0, "the overlay (p > 0)") for key in ("ig_scale_low", "ig_scale_high")},
    "random_map_sigma": (lambda c: c.p > 0 and c.overlay_maps == "random", "overlay_maps random and p > 0"),
    **{key: (lambda c: c.mix != "none", "mix cutmix or mixup") for key in ("mix_alpha", "mix_prob")},
    **{key: (lambda c: c.gamma > 0, "attention transfer (gamma > 0)") for key in ("at_teacher_layer", "at_student_layer", "at_divider")},
    **{key: (lambda c: c.optimizer == "sgd", "optimizer sgd") for key in ("momentum", "nesterov")},
    "subset_seed": (lambda c: c.subset < 1, "a Monte Carlo subset (subset < 1)"),
    **{key: (lambda c: c.student_arch is not None or c.student == "external", "an external architecture (student_arch)")
       for key in ("student_arch_args", "student_normalize")},
    "width": (lambda c: c.student_arch is None and c.student != "external", "a student of the MobileNetV2 family (not an external architecture)"),
    "cpu_bf16": (lambda c: c.cpu_bf16 != "teacher" or c.uses_teacher, "a teacher term (KD, DKD, DIST or attention); cpu_bf16 all also covers the student"),
    # the warm-up lasts min(warmup_fraction * epochs, warmup_epochs) epochs: either at 0 turns it off (and
    # setting one to 0 says so, whatever the other is)
    "warmup_epochs": (lambda c: c.warmup_fraction > 0 or c.warmup_epochs == 0,
                      "warmup_fraction > 0 (the warm-up is min(warmup_fraction x epochs, warmup_epochs))"),
    "warmup_fraction": (lambda c: c.warmup_epochs > 0 or c.warmup_fraction == 0,
                        "warmup_epochs > 0 (the warm-up is min(warmup_fraction x epochs, warmup_epochs))"),
}


def no_effect(config: TrainConfig, key: str) -> str | None:
    """What would make ``key`` act on ``config`` (e.g. ``"mix cutmix or mixup"``), or None when it acts."""
    acts, condition = CONDITIONAL_KEYS.get(key, (None, None))
    return None if acts is None or acts(config) else condition


def refuse_no_effect(configs: list[TrainConfig], places: dict[str, str]) -> None:
    """Refuse, in one line, the first key of ``places`` (key -> where it was set) that acts on none of ``configs``."""
    for key, where in places.items():
        conditions = [no_effect(c, key) for c in configs]
        if conditions and all(conditions):
            methods = list(dict.fromkeys(c.method for c in configs))
            whose = f"method {methods[0]!r}" if len(methods) == 1 else f"any of the methods {', '.join(methods)}"
            raise IgkdError(
                f"{key} = {getattr(configs[0], key)!r} from {where} has no effect on {whose}: it acts only with "
                f"{conditions[0]}; remove it, or set that"
            )


def validate(config: TrainConfig) -> None:
    checks = [
        (config.epochs >= 1, f"epochs must be at least 1, got {config.epochs}"),
        (config.width > 0, f"width must be positive (a width multiplier such as 0.5 or 1.0), got {config.width}"),
        (config.batch_size >= 1, f"batch_size must be at least 1, got {config.batch_size}"),
        (config.eval_batch_size >= 1, f"eval_batch_size must be at least 1, got {config.eval_batch_size}"),
        (config.lr > 0, f"lr must be positive, got {config.lr}"),
        (0 <= config.warmup_fraction <= 1, f"warmup_fraction must be in [0, 1], got {config.warmup_fraction}"),
        (config.warmup_epochs >= 0, f"warmup_epochs must be non-negative, got {config.warmup_epochs}"),
        (config.cpu_bf16 in CPU_BF16, f"cpu_bf16 must be one of {', '.join(CPU_BF16)}, got {config.cpu_bf16!r}"),
        (config.bn_recalibration_images >= 0, f"bn_recalibration_images must be non-negative, got {config.bn_recalibration_images}"),
        (0 <= config.alpha <= 1, f"alpha must be in [0, 1], got {config.alpha}"),
        (config.temperature > 0, f"temperature must be positive, got {config.temperature}"),
        (0 <= config.p <= 1, f"p must be in [0, 1], got {config.p}"),
        (0 < config.ig_scale_low <= config.ig_scale_high, "need 0 < ig_scale_low <= ig_scale_high"),
        (config.gamma >= 0, f"gamma must be non-negative, got {config.gamma}"),
        (0 < config.subset <= 1, f"subset must be in (0, 1], got {config.subset}"),
        (0 <= config.val_fraction < 1, f"val_fraction must be in [0, 1), got {config.val_fraction}"),
        (config.optimizer in ("adam", "adamw", "sgd"), f"optimizer must be adam, adamw or sgd, got {config.optimizer!r}"),
        (config.schedule in ("constant", "cosine"), f"schedule must be constant or cosine, got {config.schedule!r}"),
        (config.logit_loss in LOGIT_LOSSES, f"logit_loss must be one of {', '.join(LOGIT_LOSSES)}, got {config.logit_loss!r}"),
        (config.logit_loss == "kd" or config.alpha == 0,
         f"alpha ({config.alpha}) is the weight of Hinton KD only; logit_loss {config.logit_loss!r} has its own weights "
         f"({'dkd_alpha, dkd_beta' if config.logit_loss == 'dkd' else 'dist_beta, dist_gamma'}): set alpha to 0"),
        (config.dkd_alpha >= 0 and config.dkd_beta >= 0, f"dkd_alpha and dkd_beta must be non-negative, got {config.dkd_alpha}, {config.dkd_beta}"),
        (config.dkd_temperature > 0, f"dkd_temperature must be positive, got {config.dkd_temperature}"),
        (config.dkd_warmup >= 0, f"dkd_warmup must be non-negative (epochs), got {config.dkd_warmup}"),
        (config.dist_beta >= 0 and config.dist_gamma >= 0, f"dist_beta and dist_gamma must be non-negative, got {config.dist_beta}, {config.dist_gamma}"),
        (config.dist_temperature > 0, f"dist_temperature must be positive, got {config.dist_temperature}"),
        (config.logit_std_temperature > 0, f"logit_std_temperature must be positive, got {config.logit_std_temperature}"),
        (not config.logit_std or config.uses_logit_distillation,
         f"logit_std standardises the logits of a distillation term, but method {config.method!r} has none (KD alpha 0, logit_loss kd)"),
        (config.overlay_maps in OVERLAY_MAPS, f"overlay_maps must be one of {', '.join(OVERLAY_MAPS)}, got {config.overlay_maps!r}"),
        (config.overlay_maps == "ig" or config.p > 0, f"overlay_maps {config.overlay_maps!r} has no effect with p = 0 (no overlay): set p > 0"),
        (config.random_map_sigma > 0, f"random_map_sigma must be positive (pixels), got {config.random_map_sigma}"),
        (config.mix in MIXES, f"mix must be one of {', '.join(MIXES)}, got {config.mix!r}"),
        (config.mix_alpha > 0, f"mix_alpha must be positive (Beta(mix_alpha, mix_alpha)), got {config.mix_alpha}"),
        (0 <= config.mix_prob <= 1, f"mix_prob must be in [0, 1], got {config.mix_prob}"),
    ]
    for ok, message in checks:
        if not ok:
            raise IgkdError(message)
    validate_architecture(config)
    from igkd.devices import parse_device

    parse_device(config.device)  # one line for a device igkd cannot use, before any data is loaded


def validate_architecture(config: TrainConfig) -> None:
    """``student``: a family name, or ``external`` with ``student_arch`` (or a Python factory given to the
    Trainer); ``student_arch`` also with ``teacher`` (training an external teacher); its arguments and
    normalisation well-formed."""
    from igkd.models.external import check_kwargs, check_ref, parse_normalize

    if config.student_arch is not None:
        if config.student not in ("teacher", "external"):
            raise IgkdError(f"student_arch {config.student_arch!r} names an external architecture, but student is {config.student!r}: set student to external (or leave it out)")
        check_ref(config.student_arch, "student_arch")
    elif config.student != "external":
        from igkd.models import parse_model_name

        parse_model_name(config.student)
    check_kwargs(config.student_arch_args, "student_arch_args")
    parse_normalize(config.student_normalize, "student_normalize")
