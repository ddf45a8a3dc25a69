"""Compare evaluated drafts: one table (tau per dataset, macro average, speedup) and a
``REPORT.md`` that embeds the plots.

    python -m deepspec.eval.report --run dspark@1.0=out/eval/dspark_t1 --run dflash@1.0=... \
        --out out/report [--title "..."] [--note "..."]

``--run LABEL@TEMPERATURE=DIR`` names an ``eval.py --output-dir``; runs are grouped by
temperature, one table per temperature.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
from collections import defaultdict
from typing import Any

from deepspec.cli import ArgumentParser, run_main
from deepspec.errors import ConfigError, DataError
from deepspec.eval.settings import check_output_dir
from deepspec.utils.io import atomic_open, atomic_write_json, atomic_write_text, read_json_object

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def load_results(directory: str) -> dict[str, Any]:
    """``<directory>/results.json`` of an ``eval.py --output-dir``, checked for the fields a
    report reads; a missing, torn or foreign file is one :class:`DataError` naming it."""
    if not os.path.isdir(directory):
        raise DataError(f"eval output directory {directory} does not exist; pass an eval.py --output-dir")
    path = os.path.join(directory, "results.json")
    if not os.path.isfile(path):
        raise DataError(f"no results.json in {directory}; run eval.py with --output-dir {directory}")
    redo = f"run eval.py with --output-dir {directory} again"
    results = read_json_object(path, redo)
    ok = (
        isinstance(results, dict)
        and isinstance(results.get("config"), dict)
        and isinstance(results.get("macro_average"), dict)
        and isinstance(results.get("datasets"), list)
        and all(isinstance(d, dict) and isinstance(d.get("dataset"), str) for d in results["datasets"])
    )
    if not ok:
        raise DataError(f"{path} is not an eval.py results file (config, datasets, macro_average); {redo}")
    return results


def parse_run(spec: str) -> tuple[str, float, str]:
    """``LABEL@TEMPERATURE=DIR`` → (label, temperature, directory)."""
    usage = f"--run {spec!r}: expected LABEL@TEMPERATURE=DIR, e.g. dspark@1.0=out/eval/dspark_t1.0"
    name, sep, directory = spec.partition("=")
    label, at, temp_text = name.rpartition("@")
    if not (sep and at and directory.strip()):
        raise ConfigError(usage)
    try:
        temp = float(temp_text)
    except ValueError:
        raise ConfigError(f"{usage} (temperature {temp_text!r} is not a number)") from None
    if not math.isfinite(temp) or temp < 0:
        raise ConfigError(f"--run {spec!r}: temperature must be a finite number >= 0, got {temp_text}")
    if not _LABEL.match(label):
        raise ConfigError(
            f"--run {spec!r}: label {label!r} must start with a letter or digit and hold only "
            "letters, digits, '.', '_', '+' or '-' (it names a folder of the report)"
        )
    return label, temp, directory


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
    """Copy results and plots of every run into ``out_dir`` and write ``REPORT.md``.

    Every run is read before anything is written, so a bad run leaves ``out_dir`` as it was."""
    loaded = {key: load_results(directory) for key, directory in runs.items()}
    os.makedirs(out_dir, exist_ok=True)
    by_temp: dict[float, dict[str, dict[str, Any]]] = defaultdict(dict)
    sections = [f"# {title}", ""]
    if note:
        sections += [note, ""]
    for (label, temp), directory in runs.items():
        results = loaded[(label, temp)]
        by_temp[temp][label] = results
        dest = os.path.join(out_dir, f"{label}_t{temp:g}")
        os.makedirs(dest, exist_ok=True)
        atomic_write_json(os.path.join(dest, "results.json"), results)
        for name in os.listdir(directory):
            if name.endswith(".png"):
                with (
                    open(os.path.join(directory, name), "rb") as src,
                    atomic_open(os.path.join(dest, name), "wb") as dst,
                ):
                    shutil.copyfileobj(src, dst)
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
    parser = ArgumentParser(
        prog="python -m deepspec.eval.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", action="append", required=True, metavar="LABEL@TEMPERATURE=DIR")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="deepspec comparison")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    runs: dict[tuple[str, float], str] = {}
    for spec in args.run:
        label, temp, directory = parse_run(spec)
        if (label, temp) in runs:
            raise ConfigError(f"--run {label}@{temp:g} is given twice; give each label and temperature once")
        runs[(label, temp)] = directory
    for directory in runs.values():
        load_results(directory)  # every run readable before the output is touched
    check_output_dir(args.out, "--out")
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
