"""Latency against compression factor, one line per backend x precision x batch size."""

from __future__ import annotations

from pathlib import Path


def plot_latency_vs_cf(results: dict, path: str | Path) -> Path:
    """Median latency per image (p90 as the upper bar) vs CF, both axes log, PNG written atomically.

    ``results`` is what ``benchmark_latency`` returns (or its JSON file, loaded).
    """
    from igkd.report.figures import pyplot, save_png

    plt = pyplot()
    cf = {row["label"]: row["cf"] for row in results["models"]}
    series: dict[tuple, list[dict]] = {}
    for m in results["measurements"]:
        series.setdefault((m["backend"], m["precision"], m["batch_size"]), []).append(m)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (backend, precision, batch_size), points in sorted(series.items()):
        points = sorted(points, key=lambda m: cf[m["model"]])
        xs = [cf[m["model"]] for m in points]
        ys = [m["median_ms"] / batch_size for m in points]
        upper = [(m["p90_ms"] - m["median_ms"]) / batch_size for m in points]
        ax.errorbar(xs, ys, yerr=[[0] * len(ys), upper], marker="o", capsize=2, label=f"{backend} {precision}, batch {batch_size}")
    for label, x in cf.items():
        ax.annotate(label.split(" ")[0], (x, 1), xycoords=("data", "axes fraction"), xytext=(0, -10),
                    textcoords="offset points", ha="center", fontsize=7, color="grey")
    machine, settings = results.get("machine", {}), results.get("settings", {})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compression factor (teacher params / params)")
    ax.set_ylabel("median latency per image (ms)")
    ax.set_title(
        f"{machine.get('gpu') or machine.get('cpu_model', '')} ({settings.get('device', 'cpu')}, {settings.get('threads')} threads)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)
