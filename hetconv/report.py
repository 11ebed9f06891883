"""Published numbers, the small table writers and the command-line helpers shared by the scripts."""

import argparse
import csv
import io
import os
import re
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


def csv_text(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def without_date_and_commit(text: str) -> str:
    """A report's text but for when and at which commit it says it was made ("on <date>, commit <hash>," or
    "on <date> (commit <hash>)")."""
    return re.sub(r" on \S+,? \(?commit [^\s,)]+", "", text, count=1)


def already_written(files: dict[Path, str]) -> bool:
    """Whether every file of a report ({path: text}) holds its text already, but for its date and commit: a rerun that
    would change only those leaves the files, and the commit they name, as they are (rewritten, they would make a
    committed report's checkout dirty, and the next rerun would name a dirty commit)."""
    for path, text in files.items():
        try:
            with open(path, newline="") as f:  # newline="": a CSV's \r\n as written
                held = f.read()
        except OSError:  # not there (yet)
            return False
        if without_date_and_commit(held) != without_date_and_commit(text):
            return False
    return True


def write_report(files: dict[Path, str]) -> None:
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            f.write(text)


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
    """argparse type of a folder to write into (--out), made when the work is written. A file in its place (or above
    it), a link to nothing or a folder that cannot be written is refused now, not after the work."""
    path = Path(text)
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            raise argparse.ArgumentTypeError(f"{p} is a link to {p.readlink()}, which does not exist: make that "
                                             "folder, or name another")
        if p.exists() and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{p} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{existing} cannot be written to: name another folder, or make it writable")
    return path


def positive_int(text: str) -> int:
    """argparse type of a count such as --repeats: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)
