"""Architectures igkd does not define: any PyTorch image classifier, named by ``package.module:factory``.

An *external* architecture is a reference ``package.module:factory`` (a function or class in an importable
module; the current folder is on the import path, so a factory in the user's own file works) plus keyword
arguments that can be written as JSON. The factory must return an ``nn.Module`` that maps float images
``[B, C, H, W]`` to logits ``[B, K]``; it is called with ``num_classes=K`` when it takes that argument and the
keyword arguments do not set it.

Input normalisation is explicit. igkd's models take pixels in [0, 1] and normalise inside, so IG baselines,
the overlay and exported graphs live in pixel space. An external model is wrapped as :class:`Normalized`
(a :class:`~igkd.models.mobilenetv2.Normalize` first) unless it is stated to normalise its input itself
(``normalize="model"``).

The spec of an external model (stored in its safetensors file) is::

    {"arch": "external", "name": <factory's name>, "factory": ref, "kwargs": {...},
     "normalize": {"mean": [...], "std": [...]} or "model", "num_classes": K, "input_shape": [C, H, W]}

Security: a model file never makes igkd import code. Rebuilding an external model from a file needs the caller
to name the same factory (:func:`trusted_factory`); otherwise one error line says so, and nothing is imported.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from igkd.errors import IgkdError
from igkd.models.mobilenetv2 import Normalize

EXTERNAL = "external"
#: ``package.module:factory`` (dotted names on both sides of the colon).
REF_PATTERN = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
NORMALIZE_CHOICES = ("dataset", "model")
MAX_INPUT_SIDE = 4096
MAX_CHANNELS = 64
MAX_KWARGS_CHARS = 10_000


class Normalized(nn.Module):
    """``model(normalize(x))``: an external classifier behind its input normalisation ((x - mean) / std per channel).

    ``normalize`` holds the mean/std as the family's models do (``model.normalize.mean``), so a student can copy
    a teacher's convention and the IG ``mean`` baseline works; ``model`` is the user's network, unchanged.
    """

    def __init__(self, model: nn.Module, mean, std, num_classes: int | None = None):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        if num_classes is not None:
            self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


# -- parsing the command line ---------------------------------------------------------------------------
def check_ref(ref: str, option: str = "--student-arch") -> str:
    ref = str(ref).strip()
    if not REF_PATTERN.fullmatch(ref):
        raise IgkdError(f"{option} {ref!r} is not a factory reference: write package.module:factory (e.g. my_nets:resnet18 for a function resnet18 in my_nets.py)")
    return ref


def parse_arch_args(text: str | dict | None, option: str = "--student-arch-args") -> dict:
    """``key=value,key=value`` (values read as YAML scalars: 3 -> int, 0.5 -> float, true -> bool), or a path to a
    .yaml/.json file holding a mapping; a dict is taken as it is. The result must be JSON-able (it goes in the spec)."""
    import yaml

    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        values = dict(text)
    elif str(text).lower().endswith((".yaml", ".yml", ".json")):
        path = Path(text)
        if not path.is_file():
            raise IgkdError(f"{option} {path} does not exist: give key=value pairs or a .yaml/.json file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise IgkdError(f"{option} {path} is not valid YAML/JSON ({str(err).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise IgkdError(f"{option} {path} must hold a mapping of argument names to values")
    else:
        values = {}
        for part in str(text).split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key.isidentifier():
                raise IgkdError(f"{option} part {part!r} is not key=value (write e.g. width=16,depth=2, or give a .yaml file)")
            try:
                values[key] = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError:
                values[key] = value
            if isinstance(values[key], str):  # YAML 1.1 reads 1e-3 as text
                try:
                    values[key] = float(values[key]) if math.isfinite(float(values[key])) else values[key]
                except ValueError:
                    pass
    return check_kwargs(values, option)


def check_kwargs(values, where: str) -> dict:
    """A factory's keyword arguments: a mapping of identifiers to JSON values (so the spec can record them)."""
    if not isinstance(values, dict) or not all(isinstance(k, str) and k.isidentifier() for k in values):
        raise IgkdError(f"{where}: the factory's arguments must be a mapping of argument names to values, got {values!r}"[:300])
    try:
        text = json.dumps(values, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        raise IgkdError(f"{where}: the factory's arguments {values!r} are not JSON values (numbers, text, true/false, lists, mappings)"[:300]) from None
    if len(text) > MAX_KWARGS_CHARS:
        raise IgkdError(f"{where}: the factory's arguments take {len(text)} characters as JSON (at most {MAX_KWARGS_CHARS})")
    return json.loads(text)


def parse_normalize(text, option: str = "--student-normalize"):
    """``dataset`` (the training images' channel statistics, or the teacher's for a student), ``model`` (the model
    normalises its own input) or ``MEAN/STD`` (``0.5,0.5,0.5/0.25,0.25,0.25``, or one value each) -> that, or a dict."""
    if isinstance(text, dict):
        return check_normalize(text, option)
    value = str(text).strip().lower()
    if value in NORMALIZE_CHOICES:
        return value
    mean, sep, std = value.partition("/")
    try:
        parsed = {"mean": [float(v) for v in mean.split(",")], "std": [float(v) for v in std.split(",")]} if sep else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise IgkdError(f"{option} {text!r}: use dataset, model, or MEAN/STD such as 0.5,0.5,0.5/0.25,0.25,0.25")
    return check_normalize(parsed, option)


def check_normalize(value, where: str, channels: int | None = None):
    if value == "model":
        return value
    ok = isinstance(value, dict) and set(value) == {"mean", "std"}
    if ok:
        mean, std = value["mean"], value["std"]
        ok = (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and 1 <= len(mean) <= MAX_CHANNELS
              and all(type(v) in (int, float) and math.isfinite(v) for v in mean + std) and min(std) > 0)
    if ok and channels is not None and len(value["mean"]) not in (1, channels):
        ok = False
    if not ok:
        raise IgkdError(f"{where}: normalize is {value!r}, not 'model' or {{mean: [...], std: [...]}} with one finite value per channel (std > 0)"[:300])
    return {"mean": [float(v) for v in value["mean"]], "std": [float(v) for v in value["std"]]}


def normalize_setting(value) -> str:
    """The config's text form of a normalisation: ``dataset``, ``model`` or ``MEAN/STD``."""
    if isinstance(value, dict):
        return ",".join(f"{v:g}" for v in value["mean"]) + "/" + ",".join(f"{v:g}" for v in value["std"])
    return str(value)


def describe(ref: str | None, kwargs: dict | None) -> str:
    """``my_nets:resnet(width=16, depth=2)``."""
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in (kwargs or {}).items())
    return f"{ref or '<a Python factory>'}({args})"


# -- importing and building -----------------------------------------------------------------------------
def import_factory(ref: str, option: str = "--student-arch") -> Callable:
    """The callable named by ``package.module:factory``; the current folder is searched first, so a factory in
    the user's own file (``my_nets.py`` -> ``my_nets:resnet``) is found."""
    ref = check_ref(ref, option)
    module_name, _, attribute = ref.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise IgkdError(f"{option} {ref}: cannot import module {module_name!r} ({err}); run igkd from the folder holding {module_name.split('.')[0]}.py, or install its package") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise IgkdError(f"{option} {ref}: importing {module_name!r} failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    target = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise IgkdError(f"{option} {ref}: module {module_name!r} has no {attribute!r}")
    if not callable(target):
        raise IgkdError(f"{option} {ref}: {attribute!r} in {module_name!r} is a {type(target).__name__}, not a function or class")
    return target


def factory_ref(factory: Callable) -> tuple[str | None, dict]:
    """(``module:qualname``, keyword arguments) naming a Python factory, so a model built by it can be rebuilt
    from the command line; (None, {}) for a lambda or a local function. A ``functools.partial`` gives its function
    and keywords; a factory in the script being run (``__main__``) is named after the script's file."""
    kwargs: dict = {}
    if isinstance(factory, functools.partial) and not factory.args:
        kwargs, factory = dict(factory.keywords), factory.func
    module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or not name or "<" in name:
        return None, {}
    if module == "__main__":
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        if not main:
            return None, {}
        module = Path(main).stem
    ref = f"{module}:{name}"
    try:
        return (ref, check_kwargs(kwargs, ref)) if REF_PATTERN.fullmatch(ref) else (None, {})
    except IgkdError:
        return None, {}


def _call(factory: Callable, kwargs: dict, num_classes: int, where: str) -> nn.Module:
    kwargs = dict(kwargs)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_classes = "num_classes" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if takes_classes and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's factory refused its arguments
        raise IgkdError(f"{where}: calling {describe(getattr(factory, '__name__', '?'), kwargs)} failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not isinstance(model, nn.Module):
        raise IgkdError(f"{where}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def external_spec(ref: str | None, kwargs: dict, normalize, num_classes: int, input_shape, name: str | None = None) -> dict:
    return {
        "arch": EXTERNAL,
        "name": name or (ref.rpartition(":")[2].rpartition(".")[2] if ref else "external"),
        "factory": ref,
        "kwargs": dict(kwargs),
        "normalize": normalize,
        "num_classes": int(num_classes),
        "input_shape": [int(v) for v in input_shape],
    }


def build_external(
    factory: str | Callable,
    kwargs: dict | None,
    num_classes: int,
    *,
    normalize="model",
    input_shape=(3, 32, 32),
    check: bool = True,
    where: str = "--student-arch",
) -> nn.Module:
    """Import (a reference) and call the factory; wrap the model as :class:`Normalized` unless ``normalize`` is
    ``"model"``; attach its spec (``model.igkd_spec``). ``check``: one dummy forward (eval mode, no gradient) on
    ``input_shape`` must give ``[1, num_classes]`` logits."""
    if isinstance(factory, str):
        ref, fn = check_ref(factory, where), import_factory(factory, where)
    else:
        fn = factory
        ref, partial_kwargs = factory_ref(factory)
        kwargs = {**partial_kwargs, **(kwargs or {})}
    kwargs = check_kwargs(kwargs or {}, where)
    normalize = check_normalize(normalize, where, channels=int(input_shape[0]))
    net = _call(fn, kwargs, num_classes, where)
    name = getattr(fn, "__name__", None)
    model = net if normalize == "model" else Normalized(net, normalize["mean"], normalize["std"], num_classes)
    if normalize == "model" and not hasattr(model, "num_classes"):
        model.num_classes = int(num_classes)
    model.igkd_spec = external_spec(ref, kwargs, normalize, num_classes, input_shape, name)
    if check:
        check_output(model, input_shape, num_classes, describe(ref, kwargs))
    return model


@torch.no_grad()
def check_output(model: nn.Module, input_shape, num_classes: int, what: str) -> None:
    """One forward of a zero image in eval mode must give ``[1, num_classes]`` (no random numbers drawn, the
    running statistics untouched)."""
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        out = model(torch.zeros(1, *input_shape, device=device))
    except Exception as err:  # noqa: BLE001 - the network cannot take this input
        raise IgkdError(f"{what} cannot take images of shape {list(input_shape)} ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise IgkdError(f"{what} maps a [1, {', '.join(map(str, input_shape))}] image to {shape}, not logits [1, {num_classes}]: igkd needs a classifier returning one tensor of logits")


def is_external(spec) -> bool:
    return isinstance(spec, dict) and spec.get("arch") == EXTERNAL


def external_spec_of(model: nn.Module) -> dict:
    """The spec of any model that is not of the family: the one it was built with (``igkd_spec``), or one naming
    its class (factory ``module:Class``, no arguments, normalisation from its ``normalize`` module or ``model``)."""
    spec = getattr(model, "igkd_spec", None)
    if is_external(spec):
        return dict(spec)
    inner = model.model if isinstance(model, Normalized) else model
    ref, _ = factory_ref(type(inner))
    normalize = "model"
    if isinstance(getattr(model, "normalize", None), Normalize):
        normalize = {"mean": model.normalize.mean.flatten().tolist(), "std": model.normalize.std.flatten().tolist()}
    classes = getattr(model, "num_classes", None)
    return external_spec(ref, {}, normalize, classes if isinstance(classes, int) else 0, [3, 0, 0], type(inner).__name__)


def check_external_spec(spec: dict, where: str) -> dict:
    """An external spec read from a file, checked before anything is imported: the reference's form, JSON
    arguments, the normalisation, ``num_classes`` and ``input_shape`` in bounds. IgkdError names the bad field."""
    from igkd.models.registry import MAX_CLASSES

    def refuse(field: str, wanted: str):
        raise IgkdError(f"{where}: model spec field {field!r} is {str(spec.get(field))[:100]!r}, not {wanted}: the file was not written by igkd or is damaged")

    factory = spec.get("factory")
    if factory is not None and (not isinstance(factory, str) or not REF_PATTERN.fullmatch(factory)):
        refuse("factory", "package.module:factory")
    if not isinstance(spec.get("name"), str) or not 0 < len(spec["name"]) <= 200:
        refuse("name", "a short text")
    try:
        check_kwargs(spec.get("kwargs"), where)
    except IgkdError:
        refuse("kwargs", "a mapping of argument names to JSON values")
    classes = spec.get("num_classes")
    if type(classes) is not int or not 1 <= classes <= MAX_CLASSES:
        refuse("num_classes", f"a whole number in 1..{MAX_CLASSES}")
    shape = spec.get("input_shape")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(type(v) is int for v in shape)
            or not 1 <= shape[0] <= MAX_CHANNELS or not all(1 <= v <= MAX_INPUT_SIDE for v in shape[1:])):
        refuse("input_shape", f"[C, H, W] with C in 1..{MAX_CHANNELS} and H, W in 1..{MAX_INPUT_SIDE}")
    try:
        check_normalize(spec.get("normalize"), where, channels=shape[0])
    except IgkdError:
        refuse("normalize", "'model' or {mean: [...], std: [...]}")
    return spec


def trusted_factory(spec: dict, trusted, where: str, option: str = "--student-arch") -> str | Callable:
    """What may rebuild the external model of ``spec``: the factory the caller named. ``trusted`` is a reference
    given on the command line, or several (one must equal the file's), ``True`` (``--trust-arch``: the file's
    reference) or a Python callable. Anything else is one error line, and nothing is imported."""
    ref = spec.get("factory")
    if trusted is True and ref is not None:
        return ref
    if callable(trusted) and not isinstance(trusted, str):
        return trusted
    names = [trusted] if isinstance(trusted, str) else list(trusted) if isinstance(trusted, (list, tuple, set)) else []
    names = [str(n).strip() for n in names if n]
    if ref is not None and ref in names:
        return ref
    built = describe(ref, spec.get("kwargs"))
    if ref is None:
        raise IgkdError(f"{where} was built by a Python factory igkd cannot name ({built}): load it from Python with load_model(path, trusted=<the factory>)")
    if names:
        raise IgkdError(f"{where} was built by {built}, not by {' or '.join(names)}: pass {option} {ref} (or --trust-arch) to rebuild it")
    raise IgkdError(f"{where} was built by {built}; igkd does not import code named by a file: pass {option} {ref} (or --trust-arch) to rebuild it")


def rebuild(spec: dict, trusted, where: str, option: str = "--student-arch") -> nn.Module:
    """The external model of a checked spec, built by the factory the caller trusts (weights still to load)."""
    factory = trusted_factory(spec, trusted, where, option)
    model = build_external(factory, spec["kwargs"], spec["num_classes"], normalize=spec["normalize"],
                           input_shape=spec["input_shape"], check=False, where=option)
    model.igkd_spec = dict(spec)
    return model


# -- layers ---------------------------------------------------------------------------------------------
def user_modules(model: nn.Module) -> nn.Module:
    """The user's own network inside a :class:`Normalized` wrapper (its layer names are the user's)."""
    return model.model if isinstance(model, Normalized) else model


def resolve_layer(model: nn.Module, name: str) -> str:
    """``name`` as a module name of ``model``: a name of the user's network inside a :class:`Normalized`
    wrapper gets its ``model.`` prefix; anything else is returned as it is."""
    if isinstance(model, Normalized) and name and name not in dict(model.named_modules()) and f"model.{name}" in dict(model.named_modules()):
        return f"model.{name}"
    return name


@torch.no_grad()
def layer_shapes(model: nn.Module, input_shape) -> list[tuple[str, str, list | str]]:
    """(name, type, output shape) of every named module of the user's network, from one forward of a zero image
    of ``input_shape`` (batch 1, eval mode, on the model's device); modules that did not run say ``not run``."""
    net = user_modules(model)
    shapes: dict[str, object] = {}
    hooks = []
    for name, module in net.named_modules():
        if not name:
            continue

        def keep(_m, _i, out, name=name):
            shapes[name] = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__

        hooks.append(module.register_forward_hook(keep))
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [(name, type(module).__name__, shapes.get(name, "not run")) for name, module in net.named_modules() if name]


def layer_listing(model: nn.Module, input_shape, limit: int = 40) -> str:
    """``name [1, C, H, W], ...`` of the modules with 4-D outputs (at most ``limit``), for one error line."""
    rows = [f"{n} {s}" for n, _, s in layer_shapes(model, input_shape) if isinstance(s, list) and len(s) == 4]
    more = f", ... ({len(rows) - limit} more: igkd models layers)" if len(rows) > limit else ""
    return ", ".join(rows[:limit]) + more
