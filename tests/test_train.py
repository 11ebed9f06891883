"""train.py and eval.py on generated data: learning, artefacts, resumption, and every bad input."""

import functools
import json
import logging
import os
import pickle
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.api_pb2 import STATUS_SUCCESS
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard import SummaryWriter

import eval as eval_module
import train as train_module
from conftest import REPO, SMALL, comparable, script, start
from hetconv import HetConv2d, training
from hetconv.data import DatasetError, Split, load_cifar10
from hetconv.flops import count_flops
from hetconv.runfiles import atomic_write, exclusive, last_checkpoint, read_metrics, write_json
from hetconv.settings import check_command_line, check_jobs, check_overrides, raised_here, train_config
from hetconv.training import Preprocess, compile_mode, evaluate, milestone_epochs, percent, select_device
from models import vgg16
from scripts.make_fake_cifar import make_fake_cifar

SCALARS = {"train/loss", "train/acc", "test/loss", "test/acc", "lr", "time/epoch_s", "time/images_per_s"}


def small_config(data_root, *overrides: str):
    """The users' train.yaml shrunk for the CPU (SMALL), on the data in data_root, with `overrides` after."""
    return train_config(*SMALL, f"data.root={data_root}", *overrides)


def copy_stopped_after_epoch_2(reference_run, run_dir, change=lambda state: None) -> None:
    """A copy of the reference run whose checkpoint is as if it stopped after epoch 2 of 3, then `change`d."""
    shutil.copytree(reference_run, run_dir)
    state = torch.load(last_checkpoint(run_dir), weights_only=True)
    state.update(epoch=2)
    change(state)
    torch.save(state, last_checkpoint(run_dir))


def test_a_small_run_learns_and_leaves_every_artefact(reference_run):
    metrics = read_metrics(reference_run)
    assert metrics["status"] == "finished" and metrics["reason"] is None
    assert metrics["epochs_done"] == metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert metrics["test_acc"] > 50  # ten classes: chance is 10%
    for key in ("part", "seed", "best_test_acc", "best_epoch", "train_loss", "flops", "executed_flops", "params",
                "wall_s", "device", "torch", "git_commit"):
        assert metrics[key] is not None, key
    assert metrics["part"] == 4 and metrics["seed"] == 0 and metrics["torch"] == torch.__version__
    assert (metrics["hetconv"], metrics["torch_compile"], metrics["precision"]) == ("grouped", None, "float32")
    [launch] = metrics["launches"]
    assert launch["versions"]["torch"] == torch.__version__ and launch["git_commit"] == metrics["git_commit"]
    assert launch["device"] == metrics["device"] and launch["data_root"] == metrics["data"]["root"]
    assert launch["overrides"] == [*SMALL, f"data.root={metrics['data']['root']}"]  # the command, as typed
    assert metrics["best_test_acc"] == max(h["test_acc"] for h in metrics["history"])
    # 6 milestones in 3 epochs, none at the end: the last epoch trains at the recipe's final lr, 0.1 * 0.2**6
    assert [h["lr"] for h in metrics["history"]] == pytest.approx([0.1, 0.004, 6.4e-6])

    events = EventAccumulator(str(reference_run)).Reload()
    assert SCALARS <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("test/acc")] == [1, 2, 3]
    assert events.Scalars("test/acc")[-1].value == pytest.approx(metrics["test_acc"])
    hparams = hparams_records(reference_run)["_hparams_/session_start_info"]
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
              for k, v in hparams.session_start_info.hparams.items()}
    assert values == pytest.approx(
        {"part": 4, "width": 0.25, "seed": 0, "epochs": 3, "flops_m": metrics["flops"] / 1e6,
         "params_m": metrics["params"] / 1e6, "data": "other", "hetconv": "grouped", "precision": "float32"})
    end = hparams_records(reference_run)["_hparams_/session_end_info"].session_end_info
    assert end.status == STATUS_SUCCESS
    assert len(list(reference_run.glob("events.out.tfevents.*"))) == 1 and not any(
        p.is_dir() for p in reference_run.iterdir() if p.name not in {".hydra", "checkpoints"})

    state = torch.load(last_checkpoint(reference_run), weights_only=False)
    assert {"model", "optimizer", "scheduler", "config", "epoch", "step", "record", "torch_rng", "data_rng",
            "device_type"} <= state.keys() and state["epoch"] == 3
    assert state["config"]["model"]["part"] == 4 and "hydra" not in state["config"]
    assert (reference_run / "model.pt").is_file() and (reference_run / ".hydra" / "config.yaml").is_file()


def test_eval_reproduces_the_final_test_accuracy(reference_run, fake_root, tmp_path):
    output = tmp_path / "eval.json"
    # The run folder names its model.pt, and the run's data folder is the default data.root.
    result = script("eval.py", f"checkpoint={reference_run}", "device=cpu", f"output={output}", cwd=tmp_path)
    report = json.loads(output.read_text())
    assert report["test_acc"] == read_metrics(reference_run)["test_acc"]
    assert f"test accuracy {report['test_acc']:.2f}%" in result.stdout
    flops = "FLOPs 6.98M (paper convention), 7.62M executed"  # truncated as the paper and tables: 7.627
    assert flops in result.stdout and flops in (reference_run / "train.log").read_text()
    assert "weights after epoch 3 of 3\n" in result.stdout and "note:" not in result.stdout
    assert report["trained_on"] == report["data_root"] == str(fake_root)
    assert report["checkpoint"] == str(reference_run / "model.pt")
    assert report["flops"] == read_metrics(reference_run)["flops"] and len(report["per_class_acc"]) == 10
    assert report["test_fingerprint"] == read_metrics(reference_run)["data"]["test_fingerprint"]
    assert report["official_cifar10"] is False and report["versions"]["torch"] == torch.__version__
    assert report["git_commit"] == read_metrics(reference_run)["git_commit"] and report["evaluated"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # evaluation leaves no other files
    assert eval_module.output_file(str(output)) == output  # a report may be replaced by the next one


def test_eval_whose_reader_has_gone_writes_its_output_and_ends_quietly(reference_run, tmp_path):
    reader, writer = os.pipe()
    os.close(reader)  # as `python eval.py ... | true`
    result = subprocess.run([sys.executable, str(REPO / "eval.py"), f"checkpoint={reference_run}",
                             f"output={tmp_path / 'eval.json'}"], cwd=tmp_path, stdout=writer, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",  # a warning is logged too
                                            "PYTHONUNBUFFERED": ""})  # stdout block-buffered, as into any pipe
    os.close(writer)
    # The log is on stderr: the report's broken stdout took nothing else with it.
    assert result.returncode == 1 and result.stderr.endswith("CUDA_VISIBLE_DEVICES is empty, so this job runs on the "
                                                              "CPU. With hydra/launcher=submitit_local, set "
                                                              "hydra.launcher.gpus_per_node to the host's GPUs.\n")
    assert json.loads((tmp_path / "eval.json").read_text())["test_acc"] == read_metrics(reference_run)["test_acc"]


def test_eval_preprocesses_as_the_checkpoints_config_says(reference_run, tmp_path):
    """eval.py's own data settings are only where the data is: normalisation is the run's."""
    state = torch.load(reference_run / "model.pt", weights_only=False)
    # As a run trained with data.normalize=true and statistics of its own records it; eval.yaml has CIFAR-10's.
    state["config"]["data"].update(normalize=True, mean=[0.3, 0.5, 0.7], std=[0.2, 0.4, 0.6])
    torch.save(state, tmp_path / "normalized.pt")
    script("eval.py", f"checkpoint={tmp_path / 'normalized.pt'}", f"output={tmp_path / 'eval.json'}", cwd=tmp_path)
    run_cfg = OmegaConf.create(state["config"])
    model = vgg16(run_cfg.model.part, run_cfg.model.num_classes, run_cfg.model.width)
    model.load_state_dict(state["model"])
    test = load_cifar10(state["data"]["root"], download_if_missing=False, splits=("test",))["test"]
    expected = evaluate(model, test, Preprocess(run_cfg.data, run_cfg.trainer.channels_last, torch.device("cpu")),
                        run_cfg.trainer.eval_batch_size, run_cfg.trainer.amp, run_cfg.model.num_classes)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["test_loss"] == round(expected["loss"], 6) != read_metrics(reference_run)["test_loss"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["sigkill", "sigterm", "ctrl-c"])
def test_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(sig, reference_run, fake_root, tmp_path):
    run_dir = tmp_path / "run"
    command = [*SMALL, f"data.root={fake_root}", f"hydra.run.dir={run_dir}"]
    process = start("train.py", *command)
    deadline = time.time() + 300
    while not (last_checkpoint(run_dir).exists() and read_metrics(run_dir)["epochs_done"] >= 1):  # in epoch 2
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(sig)
    output = process.communicate(timeout=120)[0]
    assert f"new run in {run_dir}" in output
    if sig != signal.SIGKILL:  # preemption or Ctrl-C: the state of the current step is saved
        assert process.returncode == -sig, output  # died of it after saving, as a shell loop over runs expects
        metrics = read_metrics(run_dir)
        assert metrics["status"] == "interrupted"
        assert metrics["reason"].endswith(f"; to resume: python train.py {' '.join(command)}")  # hydra.run.dir last
        state = torch.load(last_checkpoint(run_dir), weights_only=False)
        assert (state["epoch"], state["step"]) > (1, 0)  # saved where it stopped, past its epoch-1 checkpoint
    else:
        assert process.returncode == -signal.SIGKILL
    assert "_hparams_/session_end_info" not in hparams_records(run_dir)  # TensorBoard would keep a status set now

    resumed = script("train.py", *command)
    assert f"resuming {run_dir}" in resumed.stderr and f"{run_dir} finished: test accuracy" in resumed.stderr
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(reference_run))
    assert read_metrics(run_dir)["status"] == "finished"
    assert hparams_records(run_dir)["_hparams_/session_end_info"].session_end_info.status == STATUS_SUCCESS
    typed = [*SMALL, f"data.root={fake_root}"]  # each launch's overrides, as typed (Hydra keeps hydra.* apart)
    assert [launch["overrides"] for launch in read_metrics(run_dir)["launches"]] == [typed, typed]


@pytest.mark.parametrize("folder_option", ["-cp", "-cd"])
def test_the_resume_command_names_a_config_from_another_folder(folder_option, fake_root, tmp_path):
    """A run composed from a config of the user's own (-cp or -cd, and -cn) records a resume command that composes it
    again: Hydra keeps those options apart from the overrides."""
    configs = tmp_path / "configs"
    if folder_option == "-cp":  # the whole config folder, the user's own
        shutil.copytree(REPO / "configs", configs)
    else:  # a folder beside train.py's, which holds only the user's config: its groups are train.py's
        configs.mkdir()
    config = OmegaConf.load(REPO / "configs" / "train.yaml")
    config.seed = 7  # not train.yaml's: a resume composing train.yaml would be refused as other settings
    OmegaConf.save(config, configs / "mine.yaml")
    run_dir = tmp_path / "run"
    options = [folder_option, str(configs), "-cn", "mine"]
    overrides = [*SMALL, "trainer.epochs=1", f"data.root={fake_root}"]
    script("train.py", *options, *overrides, f"hydra.run.dir={run_dir}")
    resume = read_metrics(run_dir)["resume"]
    assert resume == shlex.join(["python", "train.py", *options, *overrides, f"hydra.run.dir={run_dir}"])
    [_, train_py, *arguments] = shlex.split(resume)
    result = script(train_py, *arguments, cwd=tmp_path)
    assert "already finished" in result.stderr and read_metrics(run_dir)["config"]["seed"] == 7


def test_a_finished_run_is_left_alone(reference_run, fake_root, tmp_path):
    run_dir = shutil.copytree(reference_run, tmp_path / "run")  # a launch rewrites .hydra/: not the shared run's
    before = {name: (run_dir / name).read_bytes() for name in ("model.pt", "metrics.json")}
    result = script("train.py", *SMALL, f"data.root={fake_root}", f"hydra.run.dir={run_dir}")
    assert "already finished" in result.stdout + result.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_a_run_killed_before_writing_its_final_weights_writes_them_when_relaunched(reference_run, fake_root,
                                                                                    tmp_path):
    run_dir = shutil.copytree(reference_run, tmp_path / "run")
    (run_dir / "model.pt").unlink()  # killed between the last checkpoint and the final save
    train_module.train(small_config(fake_root), run_dir)
    final = torch.load(run_dir / "model.pt", weights_only=False)
    last = torch.load(last_checkpoint(run_dir), weights_only=False)
    assert final["epoch"] == 3 and final["data"] == read_metrics(run_dir)["data"]
    assert final["model"].keys() == last["model"].keys()
    assert all(torch.equal(final["model"][k], last["model"][k]) for k in last["model"])
    assert read_metrics(run_dir)["status"] == "finished"


def test_resuming_with_other_settings_is_refused_and_changes_nothing(reference_run, fake_root, tmp_path):
    run_dir = shutil.copytree(reference_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (run_dir / "metrics.json", last_checkpoint(run_dir))}
    result = script("train.py", *SMALL, "trainer.epochs=5", f"data.root={fake_root}",
                    f"hydra.run.dir={run_dir}", check=False)
    assert result.returncode != 0
    assert "trainer.epochs: 3 -> 5" in result.stderr and "hydra.run.dir" in result.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics.json", last_checkpoint(run_dir))} == before


def test_the_seed_augmentation_and_optimizer_settings_reach_the_training_loop(fake_root, tmp_path, monkeypatch):
    """A run that dropped them would still learn, and its resumes would still match its uninterrupted twin."""
    seen, real_optimizer = {}, training.build_optimizer

    def optimizer(*args):
        seen["optimizer"] = real_optimizer(*args)
        return seen["optimizer"]

    def batches(split, batch_size, generator, crop_padding, flip):
        seen.update(model_seed=torch.initial_seed(), data_seed=generator.initial_seed(), crop=crop_padding, flip=flip)
        raise KeyError("stop before training")

    monkeypatch.setattr(training, "build_optimizer", optimizer)
    monkeypatch.setattr(training, "TrainBatches", batches)
    cfg = small_config(fake_root, "seed=7", "data.crop_padding=2", "data.flip=false", "optim.lr=0.03",
                       "optim.momentum=0.8", "optim.weight_decay=0.001", "optim.nesterov=true")
    with pytest.raises(KeyError, match="stop before training"):
        train_module.train(cfg, tmp_path)
    group = seen.pop("optimizer").param_groups[0]
    assert seen == {"model_seed": 7, "data_seed": 7, "crop": 2, "flip": False}
    assert {key: group[key] for key in ("lr", "momentum", "weight_decay", "nesterov")} == {
        "lr": 0.03, "momentum": 0.8, "weight_decay": 0.001, "nesterov": True}


@pytest.mark.parametrize("signal_after_diverging", [False, True, "in_that_step"],
                         ids=["at_the_epochs_end", "at_a_signal", "at_a_signal_in_the_step_that_diverged"])
def test_diverging_loss_fails_the_run_and_keeps_the_last_good_checkpoint(signal_after_diverging, fake_root, tmp_path,
                                                                         monkeypatch):
    cfg = small_config(fake_root)
    real_step, calls = train_module.train_step, []
    steps_per_epoch = 4000 // 100

    def step_that_diverges_in_epoch_2(model, *args):
        calls.append(1)
        if signal_after_diverging == "in_that_step" and len(calls) == steps_per_epoch + 5:
            result = real_step(model, *args)  # its loss is finite: the update after it is not
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            os.kill(os.getpid(), signal.SIGTERM)
            return result
        if len(calls) == steps_per_epoch + 5:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        if signal_after_diverging and len(calls) == steps_per_epoch + 10:  # its state is not saved over epoch 1's
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(model, *args)

    monkeypatch.setattr(train_module, "train_step", step_that_diverges_in_epoch_2)
    with pytest.raises(FloatingPointError, match="in epoch 2: training diverged"):
        train_module.train(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert metrics["status"] == "failed" and "diverged" in metrics["reason"] and metrics["epochs_done"] == 1
    state = torch.load(last_checkpoint(tmp_path), weights_only=False)
    assert state["epoch"] == 1 and len(state["record"]["history"]) == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert "_hparams_/session_end_info" not in hparams_records(tmp_path)  # no status: it did not finish


def test_a_run_diverging_after_a_resume_mid_epoch_names_the_mid_epoch_state_it_keeps(fake_root, tmp_path, monkeypatch):
    cfg = small_config(fake_root)
    real_step, calls = train_module.train_step, []

    def step_then_signal_then_diverge(model, *args):
        calls.append(1)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGTERM)  # saved at epoch 1, step 10
        if len(calls) == 15:  # in the resumed launch's epoch 1
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real_step(model, *args)

    monkeypatch.setattr(train_module, "train_step", step_then_signal_then_diverge)
    with pytest.raises(train_module.Interrupted):
        train_module.train(cfg, tmp_path)
    kept = f"The last good state, at epoch 1, step 10, is kept in {last_checkpoint(tmp_path)}."
    with pytest.raises(FloatingPointError, match="in epoch 1: training diverged") as diverged:
        train_module.train(cfg, tmp_path)
    assert kept in str(diverged.value)
    assert torch.load(last_checkpoint(tmp_path), weights_only=False)["step"] == 10


def hparams_records(run_dir: Path) -> dict[str, HParamsPluginData]:
    """The run's HParams records by tag (_hparams_/session_start_info, ...), as TensorBoard reads them."""
    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: HParamsPluginData.FromString(content) for tag, content in events.PluginTagToContent("hparams").items()}


def test_missing_data_without_download_fails_before_training_naming_path_and_files(tmp_path):
    result = script("train.py", *SMALL, f"data.root={tmp_path / 'nowhere'}", "data.download=false",
                    f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0
    message = result.stderr
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1..5" in message and "test_batch" in message and "data.download=true" in message
    assert "make_fake_cifar.py" in message and "make demo (experiment=demo reads the data it generates)" in message
    assert read_metrics(tmp_path / "run")["status"] == "failed"
    assert not last_checkpoint(tmp_path / "run").exists()


def test_truncated_batch_file_is_named(fake_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(fake_root, root)
    victim = root / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(DatasetError) as error:
        load_cifar10(root, download_if_missing=False)
    assert str(victim) in str(error.value) and "truncated or corrupt" in str(error.value)


def test_impossible_part_for_the_width_is_rejected_before_hydra_makes_the_run_folder(fake_root, tmp_path):
    result = script("train.py", *SMALL, "model.part=64", f"data.root={fake_root}",
                    f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 1
    assert "conv layer 2 of 13 (HetConv2d 16 -> 16 channels): part=64 must divide in_channels=16" in result.stderr
    assert not (tmp_path / "run").exists()


def test_eval_says_when_weights_are_from_part_way_or_the_data_is_elsewhere_or_other(reference_run, fake_root, tmp_path):
    run_dir = tmp_path / "run"
    copy_stopped_after_epoch_2(reference_run, run_dir, lambda state: state.update(step=7))
    moved = shutil.copytree(fake_root, tmp_path / "moved")
    result = script("eval.py", f"checkpoint={last_checkpoint(run_dir)}", f"data.root={moved}", "device=cpu",
                    cwd=tmp_path)
    assert "weights at epoch 3 of 3, step 7: the run had not finished" in result.stdout
    assert f"note: the run trained on the data in {fake_root}; this evaluates the data in {moved}" in result.stdout
    assert "not the test images" not in result.stdout  # moved, not changed
    (tmp_path / "link").symlink_to(fake_root)
    result = script("eval.py", f"checkpoint={run_dir}", f"data.root={tmp_path / 'link'}", "device=cpu", cwd=tmp_path)
    assert "note:" not in result.stdout  # the same folder, by another path

    make_fake_cifar(tmp_path / "other", train=500, test=500, seed=1)  # as many test images, other ones
    result = script("eval.py", f"checkpoint={run_dir}", f"data.root={tmp_path / 'other'}", "device=cpu", cwd=tmp_path)
    assert "note: these are not the test images the run was tested on" in result.stdout


def eval_error(*overrides: str) -> Exception:
    """The error eval.py's evaluation stops with for these settings (eval.py prints it as "error: <type>: <message>",
    as the README.md case below checks)."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    with pytest.raises((ValueError, OSError, DatasetError)) as error:
        eval_module.evaluate_checkpoint(cfg)
    return error.value


def test_eval_names_what_is_wrong_with_the_checkpoint_data_or_settings_it_is_given(reference_run, fake_root, tmp_path):
    assert "checkpoint not found" in str(eval_error(f"checkpoint={tmp_path / 'none.pt'}", f"data.root={fake_root}"))

    state = torch.load(reference_run / "model.pt", weights_only=False)
    state["config"]["model"]["width"] = 0.5
    torch.save(state, tmp_path / "other.pt")
    assert "do not fit the VGG-16 its own config describes" in str(
        eval_error(f"checkpoint={tmp_path / 'other.pt'}", f"data.root={fake_root}"))

    state = torch.load(reference_run / "model.pt", weights_only=False)
    state["config"]["model"]["num_classes"] = 5  # as if trained on data of 5 classes: the last layer's first 5 rows
    last = max(key for key in state["model"] if key.startswith("classifier.")).rsplit(".", 1)[0]
    state["model"] = {key: value[:5] if key.startswith(last) else value for key, value in state["model"].items()}
    torch.save(state, tmp_path / "five.pt")
    assert (f"{tmp_path / 'five.pt'} was trained for 5 classes (its model.num_classes), but the test labels in "
            f"{fake_root} go up to 9: evaluate it on test data of its classes") in str(
        eval_error(f"checkpoint={tmp_path / 'five.pt'}", f"data.root={fake_root}"))

    state = torch.load(reference_run / "model.pt", weights_only=False)
    state["data"]["root"] = str(tmp_path / "elsewhere")  # a run folder copied from another machine
    torch.save(state, tmp_path / "copied.pt")
    assert (f"the run trained on the data in {tmp_path / 'elsewhere'}, and there is no cifar-10-batches-py/ there "
            "now") in str(eval_error(f"checkpoint={tmp_path / 'copied.pt'}", "device=cpu"))
    assert not (tmp_path / "elsewhere").exists()  # no download into the recorded folder
    assert "data.download must be true or false, got 'off'" in str(
        eval_error(f"checkpoint={reference_run}", "data.download=off"))
    assert f"output={tmp_path} is a folder: name the file to write the report to, e.g. output={tmp_path}/eval.json" \
        in str(eval_error(f"checkpoint={reference_run}", f"output={tmp_path}"))
    for taken in (reference_run / "model.pt", last_checkpoint(reference_run), reference_run / "metrics.json"):
        assert (f"output={taken} names an existing file that is not a report of eval.py (a checkpoint, a run's "
                f"metrics.json, say), which writing the report would destroy: name a new file, e.g. "
                f"output={taken.parent}/eval.json") in str(eval_error(f"checkpoint={reference_run}", f"output={taken}"))
    assert read_metrics(reference_run)["status"] == "finished" and torch.load(reference_run / "model.pt")

    unfinished = tmp_path / "unfinished"
    copy_stopped_after_epoch_2(reference_run, unfinished)
    (unfinished / "model.pt").unlink()
    for named in (unfinished, last_checkpoint(unfinished).parent):  # the run, or its checkpoints/ folder
        assert (f"{unfinished} has no model.pt: its run has not finished. To evaluate the weights it has so far: "
                f"checkpoint={last_checkpoint(unfinished)}") in str(eval_error(f"checkpoint={named}", "device=cpu"))
    failed = tmp_path / "failed"  # a run that failed before its first checkpoint
    write_json(failed / "metrics.json", {"status": "failed", "reason": "DatasetError: CIFAR-10 not found", "config": {},
                                         "epochs_done": 0})
    assert (f"{failed} holds a run but no weights (model.pt, checkpoints/last.pt): its metrics.json says failed, 0 "
            "epochs done (DatasetError: CIFAR-10 not found)") in str(eval_error(f"checkpoint={failed}"))
    result = script("eval.py", str(reference_run), check=False, cwd=tmp_path)  # Hydra could not parse it
    assert result.returncode == 1 and (f"{reference_run}: eval.py takes its settings as key=value (did you mean "
                                       f"checkpoint={reference_run}?)") in result.stderr

    sweep = tmp_path / "sweep"
    shutil.copytree(reference_run, sweep / "part=4,seed=0")
    quoted = f"\"checkpoint='{sweep}/part=4,seed=0'\""
    for named in (sweep, tmp_path):  # a sweep's folder, or the folder of sweeps (or of outputs' dates)
        assert f"{named} holds the folders of 1 finished run: name one, e.g. {quoted}" in str(
            eval_error(f"checkpoint={named}"))
    with pytest.raises(SystemExit, match=re.escape(  # Hydra's own answer: "mismatched input '='"
            f"Hydra reads the = and , in this path as its own syntax (did you mean {quoted}?)")):
        check_command_line([f"checkpoint={sweep}/part=4,seed=0"], list(eval_module.SETTINGS), ["data"], "eval.py",
                           hint="", bare="checkpoint")
    with pytest.raises(SystemExit, match=re.escape(f"did you mean \"hydra.run.dir='{sweep}/part=4,seed=0'\"?")):
        check_command_line([f"hydra.run.dir={sweep}/part=4,seed=0"], [], [], "train.py", hint="")  # Hydra's key too
    for home, written_out in (("~/runs/x", " (checkpoint=$HOME/runs/x)"), ("~alice/x", "")):  # Hydra: a lexer error
        with pytest.raises(SystemExit, match=re.escape(f"checkpoint={home}: the shell left this ~ as it is, and Hydra "
                                                       f"cannot read it: write the folder out{written_out}")):
            check_command_line([f"checkpoint={home}"], list(eval_module.SETTINGS), ["data"], "eval.py", hint="")
    assert "no checkpoint given: name a run folder" in str(eval_error())
    result = script("eval.py", f"checkpoint={REPO / 'README.md'}", check=False, cwd=tmp_path)
    assert result.stderr == (f"error: ValueError: {REPO / 'README.md'}: not a readable checkpoint (it holds more than "
                             "tensors and plain data, or is no torch file); a run's model.pt or checkpoints/last.pt "
                             "is. A damaged last.pt can be moved away to start its run over.\n")  # not torch's advice


def test_each_scripts_help_names_the_settings_it_reads():
    train_help, eval_help = (script(name, "--help").stdout for name in ("train.py", "eval.py"))
    assert "python train.py -m experiment=paper" in train_help and "experiment: demo, paper" in train_help
    assert "python eval.py checkpoint=PATH" in eval_help and "output " in eval_help
    assert "experiment" not in eval_help and "crop_padding" not in eval_help  # train.py's, which eval.py refuses


def test_a_setting_that_nothing_would_read_is_refused(reference_run, fake_root, tmp_path):
    # Hydra's own answer to trainer.epoch=3 is "To append to your config use +trainer.epoch=3"
    run = tmp_path / "run"
    result = script("train.py", *SMALL, "trainer.epoch=3", f"data.root={fake_root}", f"hydra.run.dir={run}",
                    check=False)
    assert result.returncode == 1 and result.stderr == (
        "error: ValueError: trainer.epoch=3: train.py does not read trainer.epoch, so it would be ignored (did you "
        "mean trainer.epochs?). `python train.py --cfg job` lists them.\n")
    result = script("train.py", *SMALL, "+trainer.epoch=3", f"data.root={fake_root}", f"hydra.run.dir={run}",
                    check=False)
    assert result.returncode == 1 and (
        "+trainer.epoch=3: adds trainer.epoch with +, but train.py reads only its configs' settings, so it would be "
        "ignored (did you mean trainer.epochs?). `python train.py --cfg job` lists them. Set one without + or ++."
    ) in result.stderr
    assert not run.exists()  # refused before Hydra makes the run's folder
    sweep = tmp_path / "sweep"  # ++ sets a key the configs define, or forces in one that nothing reads
    result = script("train.py", "-m", *SMALL, "model.part=1,4", "++trainer.epochs=2", "++trainer.epoch=3",
                    f"data.root={fake_root}", f"hydra.sweep.dir={sweep}", check=False)
    assert result.returncode == 1 and result.stderr.count(
        "++trainer.epoch=3: train.py does not read trainer.epoch, so it would be ignored (did you mean "
        "trainer.epochs?). `python train.py --cfg job` lists them. Set one without + or ++.") == 1
    assert not sweep.exists()  # refused once, before the sweep's first job
    for group_given_a_number in (["trainer=1"], ["-m", "trainer=1,2"]):  # Hydra's answer to the sweep: a traceback
        result = script("train.py", *group_given_a_number, check=False)
        assert result.returncode == 1 and result.stderr == (
            f"error: ValueError: {group_given_a_number[-1]}: trainer is a config group, set to the name of one of "
            "its configs (default); a setting inside it is trainer.<setting>=<value>\n")
    assert "hydra_bash_completion" in script("train.py", "-sc", "install=bash").stdout  # Hydra's arguments, not settings
    result = script("eval.py", f"checkpoint={reference_run}", "data.normalize=true", check=False, cwd=tmp_path)
    assert result.returncode == 1 and ("data.normalize=true: eval.py does not read data.normalize, so it would be "
                                       "ignored") in result.stderr
    result = script("eval.py", f"checkpoint={reference_run}", "data.rot=x", check=False, cwd=tmp_path)
    assert "eval.py does not read data.rot, so it would be ignored (did you mean data.root?)" in result.stderr
    check_command_line(["-m", f"seed={','.join(map(str, range(100)))}"], ["seed"], [], "train.py", hint="")  # no path
    readable = ["model.part", "data.mean"]
    check_overrides(["experiment=demo", "model.part=4", "data.mean.0=0.5"], readable, ["experiment"], "train.py",
                    hint="")
    readable = [*readable, "optim.lr", "trainer.amp", "trainer.epochs"]
    with pytest.raises(ValueError) as refused:  # compared whole with trainer.amp, trainer.foo would look close to it
        check_overrides(["trainer.foo=1"], readable, [], "train.py", hint="")
    assert "did you mean" not in str(refused.value)
    for typed, meant in (("trainer.epoch", "trainer.epochs"), ("optm.lr", "optim.lr"), ("optm.lrr", "optim.lr")):
        with pytest.raises(ValueError, match=re.escape(f"(did you mean {meant}?)")):
            check_overrides([f"{typed}=1"], readable, [], "train.py", hint="")
    with pytest.raises(ValueError, match="train.py does not take a setting away; set data.mean instead"):
        check_overrides(["~data.mean"], readable, ["experiment"], "train.py", hint="")
    with pytest.raises(ValueError, match="eval.py does not read experiment"):  # it would set the model's width
        check_overrides(["experiment=demo"], list(eval_module.SETTINGS), ["data"], "eval.py", hint="")


def test_a_launchers_own_signal_handler_runs_after_the_state_is_saved(reference_run, fake_root, tmp_path, monkeypatch):
    """Like submitit on SLURM: its SIGUSR2 handler (requeue) is called once the step's state is saved;
    when it lets the job go on, training continues and ends exactly as if nothing had happened."""
    launcher_calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: launcher_calls.append(
        torch.load(last_checkpoint(tmp_path), weights_only=True)["step"]))
    real_step, steps, status_after = train_module.train_step, [], []

    def step_then_signal(*args):
        steps.append(1)
        if len(steps) == 50:  # in epoch 2
            os.kill(os.getpid(), signal.SIGUSR2)
        if len(steps) == 51:
            status_after.append(read_metrics(tmp_path)["status"])
        return real_step(*args)

    monkeypatch.setattr(train_module, "train_step", step_then_signal)
    try:
        metrics = train_module.train(small_config(fake_root), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert launcher_calls == [10]  # saved at epoch 2, step 10, before the launcher's handler ran
    assert status_after == ["running"]  # not "interrupted" while it trains on
    assert metrics["status"] == "finished"
    assert comparable(metrics) == comparable(read_metrics(reference_run))


def test_a_signal_during_the_last_evaluation_lets_the_run_finish_then_stops(reference_run, fake_root, tmp_path,
                                                                           monkeypatch, caplog):
    """Nothing is left to train: stopping would only leave the final weights to a relaunch. The signal is then passed
    on: a sweep whose jobs run in this process stops rather than start the next one."""
    real_evaluate, calls = train_module.evaluate, []

    def evaluate_then_signal(*args):
        calls.append(1)
        if len(calls) == 3:  # the last of 3 epochs
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args)

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_signal)
    with pytest.raises(train_module.Interrupted) as stopped:
        train_module.train(small_config(fake_root), tmp_path)
    metrics = read_metrics(tmp_path)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert metrics["status"] == "finished" and (tmp_path / "model.pt").is_file()
    assert comparable(metrics) == comparable(read_metrics(reference_run))
    assert "SIGTERM after the last epoch's steps: the run finished first" in caplog.text


def test_a_second_ctrl_c_stops_at_once_and_an_ignored_sigint_stays_ignored(caplog):
    with train_module.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # launchers may send it twice: still a flag
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C during a long evaluation or compilation, twice
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
    try:
        with caplog.at_level(logging.INFO, logger="train"), train_module.StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert stop.received is None
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "SIGINT is ignored in this process (a shell's background job, say): Ctrl-C does not stop" in caplog.text


def test_sigusr2_without_a_launchers_handler_stops_the_run_with_its_exit_code():
    """SIGUSR2's default action would kill the run unsaved; taken over, it stops it after saving, exit 128 + 12."""
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    with train_module.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == signal.SIGUSR2
        with pytest.raises(train_module.Interrupted) as stopped:
            stop.pass_on()
    assert stopped.value.code == 128 + signal.SIGUSR2 and stop.received is None
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # given back on leaving


def test_resuming_on_another_device_type_is_refused(reference_run, fake_root, tmp_path):
    run_dir = tmp_path / "run"
    copy_stopped_after_epoch_2(reference_run, run_dir, lambda state: state.update(device_type="cuda"))
    before = (run_dir / "metrics.json").read_bytes()
    result = script("train.py", *SMALL, f"data.root={fake_root}", f"hydra.run.dir={run_dir}", check=False)
    assert result.returncode != 0 and "was trained on cuda and cannot resume on cpu" in result.stderr
    assert (run_dir / "metrics.json").read_bytes() == before


def test_a_cuda_device_that_torch_cannot_see_is_named_with_what_to_do(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"trainer.device=cuda but torch sees no CUDA device: use trainer.device=cpu"):
        select_device("cuda")
    with pytest.raises(ValueError, match=r"^device=cuda but .*: use device=cpu or auto"):
        select_device("cuda", key="device")  # eval.py's setting
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a launcher that hid every GPU: submitit_local, say
    with caplog.at_level(logging.WARNING):
        assert select_device("auto") == torch.device("cpu")
    assert "CUDA_VISIBLE_DEVICES is empty" in caplog.text and "hydra.launcher.gpus_per_node" in caplog.text


def test_a_damaged_or_foreign_checkpoint_is_named_and_the_run_left_as_it_is(reference_run, fake_root, tmp_path):
    run_dir = tmp_path / "run"
    copy_stopped_after_epoch_2(reference_run, run_dir)
    checkpoint, before = last_checkpoint(run_dir), (run_dir / "metrics.json").read_bytes()
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short by a full disk, say
    cfg = small_config(fake_root)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint}: not a readable checkpoint") + ".*can be moved away"):
        train_module.train(cfg, run_dir)
    torch.save({"weights": {}}, checkpoint)
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        train_module.train(cfg, run_dir)
    assert (run_dir / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("override,message", [
    ("trainer.batch_size=0", "trainer.batch_size must be an int >= 2, got 0"),
    ("trainer.batch_size=1", "trainer.batch_size must be an int >= 2, got 1"),  # BatchNorm1d would fail in step 1
    ("trainer.epochs=-1", "trainer.epochs must be an int >= 1, got -1"),
    ("data.crop_padding=-4", "data.crop_padding must be an int >= 0, got -4"),
    ("seed=abc", "seed must be an int from 0 to 2**64 - 1, got 'abc'"),
    ("seed=18446744073709551616", "seed must be an int from 0 to 2**64 - 1"),
    ("seed=-1", "seed must be an int from 0 to 2**64 - 1, got -1"),  # torch draws for it as for 2**64 - 1
    ("schedule.milestones=[50,a]", "schedule.milestones must be a list of epochs (ints >= 0)"),
    ("schedule.milestones=[50,330,400]", "schedule.milestones [330, 400] lie at or past schedule.reference_epochs=330"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0, got -1"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("schedule.gamma=0", "schedule.gamma must be a finite number > 0, got 0"),
    ("optim.momentum=-0.9", "optim.momentum must be a finite number >= 0, got -0.9"),
    ("optim.momentum=1", "optim.momentum must be below 1, got 1"),
    ("data.root=null", "data.root must name the folder that holds cifar-10-batches-py/ (or will, once downloaded), "
                       "got None"),
    ("data.root=", "data.root must name the folder that holds cifar-10-batches-py/ (or will, once downloaded), got ''"),
    ("optim.nesterov=true optim.momentum=0", "optim.nesterov=true needs optim.momentum > 0"),
    ("data.flip=off", "data.flip must be true or false, got 'off'"),  # a string: Python would take it for true
    ("optim.nesterov=no", "optim.nesterov must be true or false, got 'no'"),
    ("data.mean=[0,0]", "data.mean must be 3 finite numbers, one per RGB channel, got [0, 0]"),
    ("data.std=[0.2,0,0.2]", "data.std must be 3 finite numbers > 0, one per RGB channel, got [0.2, 0, 0.2]"),
    ("trainer.jobs_per_gpu=0", "trainer.jobs_per_gpu must be an int >= 1 (or null to not pin jobs), got 0"),
    ("trainer.jobs_per_gpu=abc", "trainer.jobs_per_gpu must be an int >= 1 (or null to not pin jobs), got 'abc'"),
    ("model.num_classes=abc", "model.num_classes must be an int >= 1, got 'abc'"),
    ("model.width=0", "model.width must be a finite number > 0, got 0"),
    ("trainer.compile=fast", "trainer.compile must be auto, true, false or a torch.compile mode"),
    ("trainer.hetconv=fast", "trainer.hetconv must be one of auto, grouped, dense, got 'fast'"),
    ("trainer.device=gpu", "trainer.device must be auto, cpu or cuda, got 'gpu'"),
    ("optim.name=adam", "optim.name must be sgd, got 'adam'"),
    ("schedule.name=cosine", "schedule.name must be step, got 'cosine'"),
])
def test_settings_that_cannot_train_are_rejected_before_training(override, message, fake_root, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_module.train(small_config(fake_root, *override.split()), tmp_path)
    assert read_metrics(tmp_path)["status"] == "failed" and not last_checkpoint(tmp_path).exists()
    with pytest.raises(SystemExit, match=re.escape(f"error: ValueError: {message}")):  # and before Hydra starts
        check_jobs(override.split())


def test_a_second_process_on_the_same_folder_is_refused(fake_root, tmp_path):
    with exclusive(tmp_path), pytest.raises(BlockingIOError, match="another process is training in"):
        train_module.train(small_config(fake_root), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_runs_launched_side_by_side_get_a_default_folder_each(fake_root, tmp_path):
    """A shell loop that starts a run per part, each in the background: they start within a second, and a folder
    named by the time alone would be one folder, where all but one run would be refused."""
    runs = {part: start("train.py", *SMALL, f"model.part={part}", "trainer.epochs=1", f"data.root={fake_root}",
                        cwd=tmp_path) for part in (2, 4)}
    for part, process in runs.items():
        assert process.wait(timeout=300) == 0, process.stdout.read()
        [run_dir] = (tmp_path / "outputs").glob(f"*/*_part{part}_seed0")
        assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d_part{part}_seed0",
                            run_dir.relative_to(tmp_path / "outputs").as_posix())
        metrics = read_metrics(run_dir)
        assert (metrics["status"], metrics["part"]) == ("finished", part)


def test_resuming_on_other_data_is_refused_and_on_the_same_data_moved_accepted(reference_run, fake_root, tmp_path):
    run_dir = tmp_path / "run"
    copy_stopped_after_epoch_2(reference_run, run_dir)
    other = tmp_path / "other"
    make_fake_cifar(other, train=4000, test=500, seed=1)
    before = (run_dir / "metrics.json").read_bytes()
    refused = script("train.py", *SMALL, f"data.root={other}", f"hydra.run.dir={run_dir}", check=False)
    assert refused.returncode != 0 and f"data.root={other} holds other data" in refused.stderr
    assert f"Rerun it with data.root={fake_root}" in refused.stderr
    assert (run_dir / "metrics.json").read_bytes() == before  # refused, not failed: the record is as it was

    moved = shutil.copytree(fake_root, tmp_path / "moved")
    script("train.py", *SMALL, f"data.root={moved}", f"hydra.run.dir={run_dir}")
    assert read_metrics(run_dir)["status"] == "finished" and read_metrics(run_dir)["data"]["root"] == str(moved)
    # Finished, it has nothing to do, on its data wherever it is; a relaunch on other data is refused all the same.
    train_module.train(small_config(fake_root), run_dir)
    with pytest.raises(train_module.Refused, match=f"data.root={other} holds other data"):
        train_module.train(small_config(other), run_dir)
    # A folder without data (the default data.root, say): no download could fetch generated data, so none is tried.
    empty = small_config(tmp_path / "empty", "data.download=true")
    refusal = (f"{run_dir} trained on the data in {moved}, not the official CIFAR-10 files that a download fetches, "
               f"and {tmp_path / 'empty'} holds no cifar-10-batches-py/: ")
    with pytest.raises(train_module.Refused, match=re.escape(f"{refusal}rerun with data.root={moved}.")):
        train_module.train(empty, run_dir)
    shutil.rmtree(moved)
    with pytest.raises(train_module.Refused, match=re.escape(f"{refusal}put that data back there, or train in")):
        train_module.train(empty, run_dir)
    assert not (tmp_path / "empty").exists()
    official = {**read_metrics(run_dir)["data"], "official_cifar10": True}  # a download would fetch it: tried
    with pytest.raises(DatasetError, match="CIFAR-10 not found"):
        train_module.load_data(small_config(tmp_path / "empty", "data.download=false"), run_dir, official)


def test_a_finished_run_without_its_checkpoint_is_left_alone(reference_run, fake_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")  # to free disk once model.pt is there
    before = {name: (run_dir / name).read_bytes() for name in ("model.pt", "metrics.json")}
    same = script("train.py", *SMALL, f"data.root={fake_root}", f"hydra.run.dir={run_dir}")
    assert "already finished" in same.stdout + same.stderr
    other = script("train.py", *SMALL, "optim.lr=0.05", f"data.root={fake_root}", f"hydra.run.dir={run_dir}",
                   check=False)
    assert other.returncode != 0 and "optim.lr: 0.1 -> 0.05" in other.stderr
    make_fake_cifar(tmp_path / "other", train=500, test=100, seed=1)
    with pytest.raises(train_module.Refused, match="holds other data"):
        train_module.train(small_config(tmp_path / "other"), run_dir)
    assert {name: (run_dir / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("killed_at", [1, 2])  # 1: no checkpoint yet, so the rerun starts the run over
def test_an_epoch_is_logged_before_its_checkpoint_so_a_kill_between_loses_nothing(killed_at, fake_root, tmp_path,
                                                                                  monkeypatch):
    cfg = small_config(fake_root)
    real_save = train_module.save

    def save_killed(path, state):
        if state["epoch"] == killed_at:
            raise KeyboardInterrupt  # stands in for SIGKILL between the epoch's log and its checkpoint
        real_save(path, state)

    monkeypatch.setattr(train_module, "save", save_killed)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, tmp_path)
    logged = [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("test/acc")]
    assert logged == list(range(1, killed_at + 1))
    monkeypatch.setattr(train_module, "save", real_save)
    train_module.train(cfg, tmp_path)  # rewrites the scalars of every epoch after its checkpoint, each once
    assert [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("test/acc")] == [1, 2, 3]


def test_a_stale_temporary_file_is_removed_when_the_folder_is_taken_and_no_other_file(tmp_path):
    stale = [tmp_path / "checkpoints" / ".last.pt.12345.tmp", tmp_path / ".metrics.json.77.tmp"]
    others = [tmp_path / ".draft.tmp", tmp_path / "notes" / ".last.pt.12345.tmp"]  # not what train.py leaves
    for path in stale + others:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    with exclusive(tmp_path):
        assert [path.exists() for path in stale + others] == [False, False, True, True]


def test_a_failed_write_names_the_file_and_the_free_space(tmp_path):
    def fail(f):
        raise RuntimeError("unexpected pos 1162176 vs 1162072")  # what torch.save says on a full disk

    with pytest.raises(OSError, match=r"could not write .*last\.pt \(RuntimeError: unexpected pos.*MB are free"):
        atomic_write(tmp_path / "last.pt", fail)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").touch()
    with pytest.raises(OSError, match=r"could not write .*a-file/out/eval\.json \((FileExists|NotADirectory)Error"):
        atomic_write(tmp_path / "a-file" / "out" / "eval.json", lambda f: None)  # eval.py's output=, say
    with pytest.raises(TypeError, match="not JSON serializable"):  # a bug, not a failed write
        write_json(tmp_path / "metrics.json", {"loss": torch.tensor(1.0)})
    assert list(tmp_path.iterdir()) == [tmp_path / "a-file"]


def test_a_checkpoint_folder_that_cannot_be_written_fails_the_run_before_it_trains(fake_root, tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(OSError, match=r"could not write .*checkpoints/\.writable"):
        train_module.train(small_config(fake_root), tmp_path)
    assert read_metrics(tmp_path)["status"] == "failed" and read_metrics(tmp_path)["epochs_done"] == 0


def test_a_run_killed_after_its_last_checkpoint_finishes_when_launched_again(reference_run, fake_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir, ignore=shutil.ignore_patterns("events.out.tfevents.*", "model.pt"))
    metrics = read_metrics(run_dir)
    write_json(run_dir / "metrics.json", {**metrics, "status": "running"})  # as its last epoch left it
    assert train_module.train(small_config(fake_root), run_dir)["status"] == "finished"
    assert {**read_metrics(run_dir), "updated": None} == {**metrics, "updated": None}
    last = torch.load(last_checkpoint(run_dir), weights_only=False)
    final = torch.load(run_dir / "model.pt", weights_only=False)
    assert final["model"].keys() == last["model"].keys()
    assert all(torch.equal(final["model"][key], last["model"][key]) for key in last["model"])
    assert hparams_records(run_dir)["_hparams_/session_end_info"].session_end_info.status == STATUS_SUCCESS


def test_final_weights_without_their_checkpoint_and_record_are_not_trained_over(reference_run, fake_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "metrics.json").unlink()
    weights = (run_dir / "model.pt").read_bytes()
    with pytest.raises(train_module.Refused, match=r"holds a run's final weights \(model.pt\), but neither"):
        train_module.train(small_config(fake_root, "seed=1"), run_dir)
    assert (run_dir / "model.pt").read_bytes() == weights and not (run_dir / "metrics.json").exists()


def test_a_single_run_in_a_sweeps_folder_is_refused(fake_root, tmp_path, monkeypatch):
    (tmp_path / "multirun.yaml").touch()
    refusal = f"{tmp_path} is a sweep's folder .* hydra.sweep.dir={tmp_path};"
    with pytest.raises(train_module.Refused, match=refusal):
        train_module.train(small_config(fake_root), tmp_path)
    # before Hydra writes its .hydra/ and train.log there, the folder named as Hydra resolves it
    monkeypatch.setenv("RUNS", str(tmp_path))
    for named in (str(tmp_path), "${oc.env:RUNS}"):
        with pytest.raises(SystemExit, match="error: Refused: " + refusal):
            check_jobs(["model.part=4", f"hydra.run.dir={named}"])
    assert list(tmp_path.iterdir()) == [tmp_path / "multirun.yaml"]
    check_jobs(["model.part=4", f"hydra.run.dir={tmp_path / 'run'}"])  # a folder of its own


def test_a_single_run_in_a_new_folder_among_a_sweeps_jobs_is_refused(reference_run, fake_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(reference_run, sweep_dir / "part=4,seed=0")  # one of its jobs, finished
    (sweep_dir / "multirun.yaml").touch()
    mistyped = sweep_dir / "part=4,seed=O"
    (mistyped / ".hydra").mkdir(parents=True)  # what Hydra wrote when the run started
    with pytest.raises(train_module.Refused, match=re.escape(f"{mistyped} is a new folder in the sweep folder "
                                                             f"{sweep_dir}, where a single run would stand among its "
                                                             "jobs (it was removed)")):
        train_module.train(small_config(fake_root), mistyped)
    assert not mistyped.exists()
    # A job that has a record is the sweep's own: a single run may resume it, or leave it finished.
    assert train_module.train(small_config(fake_root), sweep_dir / "part=4,seed=0")["status"] == "finished"
    shutil.rmtree(sweep_dir / "part=4,seed=0" / "checkpoints")
    (sweep_dir / "part=4,seed=0" / "metrics.json").unlink()  # its final weights alone: not a new folder
    with pytest.raises(train_module.Refused, match=r"holds a run's final weights \(model.pt\), but neither"):
        train_module.train(small_config(fake_root), sweep_dir / "part=4,seed=0")


def test_the_test_split_loads_alone_and_a_misplaced_or_incomplete_data_root_is_named(tmp_path):
    make_fake_cifar(tmp_path, train=500, test=100, seed=0)
    for batch in (tmp_path / "cifar-10-batches-py").glob("data_batch_*"):
        batch.unlink()
    assert len(load_cifar10(tmp_path, download_if_missing=False, splits=("test",))["test"]) == 100  # what eval reads
    with pytest.raises(DatasetError, match="incomplete: missing .*data_batch_1..5") as error:
        load_cifar10(tmp_path, download_if_missing=False)
    # the download would skip the folder that is there: it has to go first
    assert f"move {tmp_path / 'cifar-10-batches-py'} away and run with data.download=true" in str(error.value)
    with pytest.raises(DatasetError, match=f"data.root={tmp_path}/cifar-10-batches-py is the dataset folder itself; "
                                           f".*: data.root={tmp_path}$"):
        load_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DatasetError, match="is a file; data.root names the folder that holds cifar-10-batches-py/"):
        load_cifar10(tmp_path / "cifar-10-batches-py" / "test_batch")


def test_a_gap_in_the_training_batches_is_named(tmp_path):
    make_fake_cifar(tmp_path, train=500, test=100, seed=0)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_2 while data_batch_5 is there"):
        load_cifar10(tmp_path, download_if_missing=False)


def test_too_few_classes_for_the_labels_is_rejected_naming_the_key(tmp_path, caplog):
    make_fake_cifar(tmp_path / "data", train=500, test=100, seed=0)
    for path in (tmp_path / "data" / "cifar-10-batches-py").glob("data_batch_*"):  # 5 classes to train on
        batch = pickle.loads(path.read_bytes())
        path.write_bytes(pickle.dumps({**batch, b"labels": [label % 5 for label in batch[b"labels"]]}))
    cfg = small_config(tmp_path / "data", "model.num_classes=5", "trainer.batch_size=50")
    with pytest.raises(ValueError, match="model.num_classes=5, but the data's labels go up to 9"):  # the test split's
        train_module.train(cfg, tmp_path / "run")
    assert read_metrics(tmp_path / "run")["epochs_done"] == 0  # refused before training
    assert (f"{tmp_path / 'data'} does not hold the official CIFAR-10 files (500 training and 100 test images "
            "here)") in caplog.text  # said at the start, as for any data but the official files


@pytest.mark.parametrize("setting,device,mode", [
    ("auto", "cuda", "reduce-overhead"), ("auto", "cpu", None), ("true", "cpu", "default"), ("false", "cuda", None),
    ("max-autotune", "cpu", "max-autotune"),
])
def test_the_compile_setting_is_a_mode_per_device(setting, device, mode):
    assert compile_mode(train_config(f"trainer.compile={setting}").trainer.compile, torch.device(device)) == mode


@pytest.mark.parametrize("key,started_with,refusal", [
    ("compile", "default", "was trained with torch.compile mode default and cannot resume eagerly"),
    ("compile", False, None),  # false and auto both train eagerly on the CPU
    ("hetconv", "dense", "was trained with its HetConv layers computed dense and cannot resume grouped"),
    ("hetconv", "grouped", None),  # what auto computes on the CPU
])
def test_a_run_resumes_only_in_the_compile_mode_and_hetconv_form_it_started_with(key, started_with, refusal,
                                                                                 reference_run, fake_root, tmp_path):
    """The reference run trains eagerly and grouped: trainer.compile and trainer.hetconv are auto on the CPU."""
    run_dir = tmp_path / "run"

    copy_stopped_after_epoch_2(reference_run, run_dir,
                               lambda state: state["config"]["trainer"].update({key: started_with}))
    before = (run_dir / "metrics.json").read_bytes()
    result = script("train.py", *SMALL, f"data.root={fake_root}", f"hydra.run.dir={run_dir}", check=False)
    if refusal:
        assert result.returncode != 0
        assert refusal in result.stderr and f"Use trainer.{key}={started_with}." in result.stderr
        assert (run_dir / "metrics.json").read_bytes() == before
    else:
        assert result.returncode == 0 and "resuming" in result.stdout + result.stderr
        assert read_metrics(run_dir)["status"] == "finished"


@pytest.mark.parametrize("setting,form", [("auto", "dense"), ("grouped", "grouped")])
def test_eval_builds_the_form_the_run_computed_on_that_device(setting, form, reference_run, tmp_path, monkeypatch):
    state = torch.load(reference_run / "model.pt", weights_only=False)
    state["config"]["trainer"]["hetconv"] = setting
    torch.save(state, tmp_path / "model.pt")
    monkeypatch.setattr(eval_module, "build_model",  # on the CPU: the tests have no GPU
                        lambda cfg, impl, device: training.build_model(cfg, impl, torch.device("cpu")))
    model, _, _ = eval_module.load_model(tmp_path / "model.pt", torch.device("cuda"))
    assert {m.impl for m in model.modules() if isinstance(m, HetConv2d)} == {form}


@pytest.mark.parametrize("other_threads", [False, True])
def test_a_resume_on_another_cpu_thread_count_warns_that_it_will_not_end_exactly(other_threads, reference_run,
                                                                                fake_root, tmp_path, caplog):
    threads = torch.get_num_threads()
    started_with = threads + 1 if other_threads else threads
    run_dir = tmp_path / "run"
    copy_stopped_after_epoch_2(reference_run, run_dir, lambda state: state.update(cpu_threads=started_with))
    train_module.train(small_config(fake_root), run_dir)
    warned = f"trained on {started_with} CPU threads and resumes on {threads}" in caplog.text
    assert warned == other_threads and read_metrics(run_dir)["status"] == "finished"


@pytest.mark.parametrize("epochs_done", [3, 0])  # 0: interrupted in its first epoch, which a checkpoint held
def test_a_start_without_a_checkpoint_records_its_failure_over_an_old_record(epochs_done, reference_run, tmp_path,
                                                                             caplog):
    run_dir = tmp_path / "run"
    copy_stopped_after_epoch_2(reference_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")  # a damaged last.pt moved away: nothing left to resume
    (run_dir / "model.pt").unlink()
    metrics = read_metrics(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "status": "interrupted", "epochs_done": epochs_done}))
    with pytest.raises(DatasetError):
        train_module.train(small_config(tmp_path / "nowhere", "data.download=false"), run_dir)
    assert read_metrics(run_dir)["status"] == "failed" and "DatasetError" in read_metrics(run_dir)["reason"]
    assert (f"metrics.json records a run that trained ({epochs_done} epochs done, interrupted), but there is no "
            "checkpoints/last.pt to resume it from: the run starts over") in caplog.text


def test_a_resume_that_fails_on_bad_input_keeps_the_record_and_logs_why(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    copy_stopped_after_epoch_2(reference_run, run_dir)
    before = (run_dir / "metrics.json").read_bytes()
    (tmp_path / "nowhere" / "cifar-10-batches-py").mkdir(parents=True)
    result = script("train.py", *SMALL, f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={run_dir}", check=False)
    assert result.returncode != 0 and "DatasetError" in result.stderr
    assert (run_dir / "metrics.json").read_bytes() == before  # still resumable, not "failed"
    assert f"DatasetError: CIFAR-10 in {tmp_path / 'nowhere' / 'cifar-10-batches-py'} is incomplete" in (
        run_dir / "train.log").read_text()


def test_a_single_run_stopped_by_bad_input_prints_the_message_once_and_a_traceback_only_when_asked(fake_root,
                                                                                                   tmp_path):
    message = "ValueError: model.num_classes=5, but the data's labels go up to 9"  # found once the data is read
    args = [*SMALL, "model.num_classes=5", f"data.root={fake_root}", f"hydra.run.dir={tmp_path}"]
    result = script("train.py", *args, check=False)
    assert result.returncode == 1 and result.stderr.count(message) == 1 and "Traceback" not in result.stderr
    assert message in (tmp_path / "train.log").read_text() and read_metrics(tmp_path)["status"] == "failed"
    result = script("train.py", *args, check=False, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "training_data" in result.stderr


def test_only_errors_that_this_project_raised_count_as_explained_a_librarys_keep_their_traceback():
    with pytest.raises(ValueError) as ours:
        select_device("gpu")
    with pytest.raises(ValueError) as torchs:  # a batch of one: no batch statistics
        torch.nn.functional.batch_norm(torch.ones(1, 4), None, None, training=True)
    assert raised_here(ours.value) and not raised_here(torchs.value)


class Counting(torch.nn.Module):
    """Stands in for torch.compile's wrapper of the model, counting the images it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, inputs):
        self.images += len(inputs)
        return self.model(inputs)


def test_trainer_compile_reaches_torch_compile_and_the_record(fake_root, tmp_path, monkeypatch):
    modes, wrappers = [], []

    def recording_compile(model, mode):
        modes.append(mode)
        wrappers.append(Counting(model))
        return wrappers[-1]

    monkeypatch.setattr(torch, "compile", recording_compile)
    train_module.train(small_config(fake_root, "trainer.epochs=1", "trainer.compile=max-autotune"), tmp_path)
    assert modes == ["max-autotune"] and read_metrics(tmp_path)["torch_compile"] == "max-autotune"
    data = read_metrics(tmp_path)["data"]
    assert wrappers[0].images == data["train_images"] + data["test_images"]  # the compiled model trains and tests


def test_every_compiled_model_starts_with_a_clean_slate(monkeypatch):
    """Hydra's default launcher runs a sweep's jobs in one process, and torch.compile keeps at most recompile_limit
    versions of a forward per process (8; two per job), past which it silently runs the model eagerly: parts 16, 32
    and 64 of the paper's sweep trained uncompiled. Here a limit of 1, made to fail loudly, stands in for it."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    compile_eagerly = functools.partial(torch.compile, backend="eager")  # dynamo's guards and cache, no code generated
    monkeypatch.setattr(torch, "compile", lambda model, mode: compile_eagerly(model))
    for part in (1, 2, 4):  # one job after another
        training.compiled(vgg16(part, width=0.125), "default")(torch.randn(2, 3, 32, 32)).sum().backward()
    torch.compiler.reset()


def test_float32_on_cuda_is_float32_for_convolutions_too():
    """cuDNN runs float32 convolutions in TF32 by default; a run that records float32 computes in it. Setting the flag
    needs no GPU; both of torch's ways of reading it must say so (mixing the new and legacy setters makes the legacy
    getter raise)."""
    probe = ("import torch; from hetconv.training import configure_backend; configure_backend(torch.device('cuda')); "
             "print(torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.allow_tf32)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    precision, allowed = result.stdout.split()
    assert precision != "tf32" and allowed == "False"


def test_trainer_hetconv_reaches_the_layers_and_the_record(fake_root, tmp_path):
    train_module.train(small_config(fake_root, "trainer.epochs=1", "trainer.hetconv=dense"), tmp_path)
    metrics = read_metrics(tmp_path)
    grouped, dense = (vgg16(4, width=0.25, impl=impl) for impl in ("grouped", "dense"))
    assert metrics["hetconv"] == "dense" and metrics["status"] == "finished"
    assert metrics["executed_flops"] == count_flops(dense, "executed") > count_flops(grouped, "executed")
    # the paper's count does not depend on the form that runs
    assert metrics["flops"] == pytest.approx(count_flops(grouped, "paper"), rel=1e-12)


@pytest.mark.parametrize("form", ["grouped", "dense"])  # dense: CUDA's default form, compiled as CUDA compiles it
def test_a_compiled_run_trains_evaluates_and_checkpoints(form, fake_root, tmp_path):
    """Inductor for real (CUDA graphs need CUDA, so on the CPU this mode compiles like the default one)."""
    script("train.py", *SMALL, "trainer.epochs=1", "trainer.compile=reduce-overhead", f"trainer.hetconv={form}",
           f"data.root={fake_root}", f"hydra.run.dir={tmp_path}")
    metrics = read_metrics(tmp_path)
    assert metrics["status"] == "finished"
    assert (metrics["torch_compile"], metrics["hetconv"]) == ("reduce-overhead", form)
    assert metrics["train_loss"] < 2.0 and metrics["test_acc"] > 20  # chance: 2.30 and 10%
    weights = torch.load(tmp_path / "model.pt", weights_only=False)["model"]
    assert not any(key.startswith("_orig_mod.") for key in weights)  # loadable without torch.compile


def test_the_milestones_are_the_recipe_s_at_330_epochs_and_keep_their_fractions_in_shorter_runs():
    schedule = train_config().schedule
    assert milestone_epochs(schedule, 330) == [50, 140, 210, 240, 270, 300] and schedule.gamma == 0.2
    assert milestone_epochs(schedule, 33) == [5, 14, 21, 24, 27, 30]
    assert milestone_epochs(schedule, 6) == [1, 3, 4, 4, 5, 5]  # experiment=demo: milestones that meet compound


def test_evaluate_scores_the_model_in_eval_mode_and_leaves_it_as_it_was():
    torch.manual_seed(0)
    model = vgg16(2, 10, width=0.125)
    model(torch.randn(16, 3, 32, 32))  # running statistics of their own, unlike a fresh model's 0 and 1
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    split = Split(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), torch.arange(20) % 10)
    preprocess = Preprocess(train_config().data, channels_last=False, device=torch.device("cpu"))
    result = evaluate(model, split, preprocess, batch_size=8, amp=False, num_classes=10)  # a short last batch

    assert model.training  # handed back in the mode it came in
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)  # BatchNorm's statistics too
    model.eval()
    with torch.no_grad():
        logits = model(preprocess(split.images))  # the whole split at once, in eval mode
    correct = logits.argmax(1) == split.labels
    assert result["acc"] == percent(correct.sum().item(), 20)
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, split.labels).item(), rel=1e-5)
    assert result["per_class_acc"] == [percent(correct[split.labels == c].sum().item(), 2) for c in range(10)]


def test_the_eta_follows_the_last_epochs_pace(caplog, tmp_path):
    """The first epoch of a compiled run includes the compilation: the ETA must not carry it forward."""
    history = {"epoch": 2, "train_loss": 1.0, "train_acc": 50.0, "test_loss": 1.0, "test_acc": 50.0, "lr": 0.1,
               "epoch_s": 4.0, "images_per_s": 100.0}
    metrics = {"test_acc": 50.0, "best_test_acc": 50.0, "train_loss": 1.0, "epochs_done": 2}
    with SummaryWriter(tmp_path) as writer, caplog.at_level(logging.INFO):
        train_module.log_epoch(writer, history, metrics, 10, 5.0)
    assert "epoch 2/10" in caplog.text and "ETA 0:00:40" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_on_the_cpu_a_freed_activation_is_reused_without_page_faults():
    # A step frees and reallocates every activation; a heap that hands the memory back to the OS makes
    # each reallocation fault every page in again. The heap reaches its working size in 2 to 4 rounds, by where
    # its blocks happen to fall (seen over 60 processes; CI once failed on a round 4 that faulted), so most rounds
    # must reuse it, not all.
    probe = """
import resource, torch
from hetconv.training import configure_backend
configure_backend(torch.device("cpu"))
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    pages = 2**24 * 4 // resource.getpagesize()
    faults = [int(line) for line in result.stdout.split()]
    reused = [f < pages // 100 for f in faults]
    assert sum(reused) > len(faults) // 2, f"page faults per round: {faults} (a round's tensor is {pages} pages)"
