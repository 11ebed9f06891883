"""The paper's accuracy/FLOPs table, regenerated from sweep folders, beside the published numbers.

    python scripts/make_table.py SWEEP_DIR [SWEEP_DIR ...] [--out results]

Reads every job's metrics.json and .hydra/config.yaml under the sweep folders and writes table.md,
table.csv and acc_vs_flops.png. Jobs that failed, are unfinished or left no metrics are listed with
their status; parts of the paper that no job ran appear as "not run". Rows of a width other than 1
get no published figures: the paper trained full-width models only. Runs on anything but the
official CIFAR-10 files can only be written outside the repository's results/.
"""

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hetconv, whichever one a venv installed

from hetconv.data import CLASSES  # noqa: E402
from hetconv.flops import count_flops, count_params, truncate_millions  # noqa: E402
from hetconv.provenance import count, git_commit, now  # noqa: E402
from hetconv.report import (RESULTS_DIR, already_written, csv_text, load_published, markdown_table,  # noqa: E402
                            output_folder, typed_command, write_report)
from hetconv.runfiles import (held_by_a_process, is_sweep_folder, last_checkpoint, read_metrics,  # noqa: E402
                              recipe_differences)
from models import vgg16  # noqa: E402
from models.vgg import PAPER_PARTS  # noqa: E402

PAPER_CLASSES = len(CLASSES)  # the paper's VGG-16 classifies CIFAR-10's classes


@dataclass
class Job:
    path: Path
    config: dict
    metrics: dict | None

    @property
    def status(self) -> str:
        return self.metrics["status"] if self.metrics else "missing"

    def describe(self) -> str:
        """The job's status as the table shows it, with why when it did not finish."""
        if self.metrics is None and last_checkpoint(self.path).exists():
            return f"{self.path.name}: no metrics.json, but a checkpoint: relaunch the sweep to resume it"
        if self.metrics is None:
            return f"{self.path.name}: no metrics.json (never started, or killed before its first write)"
        m = self.metrics
        if m["status"] == "finished":
            return f"{self.path.name}: finished"
        if m["status"] == "running" and not held_by_a_process(self.path):
            return (f"{self.path.name}: stopped, {m['epochs_done']}/{m['epochs']} epochs done (no process holds its "
                    f"lock: killed?); to resume: {m['resume']}")
        return f"{self.path.name}: {m['status']}, {m['epochs_done']}/{m['epochs']} epochs done" + (
            f" ({m['reason']})" if m.get("reason") else "")


def hydras_config(job: Path):
    """The config Hydra wrote for a job, or None where that file is damaged (cut short, or not YAML)."""
    try:
        return OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"))
    except (yaml.YAMLError, OSError):  # OSError: YAML that is not a mapping or list
        return None


def find_jobs(sweep_dirs: list[Path]) -> list[Job]:
    """Every job folder under the sweep folders, once: each that holds a record (metrics.json; a job launched with
    hydra.output_subdir=null has no .hydra/), and each with Hydra's files for a job that wrote none yet
    (.hydra/config.yaml; not a sweep's own folder, where a refused single run leaves them). A job's config is the one
    metrics.json recorded, since Hydra rewrites .hydra/config.yaml whenever a command is launched on the folder."""
    paths = []
    for sweep in sweep_dirs:
        if not sweep.is_dir():
            raise SystemExit(f"error: {sweep} is not a folder; give the sweep folder(s) train.py -m wrote")
        made = [c.parent.parent for c in sweep.glob("**/.hydra/config.yaml") if not is_sweep_folder(c.parent.parent)]
        paths += sorted({job.resolve() for job in made + [m.parent for m in sweep.glob("**/metrics.json")]})
    jobs = []
    for path in dict.fromkeys(paths):
        try:
            metrics = read_metrics(path)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        config = metrics["config"] if metrics else hydras_config(path)
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise SystemExit(f"error: {path / '.hydra' / 'config.yaml'} holds no train.py config, and the job has no "
                             "metrics.json: relaunch its sweep, which writes both again, or move the folder away")
        jobs.append(Job(path, config, metrics))
    if not jobs:
        raise SystemExit(f"error: no jobs (folders with metrics.json or .hydra/config.yaml) under "
                         f"{', '.join(map(str, sweep_dirs))}")
    return jobs


def check_one_recipe(jobs: list[Job]) -> None:
    """A row pools seeds, so every job must share the recipe; only part, width and seed may vary."""
    for job in jobs[1:]:
        differences = recipe_differences(jobs[0].config, job.config)
        if differences:
            raise SystemExit(f"error: {jobs[0].path} and {job.path} ran different recipes ({'; '.join(differences)}); "
                             "make a table of each recipe's jobs separately: give its sweep folders, or, where two "
                             "recipes share a sweep folder, its job folders. A sweep with other settings belongs in "
                             "a folder of its own: hydra.sweep.dir=..., make reproduce SWEEP=... or make demo DEMO=...")


def check_one_dataset(jobs: list[Job]) -> None:
    """A row pools seeds, so every job must have trained on the same images; data.root may differ between them (it
    is a RESUMABLE_CHANGES key), the data under it may not."""
    trained = [job for job in jobs if job.metrics and "fingerprint" in job.metrics.get("data", {})]
    for job in trained[1:]:
        first, other = trained[0].metrics["data"], job.metrics["data"]
        if other["fingerprint"] != first["fingerprint"]:
            raise SystemExit(f"error: {trained[0].path} and {job.path} trained on different data ({first['root']}, "
                             f"fingerprint {first['fingerprint']}; {other['root']}, fingerprint "
                             f"{other['fingerprint']}); make a table of each dataset's jobs separately: give their "
                             "sweep or job folders")


def check_each_job_once(jobs: list[Job]) -> None:
    """A row's n counts seeds: two folders of the same (part, width, seed), a copied sweep say, would count twice."""
    seen: dict[tuple, Job] = {}
    for job in jobs:
        key = (job.config["model"]["part"], job.config["model"]["width"], job.config["seed"])
        if key in seen:
            untrained = [twin.path for twin in (seen[key], job) if twin.metrics is None]
            why = (f"{untrained[0]} holds no metrics.json: the sweep was launched again with its overrides written "
                   "otherwise (a setting at its default value, say), which names a new folder, where train.py refused "
                   "to train the job again. Remove that folder" if untrained else "Is one a copy of the other?")
            raise SystemExit(f"error: {seen[key].path} and {job.path} are the same job (part={key[0]}, "
                             f"width={key[1]}, seed={key[2]}); give each job's folder once. {why}")
        seen[key] = job


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std, rounded as metrics.json rounds; no std from a single seed."""
    if not values:
        return None, None
    std = round(statistics.stdev(values), 2) if len(values) > 1 else None
    return round(statistics.mean(values), 2), std


def paper_costs(part: int, width: float, num_classes: int) -> tuple[float | None, float | None]:
    """(paper FLOPs, effective params) in millions, counted on the model; None when it cannot be built."""
    try:
        model = vgg16(part, num_classes, width)
    except ValueError:
        return None, None
    return truncate_millions(count_flops(model, "paper")), round(count_params(model)[0] / 1e6, 3)


def counted_otherwise(finished: list[dict], flops_m: float | None, params_m: float | None) -> list[str]:
    """The costs that finished jobs recorded where they are not the table's: counted by the code that trained them,
    which counted otherwise than this one."""
    recorded = {(truncate_millions(m["flops"]), round(m["params"] / 1e6, 3)) for m in finished if "flops" in m}
    return [f"its jobs recorded {flops:.2f}M FLOPs and {params:.3f}M params, counted by the code that trained them; "
            f"this table gives this code's count" for flops, params in sorted(recorded - {(flops_m, params_m)})]


def published_figures(part: int, width: float, num_classes: int, published: dict) -> dict:
    """The paper's figures to set beside a row; none for a width-scaled model or another classifier, which are not
    the paper's."""
    return published.get(part, {}) if width == 1 and num_classes == PAPER_CLASSES else {}


def row_order(group: tuple) -> tuple:
    """(part, width) in order; a value that is not a number (a failed job's typo, model.part=l6) goes last."""
    return tuple((0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value)) for value in group)


def table_rows(jobs: list[Job], published: dict, num_classes: int) -> list[dict]:
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.config["model"]["part"], job.config["model"]["width"]), []).append(job)
    widths = sorted({width for _, width in groups}, key=lambda width: row_order((width,)))
    sweep_width = 1.0 if 1 in widths or not widths else widths[0]  # the paper's width, unless no job ran at it
    for part in PAPER_PARTS:  # every published part gets a row, run or not
        groups.setdefault((part, sweep_width), [])
    rows = []
    for (part, width), group in sorted(groups.items(), key=lambda item: row_order(item[0])):
        finished = [j.metrics for j in group if j.status == "finished"]
        final, final_std = mean_std([m["test_acc"] for m in finished])
        best, best_std = mean_std([m["best_test_acc"] for m in finished])
        flops_m, params_m = paper_costs(part, width, num_classes)
        paper = published_figures(part, width, num_classes, published)
        if not group:  # a part of the paper that no job ran
            status = "not run" if flops_m is not None else f"not run: P={part} does not split width {width}'s layers"
        else:
            status = "; ".join(([f"{len(finished)} finished"] if finished else [])
                               + [j.describe() for j in group if j.status != "finished"]
                               + counted_otherwise(finished, flops_m, params_m))
        rows.append({
            "part": part, "width": width, "flops_m": flops_m, "published_flops_m": paper.get("flops_m"),
            "params_m": params_m, "n": len(finished), "test_acc": final, "test_acc_std": final_std,
            "best_test_acc": best, "best_test_acc_std": best_std, "published_test_acc": paper.get("test_acc"),
            "reimpl_best_test_acc": paper.get("reimpl_best_test_acc"),
            "diff": None if final is None or "test_acc" not in paper else round(final - paper["test_acc"], 2),
            "status": status,
        })
    return rows


def fmt(value, std=None, n=None, digits=2) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    if std is not None and n and n > 1:
        text += f" ± {std:.{digits}f} (n={n})"
    return text


def millions(value: float | None, digits: int = 2) -> str:
    return f"{fmt(value, digits=digits)}M" if value else "-"


def augmentation(data_cfg: dict) -> str:
    crop = f"random crop (pad {data_cfg['crop_padding']})" if data_cfg["crop_padding"] else "no crop"
    return crop + (" + flip" if data_cfg["flip"] else ", no flip")


def computed_as(metrics: dict) -> str:
    """How a job computed. A sweep may mix HetConv forms, compile modes and precisions (RESUMABLE_CHANGES): they
    compute the same model, rounded differently."""
    return (f"HetConv {metrics['hetconv']}, {metrics['torch_compile'] or 'eager'}, "
            f"{metrics.get('precision', 'precision unrecorded')}")  # runs before a971463 did not record it


def provenance(jobs: list[Job]) -> dict:
    configs = [j.config for j in jobs]
    metrics = [j.metrics for j in jobs if j.metrics]
    every_launch = [launch for m in metrics for launch in m["launches"]]
    first = configs[0]
    optim, schedule, trainer, data_cfg = first["optim"], first["schedule"], first["trainer"], first["data"]
    return {
        "recipe": (f"SGD lr {optim['lr']}, momentum {optim['momentum']}{' (Nesterov)' if optim['nesterov'] else ''}, "
                   f"weight decay {optim['weight_decay']}, batch {trainer['batch_size']}; lr x{schedule['gamma']} at "
                   f"epochs {schedule['milestones']} of {schedule['reference_epochs']}, scaled to the run's epochs; "
                   f"{augmentation(data_cfg)}; {'mean/std' if data_cfg['normalize'] else 'no'} normalisation"),
        "num_classes": first["model"]["num_classes"],  # the recipe's, which every job shares
        "epochs": sorted({c["trainer"]["epochs"] for c in configs}),
        "seeds": sorted({c["seed"] for c in configs}),
        "devices": sorted({launch["device"] for launch in every_launch if launch["device"]}),
        "computed": sorted({computed_as(m) for m in metrics if m["status"] == "finished"}),
        "not_finished": sum(j.status != "finished" for j in jobs),
        "commits": sorted({launch["git_commit"] for launch in every_launch}),
        "torch": sorted({launch["versions"]["torch"] for launch in every_launch}),
        "not_cifar10": [str(j.path) for j in jobs
                        if j.metrics and "data" in j.metrics and not j.metrics["data"]["official_cifar10"]],
        "run_dates": sorted({m["started"][:10] for m in metrics}),
    }


def render_markdown(rows: list[dict], info: dict, command: str) -> str:
    header = ["P", "width", "FLOPs (ours)", "FLOPs (paper)", "params", "final-epoch acc %", "best-epoch acc %*",
              "re-impl best-epoch acc %*", "paper acc %", "diff (final - paper)", "jobs"]
    body = [[r["part"], r["width"], millions(r["flops_m"]), millions(r["published_flops_m"]),
             millions(r["params_m"], digits=3), fmt(r["test_acc"], r["test_acc_std"], r["n"]),
             fmt(r["best_test_acc"], r["best_test_acc_std"], r["n"]), fmt(r["reimpl_best_test_acc"], digits=1),
             fmt(r["published_test_acc"]), "-" if r["diff"] is None else f"{r['diff']:+.2f}", r["status"]]
            for r in rows]
    warning = "" if not info["not_cifar10"] else (
        "\n**Not CIFAR-10**: some or all jobs ran on other data (e.g. the generated demo set); these accuracies "
        "are not comparable to the paper's.\n")
    return (
        "# HetConv VGG-16 on CIFAR-10: accuracy and FLOPs, ours beside the paper's\n"
        + warning +
        f"\nMade by `{command}` on {now()} (commit "
        f"{git_commit()}) from {count(sum(r['n'] for r in rows), 'finished job')}"
        + (f" ({info['not_finished']} more did not finish: see the jobs column)" if info["not_finished"] else "")
        + ".\n\n"
        f"- Recipe: {info['recipe']}.\n"
        f"- Epochs: {', '.join(map(str, info['epochs']))}; seeds: {', '.join(map(str, info['seeds']))}; "
        f"runs started {', '.join(info['run_dates']) or '-'}.\n"
        f"- Devices: {'; '.join(info['devices']) or '-'}. Computed as: {'; '.join(info['computed']) or '-'}. Code: "
        f"{', '.join(info['commits']) or '-'}; torch {', '.join(info['torch']) or '-'}.\n\n"
        + markdown_table(header, body) +
        "\nFinal-epoch accuracy is the test accuracy after the last epoch, mean ± sample std over seeds. "
        "*Best-epoch accuracy is the highest test accuracy over all epochs: it is selected on the test set, "
        "as the public re-implementation did (its figures beside ours, from results/published.csv), and so is "
        "optimistic. "
        + ("Rows from one seed (n=1) have no spread: run-to-run noise on CIFAR-10 at this accuracy is about 0.15-0.3 "
           "points, so one seed per P cannot separate parts whose accuracies lie that close (more seeds: "
           "make reproduce ARGS=\"seed=0,1,2\"). " if any(r["n"] == 1 for r in rows) else "") +
        "FLOPs are in the paper's convention (results/flops.md); params are effective parameters. "
        "Paper accuracy: Singh et al., CVPR 2019, Table for VGG-16 on CIFAR-10."
        + (f" No row has paper figures: the paper trained {PAPER_CLASSES}-class models, these jobs "
           f"{info['num_classes']}." if info["num_classes"] != PAPER_CLASSES else
           " Rows of width != 1 have no paper figures: the paper trained full-width models only."
           if any(r["width"] != 1 for r in rows) else "") + "\n"
    )


def plot(rows: list[dict], path: Path, official: bool) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ours = [r for r in rows if r["test_acc"] is not None and r["flops_m"]]
    paper = [r for r in rows if r["published_test_acc"] is not None and r["published_flops_m"]]
    for width in sorted({r["width"] for r in ours}, reverse=True):  # one curve per width: P moves along it
        curve = [r for r in ours if r["width"] == width]
        errors = [math.nan if r["test_acc_std"] is None else r["test_acc_std"] for r in curve]  # one seed: no bar
        ax.errorbar([r["flops_m"] for r in curve], [r["test_acc"] for r in curve], yerr=errors, fmt="o-", capsize=4,
                    label=f"ours{'' if width == 1 else f', width {width}'} (final epoch, mean ± std)")
    if paper:  # no legend entry for a curve that width-scaled rows leave empty
        ax.plot([r["published_flops_m"] for r in paper], [r["published_test_acc"] for r in paper], "s--",
                label="HetConv paper")
    for r in ours:
        ax.annotate(f"P{r['part']}", (r["flops_m"], r["test_acc"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.15)  # room for the labels of the outermost points, which the frame would clip
    ax.set_xlabel("FLOPs (millions, paper convention)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("VGG-16 + HetConv on CIFAR-10" if official else "VGG-16 + HetConv on generated data (NOT CIFAR-10)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no curve where no job finished and no row is the paper's model
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path,
                        help="sweep folders written by train.py -m, or job folders in them")
    parser.add_argument("--out", type=output_folder, default=RESULTS_DIR,
                        help="folder for table.md, table.csv, acc_vs_flops.png")
    args = parser.parse_args(argv)
    command = typed_command("scripts/make_table.py", argv)
    jobs = find_jobs(args.sweeps)
    check_one_recipe(jobs)
    check_one_dataset(jobs)
    check_each_job_once(jobs)
    info = provenance(jobs)
    if args.out.resolve().is_relative_to(RESULTS_DIR.resolve()):
        if info["not_cifar10"]:
            raise SystemExit(f"error: {', '.join(info['not_cifar10'])} did not train on the official CIFAR-10 "
                             f"files; {RESULTS_DIR} holds real results only. Write the table elsewhere: --out <folder>")
        if not any(j.status == "finished" for j in jobs):
            raise SystemExit(f"error: no job under {', '.join(map(str, args.sweeps))} has finished, so there is no "
                             f"result for {RESULTS_DIR}; see the jobs' train.log, or write the table elsewhere "
                             "to list them: --out <folder>")
    rows = table_rows(jobs, load_published(), info["num_classes"])
    text = render_markdown(rows, info, command)  # before writing: the commit it names is not dirty with our files
    report = {args.out / "table.csv": csv_text(rows), args.out / "table.md": text}
    figure = args.out / "acc_vs_flops.png"  # drawn from the rows alone
    if figure.is_file() and already_written(report):
        print((args.out / "table.md").read_text())
        print(f"{args.out / 'table.md'}, table.csv and acc_vs_flops.png already held this table: left as they are, "
              "with the commit that made them", file=sys.stderr)
        return rows
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, figure, official=not info["not_cifar10"])  # first: a table on disk vouches for the figure beside it
    write_report(report)
    print(text)
    print(f"wrote {args.out / 'table.md'}, table.csv and acc_vs_flops.png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
