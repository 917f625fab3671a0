"""The arena's PNG plots: throughput and memory against length, prefill and decode latency against context,
cache bytes against context, quality per task, and the quality-against-speed Pareto scatter.

Each plot is written atomically; a plot with nothing to show is not written.
"""

from __future__ import annotations

from pathlib import Path

from effarch.arena.tables import Tables
from effarch.utils import atomic_path

MIB = 2**20
PLOTS = ("throughput.png", "memory.png", "decode.png", "cache.png", "quality.png", "pareto.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def _style(i: int) -> dict:
    """Distinct colour, marker and line style for the i-th architecture (more than ten stay apart)."""
    import matplotlib

    return {
        "color": matplotlib.colormaps["tab20"](i % 20),
        "marker": "osD^v<>ph*"[i % 10],
        "linestyle": ("-", "--", ":")[(i // 10) % 3],
    }


def _lines(ax, series: dict[str, dict[int, float]], scale: float = 1.0) -> bool:
    drawn = False
    for i, (arch, pts) in enumerate(series.items()):
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [pts[x] * scale for x in xs], label=arch, **_style(i))
            drawn = True
    return drawn


def _line_plot(path: Path, series, title: str, xlabel: str, ylabel: str, *, scale=1.0, logy=True) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not _lines(ax, series, scale):
        plt.close(fig)
        return False
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Labels not dominated in (x larger is better, y larger is better), sorted by x."""
    front = [
        a
        for a, (x, y) in points.items()
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for b, (x2, y2) in points.items() if b != a)
    ]
    return sorted(front, key=lambda a: points[a][0])


def speed_reference_length(t: Tables) -> int | None:
    """The longest training length every architecture finished (else the longest any finished)."""
    ok = t.ok_lengths(t.train, "tokens_per_s")
    sets = [set(v) for v in ok.values() if v]
    if not sets:
        return None
    common = set.intersection(*sets)
    return max(common) if common else max(set.union(*sets))


def pareto_points(t: Tables) -> tuple[dict[str, tuple[float, float]], int | None]:
    n = speed_reference_length(t)
    ok = t.ok_lengths(t.train, "tokens_per_s")
    points = {}
    for a in t.archs:
        acc = t.mean_accuracy(a)
        if n is not None and n in ok.get(a, {}) and acc is not None:
            points[a] = (ok[a][n], acc)
    return points, n


def write_plots(folder: Path, t: Tables) -> list[str]:
    """Write every plot that has data; returns the file names written."""
    folder = Path(folder)
    written = []
    if _line_plot(
        folder / "throughput.png",
        t.ok_lengths(t.train, "tokens_per_s"),
        "Training throughput (forward + backward + AdamW)",
        "sequence length",
        "tokens / s",
    ):
        written.append("throughput.png")
    if _line_plot(
        folder / "memory.png",
        t.ok_lengths(t.train, "peak_mem_bytes"),
        "Peak training memory",
        "sequence length",
        "MiB",
        scale=1 / MIB,
    ):
        written.append("memory.png")
    if _latency_plot(folder / "decode.png", t):
        written.append("decode.png")
    cache = {
        a: {int(n): b for n, b in r.get("cache_bytes", {}).items()}
        for a, r in t.cache.items()
        if r.get("status") == "ok"
    }
    if _line_plot(
        folder / "cache.png", cache, "Inference cache, batch 1", "context length (tokens)", "MiB", scale=1 / MIB
    ):
        written.append("cache.png")
    if _quality_plot(folder / "quality.png", t):
        written.append("quality.png")
    if _pareto_plot(folder / "pareto.png", t):
        written.append("pareto.png")
    for stale in set(PLOTS) - set(written):  # a plot from an earlier run whose data is gone
        (folder / stale).unlink(missing_ok=True)
    return written


def _latency_plot(path: Path, t: Tables) -> bool:
    plt = _plt()
    pre, dec = t.ok_lengths(t.infer, "prefill_s"), t.ok_lengths(t.infer, "decode_s_per_token")
    if not any(dec.values()):
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    _lines(ax1, pre, 1e3)
    _lines(ax2, dec, 1e3)
    for ax, title in ((ax1, "Prefill latency (batch 1)"), (ax2, "Decode latency per token (batch 1)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(title=title, xlabel="context length (tokens)", ylabel="ms")
        ax.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def _quality_plot(path: Path, t: Tables) -> bool:
    plt = _plt()
    synth = [task for task in t.tasks if task.kind != "lm"]
    lm = [task for task in t.tasks if task.kind == "lm"]
    acc = {a: [(t.best(a, task) or {}).get("accuracy") for task in synth] for a in t.archs}
    bpb = {a: [(t.best(a, task) or {}).get("bpb") for task in lm] for a in t.archs}
    if not any(v is not None for vals in list(acc.values()) + list(bpb.values()) for v in vals):
        return False
    n = max(1, len(t.archs))
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [max(1, len(synth)), max(1, len(lm))]}
    )
    for ax, tasks, values, ylabel in (
        (axes[0], synth, acc, "accuracy on answer tokens"),
        (axes[1], lm, bpb, "bits per byte (lower is better)"),
    ):
        width = 0.8 / n
        for i, a in enumerate(t.archs):
            ys = [v if v is not None else 0.0 for v in values[a]]
            ax.bar([j + i * width for j in range(len(tasks))], ys, width, label=a, color=_style(i)["color"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
        ax.set_xticklabels([task.name for task in tasks], rotation=15, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("Synthetic tasks (best learning rate)")
    axes[1].set_title("Language modelling")
    axes[0].legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def _pareto_plot(path: Path, t: Tables) -> bool:
    points, n = pareto_points(t)
    if not points:
        return False
    plt = _plt()
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 5))
    for a, (x, y) in points.items():
        ax.scatter([x], [y], s=40, color="C3" if a in front else "C0")
        ax.annotate(a, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if len(front) > 1:
        ax.plot([points[a][0] for a in front], [points[a][1] for a in front], "--", color="C3", alpha=0.6)
    ax.set_xscale("log")
    ax.set(
        title=f"Quality against training speed (T = {n}); red: Pareto front",
        xlabel=f"training tokens / s at T = {n}",
        ylabel="mean accuracy, synthetic tasks",
    )
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)
    return True
