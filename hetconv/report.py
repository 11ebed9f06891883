"""Published numbers, the small table writers and the command-line helpers shared by the scripts."""

import argparse
import csv
import shlex
import sys
from pathlib import Path

from hetconv.provenance import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "results"
PUBLISHED_CSV = RESULTS_DIR / "published.csv"


def load_published(path: Path = PUBLISHED_CSV) -> dict[int, dict[str, float]]:
    """part -> published figures (see results/README.md for their sources)."""
    with open(path, newline="") as f:
        return {int(row["part"]): {k: float(v) for k, v in row.items() if k != "part"}
                for row in csv.DictReader(f)}


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_cell(value) -> str:
    """A value on one line, its pipes escaped: a line break (in a failed job's error, say) would end the table."""
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def typed_command(script: str, argv: list[str] | None) -> str:
    """The command that made a report, as typed (argv: the arguments main() got, or None for sys.argv's)."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def output_folder(text: str) -> Path:
    """argparse type of --out: a folder, made when the report is written. A file in its place (or above it), or a
    link to nothing, is refused now, not after the work that the report would hold."""
    path = Path(text)
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            raise argparse.ArgumentTypeError(f"{p} is a link to {p.readlink()}, which does not exist: make that "
                                             "folder, or name another --out")
        if p.exists() and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{p} is a file, not a folder")
    return path


def positive_int(text: str) -> int:
    """argparse type of a count such as --repeats: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)
