"""Readable tables and PNG plots of benchmark summaries."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

PHASE_LABELS = {
    "cold": "cold (no kvshelf)",
    "first_pass": "first pass (miss + save)",
    "warm_memory": "warm, memory tier",
    "warm_disk": "warm, disk tier after restart",
}


def long_doc_qa_table(summary: dict) -> str:
    ttft = summary["ttft_s"]
    load = summary["load_path"]
    workload = summary["workload"]
    lines = [
        f"long-doc-qa: {workload['num_docs']} documents x {workload['doc_tokens']} tokens, "
        f"{workload['num_questions']} questions each, chunk {workload['chunk_size']}",
        "",
        f"{'phase':<32}{'median TTFT':>14}{'vs cold':>10}",
    ]
    for phase, label in PHASE_LABELS.items():
        lines.append(f"{label:<32}{ttft[phase] * 1000:>11.1f} ms{ttft['cold'] / ttft[phase]:>9.1f}x")
    lines += [
        "",
        f"load path, memory tier -> DynamicCache: {load['memory_load_s'] * 1000:.2f} ms "
        f"({load['memory_vs_memcpy']:.2f}x a memcpy of the same {load['bytes_per_doc'] / 2**20:.0f} MiB)",
        f"load path, disk tier -> DynamicCache:   {load['disk_load_s'] * 1000:.2f} ms "
        f"({load['disk_vs_file_read']:.2f}x a cold read of the same files)",
        f"greedy output with a cache hit equals output without kvshelf: {summary['outputs_match_cold']}",
    ]
    return "\n".join(lines)


def plot_long_doc_qa(summary: dict, path: Path) -> None:
    ttft = summary["ttft_s"]
    load = summary["load_path"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [PHASE_LABELS[phase] for phase in PHASE_LABELS]
    ttft_ms = [ttft[phase] * 1000 for phase in PHASE_LABELS]
    bars = left.barh(labels, ttft_ms, color=["grey", "silver", "tab:green", "tab:blue"])
    left.bar_label(bars, labels=[f"{ms:.0f} ms" for ms in ttft_ms], padding=3)
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
    left.set_xlim(right=max(ttft_ms) * 4)
    left.set_xlabel("median TTFT (ms, log scale)")
    left.invert_yaxis()
    left.set_title(f"long-doc-qa, {summary['workload']['doc_tokens']}-token documents")
    limits = {
        "memory tier load": load["memory_load_s"],
        "memcpy (limit)": load["memcpy_s"],
        "disk tier load": load["disk_load_s"],
        "cold file read (limit)": load["cold_file_read_s"],
    }
    limit_ms = [seconds * 1000 for seconds in limits.values()]
    limit_bars = right.bar(list(limits), limit_ms, color=["tab:green", "grey", "tab:blue", "grey"])
    right.bar_label(limit_bars, labels=[f"{ms:.1f}" for ms in limit_ms], padding=2)
    right.set_ylabel("ms per document prefix")
    right.set_title("load path vs physical limit")
    right.tick_params(axis="x", labelrotation=20)
    _save(figure, path)


def compare_table(summary: dict) -> str:
    lines = [
        "multi-round QA (MRQA): mean TTFT over all rounds, and over rounds after each user's first;",
        "long-doc QA: mean TTFT of each document's first (cold) and second (warm) question.",
        "",
        f"{'set-up':<24}{'MRQA TTFT':>11}{'speedup':>9}{'rounds>0':>10}{'speedup':>9}{'req/s':>8}{'x vLLM':>8}"
        f"{'doc cold':>10}{'doc warm':>10}{'warm/cold':>11}",
    ]
    for name, setup in summary["setups"].items():
        rounds, docs, ratio = setup["multi_round_qa"], setup["long_doc_qa"], summary["ratios"][name]
        lines.append(
            f"{name:<24}{rounds['mean_ttft_s'] * 1000:>8.0f} ms{ratio['mean_ttft_speedup']:>8.1f}x"
            f"{rounds['mean_ttft_after_first_round_s'] * 1000:>7.0f} ms"
            f"{ratio['mean_ttft_speedup_after_first_round']:>8.1f}x"
            f"{rounds['requests_per_s']:>8.2f}{ratio['throughput_ratio']:>7.1f}x"
            f"{docs['cold_ttft_s'] * 1000:>7.0f} ms{docs['warm_ttft_s'] * 1000:>7.0f} ms"
            f"{ratio['long_doc_warm_vs_cold']:>10.1f}x"
        )
    return "\n".join(lines)


def plot_compare(summary: dict, path: Path) -> None:
    names = list(summary["setups"])
    setups = [summary["setups"][name] for name in names]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("multi-round QA: mean TTFT (ms)", [s["multi_round_qa"]["mean_ttft_s"] * 1000 for s in setups]),
        ("multi-round QA: requests/s", [s["multi_round_qa"]["requests_per_s"] for s in setups]),
        ("long-doc QA: warm TTFT (ms)", [s["long_doc_qa"]["warm_ttft_s"] * 1000 for s in setups]),
    ]
    for axis, (title, values) in zip(axes, panels):
        bars = axis.bar(names, values, color=["tab:green" if "kvshelf" in name else "silver" for name in names])
        axis.bar_label(bars, labels=[f"{value:.2f}" if value < 10 else f"{value:.0f}" for value in values])
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=15)
    _save(figure, path)


def plot_ttft(labels: dict[str, str], ttft_s: dict[str, float], title: str, path: Path) -> None:
    """One horizontal bar of mean TTFT per phase, log scale."""
    ttft_ms = [ttft_s[phase] * 1000 for phase in labels]
    figure, axis = plt.subplots(figsize=(8, 3))
    bars = axis.barh(list(labels.values()), ttft_ms, color=["grey", "tab:green", "tab:blue", "silver"][: len(labels)])
    axis.bar_label(bars, labels=[f"{ms:.0f} ms" for ms in ttft_ms], padding=3)
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlim(right=max(ttft_ms) * 4)
    axis.set_xlabel("mean TTFT (ms, log scale)")
    axis.invert_yaxis()
    axis.set_title(title)
    _save(figure, path)


def plot_codecs(summary: dict, path: Path) -> None:
    points = {
        name: (result["bits_per_value"], (result["perplexity_vs_exact"] - 1) * 100)
        for name, result in summary["codecs"].items()
    }
    figure, axis = _labelled_scatter(points)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("stored bits per value (log scale)")
    axis.set_ylabel("perplexity vs exact KV (%)")
    axis.axhline(0, color="grey", linewidth=0.5)
    axis.set_title("KV codecs on the bundled model: size vs quality")
    _save(figure, path)


def plot_rag(summary: dict, path: Path) -> None:
    points = {setup: (row["mean_ttft_s"] * 1000, row["accuracy"] * 100) for setup, row in summary["setups"].items()}
    figure, axis = _labelled_scatter(points)
    axis.set_xlabel("mean TTFT (ms)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("RAG prompts on the bundled model: TTFT vs accuracy")
    _save(figure, path)


def plot_pd(summary: dict, path: Path) -> None:
    setups = summary["setups"]
    figure, (itl_axis, ttft_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    for offset, (key, label) in enumerate([("itl_p50_ms", "p50"), ("itl_p99_ms", "p99")]):
        itl_axis.bar([index + 0.4 * offset for index in range(len(setups))],
                     [row[key] for row in setups.values()], width=0.4, label=label)
    itl_axis.set_xticks([index + 0.2 for index in range(len(setups))], list(setups))
    itl_axis.set_ylabel("inter-token latency of decoding users (ms)")
    itl_axis.legend()
    ttft_axis.bar(list(setups), [row["long_ttft_mean_s"] for row in setups.values()])
    ttft_axis.set_ylabel("TTFT of the long prompts (s)")
    figure.suptitle("Long prompts arriving while users decode")
    _save(figure, path)


def _labelled_scatter(points: dict[str, tuple[float, float]]):
    """One labelled dot per entry of `points` (label -> (x, y))."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, (x, y) in points.items():
        axis.scatter(x, y)
        axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4))
    return figure, axis


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
