"""Summary statistics and significance tests for Monte Carlo accuracies.

A study trains every method several times ("runs"); each run of each method
gives one test accuracy. This module turns rows ``(method, run, accuracy)`` into
per-method summaries and method-vs-method comparisons.

Whether two methods' runs are *paired* decides the test. Runs are paired when
run ``r`` of method A and run ``r`` of method B used the same seed and the same
training subset: then the per-run differences remove the run-to-run variation
they share and a paired t-test (plus a Wilcoxon signed-rank test) is right.
Runs that merely carry the same ids but were drawn independently are not
paired (the published study numbered its independently drawn runs 0..9 and
compared them with a paired test); they get Welch's t-test, which assumes
neither pairing nor equal variances. Equal run ids alone therefore never mean
paired: pairing must be declared, by the caller (``paired=True``, ``--paired``;
a study records it in study.json) or by the data (a ``seed``/``subset_seed``
column whose values agree across methods for every run id). The rule is in
:func:`decide_pairing`.

Each comparison reports ``b - a`` (for the comparisons with the baseline, ``a``
is the baseline, so positive means better than the baseline), its confidence
interval, the test, an effect size and Holm-adjusted p-values. Holm's
correction is applied within two separate families: all pairs of methods, and
the methods against the baseline.
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from igkd.errors import IgkdError

Row = tuple[str, str, float]

#: Fewer non-zero differences than this and a two-sided Wilcoxon signed-rank
#: test cannot reach p < 0.05 (with 5 the smallest exact p is 2/32 = 0.0625).
WILCOXON_MIN_NONZERO = 6

#: Per-run differences are rounded to this many decimals before the Wilcoxon
#: test, so that equal differences computed in floating point (92.58 - 91.19 vs
#: 92.45 - 91.06) tie as they should instead of being ranked by rounding noise.
WILCOXON_DECIMALS = 9

CSV_COLUMNS = ("method", "run", "accuracy")

#: Optional CSV columns that declare pairing: run r of two methods is a pair when these agree.
PAIRING_COLUMNS = ("seed", "subset_seed")

PairingKeys = dict[tuple[str, str], tuple[str, ...]]


def read_accuracy_csv(path: str | Path) -> list[Row]:
    """Rows ``(method, run, accuracy)`` of a CSV with header ``method,run,accuracy``.

    Column names are matched case-insensitively, extra columns are ignored, and
    blank lines are skipped. Any problem is an :class:`IgkdError` naming the file
    and, for a bad value, the line.
    """
    path = Path(path)
    if not path.is_file():
        raise IgkdError(f"{path}: no such file; pass a CSV with header {','.join(CSV_COLUMNS)}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise IgkdError(f"{path}: the file is empty; expected a header {','.join(CSV_COLUMNS)} and one row per run")
            names = [name.strip().lower() for name in header]
            missing = [column for column in CSV_COLUMNS if column not in names]
            if missing:
                raise IgkdError(
                    f"{path}: missing column(s) {', '.join(missing)}; the header is {','.join(header)!s} "
                    f"but must contain {','.join(CSV_COLUMNS)}"
                )
            where = {column: names.index(column) for column in CSV_COLUMNS}
            rows: list[Row] = []
            for record in reader:
                if not any(field.strip() for field in record):
                    continue
                line = reader.line_num
                values = {column: (record[i].strip() if i < len(record) else "") for column, i in where.items()}
                for column in ("method", "run"):
                    if not values[column]:
                        raise IgkdError(f"{path}, line {line}: the {column} is empty")
                try:
                    accuracy = float(values["accuracy"])
                except ValueError:
                    raise IgkdError(f"{path}, line {line}: accuracy {values['accuracy']!r} is not a number") from None
                if not math.isfinite(accuracy):
                    raise IgkdError(f"{path}, line {line}: accuracy {values['accuracy']!r} is not a finite number")
                rows.append((values["method"], values["run"], accuracy))
    except UnicodeDecodeError as err:
        raise IgkdError(f"{path}: not a UTF-8 text CSV ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise IgkdError(f"{path}: malformed CSV ({err})") from None
    if not rows:
        raise IgkdError(f"{path}: no data rows below the header")
    return rows


def read_pairing_keys(path: str | Path) -> tuple[tuple[str, ...], PairingKeys] | None:
    """``(columns, {(method, run): values})`` of the CSV's ``seed``/``subset_seed`` columns, or ``None`` without them.

    Call after :func:`read_accuracy_csv` (which checks the file). Values are compared as stripped strings.
    """
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        names = [name.strip().lower() for name in next(reader)]
        columns = tuple(column for column in PAIRING_COLUMNS if column in names)
        if not columns:
            return None
        where = {column: names.index(column) for column in (*CSV_COLUMNS, *columns)}
        keys: PairingKeys = {}
        for record in reader:
            if not any(field.strip() for field in record):
                continue
            value = {column: (record[i].strip() if i < len(record) else "") for column, i in where.items()}
            keys[(value["method"], value["run"])] = tuple(value[column] for column in columns)
    return columns, keys


def group_runs(rows: Iterable[Sequence]) -> dict[str, dict[str, float]]:
    """``{method: {run: accuracy}}`` in first-seen order; run ids are compared as strings."""
    runs: dict[str, dict[str, float]] = {}
    for row in rows:
        if len(row) != 3:
            raise IgkdError(f"each row must be (method, run, accuracy), got {row!r}")
        method, run, accuracy = str(row[0]), str(row[1]), row[2]
        try:
            accuracy = float(accuracy)
        except (TypeError, ValueError):
            raise IgkdError(f"method {method!r}, run {run!r}: accuracy {accuracy!r} is not a number") from None
        if not math.isfinite(accuracy):
            raise IgkdError(f"method {method!r}, run {run!r}: accuracy {accuracy!r} is not a finite number")
        per_method = runs.setdefault(method, {})
        if run in per_method:
            raise IgkdError(f"method {method!r} has more than one accuracy for run {run!r}; each run id must appear once per method")
        per_method[run] = accuracy
    if not runs:
        raise IgkdError("no accuracies to summarise")
    return runs


def decide_pairing(
    runs: Mapping[str, Mapping[str, float]],
    paired: bool | None = None,
    keys: tuple[tuple[str, ...], PairingKeys] | None = None,
) -> tuple[bool, str]:
    """Whether to compare methods run by run, and why.

    - ``paired=False``: the caller says runs with the same id do not share seeds
      and subsets -> unpaired (Welch), whatever the ids.
    - ``paired=True``: the caller says they do -> paired; every method must then
      have exactly the same run ids (and agreeing ``keys`` when given), else
      :class:`IgkdError`.
    - ``paired=None``: paired only when the data declare it: ``keys`` (the
      ``seed``/``subset_seed`` columns, :func:`read_pairing_keys`) agree across
      methods for every run id. Equal run ids alone are not pairs: the published
      runs were numbered 0..9 per method but drawn independently. Otherwise unpaired.
    """
    id_sets = {method: frozenset(per_method) for method, per_method in runs.items()}
    reference_method, reference = next(iter(id_sets.items()))
    mismatch = next(((method, ids) for method, ids in id_sets.items() if ids != reference), None)
    if paired is False:
        return False, "marked unpaired by the caller (runs with the same id do not share seeds and subsets)"
    if mismatch is not None:
        method, ids = mismatch
        extra, lacking = sorted(ids - reference)[:5], sorted(reference - ids)[:5]
        detail = " and ".join(
            part
            for part in (
                f"{method!r} has runs {extra} that {reference_method!r} lacks" if extra else "",
                f"{method!r} lacks runs {lacking} of {reference_method!r}" if lacking else "",
            )
            if part
        )
        if paired:
            raise IgkdError(f"paired comparison needs the same run ids for every method, but {detail}; pass --unpaired")
        return False, f"run ids differ between methods ({detail})"
    disagreement = None
    if keys is not None:
        columns, values = keys
        for run in sorted(reference):
            seen = {method: values.get((method, run)) for method in runs}
            if len(set(seen.values())) > 1:
                first = seen[reference_method]
                other, value = next((m, v) for m, v in seen.items() if v != first)
                disagreement = (
                    f"run {run!r} has {'/'.join(columns)} {'/'.join(first or ('?',))} for {reference_method!r} "
                    f"but {'/'.join(value or ('?',))} for {other!r}"
                )
                break
    if paired:
        if disagreement:
            raise IgkdError(f"--paired, but the CSV's {'/'.join(keys[0])} column(s) say the runs are not pairs: {disagreement}; drop --paired")
        return True, "marked paired by the caller (runs with the same id share seed and subset)"
    if keys is None:
        return False, (
            f"the methods share {len(reference)} run ids, but nothing declares that run r of each method used the same "
            "seed and subset (no seed/subset_seed column), and independently drawn runs numbered alike (as in the "
            "published study) are not pairs; pass --paired if they are, or add a seed/subset_seed column"
        )
    if disagreement:
        return False, f"the {'/'.join(keys[0])} column(s) differ between methods ({disagreement}): independent runs"
    return True, f"the {'/'.join(keys[0])} column(s) agree across methods for each of the {len(reference)} run ids: run r of every method shared them"


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in input order.

    Sorted ascending, the i-th smallest of m p-values (i from 0) is multiplied by
    m - i, made non-decreasing by a running maximum and capped at 1. A missing
    p-value (``None``: test not possible) stays ``None`` but still counts in m,
    as a p-value of 1 would.
    """
    m = len(pvalues)
    filled = [1.0 if p is None else float(p) for p in pvalues]
    adjusted: list[float | None] = [None] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=filled.__getitem__)):
        running = max(running, min(1.0, (m - rank) * filled[index]))
        adjusted[index] = None if pvalues[index] is None else running
    return adjusted


def describe(values: Sequence[float], confidence: float = 0.95) -> dict:
    """n, mean, sd (ddof=1), min, max and the t-interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {
        "n": int(n),
        "mean": mean,
        "sd": sd,
        "min": float(x.min()),
        "max": float(x.max()),
        "ci_low": mean - half,
        "ci_high": mean + half,
    }


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _constant(x: np.ndarray) -> bool:
    """All equal up to floating-point noise (92.58 - 91.19 and 92.45 - 91.06 differ in the 15th digit)."""
    return float(np.ptp(x)) <= 1e-12 * max(1.0, float(np.abs(x).max()))


def _wilcoxon(differences: np.ndarray) -> dict:
    d = np.round(differences, WILCOXON_DECIMALS)
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        return {"statistic": None, "p": None, "p_holm": None, "reason": "all differences are zero"}
    if nonzero < WILCOXON_MIN_NONZERO:
        return {
            "statistic": None,
            "p": None,
            "p_holm": None,
            "reason": f"only {nonzero} non-zero differences; the signed-rank test needs at least {WILCOXON_MIN_NONZERO} to reach p < 0.05",
        }
    result = stats.wilcoxon(d)
    return {"statistic": float(result.statistic), "p": _finite(result.pvalue), "p_holm": None, "reason": None}


def _paired_comparison(a: np.ndarray, b: np.ndarray, confidence: float) -> dict:
    d = b - a
    n = d.size
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    out = {"n_pairs": int(n), "mean_difference": mean, "ci_low": mean - half, "ci_high": mean + half, "df": float(n - 1)}
    if _constant(d):
        out.update(t=None, p=None, p_holm=None, reason="the per-run differences have zero variance")
        out["effect_size"] = {"name": "cohen_dz", "value": None}
    else:
        result = stats.ttest_rel(b, a)
        out.update(t=_finite(result.statistic), p=_finite(result.pvalue), p_holm=None, reason=None)
        out["effect_size"] = {"name": "cohen_dz", "value": mean / sd}
    out["wilcoxon"] = _wilcoxon(d)
    return out


def _welch_comparison(a: np.ndarray, b: np.ndarray, confidence: float) -> dict:
    na, nb = a.size, b.size
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    mean = float(b.mean() - a.mean())
    se2 = va / na + vb / nb
    out = {"mean_difference": mean}
    if _constant(a) and _constant(b):
        out.update(ci_low=mean, ci_high=mean, df=None, t=None, p=None, p_holm=None, reason="both methods have zero variance")
        out["effect_size"] = {"name": "hedges_g", "value": None}
        return out
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * math.sqrt(se2)
    result = stats.ttest_ind(b, a, equal_var=False)
    pooled_sd = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    correction = 1 - 3 / (4 * (na + nb) - 9)  # Hedges' small-sample bias correction of Cohen's d
    out.update(ci_low=mean - half, ci_high=mean + half, df=float(df), t=_finite(result.statistic), p=_finite(result.pvalue), p_holm=None, reason=None)
    out["effect_size"] = {"name": "hedges_g", "value": correction * mean / pooled_sd if pooled_sd > 0 else None}
    return out


def compare(a_runs: Mapping[str, float], b_runs: Mapping[str, float], paired: bool, confidence: float = 0.95) -> dict:
    """``b - a``: mean difference with CI, t-test, effect size (and Wilcoxon when paired).

    Paired: runs are matched by id; paired t-test (``scipy.stats.ttest_rel``),
    Cohen's d_z = mean difference / sd of the differences, Wilcoxon signed-rank.
    Unpaired: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) with
    the Welch-Satterthwaite df, Hedges' g (Cohen's d with the pooled sd, bias-corrected).
    """
    if paired:
        order = list(a_runs)
        a = np.array([a_runs[r] for r in order], dtype=np.float64)
        b = np.array([b_runs[r] for r in order], dtype=np.float64)
        return {"test": "paired t-test", **_paired_comparison(a, b, confidence)}
    a = np.array(list(a_runs.values()), dtype=np.float64)
    b = np.array(list(b_runs.values()), dtype=np.float64)
    return {"test": "Welch t-test", **_welch_comparison(a, b, confidence)}


def _find_baseline(methods: Sequence[str], baseline: str) -> str:
    matches = [m for m in methods if m.lower() == baseline.strip().lower()]
    if not matches:
        raise IgkdError(f"baseline method {baseline!r} not found; the methods are {', '.join(methods)} (choose one with --baseline)")
    if len(matches) > 1:
        raise IgkdError(f"baseline {baseline!r} is ambiguous: methods {', '.join(matches)} differ only in case; rename one")
    return matches[0]


def _apply_holm(comparisons: list[dict]) -> None:
    """Add ``p_holm`` (and ``wilcoxon.p_holm``) adjusted over this family."""
    for comparison, value in zip(comparisons, holm([c["p"] for c in comparisons])):
        comparison["p_holm"] = value
    if comparisons and "wilcoxon" in comparisons[0]:
        for comparison, value in zip(comparisons, holm([c["wilcoxon"]["p"] for c in comparisons])):
            comparison["wilcoxon"]["p_holm"] = value


def summarize(
    rows: Iterable[Sequence],
    *,
    baseline: str = "student",
    paired: bool | None = None,
    confidence: float = 0.95,
    pairing_keys: tuple[tuple[str, ...], PairingKeys] | None = None,
) -> dict:
    """Per-method statistics and comparisons (vs the baseline and all pairs).

    ``rows``: ``(method, run, accuracy)``. ``baseline`` is looked up
    case-insensitively. ``paired``, ``pairing_keys``: see :func:`decide_pairing`. Methods are
    listed baseline first, then in first-seen order; a pair ``(a, b)`` always has
    ``a`` earlier in that order and reports ``b - a``. Holm's correction runs
    separately over the ``all_pairs`` family and the ``vs_baseline`` family.
    Every method needs at least 2 runs.
    """
    if not 0 < confidence < 1:
        raise IgkdError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    runs = group_runs(rows)
    base = _find_baseline(list(runs), baseline)
    for method, per_method in runs.items():
        if len(per_method) < 2:
            raise IgkdError(
                f"method {method!r} has {len(per_method)} run; at least 2 are needed for its sd, confidence interval and tests"
            )
    is_paired, reason = decide_pairing(runs, paired, pairing_keys)
    methods = [base] + [m for m in runs if m != base]

    def pair(a: str, b: str) -> dict:
        return {"a": a, "b": b, "n_a": len(runs[a]), "n_b": len(runs[b]), **compare(runs[a], runs[b], is_paired, confidence)}

    all_pairs = [pair(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
    vs_baseline = copy.deepcopy(all_pairs[: len(methods) - 1])  # (base, m) for every other m: the same tests, Holm-adjusted apart
    _apply_holm(vs_baseline)
    _apply_holm(all_pairs)
    return {
        "baseline": base,
        "paired": is_paired,
        "pairing": reason,
        "confidence": confidence,
        "test": "paired t-test (scipy.stats.ttest_rel) and Wilcoxon signed-rank (scipy.stats.wilcoxon)"
        if is_paired
        else "Welch's t-test (scipy.stats.ttest_ind, equal_var=False)",
        "effect_size": "cohen_dz (mean difference / sd of the differences)"
        if is_paired
        else "hedges_g (Cohen's d with the pooled sd, times 1 - 3/(4(n_a+n_b)-9))",
        "difference": "b - a (vs_baseline: a is the baseline)",
        "holm_families": {
            "vs_baseline": f"the {len(vs_baseline)} comparisons of each method with {base!r}",
            "all_pairs": f"all {len(all_pairs)} pairs of the {len(methods)} methods",
        },
        "methods": [{"method": m, **describe(list(runs[m].values()), confidence)} for m in methods],
        "vs_baseline": vs_baseline,
        "all_pairs": all_pairs,
    }
