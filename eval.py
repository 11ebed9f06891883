"""Evaluate a trained checkpoint on the CIFAR-10 test set.

    python eval.py checkpoint=outputs/.../model.pt [data.root=data] [output=eval.json]
    (a run folder names its model.pt; checkpoints/last.pt evaluates an unfinished run)

Prints how far the run had trained, test accuracy (%, two decimals, as in metrics.json) and loss,
FLOPs in both conventions, parameters and per-class accuracy, and a note when data.root is not where
the run trained. The model, its preprocessing and the evaluation batch size come from the checkpoint's
config, so the run's final test_acc is reproduced exactly on the same device type.
"""

from pathlib import Path

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from hetconv.data import CLASSES, load_cifar10, memory_format
from hetconv.flops import model_costs
from hetconv.provenance import device_name
from hetconv.runfiles import hetconv_form, load, write_json
from hetconv.training import Preprocess, configure_backend, evaluate, select_device
from models import vgg16


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The run's model on the CPU, its HetConv layers in the form the run's setting gives on `device`, and the
    checkpoint it came from."""
    state = load(path)
    spec = state["config"]["model"]
    model = vgg16(spec["part"], spec["num_classes"], spec["width"], hetconv_form(state["config"], device))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights do not fit the VGG-16 its own config describes (part="
                         f"{spec['part']}, width={spec['width']}): {error}") from error
    return model, state


def training_point(state: dict) -> str:
    """How far the run had trained when these weights were saved."""
    epochs, epoch, step = state["config"]["trainer"]["epochs"], state["epoch"], state.get("step", 0)
    if step:
        return f"at epoch {epoch + 1} of {epochs}, step {step}: the run had not finished"
    return f"after epoch {epoch} of {epochs}" + ("" if epoch == epochs else ": the run had not finished")


def trained_on(state: dict) -> dict | None:
    """The data the run recorded (model.pt carries it; last.pt in its record); None for older files."""
    return state.get("data") or state.get("record", {}).get("info", {}).get("data")


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    path = Path(to_absolute_path(cfg.checkpoint))
    if path.is_dir():  # a run folder: its final weights
        path = path / "model.pt"
    device = select_device(cfg.device)
    model, state = load_model(path, device)
    run_cfg = OmegaConf.create(state["config"])
    configure_backend(device)
    data_root = Path(to_absolute_path(cfg.data.root))
    test = load_cifar10(data_root, cfg.data.download, splits=("test",))["test"].to(device)
    costs = model_costs(model)
    model = model.to(device, memory_format=memory_format(run_cfg.trainer.channels_last))
    preprocess = Preprocess(run_cfg.data, run_cfg.trainer.channels_last, device)
    result = evaluate(model, test, preprocess, run_cfg.trainer.eval_batch_size, run_cfg.trainer.amp,
                      run_cfg.model.num_classes)
    run_data = trained_on(state)
    report = {"checkpoint": str(path), "trained": training_point(state), "part": run_cfg.model.part,
              "width": run_cfg.model.width, "data_root": str(data_root), "trained_on": run_data and run_data["root"],
              "test_acc": result["acc"], "test_loss": round(result["loss"], 6), "images": len(test), **costs,
              "per_class_acc": dict(zip(CLASSES, result["per_class_acc"])), "device": device_name(device)}

    print(f"{path}  (VGG-16, part={report['part']}, width={report['width']}, on {report['device']}), weights "
          f"{report['trained']}")
    if run_data and Path(run_data["root"]) != data_root:
        print(f"note: the run trained on the data in {run_data['root']}; this evaluates the data in {data_root} "
              f"(data.root={cfg.data.root})")
    print(f"test accuracy {report['test_acc']:.2f}%   loss {report['test_loss']:.4f}   ({len(test)} images)")
    print(f"FLOPs {costs['flops'] / 1e6:.2f}M (paper convention), {costs['executed_flops'] / 1e6:.2f}M executed")
    print(f"parameters {costs['params'] / 1e6:.3f}M effective, {costs['stored_params'] / 1e6:.3f}M stored")
    print("per-class accuracy: " + ", ".join(
        f"{name} {'-' if acc is None else f'{acc:.2f}%'}" for name, acc in report["per_class_acc"].items()))
    if cfg.output:
        write_json(Path(to_absolute_path(cfg.output)), report)
        print(f"wrote {cfg.output}")
    return report


if __name__ == "__main__":
    main()
