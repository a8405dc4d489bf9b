"""What a person reads of an ablation: one seed's summary (the table, each claim and whether it holds, time and
memory: `summary`) and every seed's numbers and checks side by side (`seeds_table`, `out/seeds.md`)."""

from __future__ import annotations

import json
from pathlib import Path


def summary(result: dict) -> str:
    lines = [result["table_markdown"], "Claims of the paper (Table 4), checked on these numbers:"]
    for c in result["claims"]:
        mark = {True: "holds", False: "does NOT hold", None: "not measured"}[c["holds"]]
        vals = ", ".join("–" if v is None else f"{v:.3f}" for v in c["values"])
        lines.append(f"- {mark}: {c['claim']} ({vals}){_noise_note(c)}")
    mem = result["memory"]
    lines.append(f"seed {result['seed']}: {result['seconds']:.0f} s on {result['cpus']} CPUs; peak memory in use "
                 f"{mem['peak_gib']} GiB ({mem['peak_over_baseline_gib']} GiB over the {mem['baseline_gib']} GiB "
                 "before the run)")
    return "\n".join(lines)


def _noise_note(check: dict) -> str:
    """' (95% CI lo..hi, within noise)' for a check with an interval: whether its samples can tell at all."""
    if "ci95" not in check:
        return ""
    lo, hi = check["ci95"]
    return f" (95% CI {lo:.3f}..{hi:.3f}{', within noise' if check['within_noise'] else ''})"


def seeds_table(out: Path) -> str | None:
    """Every seed's numbers side by side (`out/seed-*/result.json`), with the spread (max - min) per cell: how much
    a metric moves with the seed. Written to `out/seeds.md`; None when fewer than two seeds have run."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("seed-*/result.json"))]
    if len(results) < 2:
        return None
    seeds = [r["seed"] for r in results]
    labels = list(results[0]["models"])
    suite_metrics = [m for m in results[0]["metrics"][labels[0]] if not m.endswith(("/samples", "judge_unscored"))
                     and m.count("/") == 3 and m.split("/")[-1] in ("wer", "bleu", "exact_match", "answer_loss",
                                                                    "content_gap")]
    lines = ["| model | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | spread |",
             "| --- | --- |" + " ---: |" * (len(seeds) + 1)]
    for label in labels:
        for metric in suite_metrics:
            vals = [r["metrics"].get(label, {}).get(metric) for r in results]
            if any(v is None for v in vals):
                continue
            cells = [f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" for v in vals]
            lines.append(f"| {label} | {metric.split('/', 2)[-1]} | " + " | ".join(cells) +
                         f" | {max(vals) - min(vals):.3f} |")
    claims = ["", "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " :---: |" * len(seeds)]
    for i, c in enumerate(results[0]["claims"]):
        marks = [{True: "holds", False: "no", None: "–"}[r["claims"][i]["holds"]] + _noise_note(r["claims"][i])
                 for r in results]
        claims.append(f"| {c['claim'].replace('|', '&#124;')} | " + " | ".join(marks) + " |")  # |gap| in a table
    text = "\n".join(lines + claims) + "\n"
    (out / "seeds.md").write_text(text)
    return text
