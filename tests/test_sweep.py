"""The P sweep through every launcher, on generated data, and the table it regenerates."""

import csv
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

import train as train_module
from conftest import REPO, SMALL, script
from hetconv import gpus, report
from hetconv.report import load_published
from hetconv.runfiles import (RESUMABLE_CHANGES, RunRecord, command_line_override, exclusive, how_to_resume,
                              read_metrics, write_json)
from hetconv.settings import check_jobs, train_config
from models.vgg import PAPER_PARTS
from scripts import make_fake_cifar, make_table

# experiment=demo, shrunk further: two epochs, CPU.
TINY = ["experiment=demo", "trainer.epochs=2", "trainer.device=cpu"]
JOB = "part={},seed=0,trainer.epochs=2"  # a job's folder: part and seed first, then the other overrides


@pytest.fixture
def two_fake_gpus(tmp_path, monkeypatch):
    """An nvidia-smi that lists two GPUs, and a private folder for the GPU slot locks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-a)'\n"  # in MIG mode, with its instances below it
                    "echo '  MIG 3g.40gb     Device  0: (UUID: MIG-c)'\necho 'GPU 1: Fake GPU (UUID: GPU-b)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    locks = tmp_path / "locks"
    locks.mkdir()  # a TMPDIR that does not exist is ignored: the slots would be /tmp's, shared with other sessions
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(locks)}


def sweep(sweep_dir, fake_root, *args, env=None):
    return script("train.py", "-m", *TINY, f"data.root={fake_root}", f"hydra.sweep.dir={sweep_dir}", *args,
                  check=False, env=env)


def test_sweep_keeps_going_past_a_failed_job_and_the_table_shows_it(fake_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, fake_root, "model.part=4,64")  # 64 cannot split the 16-channel layers at width 0.25
    assert result.returncode != 0  # Hydra reports the failure after running every job
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [JOB.format(4), JOB.format(64)]
    assert read_metrics(sweep_dir / JOB.format(4))["status"] == "finished"
    assert read_metrics(sweep_dir / JOB.format(64))["status"] == "failed"
    # The command that resumes a job launches that job alone, in its folder: a finished one is left as it is.
    resume = shlex.split(read_metrics(sweep_dir / JOB.format(4))["resume"])
    assert resume[:3] == ["python", "train.py", "-m"] and resume[-1] == f"hydra.sweep.dir={sweep_dir}"
    assert "already finished" in script(*resume[1:]).stderr
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [JOB.format(4), JOB.format(64)]
    assert (sweep_dir / JOB.format(4) / ".hydra" / "config.yaml").is_file()

    out = tmp_path / "table"
    script("scripts/make_table.py", str(sweep_dir), str(sweep_dir), "--out", str(out))  # listed twice: counted once
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "acc_vs_flops.png"}
    rows = {int(r["part"]): r for r in csv.DictReader(open(out / "table.csv"))}
    assert sorted(rows) == list(PAPER_PARTS)
    assert rows[4]["n"] == "1" and float(rows[4]["test_acc"]) == read_metrics(sweep_dir / JOB.format(4))["test_acc"]
    assert rows[4]["published_test_acc"] == "" and rows[4]["status"] == "1 finished"  # width 0.25: not the paper's
    assert "failed" in rows[64]["status"] and "part=64 must divide in_channels=16" in rows[64]["status"]
    assert rows[2]["status"] == "not run" and rows[64]["test_acc"] == ""
    assert rows[32]["status"] == "not run: P=32 does not split width 0.25's layers"
    markdown = (out / "table.md").read_text()
    assert "Not CIFAR-10" in markdown and "selected on the test set" in markdown and "Epochs: 2" in markdown

    runs = EventMultiplexer().AddRunsFromDirectory(str(sweep_dir)).Reload().Runs()
    assert set(runs) == {JOB.format(4)}  # one TensorBoard run per trained job, named by part and seed

    # The same command again: the finished job is left alone, the failed one is tried again.
    finished = {name: (sweep_dir / JOB.format(4) / name).read_bytes() for name in ("model.pt", "metrics.json")}
    again = sweep(sweep_dir, fake_root, "model.part=4,64")
    assert "already finished" in again.stdout + again.stderr
    assert {name: (sweep_dir / JOB.format(4) / name).read_bytes() for name in finished} == finished

    # A job of another recipe in the same table is refused rather than averaged in.
    other = tmp_path / "other"
    fake_job(other, 4, 0.25, "finished", overrides=["optim.lr=0.05"])
    mixed = script("scripts/make_table.py", str(sweep_dir), str(other), "--out", str(out), check=False)
    assert mixed.returncode != 0 and "ran different recipes (optim.lr: 0.02 -> 0.05)" in mixed.stderr

    # A copy of the sweep beside the sweep would count every job twice as two seeds.
    copy = shutil.copytree(sweep_dir, tmp_path / "copy")
    twice = script("scripts/make_table.py", str(sweep_dir), str(copy), "--out", str(out), check=False)
    assert twice.returncode != 0 and ("are the same job (part=4, width=0.25, seed=0); give each job's folder once. "
                                      "Is one a copy of the other?") in twice.stderr

    # Launched again with a setting written out at its default value: a new folder, refused before it trains, even
    # computed in the other form (left out of the folder's name), which the table would not tell apart either.
    twin = sweep(sweep_dir, fake_root, "model.part=4", "optim.lr=0.02", "trainer.hetconv=dense")
    assert twin.returncode != 0 and (
        f"part=4,seed=0,optim.lr=0.02,trainer.epochs=2 would train the job that {JOB.format(4)} holds, with the same "
        "recipe and only another way to compute it (trainer.hetconv: auto -> dense), which make_table.py would count "
        "as the same job: to compare such settings, give each its own hydra.sweep.dir. It would train it under "
        "another name: a job's folder is named after its overrides, and this launch adds optim.lr=0.02, against that "
        "job's last launch") in twin.stderr
    twin_dir = sweep_dir / "part=4,seed=0,optim.lr=0.02,trainer.epochs=2"
    assert f"({twin_dir}, which held only Hydra's files, was removed)" in twin.stderr and not twin_dir.exists()
    make_table.main([str(sweep_dir), "--out", str(out)])  # no twin left to refuse as the same job


def test_a_sweep_with_a_value_that_cannot_train_is_refused_before_any_job_folder(fake_root, tmp_path):
    """Each job would fail in a folder of its own, which the sweep relaunched with the value mended would leave
    beside its jobs, as another recipe."""
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, fake_root, "model.part=1,4", "optim.lr=0.02,-1")
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: ValueError: the sweep's job model.part=1 trainer.epochs=2 trainer.device=cpu data.root={fake_root} "
        "optim.lr=-1: optim.lr must be a finite number > 0, got -1")
    assert not sweep_dir.exists()
    # The experiment's own sweep (model.part=1,4 for experiment=demo) is expanded as Hydra expands it.
    demo = script("train.py", "-m", "experiment=demo", "trainer.batch_size=1", f"hydra.sweep.dir={sweep_dir}",
                  check=False)
    assert demo.returncode == 1 and "the sweep's job model.part=1 trainer.batch_size=1: trainer.batch_size must be" \
        in demo.stderr
    assert not sweep_dir.exists()
    for fine in (["-m", "seed=${hydra:job.num}", "model.part=1,4"],  # resolves in the job alone
                 ["--cfg", "job", "trainer.amp=off"]):  # only prints the config
        check_jobs(fine)
    # Data that is not there is refused once, rather than by each job (and Hydra's traceback for each)
    result = sweep(sweep_dir, tmp_path / "nowhere", "model.part=1,4")
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: DatasetError: CIFAR-10 not found: {tmp_path / 'nowhere' / 'cifar-10-batches-py'} does not exist")
    assert not sweep_dir.exists()
    # but a SLURM sweep's jobs may read a folder that only their nodes have
    check_jobs(["-m", "model.part=1,4", "hydra/launcher=slurm", f"data.root={tmp_path / 'nowhere'}",
                "data.download=false", f"hydra.sweep.dir={sweep_dir}"])


def test_table_refuses_to_put_generated_data_or_no_result_into_results(tmp_path):
    results = {p.name: p.read_bytes() for p in (REPO / "results").iterdir()}
    generated = fake_job(tmp_path / "sweep", 4, 0.25, "finished", official=False)
    for out in ([], ["--out", str(REPO / "results" / "demo")]):  # results/ and every folder in it
        with pytest.raises(SystemExit, match=f"{re.escape(str(generated))} did not train on the official CIFAR-10 "
                                             "files; .* holds real results only"):
            make_table.main([str(tmp_path / "sweep"), *out])
    fake_job(tmp_path / "failed", 64, 0.25, "failed", epochs_done=0)  # failed before it read any data
    with pytest.raises(SystemExit, match="no job under .* has finished"):
        make_table.main([str(tmp_path / "failed")])
    with warnings.catch_warnings():  # elsewhere its table lists the failure, beside a plot with nothing to name
        warnings.simplefilter("error")
        make_table.main([str(tmp_path / "failed"), "--out", str(tmp_path / "table")])
    assert {p.name: p.read_bytes() for p in (REPO / "results").iterdir()} == results


def test_an_out_folder_that_is_a_file_a_broken_link_or_read_only_is_refused_before_any_work(tmp_path, capsys,
                                                                                          monkeypatch):
    from scripts import flops_table

    taken = tmp_path / "taken"
    taken.write_text("")
    monkeypatch.setattr(make_table, "find_jobs", lambda *a: pytest.fail("read the sweep before checking --out"))
    monkeypatch.setattr(flops_table, "flops_rows", lambda: pytest.fail("counted before checking --out"))
    for main, args in ((make_table.main, [str(tmp_path)]), (flops_table.main, [])):
        for out in (taken, taken / "table"):  # the folder, or one above it
            with pytest.raises(SystemExit):
                main([*args, "--out", str(out)])
            assert f"argument --out: {taken} is a file, not a folder" in capsys.readouterr().err
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    for out in (dangling, dangling / "table"):
        with pytest.raises(SystemExit):
            make_table.main([str(tmp_path), "--out", str(out)])
        error = capsys.readouterr().err
        assert f"argument --out: {dangling} is a link to {tmp_path / 'gone'}, which does not exist" in error
    locked = tmp_path / "locked"  # read-only to this user (root writes anywhere: os.access says which it may not)
    locked.mkdir()
    monkeypatch.setattr(report.os, "access", lambda path, mode, **_: Path(path) != locked)
    for main, args in ((make_table.main, [str(tmp_path), "--out", str(locked / "table")]),
                       (flops_table.main, ["--out", str(locked)]),
                       (make_fake_cifar.main, [str(locked / "data")])):
        with pytest.raises(SystemExit):
            main(args)
        assert f"{locked} cannot be written to: name another folder, or make it writable" in capsys.readouterr().err


def fake_job(sweep_dir, part, width, status, epochs_done=2, launches=None, seed=0, test_acc=90.0, overrides=(),
             official=None, reason=None):
    """A job folder as train.py leaves it, without training: .hydra/config.yaml and the metrics.json that train.py's
    RunRecord writes for a history that ends at test_acc, its best epoch one point higher; official: whether its
    data was the official CIFAR-10 (None: no data recorded, as for a job that failed before loading it)."""
    cfg = train_config("experiment=demo", "trainer.epochs=2", f"model.part={part}", f"model.width={width}",
                       f"seed={seed}", *overrides)
    run_dir = sweep_dir / (f"part={part},width={width}" + (f",seed={seed}" if seed else ""))
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    record = RunRecord(run_dir, OmegaConf.to_container(cfg, resolve=True))
    record.history = [{"epoch": epoch, "test_acc": test_acc + (epoch < epochs_done)}
                      for epoch in range(1, epochs_done + 1)]
    record.info.update(git_commit="abc", started="2024-01-01T00:00:00",
                       launches=launches or [{"device": "cpu", "git_commit": "abc", "versions": {"torch": "2.14.1"}}])
    data = {} if official is None else {"data": {"official_cifar10": official, "root": "data",
                                                 "fingerprint": "cifar10" if official else "generated"}}
    record.update(status, reason, device="cpu", hetconv="grouped", torch_compile=None, precision="float32",
                  resume=how_to_resume(run_dir, in_sweep=True), **data)
    return run_dir


def test_a_table_of_finished_jobs_on_the_official_cifar10_is_written_to_results(tmp_path, monkeypatch):
    fake_job(tmp_path / "sweep", 1, 1.0, "finished", official=True)
    monkeypatch.setattr(make_table, "RESULTS_DIR", tmp_path / "results")  # its default --out
    make_table.main([str(tmp_path / "sweep")])
    assert {p.name for p in (tmp_path / "results").iterdir()} == {"table.md", "table.csv", "acc_vs_flops.png"}
    assert "Not CIFAR-10" not in (tmp_path / "results" / "table.md").read_text()


def test_the_table_counts_each_rows_costs_on_its_model_and_refuses_to_pool_other_data(tmp_path):
    for part in PAPER_PARTS:
        fake_job(tmp_path / "paper", part, 1.0, "finished", official=True)
    make_table.main([str(tmp_path / "paper"), "--out", str(tmp_path / "table")])
    rows = {int(r["part"]): r for r in csv.DictReader((tmp_path / "table" / "table.csv").read_text().splitlines())}
    published = load_published()
    for part in PAPER_PARTS:  # counted on the model, beside the published figures, which agree
        counted = {key: float(rows[part][key]) for key in ("flops_m", "params_m")}
        assert counted == {key: published[part][key] for key in ("flops_m", "params_m")}
        assert float(rows[part]["reimpl_best_test_acc"]) == published[part]["reimpl_best_test_acc"]
    assert rows[4]["status"] == "1 finished"
    record = read_metrics(tmp_path / "paper" / "part=4,width=1.0")  # as a run of code that counted otherwise records
    write_json(tmp_path / "paper" / "part=4,width=1.0" / "metrics.json", {**record, "flops": 106e6, "params": 3.5e6})
    [row] = [r for r in make_table.main([str(tmp_path / "paper"), "--out", str(tmp_path / "table")]) if r["part"] == 4]
    assert (row["flops_m"], row["params_m"]) == (published[4]["flops_m"], published[4]["params_m"])
    assert row["status"] == ("1 finished; its jobs recorded 106.00M FLOPs and 3.500M params, counted by the code that "
                             "trained them; this table gives this code's count")
    fake_job(tmp_path / "paper", 4, 1.0, "finished", seed=1, official=False)  # a seed on other images
    with pytest.raises(SystemExit, match=r"seed=1 trained on different data \(data, fingerprint cifar10; data, "
                                         r"fingerprint generated\); make a table of each dataset's jobs separately"):
        make_table.main([str(tmp_path / "paper"), "--out", str(tmp_path / "table")])
    fake_job(tmp_path / "five", 1, 1.0, "finished", overrides=["model.num_classes=5"])  # the recipe's classifier
    [five] = [r for r in make_table.main([str(tmp_path / "five"), "--out", str(tmp_path / "table")]) if r["n"]]
    assert (five["flops_m"], five["params_m"]) == (313.73, 14.985)  # published: 313.74, 14.988 with 10 classes
    assert five["published_flops_m"] is five["published_test_acc"] is five["diff"] is None  # not the paper's model
    assert "No row has paper figures: the paper trained 10-class models, these jobs 5." in (
        tmp_path / "table" / "table.md").read_text()


def test_a_new_job_is_refused_as_another_jobs_twin_whatever_data_folder_and_form_it_runs_with(tmp_path):
    job = fake_job(tmp_path / "sweep", 4, 0.25, "finished", launches=[{"overrides": ["model.part=4", "optim.lr=0.02"]}])
    config, new = read_metrics(job)["config"], tmp_path / "sweep" / "new"
    new.mkdir()
    other_lr = {**config, "optim": {**config["optim"], "lr": 0.05}}  # hydra.sweep.subdir=${hydra.job.num}, say
    train_module.refuse_a_twin(new, other_lr, ["model.part=4", "optim.lr=0.05"])
    # Where the data is and how the job runs make no other job: the table would refuse the pair as one job twice.
    moved = {**config, "data": {**config["data"], "root": "/elsewhere"}}
    with pytest.raises(train_module.Refused, match="this launch leaves out optim.lr=0.02, against that job's last"):
        train_module.refuse_a_twin(new, moved, ["model.part=4", "data.root=/elsewhere"])
    new.mkdir()  # the refusal removed it, empty
    other_form = {**moved, "trainer": {**config["trainer"], "hetconv": "dense", "compile": False}}
    with pytest.raises(train_module.Refused, match=r"holds, with the same recipe and only another way to compute it "
                                                   r"\(trainer.compile: .* -> False; trainer.hetconv: .* -> dense\), "
                                                   r"which make_table.py would count as the same job"):
        train_module.refuse_a_twin(new, other_form, ["model.part=4", "data.root=/elsewhere", "trainer.hetconv=dense"])


def test_make_refuses_a_sweep_folder_in_args_that_its_table_would_not_read():
    def dry_run(target, args, *variables):  # make -n prints the commands without running them
        return subprocess.run(["make", "-n", "-o", "install", target, f"ARGS={args}", *variables], cwd=REPO,
                              capture_output=True, text=True)

    for target, folder in (("reproduce", "multirun/paper"), ("demo", "demo/sweep")):
        refused = dry_run(target, "seed=0,1 hydra.sweep.dir=elsewhere")
        assert refused.returncode == 2 and f"ARGS sets hydra.sweep.dir, but the table is made from {folder}" in (
            refused.stderr)
    launched = dry_run("reproduce", "seed=0,1")
    assert launched.returncode == 0 and (
        """train.py -m experiment=paper "hydra.sweep.dir='multirun/paper'" seed=0,1""" in launched.stdout)
    # Other settings in their own folder, named after them: quoted for Hydra, which would read the = in it.
    elsewhere = dry_run("demo", "optim.lr=0.05", "DEMO=demo/lr=0.05").stdout
    for command in ('make_fake_cifar.py "demo/lr=0.05/data"', 'make_table.py "demo/lr=0.05/sweep" --out "demo/lr=0.05"',
                    """"data.root='demo/lr=0.05/data'" "hydra.sweep.dir='demo/lr=0.05/sweep'" optim.lr=0.05"""):
        assert command in elsewhere


def test_a_twin_folder_without_a_record_is_named_as_the_one_to_remove(tmp_path):
    job = fake_job(tmp_path / "sweep", 4, 1.0, "finished")
    twin = tmp_path / "sweep" / "part=4,seed=0,optim.lr=0.02"
    shutil.copytree(job / ".hydra", twin / ".hydra")  # where a relaunch was refused, its folder left with a file more
    (twin / "notes.txt").touch()
    with pytest.raises(SystemExit, match=re.escape(f"{twin} holds no metrics.json: the sweep was launched again with "
                                                   "its overrides written otherwise") + ".*Remove that folder"):
        make_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])


def test_a_damaged_metrics_json_is_named_with_what_to_do(tmp_path):
    job = fake_job(tmp_path / "sweep", 1, 1.0, "finished")
    (job / "metrics.json").write_text('{"status": ')  # truncated by something other than train.py
    with pytest.raises(SystemExit, match=r"metrics.json is not readable \(.*Move it away: with no checkpoints/last"):
        make_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])
    (job / "metrics.json").write_text('{"x": 1}')  # JSON, but not a run's record
    with pytest.raises(SystemExit, match=r"metrics.json is not readable \(not a run's record"):
        make_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])


def test_the_table_skips_the_sweeps_own_folder_and_names_a_job_that_lost_its_metrics(tmp_path):
    sweep_dir = tmp_path / "sweep"
    fake_job(sweep_dir, 1, 1.0, "finished")
    job = fake_job(sweep_dir, 4, 1.0, "running")
    shutil.copytree(job / ".hydra", sweep_dir / ".hydra")  # a run launched in the sweep's folder itself
    (sweep_dir / "multirun.yaml").touch()
    (job / "metrics.json").unlink()
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.pt").touch()
    make_table.main([str(sweep_dir), "--out", str(tmp_path / "table")])
    rows = {r["part"]: r for r in csv.DictReader(open(tmp_path / "table" / "table.csv"))}
    assert rows["4"]["status"] == "part=4,width=1.0: no metrics.json, but a checkpoint: relaunch the sweep to resume it"
    (job / "checkpoints" / "last.pt").unlink()  # nothing to resume: killed before its first write
    rows = {r["part"]: r for r in make_table.main([str(sweep_dir), "--out", str(tmp_path / "table")])}
    assert rows[4]["status"] == "part=4,width=1.0: no metrics.json (never started, or killed before its first write)"
    for damaged in ("", "model: {part: [4", "- 4", "4"):  # emptied, cut short, not a mapping
        (job / ".hydra" / "config.yaml").write_text(damaged)
        with pytest.raises(SystemExit, match=r"config.yaml holds no train.py config, and the job has no metrics.json"):
            make_table.main([str(sweep_dir), "--out", str(tmp_path / "table")])


def test_the_table_counts_a_job_without_hydras_files_and_a_run_in_the_sweeps_own_folder(tmp_path):
    sweep_dir = fake_job(tmp_path, 4, 1.0, "finished", seed=2, test_acc=95.5)  # a single run's folder...
    (sweep_dir / "multirun.yaml").touch()  # ...that a sweep was launched into, as train.py allowed until 3278194
    fake_job(sweep_dir, 4, 1.0, "finished", test_acc=93.0)
    shutil.rmtree(fake_job(sweep_dir, 4, 1.0, "finished", seed=1, test_acc=94.0) / ".hydra")  # hydra.output_subdir=null
    make_table.main([str(sweep_dir), "--out", str(tmp_path / "table")])
    [row] = [r for r in csv.DictReader(open(tmp_path / "table" / "table.csv")) if r["part"] == "4"]
    assert (row["n"], row["test_acc"], row["status"]) == ("3", "94.17", "3 finished")


def test_a_sweep_into_a_single_runs_folder_is_refused_before_hydra_writes_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNS", str(tmp_path))
    (tmp_path / "multirun").mkdir()
    run = fake_job(tmp_path, 4, 1.0, "finished").rename(tmp_path / "multirun" / "paper")
    refusal = ("hydra.sweep.dir={} holds a run that train.py trained: a sweep there would train its jobs inside that "
               "run's folder. Give the sweep a folder of its own")
    # named by the command line (the last of two wins, as in Hydra; an interpolation resolves), or by the experiment
    for command, named in ((["hydra.sweep.dir=elsewhere", f"hydra.sweep.dir={run}"], run),
                           (["hydra.sweep.dir=${oc.env:RUNS}/multirun/paper"], run),
                           (["experiment=paper"], "multirun/paper")):
        with pytest.raises(SystemExit, match=re.escape(refusal.format(named))):
            check_jobs(["-m", "model.part=1,4", *command])
    for fine in (["model.part=1,4", f"hydra.sweep.dir={run}", "hydra.sweep.dir=elsewhere"],
                 ["model.part=1,4", "hydra.sweep.dir=2024"],  # a number is a folder's name too
                 ["experiment=paper", "hydra.sweep.dir=runs/${hydra:job.name}"]):  # named as the sweep starts
        check_jobs(["-m", *fine])
    (run / "metrics.json").unlink()
    (run / "multirun.yaml").touch()  # a sweep's own folder: launched again, the sweep resumes its jobs
    check_jobs(["-m", "experiment=paper"])


def test_a_sweep_relaunched_with_another_recipe_is_refused_naming_what_differs(fake_root, tmp_path):
    """Relaunched with trainer.epochs=2 left out, a sweep would start every job over at six epochs beside its own,
    which make_table.py would then refuse to pool."""
    sweep_dir = tmp_path / "e2"
    fake_job(sweep_dir, 4, 0.25, "finished", launches=[{"overrides": ["model.part=4", "experiment=demo",
                                                                      "trainer.epochs=2"]}])
    refusal = (f"hydra.sweep.dir={sweep_dir} holds a sweep of another recipe: against its job part=4,width=0.25, "
               "this launch's job {} changes {}. A sweep folder holds one recipe, whose seeds make_table.py pools. To "
               "resume or extend that sweep, launch it with the settings its jobs had (besides part, width and seed, "
               "that job had: experiment=demo trainer.epochs=2)")
    with pytest.raises(SystemExit, match=re.escape(refusal.format("model.part=1", "trainer.epochs: 2 -> 6"))):
        check_jobs(["-m", "experiment=demo", f"hydra.sweep.dir={sweep_dir}"])
    # The folder as Hydra names it, with the command's own values
    named = "hydra.sweep.dir=" + str(tmp_path / "e${trainer.epochs}")
    with pytest.raises(SystemExit, match=re.escape(refusal.format("model.part=1 trainer.epochs=2 optim.lr=0.05",
                                                                  "optim.lr: 0.02 -> 0.05"))):
        check_jobs(["-m", "experiment=demo", "trainer.epochs=2", "optim.lr=0.05", named])
    # Its own recipe, resumed or given new parts, widths and seeds, on data moved elsewhere and computed otherwise
    check_jobs(["-m", "experiment=demo", "trainer.epochs=2", "model.part=1,4", "model.width=0.25,0.5", "seed=0,1",
                f"data.root={fake_root}", "trainer.hetconv=dense", f"hydra.sweep.dir={sweep_dir}"])
    # A sweep over one of the recipe's settings, relaunched before each of its values has a job in the folder
    check_jobs(["-m", "experiment=demo", "trainer.epochs=2", "optim.lr=0.02,0.05", f"data.root={fake_root}", named])


def test_a_job_launched_with_a_mistyped_part_is_a_failed_row_of_the_table(tmp_path):
    fake_job(tmp_path / "sweep", 4, 1.0, "finished")
    fake_job(tmp_path / "sweep", "l6", 1.0, "failed", epochs_done=0)  # model.part=1,2,4,l6: a string reaches the job
    make_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])
    rows = list(csv.DictReader(open(tmp_path / "table" / "table.csv")))
    assert [r["part"] for r in rows] == [*map(str, PAPER_PARTS), "l6"]
    assert rows[-1]["status"].startswith("part=l6,width=1.0: failed")


def test_table_compares_only_full_width_rows_and_tells_a_killed_job_from_a_running_one(tmp_path):
    sweep_dir = tmp_path / "sweep"
    fake_job(sweep_dir, 1, 1.0, "finished")
    fake_job(sweep_dir, 1, 0.25, "finished")
    fake_job(sweep_dir, 4, 1.0, "running", epochs_done=1)  # killed: metrics.json still says running
    alive = fake_job(sweep_dir, 8, 1.0, "running", epochs_done=1)
    out = tmp_path / "table"
    with exclusive(alive):  # held as train.py holds it while it trains
        script("scripts/make_table.py", str(sweep_dir), "--out", str(out))

    table = csv.DictReader((out / "table.csv").read_text().splitlines())
    rows = {(int(r["part"]), float(r["width"])): r for r in table}
    full, narrow = rows[(1, 1.0)], rows[(1, 0.25)]
    assert (full["published_flops_m"], full["published_test_acc"], full["diff"]) == ("313.74", "94.06", "-4.06")
    assert narrow["test_acc"] == "90.0"
    assert narrow["published_flops_m"] == narrow["published_test_acc"] == narrow["diff"] == ""
    assert rows[(4, 1.0)]["status"] == (
        "part=4,width=1.0: stopped, 1/2 epochs done (no process holds its lock: killed?); to resume: rerun the sweep "
        f"command with hydra.sweep.dir={sweep_dir}")
    assert rows[(8, 1.0)]["status"] == "part=8,width=1.0: running, 1/2 epochs done"
    not_run = rows.pop((2, 1.0))  # a part of the paper that no job ran: at the paper's width, its figures beside
    assert not_run["status"] == "not run" and not_run["published_test_acc"] != ""
    assert sorted(rows) == [(1, 0.25), (1, 1.0), (4, 1.0), (8, 1.0), (16, 1.0), (32, 1.0), (64, 1.0)]

    markdown = (out / "table.md").read_text()
    assert f"Made by `python scripts/make_table.py {sweep_dir} --out {out}`" in markdown  # every option, as typed
    part_1 = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
              if line.startswith("| 1 |")]
    # FLOPs, the re-implementation's best epoch, accuracy and diff of the paper
    paper_cells = {cells[1]: [cells[3], cells[7], cells[8], cells[9]] for cells in part_1}
    assert paper_cells == {"1.0": ["313.74M", "94.1", "94.06", "-4.06"], "0.25": ["-", "-", "-", "-"]}
    assert "Rows of width != 1 have no paper figures" in markdown


def test_a_row_pools_its_seeds_as_mean_and_sample_std(tmp_path):
    for seed, test_acc in enumerate((93.0, 94.0, 95.5)):
        fake_job(tmp_path / "sweep", 4, 1.0, "finished", seed=seed, test_acc=test_acc)
    make_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])
    [row] = [r for r in csv.DictReader(open(tmp_path / "table" / "table.csv")) if r["part"] == "4"]
    assert (row["n"], row["test_acc"], row["test_acc_std"], row["best_test_acc"]) == ("3", "94.17", "1.26", "95.17")
    assert row["diff"] == "0.24" and row["status"] == "3 finished"  # 94.17 - the paper's 93.93
    assert "| 94.17 ± 1.26 (n=3) |" in (tmp_path / "table" / "table.md").read_text()
    # An error of several lines (torch.compile's, say) and a pipe: kept whole in the CSV, on one line in Markdown.
    fake_job(tmp_path / "sweep", 4, 1.0, "failed", seed=3, reason="InductorError: a | b\n\nSet TORCHDYNAMO_VERBOSE=1")
    fake_job(tmp_path / "sweep", 8, 1.0, "finished")
    make_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])
    rows = {r["part"]: r for r in csv.DictReader(open(tmp_path / "table" / "table.csv"))}
    assert rows["4"]["status"] == ("3 finished; part=4,width=1.0,seed=3: failed, 2/2 epochs done (InductorError: a | "
                                   "b\n\nSet TORCHDYNAMO_VERBOSE=1)")  # none hidden
    assert (rows["8"]["n"], rows["8"]["test_acc_std"]) == ("1", "")  # one seed: no std
    markdown = (tmp_path / "table" / "table.md").read_text()
    table = markdown[markdown.index("| P |"):].split("\n\n")[0]  # a blank line would end it before its last row
    assert "2/2 epochs done (InductorError: a \\| b Set TORCHDYNAMO_VERBOSE=1) |\n| 8 |" in table and "| 64 |" in table
    assert "from 4 finished jobs (1 more did not finish: see the jobs column)" in markdown
    assert "Computed as: HetConv grouped, eager, float32." in markdown


def test_a_table_made_again_from_the_same_jobs_is_left_as_it_is(tmp_path, monkeypatch):
    """Rewritten, only its date and commit would change: a committed table would make its checkout dirty, and the next
    rerun would name a dirty commit."""
    fake_job(tmp_path / "sweep", 4, 1.0, "finished")
    out = tmp_path / "table"
    make_table.main([str(tmp_path / "sweep"), "--out", str(out)])
    (out / "table.md").write_text((out / "table.md").read_text().replace("(commit ", "(commit 0ld", 1))  # made earlier
    written = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    make_table.main([str(tmp_path / "sweep"), "--out", str(out)])
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == written
    fake_job(tmp_path / "sweep", 8, 1.0, "finished")  # a new job: made again, even after a stop while drawing it

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(make_table, "plot", interrupted)
        make_table.main([str(tmp_path / "sweep"), "--out", str(out)])
    make_table.main([str(tmp_path / "sweep"), "--out", str(out)])
    assert (out / "acc_vs_flops.png").stat().st_mtime_ns != written["acc_vs_flops.png"]
    table = (out / "table.md").read_text()
    assert "(commit 0ld" not in table and "| 8 | 1.0 | 71.35M" in table


def test_the_table_names_every_launch_and_plots_one_curve_per_width(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    fake_job(sweep_dir, 1, 1.0, "finished", launches=[  # started on one machine, resumed on another
        {"device": "CPU A", "git_commit": "abc", "versions": {"torch": "2.14.1"}},
        {"device": "GPU B", "git_commit": "def", "versions": {"torch": "2.14.2"}}])
    fake_job(sweep_dir, 4, 1.0, "finished", launches=[{"device": "GPU C", "git_commit": "old",
                                                       "versions": {"torch": "2.11.0"}}])
    fake_job(sweep_dir, 1, 0.25, "finished")
    figures = []
    monkeypatch.setattr(make_table.plt, "close", figures.append)
    out = tmp_path / "table"
    make_table.main([str(sweep_dir), "--out", str(out)])

    markdown = (out / "table.md").read_text()
    assert ("- Devices: CPU A; GPU B; GPU C; cpu. Computed as: HetConv grouped, eager, float32. Code: abc, def, old; "
            "torch 2.11.0, 2.14.1, 2.14.2.") in markdown
    assert "momentum 0.9, weight decay 0.0005, batch 100;" in markdown and "; random crop (pad 4) + flip;" in markdown
    assert make_table.augmentation({"crop_padding": 0, "flip": False}) == "no crop, no flip"
    legend = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["HetConv paper", "ours (final epoch, mean ± std)", "ours, width 0.25 (final epoch, mean ± std)"]


@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=10"],
], ids=["joblib", "submitit_local"])
def test_parallel_launchers_run_the_sweep_with_one_gpu_per_job(launcher, fake_root, tmp_path, two_fake_gpus):
    sweep_dir = tmp_path / "sweep"
    # trainer.device=auto: a job claims a GPU (the fake ones here, where CUDA finds none and the job trains on the CPU)
    result = sweep(sweep_dir, fake_root, "model.part=1,4", "trainer.jobs_per_gpu=1", "trainer.device=auto", *launcher,
                   env=two_fake_gpus)
    assert result.returncode == 0, result.stderr
    metrics = [read_metrics(sweep_dir / JOB.format(p)) for p in (1, 4)]
    assert [m["status"] for m in metrics] == ["finished", "finished"]
    assert sorted(m["cuda_visible_devices"] for m in metrics) == ["0", "1"]  # not both on GPU 0
    assert [p.name for p in (tmp_path / "locks").iterdir()] == [f"hetconv-gpu-slots-{os.getuid()}"]
    assert [f"model.part={p}" in m["launches"][0]["overrides"] for p, m in zip((1, 4), metrics)] == [True, True]


def test_a_cpu_job_claims_no_gpu(fake_root, two_fake_gpus, monkeypatch):
    monkeypatch.setenv("PATH", two_fake_gpus["PATH"])
    cfg = train_config(*SMALL, f"data.root={fake_root}", "trainer.jobs_per_gpu=1")  # SMALL: trainer.device=cpu
    assert train_module.choose_execution(cfg, fake_root, None)[0] == torch.device("cpu")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and not gpus._held


def test_a_sweep_whose_jobs_would_all_train_on_the_first_of_several_gpus_is_refused(tmp_path, two_fake_gpus,
                                                                                      monkeypatch):
    monkeypatch.setenv("PATH", two_fake_gpus["PATH"])
    refusal = ("runs the sweep's jobs side by side, each seeing the same 2 GPUs, and with trainer.jobs_per_gpu=null "
               "every job would train on the first of them: add trainer.jobs_per_gpu=1")
    side_by_side = (["hydra/launcher=joblib"], ["hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=2"])
    for launcher in side_by_side:
        command = ["-m", "model.part=1,4", f"hydra.sweep.dir={tmp_path / 'sweep'}", *launcher]
        with pytest.raises(SystemExit, match=re.escape(f"error: ValueError: {launcher[0]} {refusal}")):
            check_jobs(command)
        for fine in ("trainer.jobs_per_gpu=1", "trainer.device=cpu"):
            check_jobs([*command, fine])
        check_jobs([*command, "model.part=4"])  # one job: nothing beside it
    for one_at_a_time in (["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"], ["hydra/launcher=basic"],
                          ["hydra/launcher=submitit_local"]):  # without gpus_per_node its jobs see no GPU
        check_jobs(["-m", "model.part=1,4", f"hydra.sweep.dir={tmp_path / 'sweep'}", *one_at_a_time])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # one GPU: the jobs share it, as asked
    check_jobs(["-m", "model.part=1,4", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra/launcher=joblib"])


def test_a_submitit_local_sweep_on_more_gpus_than_the_host_has_is_refused(tmp_path, two_fake_gpus, monkeypatch):
    monkeypatch.setenv("PATH", two_fake_gpus["PATH"])
    command = ["-m", "model.part=4", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra/launcher=submitit_local",
               "trainer.jobs_per_gpu=1"]
    refusal = ("hydra.launcher.gpus_per_node=4, but this host has 2 GPUs (nvidia-smi --list-gpus): submitit_local "
               "would give the jobs GPUs that are not there, where they would train on the CPU. Set "
               "hydra.launcher.gpus_per_node=2")
    with pytest.raises(SystemExit, match=re.escape(refusal)):
        check_jobs([*command, "hydra.launcher.gpus_per_node=4"])
    check_jobs([*command, "hydra.launcher.gpus_per_node=2"])
    check_jobs([*command, "hydra.launcher.gpus_per_node=4", "trainer.device=cpu"])


def test_the_gpus_a_launchers_jobs_share_are_those_they_see(two_fake_gpus, monkeypatch):
    monkeypatch.setenv("PATH", two_fake_gpus["PATH"])
    assert gpus.host_gpus() == ["0", "1"]  # numbered as nvidia-smi numbers them, whatever is listed between
    plugin = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
    local = {"_target_": plugin + "LocalLauncher", "gpus_per_node": 4}
    assert gpus.gpus_each_job_shares(local) == 2  # "0,1,2,3" on a host of two GPUs: the two there are
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # submitit_local sets its own, 0..gpus_per_node-1, over the shell's
    assert gpus.gpus_each_job_shares(local) == 2
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
    assert gpus.gpus_each_job_shares(joblib) == 1  # joblib's jobs inherit the shell's
    assert gpus.gpus_each_job_shares({"_target_": plugin + "SlurmLauncher", "gpus_per_node": 2}) == 0  # its own


def never_wait(seconds):
    raise AssertionError("claim_gpu waited for a slot while one was free")


def test_gpu_slots_fill_every_gpu_before_doubling_up(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(gpus, "sleep", never_wait)  # a claim that finds no free slot fails rather than hangs
    claimed, handles = [], []
    for _ in range(3):  # three jobs, as three processes would: a fresh slot table each time
        monkeypatch.setattr(gpus, "_held", [])
        claimed.append(gpus.claim_gpu(jobs_per_gpu=2, lock_dir=tmp_path))
        handles += gpus._held
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert claimed == ["3", "5", "3"]


def test_a_job_waits_for_a_free_gpu_slot_and_a_reused_worker_keeps_its_gpu(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    held = {}
    for _ in range(2):  # two running jobs fill both GPUs' single slots
        monkeypatch.setattr(gpus, "_held", [])
        gpu = gpus.claim_gpu(jobs_per_gpu=1, lock_dir=tmp_path)
        held[gpu] = gpus._held[0]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(gpus, "_held", [])
    claimed, waits = [], threading.Event()
    real_sleep = time.sleep

    def sleep(seconds):  # claim_gpu sleeps only when it found every slot busy
        waits.set()
        real_sleep(seconds)

    monkeypatch.setattr(gpus, "sleep", sleep)
    waiting = threading.Thread(target=lambda: claimed.append(gpus.claim_gpu(1, lock_dir=tmp_path, poll_s=0.01)))
    with caplog.at_level(logging.INFO, logger=gpus.__name__):
        waiting.start()
        assert waits.wait(timeout=30) and not claimed
        held["5"].close()  # the job on GPU 5 ends
        waiting.join(timeout=30)
    assert claimed == ["5"] and "all 2 GPU slots (2 GPUs x trainer.jobs_per_gpu=1) are busy" in caplog.text
    assert gpus.claim_gpu(1, lock_dir=tmp_path) == "5" and len(gpus._held) == 1  # its next job: same GPU, same slot
    held["3"].close()


def test_no_visible_gpu_is_no_gpu_to_claim(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(gpus, "sleep", never_wait)
    monkeypatch.setattr(gpus, "_held", [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 2,")  # spaces and a trailing comma name no GPU
    assert gpus.visible_gpus() == ["0", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden
    assert gpus.visible_gpus() == [] and gpus.claim_gpu(1, lock_dir=tmp_path) is None
    assert "no GPU claimed" not in caplog.text  # hidden on purpose
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path))  # a host without nvidia-smi: a container may still have CUDA
    assert gpus.visible_gpus() == [] and gpus.claim_gpu(1, lock_dir=tmp_path) is None
    assert "nvidia-smi lists no GPU and CUDA_VISIBLE_DEVICES is unset: no GPU claimed" in caplog.text
    assert gpus._held == []


def test_two_slurm_allocations_on_one_node_keep_their_gpu_slots_apart(monkeypatch):
    """Each sees its own GPUs as 0, 1, ...: slots by that number alone would make one wait for the other's."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    outside = gpus.default_lock_dir()
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    first = gpus.default_lock_dir()
    monkeypatch.setenv("SLURM_JOB_ID", "102")
    assert len({outside, first, gpus.default_lock_dir()}) == 3


def test_a_gpus_slots_are_the_same_whichever_gpus_a_job_sees(tmp_path, monkeypatch):
    """A sweep launched on GPUs 3,5 and another on GPU 5 alone share GPU 5's slots."""
    class Waits(Exception):
        pass

    def would_wait(seconds):
        raise Waits

    monkeypatch.setattr(gpus, "sleep", would_wait)
    held = []
    for _ in range(2):  # the first sweep's two jobs fill both GPUs' single slots
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
        monkeypatch.setattr(gpus, "_held", [])
        gpus.claim_gpu(1, lock_dir=tmp_path)
        held += gpus._held
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    monkeypatch.setattr(gpus, "_held", [])
    try:
        with pytest.raises(Waits):  # GPU 5's one slot is taken: the job waits rather than doubling up
            gpus.claim_gpu(1, lock_dir=tmp_path)
    finally:
        for handle in held:
            handle.close()


def test_a_job_waiting_for_a_gpu_slot_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(gpus, "_held", [])
    gpus.claim_gpu(1, lock_dir=tmp_path)
    [busy] = gpus._held
    monkeypatch.setattr(gpus, "_held", [])
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 3:  # the job on GPU 3 ends while this one waits
            busy.close()

    monkeypatch.setattr(gpus, "sleep", sleep)
    with caplog.at_level(logging.INFO, logger=gpus.__name__):
        assert gpus.claim_gpu(1, lock_dir=tmp_path, poll_s=7) == "3"
    assert polls == [7, 7, 7] and caplog.text.count("GPU slots") == 1  # not a line every poll, for hours


def test_a_sweep_without_multirun_is_refused_rather_than_run_as_one_job(tmp_path):
    refusal = ("this command sets a sweep (model.part=1,2,4,8,16,32,64, from experiment=paper), which only -m runs: "
               "add -m to the command (python train.py -m ...), or give model.part one value for a single run")
    result = script("train.py", "experiment=paper", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 1 and refusal in result.stderr
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run's folder
    # Composed from a folder named on the command line, which the check before Hydra leaves alone: refused in the run
    result = script("train.py", "-cd", str(REPO / "configs"), "experiment=paper", f"hydra.run.dir={tmp_path / 'cd'}",
                    check=False)
    assert result.returncode == 1 and refusal in result.stderr and not (tmp_path / "cd" / "metrics.json").exists()
    # Hydra would ignore the other mode's folder, and train in a new one named by the time
    with pytest.raises(SystemExit, match=re.escape("error: ValueError: hydra.sweep.dir=x: Hydra reads hydra.sweep.* "
                                                   "with -m alone; this single run would ignore it")):
        check_jobs(["model.part=4", "hydra.sweep.dir=x"])
    with pytest.raises(SystemExit, match=re.escape("error: ValueError: hydra.run.dir=x: Hydra reads hydra.run.* for a "
                                                   "single run alone; this sweep (-m) would ignore it")):
        check_jobs(["-m", "model.part=1,4", "hydra.run.dir=x"])
    # with model.part given, the same command is a single run: it gets past this check to the settings' own
    result = script("train.py", "experiment=paper", "model.part=3", f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 1 and "vgg16(part=3, width=1.0)" in result.stderr


def test_job_folders_are_named_by_every_override_that_changes_what_the_job_computes():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    unnamed = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    # What may change on a resume must not rename the job: a relaunch would train it again in a new folder.
    assert unnamed == {"model.part", "seed", "experiment", *RESUMABLE_CHANGES}


def test_the_resume_command_is_the_launchs_own_in_the_runs_folder():
    run_dir = Path("outputs/2026-11-26/13-17-50_part4_seed0")  # the default is a new folder at each launch
    assert how_to_resume(run_dir, False, ["model.part=4", "data.root='/a b'"], ["hydra.run.dir=elsewhere"]) == (
        f"python train.py model.part=4 'data.root='\"'\"'/a b'\"'\"'' hydra.run.dir={run_dir}")  # as the shell reads it
    # A sweep's job: its own values, with the sweep's launcher and folder, launch it alone
    assert how_to_resume(Path("multirun/paper/part=4,seed=0"), True, ["model.part=4", "experiment=paper"],
                         ["hydra/launcher=slurm", "hydra.mode=MULTIRUN"]) == (
        "python train.py -m model.part=4 experiment=paper hydra/launcher=slurm hydra.sweep.dir=multirun/paper")
    # A run started without Hydra (train.train, as the tests call it) has no command of its own
    assert how_to_resume(run_dir, in_sweep=False) == f"rerun the same command with hydra.run.dir={run_dir}"


@pytest.mark.parametrize("folder", ["multirun/paper/part=4,seed=0", "/tmp/~x", "/home/josé/runs", "/home/o'brien/run",
                                    "/tmp/a\\b", "/tmp/x\\", "/tmp/$HOME/x", "/tmp/a b"])
def test_a_folder_in_a_printed_command_reaches_hydra_as_it_is(folder):
    typed = command_line_override("hydra.run.dir", Path(folder))
    [argument] = shlex.split(typed)  # as the shell passes it on
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[argument], return_hydra_config=True)
    assert cfg.hydra.run.dir == folder


def test_slurm_launcher_asks_for_one_gpu_per_job():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=paper", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")
    # what the README promises: 8 CPUs, 32 GB, 8 h per allocation, 5 requeues, 7 jobs at once
    assert (launcher.cpus_per_task, launcher.mem_gb, launcher.timeout_min, launcher.max_num_timeout,
            launcher.array_parallelism) == (8, 32, 480, 5, 7)
    assert cfg.hydra.sweeper.params["model.part"] == "1,2,4,8,16,32,64"


def test_the_table_says_when_a_row_rests_on_one_seed(tmp_path):
    """Run-to-run noise (0.15-0.3 points) is larger than most gaps between the paper's rows: a one-seed row says so."""
    for seed, test_acc in enumerate((93.0, 94.0)):
        fake_job(tmp_path / "sweep", 4, 1.0, "finished", seed=seed, test_acc=test_acc)
    make_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])
    assert "Rows from one seed" not in (tmp_path / "table" / "table.md").read_text()
    fake_job(tmp_path / "sweep", 16, 1.0, "finished")
    make_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])
    assert "Rows from one seed (n=1) have no spread: run-to-run noise" in (tmp_path / "table" / "table.md").read_text()
