"""bf16 on a CPU (cpu_bf16): the rule, a run in each setting, and what bf16 changes in a teacher's outputs."""

from __future__ import annotations

import json

import pytest
import torch

from igkd.distill import Trainer, resolve_config
from igkd.distill.precision import MIN_GAIN, bf16_effect, decide
from igkd.doctor import tiny_dataset
from igkd.models import build_model


def test_the_rule_takes_bf16_only_where_it_pays():
    assert decide({"teacher_forward": MIN_GAIN - 0.01, "student_step": 2.0}) == "off"  # "all" needs the teacher's gain too
    assert decide({"teacher_forward": MIN_GAIN, "student_step": 1.0}) == "teacher"
    assert decide({"teacher_forward": 1.8, "student_step": MIN_GAIN}) == "all"


@pytest.mark.parametrize("setting", ["teacher", "all"])
def test_a_kd_run_trains_with_cpu_bf16(tmp_path, setting):
    data = tiny_dataset(n_train=64, n_test=32, size=16, classes=4)
    torch.manual_seed(0)
    teacher = build_model("teacher", num_classes=4, width=0.25).eval()
    config = resolve_config("kd", "improved", student="k13", width=0.25, epochs=2, batch_size=16, lr=0.05, val_fraction=0.0,
                            device="cpu", cpu_bf16=setting)
    trainer = Trainer(config, data, tmp_path / "run", teacher=teacher, teacher_info={"sha256": None}, progress=False)
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16  # the frozen teacher's weights, cast once
    assert next(trainer.model.parameters()).dtype == torch.float32  # the student's weights stay fp32 (autocast only)
    summary = trainer.run()
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(loss == loss and loss < 10 for loss in losses) and summary["config"]["cpu_bf16"] == setting


def test_bf16_effect_measures_the_teacher_in_both_precisions():
    torch.manual_seed(0)
    teacher = build_model("teacher", num_classes=4, width=0.25).eval()
    data = tiny_dataset(n_train=8, n_test=40, size=16, classes=4)
    effect = bf16_effect(teacher, data.test.images, data.test.labels, temperature=4.0)
    assert effect["images"] == 40 and 0 <= effect["top1_agreement"] <= 100
    assert effect["soft_target_kl"] >= 0 and effect["max_abs_logit_difference"] >= 0
