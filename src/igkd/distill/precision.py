"""bf16 on a CPU, chosen by measurement: which parts of a distillation step pay for it, and what it costs.

On a CPU with native bf16 (AVX512-BF16 or AMX) bf16 autocast speeds up some convolutions and
slows others (the narrow, memory-bound layers of a width-0.5 MobileNetV2 gain nothing). So
``cpu_bf16`` (:class:`igkd.distill.config.TrainConfig`) is chosen per *role* from timings of the
real models, interleaved in one run so that a shared machine's load falls on both precisions alike:

* ``teacher`` -- the frozen teacher's forward (the KD targets), bf16 weights under autocast;
* ``all`` -- also the student's training step.

The rule (:data:`RULE`): a role runs in bf16 when the CPU has native bf16 and the median over the
rounds of bf16's images/s is at least :data:`MIN_GAIN` times fp32's; ``all`` also needs the teacher's
gain (the student's step then contains the teacher's forward). :func:`bf16_effect` measures what the
choice changes: the teacher's test accuracy and top-1 agreement in both precisions, and the
KL divergence of its soft targets at the KD temperature.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from igkd.devices import autocast, cpu_has_bf16, frozen_copy, prepare_model

MIN_GAIN = 1.15
RULE = f"bf16 for a role when the CPU has native bf16 and its median images/s over interleaved rounds is >= {MIN_GAIN}x fp32's"


def _rate(step, batch: int, repeats: int) -> float:
    step()  # a warm-up call per round: oneDNN picks its kernels on the first call of a shape
    tick = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - tick)


def choose_cpu_bf16(teacher: nn.Module, student: nn.Module, *, batch_size: int = 64, rounds: int = 3, repeats: int = 3,
                    image_size: tuple[int, int] = (32, 32)) -> dict:
    """Time the teacher's forward and the student's training step in fp32 and bf16 (interleaved, ``rounds``
    times) and return ``{"cpu_bf16": off|teacher|all, "rule", "native_bf16", "images_per_s": {...}, "gain": {...}}``."""
    device = torch.device("cpu")
    record = {"rule": RULE, "native_bf16": cpu_has_bf16(), "batch_size": batch_size, "rounds": rounds, "threads": torch.get_num_threads()}
    if not record["native_bf16"]:
        return {**record, "cpu_bf16": "off", "why": "this CPU has no native bf16 (AVX512-BF16 or AMX): fp32 everywhere"}
    x = torch.rand(batch_size, 3, *image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,))
    frozen = {"fp32": frozen_copy(teacher, device), "bf16": frozen_copy(teacher, device, bf16=True)}
    model = prepare_model(copy.deepcopy(student), device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)  # a real step that barely moves the copy

    def teacher_step(precision: str):
        def step():
            with torch.inference_mode(), autocast(device, True, cpu=precision == "bf16"):
                frozen[precision](x)
        return step

    def student_step(precision: str):
        def step():
            with autocast(device, True, cpu=precision == "bf16"):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    rates: dict[str, list[float]] = {f"{role}_{p}": [] for role in ("teacher_forward", "student_step") for p in ("fp32", "bf16")}
    for _ in range(rounds):
        for p in ("fp32", "bf16"):
            rates[f"teacher_forward_{p}"].append(_rate(teacher_step(p), batch_size, repeats))
            rates[f"student_step_{p}"].append(_rate(student_step(p), batch_size, repeats))
    median = {name: round(statistics.median(values), 1) for name, values in rates.items()}
    gain = {role: round(median[f"{role}_bf16"] / median[f"{role}_fp32"], 3) for role in ("teacher_forward", "student_step")}
    return {**record, "cpu_bf16": decide(gain), "images_per_s": median, "gain": gain}


def decide(gain: dict) -> str:
    """:data:`RULE` on measured bf16/fp32 speed ratios ``{"teacher_forward": r, "student_step": r}`` (native bf16 assumed)."""
    if gain["teacher_forward"] < MIN_GAIN:
        return "off"
    return "all" if gain["student_step"] >= MIN_GAIN else "teacher"


@torch.no_grad()
def bf16_effect(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, temperature: float, batch_size: int = 1000) -> dict:
    """What bf16 changes in the teacher's outputs on ``images`` (uint8 ``[N, 3, H, W]``): test accuracy in
    fp32 and bf16, top-1 agreement, the largest logit difference, and the mean KL(fp32 || bf16) of the
    soft targets at ``temperature`` (the KD term's input)."""
    device = torch.device("cpu")
    frozen = {"fp32": frozen_copy(teacher, device), "bf16": frozen_copy(teacher, device, bf16=True)}
    logits = {"fp32": [], "bf16": []}
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float().div_(255).contiguous(memory_format=torch.channels_last)
        for p, model in frozen.items():
            with torch.inference_mode(), autocast(device, True, cpu=p == "bf16"):
                logits[p].append(model(x).float())
    a, b = torch.cat(logits["fp32"]), torch.cat(logits["bf16"])
    kl = F.kl_div(F.log_softmax(b / temperature, 1), F.log_softmax(a / temperature, 1), reduction="batchmean", log_target=True)
    return {
        "images": len(images),
        "accuracy_fp32": round(100.0 * float((a.argmax(1) == labels).float().mean()), 2),
        "accuracy_bf16": round(100.0 * float((b.argmax(1) == labels).float().mean()), 2),
        "top1_agreement": round(100.0 * float((a.argmax(1) == b.argmax(1)).float().mean()), 3),
        "max_abs_logit_difference": round(float((a - b).abs().max()), 4),
        "soft_target_kl": float(f"{float(kl):.3g}"),
        "temperature": temperature,
    }
