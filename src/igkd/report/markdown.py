"""report.md from the report dict (the same dict is report.json, so every number shown is there)."""

from __future__ import annotations


def num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pm(part: dict, digits: int = 2) -> str:
    """``mean ± sd`` (just the mean for one run, ``-`` for none)."""
    if not part or part["mean"] is None:
        return "-"
    return num(part["mean"], digits) + ("" if part["sd"] is None else f" ± {num(part['sd'], digits)}")


def pvalue(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def table(header: list[str], rows: list[list], left: int = 1) -> str:
    """A markdown table; the first ``left`` columns are left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def caption(prov: dict, student: str | None = None, seeds: list | None = None) -> str:
    """The line under a table: which study, data, device(s) and seeds its numbers come from."""
    data = prov["dataset"]
    seeds = ", ".join(map(str, prov["seeds"] if seeds is None else seeds)) or "-"
    parts = [
        f"study `{prov['path']}` ({prov['kind']}" + (f", student {student}" if student else "") + ")",
        f"data {data['name']} `{(data['fingerprint'] or '')[:12]}`",
        f"device {', '.join(prov['devices']) or 'unknown'}",
        f"seeds {seeds}",
    ]
    return f"_{'; '.join(parts)}._"


def figure(fig: dict | None, alt: str) -> str:
    if not fig:
        return ""
    if "skipped" in fig:
        return f"_{alt}: not drawn — {fig['skipped']}_"
    return f"![{alt}]({fig['file']})\n\n_{fig['caption']}_"


def provenance(prov: dict) -> str:
    data, teacher, ig, runs = prov["dataset"], prov["teacher"], prov["attributions"], prov["runs"]
    training = "; ".join(
        f"{m}: " + ", ".join(f"{k} {v}" for k, v in c.items() if v is not None) for m, c in prov["training"].items()
    )
    rows = [
        ["folder", f"`{prov['path']}`"],
        ["kind", prov["kind"] + (f", subset {prov['subset']:g}" if prov.get("subset") not in (None, 1, 1.0) else "")],
        ["pairing", f"{'paired' if prov['paired'] else 'unpaired'}: {prov['pairing']}" if prov["paired"] is not None else "-"],
        ["dataset", f"{data['name']}, fingerprint `{data['fingerprint']}`, {data['train']} train / {data['test']} test images, {data['classes']} classes"
         + (f", source {', '.join(data['source'])}" if data["source"] else "")],
        ["teacher", f"`{teacher['path']}` (sha256 `{teacher['sha256'][:12]}`, {teacher['params']:,} params)" if teacher else "none"],
        ["IG cache", f"`{ig['path']}` ({ig.get('n_steps')} steps, manifest `{(ig.get('manifest_sha256') or '')[:12]}`)" if ig else "none"],
        ["training", training or "-"],
        ["cohorts", cohorts(prov.get("cohort_sizes") or [])],
        ["devices", ", ".join(prov["devices"]) or "-"],
        ["torch", ", ".join(prov["torch"]) or "-"],
        ["igkd / git", f"{', '.join(prov['igkd']) or '-'} / {', '.join(prov['git_sha']) or '-'}"],
        ["seeds", ", ".join(map(str, prov["seeds"])) or "-"],
    ]
    if prov["subset_seeds"] is not None:
        rows.append(["subset seeds", ", ".join(map(str, prov["subset_seeds"]))])
    rows.append(["runs", f"{runs['planned']} planned, {runs['finished']} finished"])
    text = table(["", ""], rows, left=2)
    if runs["unfinished"]:
        listed = ", ".join(f"{r['run_id']} ({r['status']})" for r in runs["unfinished"])
        text += f"\n\n> **Note:** {runs['finished']} of {runs['planned']} planned runs are finished; not in any table yet: {listed}."
    return text


def cohorts(sizes: list[int]) -> str:
    """The cohort sizes the runs trained in, and what that means for their numbers (docs/training.md, "Cohorts")."""
    if all(size == 1 for size in sizes):
        return "none: every run trained alone"
    return (
        f"runs trained in cohorts of {', '.join(map(str, sizes))} (one fused network each): equal to their run-by-run "
        "training in exact arithmetic; in float32 the same seeds, subsets and pairing, not the same weights"
    )


def accuracy(acc: dict, cap: str) -> str:
    level = "95% CI"
    rows = [[m["method"], f"{m['n']}/{m['planned']}", pm(m), num(m["delta_vs_baseline"]) if m["method"] != acc["baseline"] else "-",
             num(m["min"]), num(m["max"]), "-" if m["ci_low"] is None else f"{num(m['ci_low'])} .. {num(m['ci_high'])}"]
            for m in acc["methods"]]
    if acc["teacher_test_accuracy"]:
        values = acc["teacher_test_accuracy"]
        rows.insert(0, ["teacher", "-", num(values[0]) if len(values) == 1 else f"{num(values[0])} .. {num(values[-1])}", "-", "-", "-", "-"])
    head = f"Test accuracy (%), student {acc['student']}" + (f" ({acc['params']:,} params, CF {acc['cf']:g})" if acc["params"] else "")
    text = f"**{head}**\n\n" + table(["method", "n finished/planned", "mean ± sd", f"Δ mean vs {acc['baseline']}", "min", "max", level], rows)
    text += "\n\n" + cap[:-2] + f"; {acc['source']}._"
    values = {(m["method"], r["run"]): r for m in acc["methods"] for r in m["runs"]}
    per_run = []
    for run in sorted({run for _, run in values}):
        seeds = sorted({r["seed"] for (_, k), r in values.items() if k == run})  # one seed per run unless drawn per method
        label = f"{run} (seed {seeds[0]})" if len(seeds) == 1 else f"{run} (seeds {', '.join(map(str, seeds))})"
        per_run.append([label] + [num(values[(m["method"], run)]["test_accuracy"]) if (m["method"], run) in values else "-" for m in acc["methods"]])
    if per_run:
        text += "\n\nPer-run test accuracy (%):\n\n" + table(["run"] + [m["method"] for m in acc["methods"]], per_run)
    return text


def statistics(stats: dict, cap: str, what: str = "test accuracy") -> str:
    if "skipped" in stats:
        return f"_Tests on {what}: not computed — {stats['skipped']}_"
    if not stats["vs_baseline"]:
        return f"_Tests on {what}: one method only, nothing to compare._"
    paired, level = stats["paired"], f"{100 * stats['confidence']:g}% CI"
    effect = "d_z" if paired else "Hedges g"
    more = paired and len(stats["all_pairs"]) > len(stats["vs_baseline"])  # with two methods the one pair is the baseline's
    families = [("vs_baseline", f"vs {stats['baseline']}")] + ([("all_pairs", "all pairs")] if more else [])
    text = [f"**Tests on {what}**: {stats['test']}; effect size {stats['effect_size']}; difference {stats['difference']}."]
    for family, title in families:
        rows = []
        for c in stats[family]:
            row = [f"{c['b']} − {c['a']}", str(c.get("n_pairs", f"{c['n_a']}/{c['n_b']}")), num(c["mean_difference"]),
                   f"{num(c['ci_low'])} .. {num(c['ci_high'])}", num(c["t"]), num(c["df"], 1), pvalue(c["p"]), pvalue(c["p_holm"]),
                   num(c["effect_size"]["value"])]
            if paired:
                row += [pvalue(c["wilcoxon"]["p"]), pvalue(c["wilcoxon"]["p_holm"])]
            rows.append(row)
        header = ["comparison", "n", "mean diff", level, "t", "df", "p", "p Holm", effect] + (["Wilcoxon p", "Wilcoxon p Holm"] if paired else [])
        text.append(f"{title} (Holm over {stats['holm_families'][family]}):\n\n" + table(header, rows))
        text.append(verdict(stats[family]))
    notes = sorted(({c.get("reason") for c in stats["all_pairs"]} | {(c.get("wilcoxon") or {}).get("reason") for c in stats["all_pairs"]}) - {None})
    text += [f"_Note: some tests gave no p-value: {n}._" for n in notes]
    dropped = stats.get("study", {}).get("runs_dropped") or stats.get("runs_dropped")
    if dropped:
        text.append(f"_Left out of the paired tests (their partner runs are not finished): {', '.join(dropped)}._")
    text.append(cap[:-2] + f"; {stats['pairing']}._")
    return "\n\n".join(text)


def verdict(comparisons: list[dict], level: float = 0.05) -> str:
    """The table's conclusion in words: which differences are significant after Holm at ``level``, which are not."""
    significant = [f"{c['b']} − {c['a']} ({num(c['mean_difference'])})" for c in comparisons if c.get("p_holm") is not None and c["p_holm"] < level]
    not_significant = [f"{c['b']} − {c['a']}" for c in comparisons if c.get("p_holm") is None or c["p_holm"] >= level]
    parts = []
    if significant:
        parts.append(f"significant at {level:g} after Holm's correction: {', '.join(significant)}")
    if not_significant:
        parts.append(f"**not significant** at {level:g} after Holm's correction (no difference shown): {', '.join(not_significant)}")
    return "In words: " + "; ".join(parts) + "."


def agreement(agr: dict | None, cap: str) -> str:
    if not agr:
        return ""
    rows = [[m["method"], m["spearman"]["n"], pm(m["spearman"], 3), pm(m["top_overlap"], 3)] for m in agr["methods"]]
    text = f"**IG agreement with the teacher ({agr['n_images']} test images, {agr['n_steps']} steps)**\n\n"
    text += table(["method", "runs", "Spearman ρ (mean ± sd over runs)", f"top-{100 * (agr['top_fraction'] or 0.1):g}% overlap"], rows)
    return text + "\n\n" + cap[:-2] + "; each run's mean over images from its agreement.json._"


def robustness(rob: dict | None, cap: str) -> str:
    if not rob:
        return ""
    header = ["method", "runs", "clean"] + rob["corruptions"] + ["mean corruption acc", "relative drop (fraction of clean)"]
    rows = [[m["method"], m["clean"]["n"], pm(m["clean"])] + [pm(m["corruptions"][c]) for c in rob["corruptions"]]
            + [pm(m["mean_corruption_accuracy"]), pm(m["relative_drop"], 3)] for m in rob["methods"]]
    text = f"**Accuracy under corruptions (%), mean over severities, mean ± sd over runs (spec {', '.join(rob['spec'])}, seed {', '.join(rob['seed'])})**\n\n"
    text += table(header, rows) + "\n\n" + cap[:-2] + "; from each run's robustness.json._"
    return text + "\n\n" + statistics(rob["statistics"], cap, "mean corruption accuracy")


def latency(lat: dict | None) -> str:
    if not lat:
        return ""
    rows = [[m["model"], f"{m['params']:,}" if m["params"] else "-", num(m["cf"])]
            + [f"{num(c['median_ms'])} ({num(c['speedup_vs_teacher'])}×)" if (c := m["latency"].get(col)) else "-" for col in lat["columns"]]
            for m in lat["models"]]
    machine, settings = lat["machine"], lat["settings"]
    cap = (f"_From `{lat['path']}` ({lat['created']}): {machine.get('gpu') or machine.get('cpu_model', '?')}, device {settings.get('device')}, "
           f"{settings.get('threads')} threads, torch {machine.get('torch')}, git {lat['git_sha']}; median over {settings.get('repeats')} timed calls per batch._")
    text = "## Latency\n\nMedian latency per batch (ms) and speedup vs the teacher:\n\n" + table(["model", "params", "CF"] + lat["columns"], rows) + "\n\n" + cap
    return text + "\n\n" + figure(lat.get("figure"), "latency vs CF")


def evaluation(ev: dict | None) -> str:
    if not ev:
        return ""
    results = ev["results"]
    names = [f"{r['model'] or '?'} ({i})" for i, r in enumerate(results, 1)]
    summary = [[name, f"`{r['checkpoint']}`", r["dataset"], f"`{(r['fingerprint'] or '')[:12]}`", r["split"], r["n"], num(r["accuracy"]),
                r.get("device") or "not recorded"] for name, r in zip(names, results)]
    per_class = [[c] + [num(r["per_class"].get(c)) for r in results] for c in ev["classes"]]
    return ("## Accuracy on other data (igkd evaluate)\n\n" + table(["model", "checkpoint", "dataset", "fingerprint", "split", "images", "accuracy %", "device"], summary, left=5)
            + "\n\n_From " + ", ".join(f"`{r['file']}`" for r in results) + "._\n\nPer-class accuracy (%):\n\n" + table(["class"] + names, per_class))


def study(section: dict, index: int) -> str:
    prov = section["provenance"]
    parts = [f"## Study {index}: {prov['kind']} `{prov['path']}`", provenance(prov)]
    if section.get("tune") is not None or prov["kind"] == "tune":
        best = (section.get("tune") or {}).get("best")
        parts.append("_A tune study chooses hyper-parameters on validation accuracy; no accuracy table or tests (its trials differ in T, alpha, p, gamma)._"
                     + (f" Best trial {best['number']}: {best['params']}, validation {num(best['val_accuracy'])}%." if best else ""))
    for part in section["students"]:
        student = part["accuracy"]["student"]
        cap = caption(prov, student, sorted({r["seed"] for m in part["accuracy"]["methods"] for r in m["runs"]}))
        parts.append(f"### Student {student}")
        parts += [accuracy(part["accuracy"], cap), statistics(part["statistics"], cap), agreement(part["agreement"], cap), robustness(part["robustness"], cap)]
    figs = section["figures"]
    parts.append("### Figures")
    for key, alt in (("accuracy_vs_cf", "accuracy vs CF"), ("curves", "training curves"), ("ig_grid", "IG maps (Figure 3)"), ("attention", "attention maps")):
        parts.append(figure(figs.get(key), alt))
    return "\n\n".join(p for p in parts if p)


def render(report: dict) -> str:
    env = report["environment"]
    parts = [
        "# igkd report",
        f"Written {report['created']} by igkd {env['igkd']} (git {env['git_sha'] or '-'}, torch {env['torch']}, {env['device_name']}): `{env['command']}`. "
        "All numbers are in report.json next to this file; accuracies are in %; sd uses ddof=1.",
    ]
    parts += [study(section, i) for i, section in enumerate(report["studies"], 1)]
    parts += [latency(report["latency"]), evaluation(report["evaluation"])]
    return "\n\n".join(p for p in parts if p) + "\n"
