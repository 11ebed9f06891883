"""FLOPs and parameters of VGG-16 with HetConv for every part of the paper, beside the published column.

    python scripts/flops_table.py [--out results]      (also: make flops)

Writes flops.csv and flops.md. Counts are measured with fvcore on the real model (hetconv/flops.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hetconv, whichever one a venv installed

from hetconv.flops import model_costs, truncate_millions  # noqa: E402
from hetconv.provenance import git_commit, library_versions, now  # noqa: E402
from hetconv.report import (RESULTS_DIR, already_written, csv_text, load_published, markdown_table,  # noqa: E402
                            output_folder, typed_command, write_report)
from models import vgg16  # noqa: E402
from models.vgg import PAPER_PARTS  # noqa: E402


def flops_rows() -> list[dict]:
    published = load_published()
    rows = []
    for part in PAPER_PARTS:
        costs = model_costs(vgg16(part, impl="grouped"))
        flops_m = truncate_millions(costs["flops"])
        rows.append({
            "part": part,
            "flops_m": flops_m,
            "published_flops_m": published[part]["flops_m"],
            "flops_diff_m": round(flops_m - published[part]["flops_m"], 2),
            "executed_flops_m": truncate_millions(costs["executed_flops"]),
            "params_m": round(costs["params"] / 1e6, 3),
            "reference_params_m": published[part]["params_m"],
            "stored_params_m": round(costs["stored_params"] / 1e6, 3),
        })
    return rows


def render_markdown(rows: list[dict], command: str) -> str:
    versions = library_versions()
    header = ["P", "FLOPs (paper conv.)", "published", "diff", "FLOPs executed (grouped)", "params (effective)",
              "reference params", "params stored"]
    body = [[r["part"], f'{r["flops_m"]:.2f}M', f'{r["published_flops_m"]:.2f}M', f'{r["flops_diff_m"]:+.2f}M',
             f'{r["executed_flops_m"]:.2f}M', f'{r["params_m"]:.3f}M', f'{r["reference_params_m"]:.3f}M',
             f'{r["stored_params_m"]:.3f}M'] for r in rows]
    matches = sum(r["flops_diff_m"] == 0 for r in rows)
    return (
        "# VGG-16 with HetConv on CIFAR-10: FLOPs and parameters\n\n"
        f"Made by `{command}` (also `make flops`) on {now()}, commit {git_commit()}, "
        f"torch {versions['torch']}, fvcore {versions['fvcore']}. Counted with fvcore on one 32x32 image.\n\n"
        + markdown_table(header, body) +
        f"\n{matches}/{len(rows)} FLOPs values equal the published column to the printed digit.\n\n"
        "- *paper convention*: the published column's convention (multiply-adds + 1 per conv output; "
        "a HetConv layer at R(P) = 1/P + (1-1/P)/9 of the 3x3 conv it replaces; FC multiply-adds; "
        "BN/ReLU/pool free), truncated to 0.01M as the paper prints it.\n"
        "- *executed (grouped)*: what the grouped form (impl=\"grouped\", trainer.hetconv=auto's form on the CPU) "
        "runs as fvcore counts it: the grouped 3x3 conv, the full 1x1 conv with its masked block diagonal, BatchNorm "
        "(2 ops per element, eval mode); ReLU and pooling uncounted, as by fvcore's default handles. The dense form "
        "(auto's on CUDA) executes P=1's count at every P.\n"
        "- *params effective*: structurally non-zero weights (convs without bias, BN affine, FC with bias); "
        "*stored*: every parameter element, the masked 1x1 block diagonal included. The reference "
        "column is results/published.csv's (sources in results/README.md).\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=output_folder, default=RESULTS_DIR, help="folder for flops.csv and flops.md")
    out = parser.parse_args(argv).out
    rows = flops_rows()
    # Rendered before writing: the commit it names is not dirty with this run's own files.
    text = render_markdown(rows, typed_command("scripts/flops_table.py", argv))
    report = {out / "flops.csv": csv_text(rows), out / "flops.md": text}
    if already_written(report):
        print((out / "flops.md").read_text())
        print(f"{out / 'flops.csv'} and flops.md already held these counts: left as they are, with the commit that "
              "made them")
        return
    write_report(report)
    print(text)


if __name__ == "__main__":
    main()
