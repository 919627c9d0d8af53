"""Evaluation: accuracy, per-class accuracy, confusion matrix; robustness under corruptions."""

from igkd.evaluate.accuracy import accuracy_report, evaluate, predict_logits

__all__ = ["accuracy_report", "evaluate", "predict_logits"]
