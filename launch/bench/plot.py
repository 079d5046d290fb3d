"""The figure of `specpipe bench` (speedup.png): speedup per method, tokens/s against the draft
link's latency, and aggregate tokens/s against concurrent clients. Needs matplotlib (the `bench` extra)."""

from __future__ import annotations

from pathlib import Path


def plot(results: dict, path: Path, labels: dict[str, str]) -> None:
    """labels: method -> its name in the figure, in table order (report.LABELS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right, third) = plt.subplots(1, 3, figsize=(20, 5.5))
    plot_load(results["load"], third)
    temperatures = list(results["summary"])
    names = [name for name in labels if any(name in results["summary"][t] for t in temperatures)]
    width = 0.8 / max(len(temperatures), 1)
    for i, temperature in enumerate(temperatures):
        xs, heights, errors = [], [], [[], []]
        for j, name in enumerate(names):
            speedup = (results["summary"][temperature].get(name) or {}).get("speedup")
            if speedup:
                xs.append(j + (i - (len(temperatures) - 1) / 2) * width)
                heights.append(speedup["median"])
                errors[0].append(speedup["median"] - speedup["min"])
                errors[1].append(speedup["max"] - speedup["median"])
        left.bar(xs, heights, width, yerr=errors, capsize=3, label=f"T = {temperature}")
    left.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    left.set_xticks(
        range(len(names)),
        [labels[name].replace(" (baseline)", "") for name in names],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    left.set_ylabel("speedup over HF autoregressive, 1 thread (median, min–max)")
    left.set_title("Speedup per method")
    left.legend()
    latency = results["latency"]
    if "summary" in latency:
        columns = list(latency["summary"])
        for mode in latency["modes"]:
            points = [(float(ms), latency["summary"][ms].get(f"specpipe_{mode}")) for ms in columns]
            points = [(ms, s["tokens_per_second"]) for ms, s in points if s and s["tokens_per_second"]]
            if points:
                right.errorbar(
                    [ms for ms, _ in points],
                    [v["median"] for _, v in points],
                    marker="o",
                    capsize=3,
                    yerr=[[v["median"] - v["min"] for _, v in points], [v["max"] - v["median"] for _, v in points]],
                    label=mode,
                )
        right.set_xlabel("one-way draft link latency, ms" + (" (simulated)" if latency["simulated"] else ""))
        right.set_ylabel("tokens/s, greedy (median, min–max)")
        right.set_title("specpipe with the draft behind a link of given latency")
        right.legend()
    else:
        right.text(
            0.5,
            0.5,
            f"latency axis not run:\n{latency.get('skipped') or latency.get('error')}",
            ha="center",
            va="center",
            wrap=True,
            transform=right.transAxes,
        )
        right.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_load(load: dict, axes) -> None:
    """Aggregate tokens/s against clients, greedy: each mode and the HF static batch."""
    levels = [level for level in load.get("levels", []) if level["temperature"] == 0]
    if not levels:
        axes.text(0.5, 0.5, "concurrency axis not run", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    clients = [level["clients"] for level in levels]
    axes.plot(
        clients,
        [level["hf_best"]["tokens_per_second"] for level in levels],
        marker="s",
        linestyle="--",
        color="grey",
        label="HF generate, static batch",
    )
    for mode in load["modes"]:
        points = [(level["clients"], level["specpipe"][mode].get("tokens_per_second")) for level in levels]
        points = [(n, value) for n, value in points if value]
        if points:
            axes.plot([n for n, _ in points], [value for _, value in points], marker="o", label=mode)
    axes.set_xscale("log", base=2)
    axes.set_xticks(clients, [str(n) for n in clients])
    axes.set_xlabel("concurrent clients")
    axes.set_ylabel("aggregate tokens/s, greedy")
    axes.set_title("Throughput against clients")
    axes.legend()
