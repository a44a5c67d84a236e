"""Write docs/benchmarks.md from the result files under docs/benchmarks/ (one table of current figures).

    python scripts/benchmarks_table.py           # (re)write docs/benchmarks.md
    python scripts/benchmarks_table.py --check   # exit 1 if docs/benchmarks.md differs from what it would write

Every `*.json` file under docs/benchmarks/ holds either a list of rows or an object with a `rows` list (and,
optionally, an `environment` string for the introduction). A row has `id` (kebab-case, unique), `title`, `command`
(a string, or a list of strings for a measurement that takes several commands), `figures` (a string, or a dict of
name -> value), `date`, and optionally `note` (one line). Rows keep the order of the files (sorted by name) and of
the rows in each file. Edit the JSON, then run this script; the history of the figures is in git.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "benchmarks"
OUTPUT = REPO / "docs" / "benchmarks.md"
REQUIRED = ("id", "title", "command", "figures", "date")
KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def load_rows(folder: Path) -> tuple[list[dict], list[str]]:
    """All rows under `folder` in file order, and the `environment` strings found; raises ValueError on a bad row."""
    rows: list[dict] = []
    environments: list[str] = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            if data.get("environment"):
                environments.append(str(data["environment"]))
            data = data.get("rows", [])
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of rows or an object with a 'rows' list")
        for row in data:
            missing = [key for key in REQUIRED if key not in row]
            if missing:
                raise ValueError(f"{path}: row {row.get('id', '?')!r} lacks {', '.join(missing)}")
            if not KEBAB.match(str(row["id"])):
                raise ValueError(f"{path}: id {row['id']!r} is not kebab-case")
            rows.append(row)
    ids = [row["id"] for row in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate ids: {', '.join(duplicates)}")
    return rows, environments


def cell(text: str) -> str:
    """`text` safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def command_cell(command: str | list[str]) -> str:
    commands = [command] if isinstance(command, str) else list(command)
    return "<br>".join(f"`{cell(c)}`" for c in commands)


def figures_cell(figures: str | dict) -> str:
    if isinstance(figures, dict):
        return cell("; ".join(f"{key} {value}" for key, value in figures.items()))
    return cell(figures)


def render(rows: list[dict], environments: list[str]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by `python scripts/benchmarks_table.py` from docs/benchmarks/*.json: edit those, not this. -->",
        "",
        "The current accuracy, speed and memory figures of hf-finetune, one row per measurement. Each row's command "
        "reproduces its figures on this project's development machine, 2 cores of a Sapphire Rapids CPU with no GPU, "
        "in fp32 unless the row says otherwise; the history of the measurements is in git.",
    ]
    lines += [f"Software and data: {environment}." for environment in environments]
    lines += [
        "",
        "| measurement | figures | command | date |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {cell(row['title'])} | {figures_cell(row['figures'])} | {command_cell(row['command'])} "
            f"| {cell(row['date'])} |"
        )
    notes = [row for row in rows if row.get("note")]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- **{cell(row['title'])}**: {cell(row['note'])}" for row in notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is not up to date")
    args = parser.parse_args()
    try:
        rows, environments = load_rows(RESULTS)
    except (ValueError, json.JSONDecodeError) as error:
        print(f"benchmarks_table: {error}", file=sys.stderr)
        return 2
    text = render(rows, environments)
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), text.splitlines(keepends=True), str(OUTPUT), "regenerated"
        )
        sys.stdout.writelines(list(diff)[:40])
        print(
            f"{OUTPUT.relative_to(REPO)} is out of date: run python scripts/benchmarks_table.py",
            file=sys.stderr,
        )
        return 1
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
