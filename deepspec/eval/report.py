"""Compare evaluated drafts: one table (tau per dataset, macro average, speedup) and a
``REPORT.md`` that embeds the plots.

    python -m deepspec.eval.report --run dspark@1.0=out/eval/dspark_t1 --run dflash@1.0=... \
        --out out/report [--title "..."] [--note "..."]

``--run LABEL@TEMPERATURE=DIR`` names an ``eval.py --output-dir``; runs are grouped by
temperature, one table per temperature.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import defaultdict
from typing import Any

from deepspec.cli import run_main
from deepspec.errors import DataError
from deepspec.utils.io import atomic_write_json, atomic_write_text


def load_results(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "results.json")
    if not os.path.isfile(path):
        raise DataError(f"no results.json in {directory}; run eval.py with --output-dir {directory}")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def comparison_table(runs: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    """Rows = drafts; columns = tau per dataset, macro tau, macro speedup."""
    datasets: list[str] = []
    for results in runs.values():
        for d in results["datasets"]:
            if d["dataset"] not in datasets:
                datasets.append(d["dataset"])
    head = ["draft"] + [f"tau {d}" for d in datasets] + ["tau macro", "speedup macro"]
    rows = [head]
    for label, results in runs.items():
        by = {d["dataset"]: d for d in results["datasets"]}
        macro = results["macro_average"]
        rows.append(
            [label]
            + [_fmt(by.get(d, {}).get("acceptance_length")) for d in datasets]
            + [_fmt(macro.get("acceptance_length")), _fmt(macro.get("speedup")) + "x"]
        )
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "---|" * len(head))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def margins(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Relative macro-tau gains between the drafts of one temperature (first label wins)."""
    taus = {label: r["macro_average"].get("acceptance_length") for label, r in runs.items()}
    labels = [label for label, tau in taus.items() if tau]
    out = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            out.append(f"{a} vs {b}: {100 * (taus[a] / taus[b] - 1):+.1f}% macro tau")
    return out


def write_report(runs: dict[tuple[str, float], str], out_dir: str, *, title: str, note: str = "") -> str:
    """Copy results and plots of every run into ``out_dir`` and write ``REPORT.md``."""
    os.makedirs(out_dir, exist_ok=True)
    by_temp: dict[float, dict[str, dict[str, Any]]] = defaultdict(dict)
    sections = [f"# {title}", ""]
    if note:
        sections += [note, ""]
    for (label, temp), directory in runs.items():
        results = load_results(directory)
        by_temp[temp][label] = results
        dest = os.path.join(out_dir, f"{label}_t{temp:g}")
        os.makedirs(dest, exist_ok=True)
        atomic_write_json(os.path.join(dest, "results.json"), results)
        for name in os.listdir(directory):
            if name.endswith(".png"):
                shutil.copyfile(os.path.join(directory, name), os.path.join(dest, name))
    for temp in sorted(by_temp, reverse=True):
        sections += [f"## Temperature {temp:g}", "", comparison_table(by_temp[temp], markdown=True), ""]
        sections += [f"- {m}" for m in margins(by_temp[temp])] + [""]
    sections += ["## Per-position conditional acceptance", ""]
    for label, temp in runs:
        folder = f"{label}_t{temp:g}"
        sections.append(f"**{label}, temperature {temp:g}**\n")
        sections.append(f"![{folder}]({folder}/conditional_acceptance.png)\n")
        if os.path.isfile(os.path.join(out_dir, folder, "threshold_sweep.png")):
            sections.append(f"![{folder} threshold sweep]({folder}/threshold_sweep.png)\n")
    path = os.path.join(out_dir, "REPORT.md")
    atomic_write_text(path, "\n".join(sections) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="append", required=True, metavar="LABEL@TEMPERATURE=DIR")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="deepspec comparison")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    runs: dict[tuple[str, float], str] = {}
    for spec in args.run:
        try:
            name, directory = spec.split("=", 1)
            label, temp = name.rsplit("@", 1)
            runs[(label, float(temp))] = directory
        except ValueError:
            raise DataError(f"--run {spec!r}: expected LABEL@TEMPERATURE=DIR") from None
    path = write_report(runs, args.out, title=args.title, note=args.note)
    by_temp: dict[float, dict[str, Any]] = defaultdict(dict)
    for (label, temp), directory in runs.items():
        by_temp[temp][label] = load_results(directory)
    for temp in sorted(by_temp, reverse=True):
        print(f"\ntemperature {temp:g}")
        print(comparison_table(by_temp[temp]))
        for m in margins(by_temp[temp]):
            print(f"  {m}")
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
