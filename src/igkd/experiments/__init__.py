"""Experiments: studies of many runs (ablation, Monte Carlo, compression sweep, tuning), their statistics, the paper's reproduction."""
