"""Model files: igkd safetensors checkpoints and the published state-dict layouts.

An igkd model file is a safetensors file whose metadata holds the architecture
spec (JSON) and free-form provenance, so ``load_model(path)`` needs nothing else.
Also accepted (loaded with ``torch.load(weights_only=True)`` by :func:`igkd.torch_io.load_torch`):

* igkd training checkpoints (``{"model": state_dict, "spec": {...}, ...}``);
* the PyTorch_CIFAR10 MobileNetV2 teacher (``features.<i>``, ``classifier.1``), which
  expects normalised inputs;
* the paper authors' students, ``features.<i>`` + ``classifier.1`` or, for their
  attention-transfer students, ``front_layers.<i>`` / ``middle_layer`` /
  ``end_layers.<j>``; these were trained on un-normalised [0, 1] inputs, which is
  recorded by giving them mean 0 / std 1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from igkd.atomic import atomic_write_bytes
from igkd.errors import IgkdError
from igkd.models.external import describe, is_external, rebuild
from igkd.models.mobilenetv2 import CIFAR10_MEAN, CIFAR10_STD, MobileNetV2CIFAR
from igkd.models.registry import build_model, check_spec, model_spec, spec_of
from igkd.torch_io import load_torch

RAW_INPUT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def save_model(path: str | Path, model: MobileNetV2CIFAR, meta: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """Write weights (optionally cast, e.g. fp16) + spec + meta as one safetensors file, atomically."""
    from safetensors.torch import save

    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if dtype is not None and value.is_floating_point() and not key.startswith("normalize."):
            value = value.to(dtype)
        state[key] = value
    spec = spec_of(model)
    if is_external(spec) and (min(spec["input_shape"][1:]) < 1 or spec["num_classes"] < 1):
        raise IgkdError(f"a {type(model).__name__} not built by igkd has no spec to record (input shape, classes): build it with "
                        "igkd.models.external.build_external(factory, kwargs, num_classes, input_shape=...) so that its file can be rebuilt")
    metadata = {"igkd_spec": json.dumps(spec), "igkd_meta": json.dumps(meta or {}, default=str)}
    atomic_write_bytes(path, canonical_safetensors(save(state, metadata=metadata)))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in a fixed order, so equal models give equal bytes.

    safetensors writes ``__metadata__`` from a Rust HashMap, whose order changes from process to
    process; the header is rewritten with sorted keys (the tensor data and offsets are unchanged).
    """
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}) | dict(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def _remap_attention_layout(state: dict) -> dict:
    """front_layers.i / middle_layer / end_layers.j -> features.<n> in that order."""
    front = sorted({int(m.group(1)) for k in state if (m := re.match(r"front_layers\.(\d+)\.", k))})
    end = sorted({int(m.group(1)) for k in state if (m := re.match(r"end_layers\.(\d+)\.", k))})
    order = {f"front_layers.{i}.": f"features.{n}." for n, i in enumerate(front)}
    order["middle_layer."] = f"features.{len(front)}."
    order.update({f"end_layers.{j}.": f"features.{len(front) + 1 + n}." for n, j in enumerate(end)})
    remapped = {}
    for key, value in state.items():
        for old, new in order.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        remapped[key] = value
    return remapped


def _spec_from_external(shapes: dict, path: Path) -> dict:
    """The spec of a published state dict, from its key names and the classifier's shape."""
    indices = {int(m.group(1)) for k in shapes if (m := re.match(r"features\.(\d+)\.", k))}
    if not indices or "classifier.1.weight" not in shapes or len(shapes["classifier.1.weight"]) != 2:
        raise IgkdError(
            f"{path} is not a MobileNetV2-CIFAR model: expected keys 'features.<i>...' and 'classifier.1.weight' "
            f"(found e.g. {', '.join(list(shapes)[:3]) or 'nothing'})"
        )
    keep = max(indices) + 1
    k = 19 - keep
    num_classes = shapes["classifier.1.weight"][0]
    teacher_like = keep == 19
    try:
        spec = model_spec("teacher" if k == 0 else f"k{k}", num_classes=num_classes)
    except IgkdError:
        raise IgkdError(f"{path}: a network of {keep} feature modules is not in the igkd family (teacher = 19, students = 19 - k)") from None
    convention = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD} if teacher_like else RAW_INPUT
    spec.update(mean=list(convention["mean"]), std=list(convention["std"]))
    return spec


def _read(path: Path) -> tuple[dict, dict | None, dict, str, object]:
    """(shapes by key, spec or None, meta, format, load) of a model file; ``load()`` then gives the tensors by key.

    A safetensors file gives its shapes from its header, so nothing is allocated before they are checked.
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        spec = json.loads(header["igkd_spec"]) if "igkd_spec" in header else None
        meta = json.loads(header.get("igkd_meta", "{}"))
        if not isinstance(meta, dict):
            raise ValueError(f"igkd_meta is a {type(meta).__name__}, not an object")

        def load() -> dict:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}

        return shapes, spec, meta, "igkd-safetensors", load
    raw = load_torch(path, map_location="cpu", what="model file")
    meta: dict = {}
    if isinstance(raw, dict) and "model" in raw and "spec" in raw and isinstance(raw["model"], dict):
        state, spec, fmt = raw["model"], raw["spec"], "igkd-training-checkpoint"
        meta = {k: v for k, v in raw.items() if k in ("meta", "epoch")}
    elif isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        state, spec, fmt = raw["state_dict"], None, "state-dict"
    elif isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state, spec, fmt = raw, None, "state-dict"
    else:
        raise IgkdError(f"{path} holds a {type(raw).__name__}, not a model state dict or igkd checkpoint")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise IgkdError(f"{path} holds a state dict with entries that are not named tensors")
    return {k: tuple(v.shape) for k, v in state.items()}, spec, meta, fmt, lambda: state


def _rename(state: dict) -> tuple[dict, bool]:
    """Published key layouts -> igkd's (``module.`` dropped, attention students remapped); True if remapped."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith(("front_layers.", "middle_layer.")) for k in state):
        return _remap_attention_layout(state), True
    return state, False


def _check_shapes(shapes: dict, spec: dict, path: Path) -> None:
    """The file's tensors against the architecture built on the meta device (no memory): names and shapes."""
    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    shapes = {"normalize.mean": reference["normalize.mean"], "normalize.std": reference["normalize.std"]} | shapes
    missing, unexpected = sorted(set(reference) - set(shapes)), sorted(set(shapes) - set(reference))
    bad_shapes = [k for k in reference if k in shapes and shapes[k] != reference[k]]
    if missing or unexpected or bad_shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"wrong shape {', '.join(bad_shapes[:3])}" if bad_shapes else "",
            )
            if part
        )
        raise IgkdError(f"{path} does not match the {spec['name']} architecture ({detail})")


def load_model(
    path: str | Path, *, map_location="cpu", expect: str | None = None, trusted=None, option: str = "--student-arch"
) -> tuple[torch.nn.Module, dict]:
    """Load any supported model file -> (model in eval mode, metadata incl. ``spec`` and ``format``).

    ``expect`` ('teacher' or 'k5' ...) refuses a file of another architecture. The spec (width,
    classes, k: :func:`igkd.models.registry.check_spec`) and every tensor's shape are checked
    before any real memory is allocated; running out of memory is one error line.

    A file of an external architecture (:mod:`igkd.models.external`) is rebuilt only by the factory the
    caller names in ``trusted`` (its reference, ``True`` for the file's own, or a callable); otherwise
    one error line naming ``option`` says what to pass, and nothing is imported.
    """
    path = Path(path)
    if not path.is_file():
        raise IgkdError(f"checkpoint {path} does not exist")
    try:
        shapes, spec, meta, fmt, load = _read(path)
    except IgkdError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoding failure means 'not a model file'
        raise IgkdError(f"cannot read {path} as a model checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if is_external(spec):
        meta["format"] = fmt
        return _load_external(path, shapes, check_spec(spec, str(path)), meta, load, map_location, expect, trusted, option)
    shapes, remapped = _rename(shapes)
    if remapped:
        fmt = "reference-attention-student"
    if spec is None:
        spec = _spec_from_external(shapes, path)
        fmt = "reference-teacher" if spec["k"] == 0 else ("reference-student" if fmt == "state-dict" else fmt)
    spec = check_spec(spec, str(path))
    if expect is not None:
        wanted = model_spec(expect)["name"]
        if spec.get("name") != wanted:
            raise IgkdError(f"{path} holds a {spec.get('name')} model, but a {wanted} model is needed here")
    _check_shapes(shapes, spec, path)
    try:
        state, _ = _rename(load())
        model = build_model(spec)
        state.setdefault("normalize.mean", model.normalize.mean)
        state.setdefault("normalize.std", model.normalize.std)
        reference = model.state_dict()
        state = {k: v.to(reference[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state)
        model.to(map_location).eval()
    except (MemoryError, RuntimeError) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        why = "out of memory" if isinstance(err, MemoryError) or "memory" in first.lower() or "alloc" in first.lower() else "failed"
        raise IgkdError(f"cannot load {path}: {why} for a {spec['name']} model of width {spec['width']:g} and {spec['num_classes']} classes "
                        f"on {map_location} ({type(err).__name__}: {first})") from None
    meta.update(spec=spec, format=fmt, path=str(path))
    return model, meta


def _load_external(path: Path, shapes: dict, spec: dict, meta: dict, load, map_location, expect, trusted, option: str):
    """An external model file: the trusted factory builds the network, whose tensors must match the file's."""
    if expect is not None:
        raise IgkdError(f"{path} holds an external {spec['name']} model, but a {model_spec(expect)['name']} model of the igkd family is needed here")
    model = rebuild(spec, trusted, str(path), option)
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(reference) - set(shapes)), sorted(set(shapes) - set(reference))
    bad_shapes = [k for k in reference if k in shapes and shapes[k] != reference[k]]
    if missing or unexpected or bad_shapes:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"wrong shape {', '.join(bad_shapes[:3])}" if bad_shapes else "") if part)
        raise IgkdError(f"{path} does not match {describe(spec['factory'], spec['kwargs'])} ({detail}): is it the same factory and arguments?")
    state = model.state_dict()
    loaded = {k: v.to(state[k].dtype) if v.is_floating_point() else v for k, v in load().items()}
    model.load_state_dict(loaded)
    model.to(map_location).eval()
    meta.update(spec=spec, path=str(path))
    return model, meta
