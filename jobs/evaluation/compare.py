"""The paper-style comparison table of evaluated runs: models as rows, metrics as columns, the best in bold; a bar
chart per metric; both logged to a new MLflow run (tagged `vtb.kind=comparison`)."""

from __future__ import annotations

from pathlib import Path

LOWER_IS_BETTER = ("wer", "judge_unscored", "answer_loss")  # every other metric: higher is better


def lower_is_better(metric: str) -> bool:
    return any(metric.split("/")[-1].startswith(p) for p in LOWER_IS_BETTER)


def comparison_table(rows: list[tuple[str, dict[str, float]]], metrics: list[str]) -> str:
    """Markdown: one row per model, one column per metric, the best value of each column in bold."""
    best = {}
    for m in metrics:
        vals = [r[m] for _, r in rows if m in r]
        if vals:
            best[m] = min(vals) if lower_is_better(m) else max(vals)
    short = [m.split("/", 2)[-1] if m.startswith("eval/") else m for m in metrics]
    heads = [f"{s} {'↓' if lower_is_better(m) else '↑'}" for s, m in zip(short, metrics)]
    lines = ["| model | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(metrics)]
    for name, r in rows:
        cells = []
        for m in metrics:
            if m not in r:
                cells.append("–")
                continue
            text = f"{r[m]:.3f}" if abs(r[m]) < 10 else f"{r[m]:.1f}"
            cells.append(f"**{text}**" if len(rows) > 1 and r[m] == best[m] else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[tuple[str, dict[str, float]]], metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    names = [n for n, _ in rows]
    for ax, m in zip(axes[0], metrics):
        values = [r.get(m, 0.0) for _, r in rows]
        ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        if min(values) >= 0:
            ax.set_ylim(bottom=0, top=max(max(values) * 1.1, 1e-3))
        ax.set_title(m.split("/", 2)[-1] + (" (lower better)" if lower_is_better(m) else ""), fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_runs(tracking_uri: str, runs: list, out: Path, *, suite: str | None = None,
                 metrics: list[str] | None = None, names: list[str] | None = None,
                 tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Table + chart of the evaluation metrics of `runs` (MLflow Run objects) written to `out` and logged as a
    new run (tagged `vtb.kind=comparison`) in the first run's experiment. Returns (markdown, comparison run id).
    Raises ValueError when no run has evaluation metrics."""
    from tracking.client import client_for

    prefix = f"eval/{suite}/" if suite else "eval/"
    rows = [((names[i] if names else None) or r.info.run_name or r.info.run_id[:8],
             {k: v for k, v in r.data.metrics.items() if k.startswith(prefix)}) for i, r in enumerate(runs)]
    rows = [(n, m) for n, m in rows if m]
    if not rows:
        raise ValueError("none of these runs has evaluation metrics (run jobs.evaluate first)")
    metrics = metrics or sorted({k for _, m in rows for k in m if not k.endswith("/samples")})
    table = comparison_table(rows, metrics)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table)
    bar_chart(rows, metrics, out / "comparison.png")
    client = client_for(tracking_uri)
    tags = {"vtb.kind": "comparison", **(tags or {}), "vtb.compared_runs": ",".join(r.info.run_id for r in runs)}
    run_id = client.create_run(runs[0].info.experiment_id, run_name="comparison", tags=tags).info.run_id
    client.log_artifact(run_id, str(out / "comparison.md"))
    client.log_artifact(run_id, str(out / "comparison.png"))
    client.set_terminated(run_id)
    return table, run_id
