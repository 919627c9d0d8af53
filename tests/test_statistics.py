"""Statistics of Monte Carlo accuracies, checked against scipy on the paper's published runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from igkd.cli import app, main
from igkd.errors import IgkdError
from igkd.experiments.statistics import decide_pairing, group_runs, holm, read_accuracy_csv, summarize

# The paper's Monte Carlo test accuracies (10 runs each, CIFAR-10, 4.12x student).
STUDENT = [91.19, 90.5, 91.32, 91.28, 91.36, 91.35, 91.43, 91.05, 90.86, 91.5]
KD_IG = [92.58, 91.73, 92.08, 92.45, 91.96, 91.58, 91.82, 91.62, 92.13, 92.23]


def paper_rows(second_method_runs=None) -> list[tuple[str, str, float]]:
    runs = second_method_runs or [str(i) for i in range(1, 11)]
    return [("Student", str(i), a) for i, a in zip(range(1, 11), STUDENT)] + [("KD_IG", r, a) for r, a in zip(runs, KD_IG)]


def test_per_method_statistics_match_the_published_means_and_sds():
    summary = summarize(paper_rows())
    student, kd_ig = summary["methods"]
    assert (student["method"], kd_ig["method"]) == ("Student", "KD_IG")
    assert student["n"] == kd_ig["n"] == 10
    assert student["mean"] == pytest.approx(91.18, abs=0.01) and student["sd"] == pytest.approx(0.31, abs=0.01)
    assert kd_ig["mean"] == pytest.approx(92.02, abs=0.01) and kd_ig["sd"] == pytest.approx(0.34, abs=0.01)
    assert (student["min"], student["max"]) == (90.5, 91.5)
    low, high = stats.t.interval(0.95, 9, loc=np.mean(STUDENT), scale=stats.sem(STUDENT))
    assert student["ci_low"] == pytest.approx(low, abs=1e-9) and student["ci_high"] == pytest.approx(high, abs=1e-9)


def test_paired_comparison_equals_scipy():
    summary = summarize(paper_rows(), paired=True)
    assert summary["paired"] is True
    (c,) = summary["vs_baseline"]
    assert (c["a"], c["b"], c["test"]) == ("Student", "KD_IG", "paired t-test")
    reference = stats.ttest_rel(KD_IG, STUDENT)
    assert c["t"] == pytest.approx(reference.statistic, abs=1e-6)
    assert c["p"] == pytest.approx(reference.pvalue, abs=1e-6)
    assert c["p"] == pytest.approx(1.1e-4, abs=0.05e-4)  # the paper's (paired) p-value
    low, high = reference.confidence_interval(0.95)
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    d = np.subtract(KD_IG, STUDENT)
    assert c["mean_difference"] == pytest.approx(d.mean(), abs=1e-12)
    assert c["effect_size"] == {"name": "cohen_dz", "value": pytest.approx(d.mean() / d.std(ddof=1), abs=1e-9)}
    wilcoxon = stats.wilcoxon(d)
    assert c["wilcoxon"]["p"] == pytest.approx(wilcoxon.pvalue, abs=1e-6)
    assert c["wilcoxon"]["statistic"] == pytest.approx(wilcoxon.statistic)


def test_welch_comparison_equals_scipy():
    summary = summarize(paper_rows(), paired=False)
    assert summary["paired"] is False
    (c,) = summary["vs_baseline"]
    assert c["test"] == "Welch t-test" and "wilcoxon" not in c
    reference = stats.ttest_ind(KD_IG, STUDENT, equal_var=False)
    assert c["t"] == pytest.approx(reference.statistic, abs=1e-6)
    assert c["p"] == pytest.approx(reference.pvalue, abs=1e-6)
    assert c["df"] == pytest.approx(reference.df, abs=1e-9)
    low, high = reference.confidence_interval(0.95)
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    na = nb = 10
    pooled = np.sqrt(((na - 1) * np.var(STUDENT, ddof=1) + (nb - 1) * np.var(KD_IG, ddof=1)) / (na + nb - 2))
    g = (1 - 3 / (4 * (na + nb) - 9)) * (np.mean(KD_IG) - np.mean(STUDENT)) / pooled
    assert c["effect_size"] == {"name": "hedges_g", "value": pytest.approx(g, abs=1e-9)}


def test_pairing_follows_run_ids_and_the_flag():
    same_ids = group_runs(paper_rows())
    assert decide_pairing(same_ids)[0] is False  # equal ids alone are not pairs (the published runs)
    assert decide_pairing(same_ids, paired=False)[0] is False
    assert decide_pairing(same_ids, paired=True)[0] is True
    other_ids = group_runs(paper_rows([f"b{i}" for i in range(10)]))
    assert decide_pairing(other_ids)[0] is False
    assert decide_pairing(other_ids, paired=False)[0] is False
    with pytest.raises(IgkdError, match="same run ids"):
        decide_pairing(other_ids, paired=True)
    # ... and summarize uses the matching test.
    assert summarize(paper_rows())["vs_baseline"][0]["test"] == "Welch t-test"
    assert summarize(paper_rows(), paired=True)["vs_baseline"][0]["test"] == "paired t-test"
    assert summarize(paper_rows(), paired=False)["vs_baseline"][0]["test"] == "Welch t-test"
    assert summarize(paper_rows([f"b{i}" for i in range(10)]))["vs_baseline"][0]["test"] == "Welch t-test"


def test_paired_runs_are_matched_by_id_not_by_order():
    rows = paper_rows()
    shuffled = rows[:10] + rows[10:][::-1]
    assert summarize(shuffled, paired=True)["vs_baseline"][0]["t"] == pytest.approx(stats.ttest_rel(KD_IG, STUDENT).statistic)


def test_holm_on_a_known_example():
    # m = 4: sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04) = 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    assert holm([0.01, None]) == [pytest.approx(0.02), None]  # a missing p still counts in m


def test_holm_families_are_all_pairs_and_vs_baseline():
    rng = np.random.default_rng(0)
    rows = [(m, str(r), 90 + shift + rng.normal(0, 0.3)) for m, shift in (("A", 0), ("student", 0.2), ("C", 1)) for r in range(8)]
    summary = summarize(rows, baseline="STUDENT", paired=True)
    assert summary["baseline"] == "student"
    assert [m["method"] for m in summary["methods"]] == ["student", "A", "C"]
    assert [(c["a"], c["b"]) for c in summary["vs_baseline"]] == [("student", "A"), ("student", "C")]
    assert [(c["a"], c["b"]) for c in summary["all_pairs"]] == [("student", "A"), ("student", "C"), ("A", "C")]
    for family in ("vs_baseline", "all_pairs"):
        comparisons = summary[family]
        assert [c["p_holm"] for c in comparisons] == pytest.approx(holm([c["p"] for c in comparisons]))
        assert [c["wilcoxon"]["p_holm"] for c in comparisons] == pytest.approx(holm([c["wilcoxon"]["p"] for c in comparisons]))


def test_degenerate_comparisons_give_no_p_value_with_a_reason():
    rows = [("student", str(r), 90.0 + r) for r in range(4)] + [("same", str(r), 90.0 + r) for r in range(4)]
    rows += [("shifted", str(r), 90.5 + r) for r in range(4)]
    by_pair = {(c["a"], c["b"]): c for c in summarize(rows, paired=True)["all_pairs"]}
    same = by_pair["student", "same"]
    assert same["p"] is None and same["wilcoxon"]["p"] is None and "zero" in same["wilcoxon"]["reason"]
    shifted = by_pair["student", "shifted"]
    assert shifted["mean_difference"] == pytest.approx(0.5) and shifted["p"] is None and "zero variance" in shifted["reason"]
    assert shifted["wilcoxon"]["p"] is None and "at least 6" in shifted["wilcoxon"]["reason"]
    json.dumps(summarize(rows, paired=True), allow_nan=False)  # no NaN or inf anywhere


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("KD", "1", 91.0), ("KD", "2", 92.0)], "baseline method 'student' not found"),
        ([("student", "1", 91.0), ("student", "2", 92.0), ("KD", "1", 91.0)], "has 1 run"),
        ([("student", "1", 91.0), ("student", "1", 92.0)], "more than one accuracy for run '1'"),
        ([("student", "1", float("nan")), ("student", "2", 92.0)], "not a finite number"),
        ([], "no accuracies"),
    ],
)
def test_bad_rows_raise_igkd_error(rows, message):
    with pytest.raises(IgkdError, match=message):
        summarize(rows)


def write_paper_csv(path):
    lines = ["note,Method,run,accuracy"] + [f"{i},{m},{r},{a}" for i, (m, r, a) in enumerate(paper_rows())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_reader_ignores_extra_columns(tmp_path):
    rows = read_accuracy_csv(write_paper_csv(tmp_path / "acc.csv"))
    assert rows == [(m, r, a) for m, r, a in paper_rows()]


def test_cli_json_end_to_end(tmp_path):
    csv_path = write_paper_csv(tmp_path / "acc.csv")
    welch = stats.ttest_ind(KD_IG, STUDENT, equal_var=False)
    for flag, expected in (([], welch), (["--unpaired"], welch), (["--paired"], stats.ttest_rel(KD_IG, STUDENT))):
        result = CliRunner().invoke(app, ["stats", "--csv", str(csv_path), "--baseline", "STUDENT", "--json", *flag])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["paired"] is (flag == ["--paired"])
        assert summary["vs_baseline"][0]["p"] == pytest.approx(expected.pvalue, abs=1e-6)


def test_cli_tables(tmp_path):
    result = CliRunner().invoke(app, ["stats", "--csv", str(write_paper_csv(tmp_path / "acc.csv"))])
    assert result.exit_code == 0, result.output
    assert "KD_IG" in result.stdout and "paired" in result.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("", "empty"),
        ("method,accuracy\nstudent,91\n", "missing column(s) run"),
        ("method,run,accuracy\nstudent,1,91.0\nstudent,2,ninety\n", "line 3: accuracy 'ninety' is not a number"),
        ("method,run,accuracy\n", "no data rows"),
        ("method,run,accuracy\nstudent,1,91\nstudent,2,92\nKD,1,93\n", "'KD' has 1 run"),
        ("method,run,accuracy\nKD,1,91\nKD,2,92\n", "baseline method 'student' not found"),
    ],
)
def test_cli_bad_csv_is_one_error_line(tmp_path, capsys, content, message):
    path = tmp_path / "acc.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--csv", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
