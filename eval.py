"""Evaluate a trained checkpoint on the CIFAR-10 test set.

    python eval.py checkpoint=outputs/.../model.pt [data.root=...] [output=eval.json]
    (a run folder names its model.pt; checkpoints/last.pt evaluates an unfinished run; data.root defaults
    to the folder the run trained on)

Prints how far the run had trained, test accuracy (%, two decimals, as in metrics.json) and loss,
FLOPs in both conventions, parameters and per-class accuracy, and a note when data.root is not where
the run trained or holds other test images than the run was tested on. The model, its preprocessing and
the evaluation batch size come from the checkpoint's config, so the run's final test_acc is reproduced
exactly on the same device type. The output file also records the commit, library versions and date.
"""

import json
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from hetconv.data import CLASSES, FOLDER, DatasetError, fingerprint_of_test, is_official, load_cifar10, top_label
from hetconv.flops import describe_flops, model_costs
from hetconv.layer import resolved_impl
from hetconv.provenance import count, device_name, git_commit, library_versions, now
from hetconv.runfiles import (check_writable, command_line_override, final_weights, last_checkpoint, load,
                              read_metrics, training_point, write_json)
from hetconv.settings import check_command_line, check_flags, ends_without_traceback
from hetconv.training import Preprocess, build_model, configure_backend, evaluate, select_device

# What eval.py reads from its command line; the model, its preprocessing and batch size are the checkpoint's.
SETTINGS = ("checkpoint", "device", "output", "data.root", "data.download")
# Keys of every report that eval.py writes: output= replaces a file holding them, and no other.
REPORT_KEYS = {"checkpoint", "test_acc", "evaluated"}


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict, DictConfig]:
    """The run's model on `device`, built as the run built it (its HetConv layers in the form the run's setting gives
    there), the checkpoint it came from and the run's config."""
    state = load(path)
    run_cfg = OmegaConf.create(state["config"])
    model = build_model(run_cfg, resolved_impl(run_cfg.trainer.hetconv, device), device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights do not fit the VGG-16 its own config describes (part="
                         f"{run_cfg.model.part}, width={run_cfg.model.width}): {error}") from error
    return model, state, run_cfg


def how_far_trained(state: dict) -> str:
    """How far the run had trained when these weights were saved."""
    epochs, epoch, step = state["config"]["trainer"]["epochs"], state["epoch"], state.get("step", 0)
    finished = epoch == epochs and not step
    return training_point(epoch, step, epochs) + ("" if finished else ": the run had not finished")


def checkpoint_path(setting: str) -> Path:
    """The checkpoint file `checkpoint=` names: a run folder names its final weights, model.pt."""
    path = Path(to_absolute_path(setting))
    if not path.is_dir():
        return path
    if last_checkpoint(path.parent).parent == path:  # a run's checkpoints/ folder: the run's
        path = path.parent
    if final_weights(path).exists():
        return final_weights(path)
    if last_checkpoint(path).exists():
        raise FileNotFoundError(f"{path} has no model.pt: its run has not finished. To evaluate the weights it "
                                f"has so far: {command_line_override('checkpoint', last_checkpoint(path))}")
    metrics = read_metrics(path)
    if metrics:  # a run that failed before its first checkpoint (on bad data, say), or is in its first epoch
        raise FileNotFoundError(f"{path} holds a run but no weights (model.pt, checkpoints/last.pt): its metrics.json "
                                f"says {metrics['status']}, {metrics['epochs_done']} epochs done"
                                + (f" ({metrics['reason']})" if metrics.get("reason") else ""))
    # Up to multirun/<date>/<time>/part=4,seed=0 from multirun: deeper, a folder (a home) would take long to search
    jobs = sorted(weights.parent for depth in (1, 2, 3) for weights in path.glob("*/" * depth + "model.pt"))
    if jobs:
        raise FileNotFoundError(f"{path} holds the folders of {count(len(jobs), 'finished run')}: name one, e.g. "
                                f"{command_line_override('checkpoint', jobs[0])}")
    return final_weights(path)  # missing: load() says what it expected


def data_root(setting: str | None, run_data: dict) -> Path:
    """data.root as given, else the folder the run recorded its data in, which must still hold the data: a run
    folder copied from another machine names that machine's folder."""
    if setting is not None:
        return Path(to_absolute_path(setting))
    root = Path(run_data["root"])
    if not (root / FOLDER).is_dir():
        raise DatasetError(f"the run trained on the data in {root}, and there is no {FOLDER}/ there now: say where "
                           f"CIFAR-10 is with data.root=...")
    return root


def is_eval_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_bytes())
    except (OSError, ValueError):  # a checkpoint is not text, a log not JSON
        return False
    return isinstance(report, dict) and REPORT_KEYS <= report.keys()


def output_file(setting: str | None) -> Path | None:
    """The file output= names, if any, checked now: evaluating can take minutes. It may replace an earlier report, but
    no other file: a checkpoint, model.pt or metrics.json named by mistake would be lost."""
    if not setting:
        return None
    output = Path(to_absolute_path(setting))
    if output.is_dir():
        raise ValueError(f"output={setting} is a folder: name the file to write the report to, e.g. "
                         f"{command_line_override('output', output / 'eval.json')}")
    if output.exists() and not is_eval_report(output):
        raise ValueError(f"output={setting} names an existing file that is not a report of eval.py (a checkpoint, a "
                         f"run's metrics.json, say), which writing the report would destroy: name a new file, e.g. "
                         f"{command_line_override('output', output.with_name('eval.json'))}")
    check_writable(output.parent)
    return output


def trained_on(state: dict) -> dict:
    """The data the run recorded: model.pt carries it, last.pt in its record."""
    return state["data"] if "data" in state else state["record"]["info"]["data"]


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        return evaluate_checkpoint(cfg)
    except Exception as error:
        if ends_without_traceback(error):
            raise SystemExit(f"error: {type(error).__name__}: {error}") from None
        raise


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ValueError("no checkpoint given: name a run folder, its model.pt or its checkpoints/last.pt with "
                         "checkpoint=...")
    check_flags(cfg, ("data.download",))
    path = checkpoint_path(cfg.checkpoint)
    output = output_file(cfg.output)
    device = select_device(cfg.device, key="device")
    configure_backend(device)
    model, state, run_cfg = load_model(path, device)
    run_data = trained_on(state)
    root = data_root(cfg.data.root, run_data)
    test = load_cifar10(root, cfg.data.download, splits=("test",))["test"]
    highest = top_label({"test": test})
    if highest >= run_cfg.model.num_classes:
        raise ValueError(f"{path} was trained for {run_cfg.model.num_classes} classes (its model.num_classes), but "
                         f"the test labels in {root} go up to {highest}: evaluate it on test data of its classes, "
                         f"with data.root=... (it trained on the data in {run_data['root']})")
    test_fingerprint = fingerprint_of_test(test)
    test = test.to(device)
    costs = model_costs(model)
    preprocess = Preprocess(run_cfg.data, run_cfg.trainer.channels_last, device)
    result = evaluate(model, test, preprocess, run_cfg.trainer.eval_batch_size, run_cfg.trainer.amp,
                      run_cfg.model.num_classes)
    report = {"checkpoint": str(path), "trained": how_far_trained(state), "part": run_cfg.model.part,
              "width": run_cfg.model.width, "data_root": str(root), "trained_on": run_data["root"],
              "test_fingerprint": test_fingerprint, "official_cifar10": is_official(root),
              "test_acc": result["acc"], "test_loss": round(result["loss"], 6), "images": len(test), **costs,
              "per_class_acc": dict(zip(CLASSES, result["per_class_acc"])), "device": device_name(device),
              "git_commit": git_commit(), "versions": library_versions(), "evaluated": now()}
    if output:  # before printing, which fails where the reader has gone (`| true`)
        write_json(output, report)
    try:
        print_report(report, run_data["test_fingerprint"], cfg.data.root)
        if output:
            print(f"wrote {cfg.output}")
        sys.stdout.flush()  # now: a pipe's buffer would be written at exit, where this could not answer for it
    except BrokenPipeError:  # the report's reader has gone; output= is written already
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's last flush fails again
        raise SystemExit(1) from None
    return report


def print_report(report: dict, tested_on: str, root_setting: str | None) -> None:
    """The report, with a note where the data is not the run's own: another folder (root_setting, data.root's
    value), or other test images than those the run was tested on (tested_on, their fingerprint)."""
    print(f"{report['checkpoint']}  (VGG-16, part={report['part']}, width={report['width']}, on {report['device']}), "
          f"weights {report['trained']}")
    if Path(report["trained_on"]).resolve() != Path(report["data_root"]).resolve():  # not the same folder, by any path
        print(f"note: the run trained on the data in {report['trained_on']}; this evaluates the data in "
              f"{report['data_root']} (data.root={root_setting})")
    if tested_on != report["test_fingerprint"]:
        print(f"note: these are not the test images the run was tested on (fingerprint {tested_on}; these: "
              f"{report['test_fingerprint']}), so this accuracy is not comparable with the run's")
    print(f"test accuracy {report['test_acc']:.2f}%   loss {report['test_loss']:.4f}   ({report['images']} images)")
    print(describe_flops(report))
    print(f"parameters {report['params'] / 1e6:.3f}M effective, {report['stored_params'] / 1e6:.3f}M stored")
    print("per-class accuracy: " + ", ".join(
        f"{name} {'-' if acc is None else f'{acc:.2f}%'}" for name, acc in report["per_class_acc"].items()))


if __name__ == "__main__":
    check_command_line(sys.argv[1:], list(SETTINGS), ["data"], "eval.py",
                       hint=f"It reads {', '.join(SETTINGS)}; the model and its preprocessing are the checkpoint's.",
                       bare="checkpoint")
    main()
