"""`python -m bench report`: bench/results/REPORT.md and PNG plots from the JSON results."""

from __future__ import annotations

import json
import time
from typing import Any

from bench.common import RESULTS_DIR

ORDER = ["baseline", "ingest-email", "actors-scale", "email-timeliness", "push-throughput",
         "push-latency", "wakeups"]


def _load() -> list[dict[str, Any]]:
    results = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and "scenario" in data:
            data["_file"] = path.name
            results.append(data)
    rank = {name: i for i, name in enumerate(ORDER)}
    results.sort(key=lambda r: (rank.get(r["scenario"], 99), r.get("backend", "")))
    return results


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _goals(result: dict[str, Any]) -> str:
    parts = []
    for g in result.get("goals", []):
        sign = "≥" if g["higher_is_better"] else "≤"
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "**missed**")
        parts.append(f"{g['name']}: {_num(g['value'])} ({sign} {_num(g['target'])}) {verdict}")
    return "<br>".join(parts) or "—"


def _plots(results: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(RESULTS_DIR / name, dpi=100)
        plt.close(fig)
        made.append(name)

    # Rates against the no-op baseline measured in the same run.
    rated = [r for r in results if r.get("baseline") and r["figures"].get("rate")]
    if rated:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['scenario']}\n{r['backend']}" for r in rated]
        xs = range(len(rated))
        ax.bar([x - 0.2 for x in xs], [r["baseline"]["rate"] for r in rated], 0.4,
               label="no-op baseline")
        ax.bar([x + 0.2 for x in xs], [r["figures"]["rate"] for r in rated], 0.4,
               label="herald")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("messages / s")
        ax.set_title("Throughput against the no-op Dramatiq baseline (same run)")
        ax.legend()
        save(fig, "throughput-vs-baseline.png")

    for r in results:
        series = r.get("series") or {}
        tag = f"{r['scenario']}-{r['backend']}"
        for key, title, xlabel in (("lateness_s", "email lateness (send − deadline)",
                                    "lateness, ms"),
                                   ("latency_s", "push latency (publish → fake APNs)",
                                    "latency, ms")):
            values = series.get(key)
            if values:
                fig, ax = plt.subplots(figsize=(7, 4))
                ax.hist([v * 1000 for v in values], bins=60)
                ax.set_xlabel(xlabel)
                ax.set_ylabel("count (sampled)")
                ax.set_title(f"{tag}: {title}")
                save(fig, f"{tag}-histogram.png")
        for key, xlabel, ylabel in (("deadline_vs_lateness", "deadline, s after insert",
                                     "lateness, ms"),
                                    ("time_vs_latency", "published, s into the run",
                                     "latency, ms")):
            points = series.get(key)
            if points:
                fig, ax = plt.subplots(figsize=(7, 4))
                ax.scatter([p[0] for p in points], [p[1] * 1000 for p in points], s=3)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.set_title(tag)
                save(fig, f"{tag}-over-time.png")
        if series.get("per_100ms"):
            points = series["per_100ms"]
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot([p[0] for p in points], [p[1] for p in points])
            ax.set_xlabel("s since the first accepted push")
            ax.set_ylabel("pushes / s (100 ms buckets)")
            ax.set_title(f"{tag}: accepted pushes")
            save(fig, f"{tag}-rate.png")
    return made


def render() -> int:
    results = _load()
    if not results:
        print(f"no results in {RESULTS_DIR}; run a scenario first (python -m bench list)")
        return 1
    plots = _plots(results)
    lines = [
        "# herald benchmark results",
        "",
        f"Rendered {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m bench report` from "
        f"{len(results)} result file(s) in `bench/results/`. Machine: "
        f"{_machine()}. Ratios compare with the no-op Dramatiq baseline measured in the "
        "same run on the same broker.",
        "",
        "| scenario | backend | figures | ratio to baseline | goals | reproduce |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        head = r.get("headline") or {}
        figures = ", ".join(f"{k}: {_num(v)}" for k, v in head.items() if k != "ratio")
        ratio = head.get("ratio")
        lines.append(
            f"| {r['scenario']} | {r['backend']} | {figures or '—'} | "
            f"{_num(ratio) if ratio is not None else '—'} | {_goals(r)} | "
            f"`{r.get('command', '')}` |"
        )
    lines += ["", "## Details", ""]
    for r in results:
        lines.append(f"### {r['scenario']} — {r['backend']}")
        lines.append("")
        lines.append(f"`{r.get('command', '')}` ({_num(r.get('duration_s'))} s, "
                     f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.get('started_at', 0)))})")
        lines.append("")
        lines.append("```")
        lines.append(json.dumps(r.get("figures"), indent=1, sort_keys=True, default=str))
        lines.append("```")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    (RESULTS_DIR / "REPORT.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS_DIR / 'REPORT.md'} and {len(plots)} plot(s)")
    return 0


def _machine() -> str:
    import os
    import platform

    return f"{os.cpu_count()} CPU(s), Python {platform.python_version()}"


if __name__ == "__main__":
    raise SystemExit(render())
