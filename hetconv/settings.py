"""The settings train.py and eval.py take: composed, checked before anything starts, and how bad ones end a run.

A mistyped or unread key and a value that cannot train are refused here, naming the key; a run stopped by such an
error ends with its message alone. `train_config` composes train.py's config: the settings it reads, for its
command-line check, the tests and bench.py.
"""

import copy
import difflib
import math
import os
import re
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # how Hydra expands a sweep into its jobs
from hydra._internal.utils import get_args_parser  # Hydra's own command-line parser (hydra-core is pinned)
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hetconv.data import FOLDER, DatasetError, find_batches
from hetconv.gpus import refuse_gpus_the_host_lacks, refuse_one_gpu_for_all
from hetconv.layer import check_impl
from hetconv.provenance import REPO_ROOT
from hetconv.runfiles import (SWEPT_IN_A_RECIPE, command_line_override, holds_a_run, last_launch_overrides,
                              read_metrics, recipe_differences, refuse_a_sweeps_folder)
from hetconv.training import check_device, compile_mode
from models.vgg import check_part_fits


# train.py's config folder and config, as its @hydra.main names them.
CONFIGS, TRAIN_CONFIG = REPO_ROOT / "configs", "train"


def train_config(*overrides: str, name: str = TRAIN_CONFIG, with_hydra: bool = False) -> DictConfig:
    """configs/train.yaml (or the config `name`, as -cn names it) composed with these overrides, as train.py would
    see it; hydra's node too if with_hydra."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=with_hydra)


def config_options(hydra_cfg: DictConfig) -> list[str]:
    """The launch's -cp, -cd and -cn, which Hydra keeps apart from its overrides, as a command line gives them: none
    where the launch read train.py's own configs/train.yaml."""
    options = []
    for source in hydra_cfg.runtime.config_sources:
        where = source.path if source.schema == "file" else f"{source.schema}://{source.path}"
        ours = source.schema == "file" and Path(source.path).resolve() == CONFIGS.resolve()
        if source.provider == "main" and not ours:
            options += ["-cp", where]
        elif source.provider == "command-line":
            options += ["-cd", where]
    if hydra_cfg.job.config_name != TRAIN_CONFIG:
        options += ["-cn", hydra_cfg.job.config_name]
    return options


def config_groups() -> list[str]:
    """train.py's config groups (experiment, data, ...): a command line sets each to one of its files."""
    return sorted(group.name for group in CONFIGS.iterdir() if group.is_dir())


def override_key(override: str) -> str:
    """The key a command-line override sets: model.part of model.part=4 or +model.part=4."""
    return override.split("=", 1)[0].lstrip("+~")


# The true/false settings. Hydra reads `off` or `no` as a string, which Python would take for true.
FLAGS = ("data.download", "data.flip", "data.normalize", "optim.nesterov", "trainer.amp", "trainer.channels_last")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_flags(cfg, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")


def check_settings(cfg) -> None:
    """Reject settings that cannot train, naming the key, before anything starts."""
    for key, least in (("trainer.epochs", 1),
                       ("trainer.batch_size", 2),  # one image has no batch statistics for the classifier's BatchNorm1d
                       ("trainer.eval_batch_size", 1),
                       ("schedule.reference_epochs", 1), ("data.crop_padding", 0), ("model.num_classes", 1)):
        value = OmegaConf.select(cfg, key)
        if not is_int(value) or value < least:
            raise ValueError(f"{key} must be an int >= {least}, got {value!r}")
    for key, zero_allowed in (("optim.lr", False), ("schedule.gamma", False), ("optim.momentum", True),
                              ("optim.weight_decay", True), ("model.width", False)):
        value = OmegaConf.select(cfg, key)
        if not is_finite_number(value) or value < 0 or (value == 0 and not zero_allowed):
            raise ValueError(f"{key} must be a finite number {'>=' if zero_allowed else '>'} 0, got {value!r}")
    if cfg.optim.momentum >= 1:  # old gradients would never fade from the velocity: its steps grow without bound
        raise ValueError(f"optim.momentum must be below 1, got {cfg.optim.momentum!r}")
    if not (isinstance(cfg.data.root, str) and cfg.data.root.strip()):  # data.root= would be the working folder
        raise ValueError(f"data.root must name the folder that holds {FOLDER}/ (or will, once downloaded), got "
                         f"{cfg.data.root!r}")
    # torch.manual_seed takes -2**63 too, but draws for a negative seed as for that seed + 2**64: seed=-1 and
    # seed=2**64-1 would be one run, which the table would count as two seeds.
    if not (is_int(cfg.seed) and 0 <= cfg.seed < 2**64):
        raise ValueError(f"seed must be an int from 0 to 2**64 - 1, got {cfg.seed!r}")
    milestones = OmegaConf.select(cfg, "schedule.milestones")
    if not (OmegaConf.is_list(milestones) and all(is_int(m) and m >= 0 for m in milestones)):
        raise ValueError(f"schedule.milestones must be a list of epochs (ints >= 0) at schedule.reference_epochs, "
                         f"got {milestones!r}")
    beyond = [m for m in milestones if m >= cfg.schedule.reference_epochs]
    if beyond:  # milestone_epochs would pull them in to the last epoch, where they would decay it after all
        raise ValueError(f"schedule.milestones {beyond} lie at or past schedule.reference_epochs="
                         f"{cfg.schedule.reference_epochs}, the run length they are given for, so they would never "
                         f"decay the lr: leave them out, or raise schedule.reference_epochs")
    jobs_per_gpu = cfg.trainer.jobs_per_gpu
    if jobs_per_gpu is not None and not (is_int(jobs_per_gpu) and jobs_per_gpu >= 1):
        raise ValueError(f"trainer.jobs_per_gpu must be an int >= 1 (or null to not pin jobs), got {jobs_per_gpu!r}")
    check_flags(cfg, FLAGS)
    for key, built in (("optim.name", "sgd"), ("schedule.name", "step")):  # what build_optimizer, build_scheduler make
        if OmegaConf.select(cfg, key) != built:
            raise ValueError(f"{key} must be {built}, got {OmegaConf.select(cfg, key)!r}")
    for key, positive in (("data.mean", False), ("data.std", True)):
        values = OmegaConf.select(cfg, key)
        if not (OmegaConf.is_list(values) and len(values) == 3
                and all(is_finite_number(v) and (v > 0 or not positive) for v in values)):
            raise ValueError(f"{key} must be 3 finite numbers{' > 0' if positive else ''}, one per RGB channel, "
                             f"got {values}")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ValueError("optim.nesterov=true needs optim.momentum > 0: set a momentum, or optim.nesterov=false")
    # An unknown trainer.device, trainer.compile or trainer.hetconv fails here, before a GPU is claimed (and before
    # Hydra starts: a login node without a GPU launches jobs that train on one, so no device is looked for here).
    check_device(cfg.trainer.device)
    compile_mode(cfg.trainer.compile, torch.device("cpu"))
    check_impl(cfg.trainer.hetconv, "trainer.hetconv")


def check_command_line(argv: list[str], readable: list[str], groups: list[str], script: str, *, hint: str,
                       bare: str | None = None) -> None:
    """`check_overrides` on a script's command line, before Hydra composes anything: a refusal exits with status 1
    and its message alone. Hydra's own answer to a mistyped key, "To append to your config use +key=value", would
    lead to a setting that nothing reads, and a sweep is refused once rather than in every job. An argument that is
    not key=value is refused too, and a path given without its key as `bare`=path or with = or , in it unquoted (Hydra
    would misparse both). Hydra checks its own settings (hydra.*, hydra/launcher=...) and what it cannot parse."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.shell_completion:  # their arguments are not settings (-sc install=bash)
        return
    ours = settings_overrides(args.overrides)
    try:
        # os.path.exists: False, not an OSError, for a value too long for a path (seed=0,...,99)
        for override in args.overrides:  # checkpoint=multirun/paper/part=4,seed=0, or hydra.run.dir=...
            key, _, value = override.partition("=")
            # bash expands ~ after name= but not after data.root=; Hydra answers a LexerNoViableAltException
            if value.startswith("~"):
                home = f" ({key}=$HOME{value[1:]})" if value.partition("/")[0] == "~" else ""  # not ~user/x
                raise ValueError(f"{override}: the shell left this ~ as it is, and Hydra cannot read it: write the "
                                 f"folder out{home}")
            if re.search("[=,]", value) and os.path.exists(value):
                raise ValueError(f"{override}: Hydra reads the = and , in this path as its own syntax (did you mean "
                                 f"{command_line_override(key, Path(value))}?)")
        for override in ours:
            if bare and os.path.exists(override):  # eval.py multirun/paper/part=4,seed=0, say
                raise ValueError(f"{override}: {script} takes its settings as key=value (did you mean "
                                 f"{command_line_override(bare, Path(override))}?). {hint}")
            if not re.match(r"[+~]*[^=]", override) or ("=" not in override and not override.startswith("~")):
                raise ValueError(f"{override}: {script} takes its settings as key=value. {hint}")
        check_overrides(ours, readable, groups, script, hint=hint)
    except OverrideParseException:
        return
    except ValueError as error:
        raise SystemExit(f"error: ValueError: {error}") from None


def settings_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides of the script's settings, without Hydra's own (hydra.*, hydra/launcher=...)."""
    return [override for override in overrides if not re.match(r"[+~]*hydra[./=]", override)]


LAUNCHER = ("hydra/launcher", "hydra.launcher.")  # the keys that choose and set the launcher


def check_jobs(argv: list[str]) -> None:
    """check_settings on every job that train.py's command line launches, before Hydra makes a folder for any: a
    value that cannot train (trainer.amp=off, say) is refused once, rather than leaving a failed job's folder per
    job (and, on SLURM, a submitted job each). A single run's part is checked against its width too. A sweep's part
    that does not split its width fails that job alone, which the table lists as failed, while the others train. A
    sweep whose jobs would all train on the first of several GPUs, or on GPUs the host lacks, is refused (gpus), and
    so is one into a folder of another recipe's jobs, or on data that is not there. A folder named for the other mode
    (hydra.sweep.dir without -m), which Hydra would ignore, is refused too, and so is a single run in a sweep's own
    folder, before Hydra writes there. What
    Hydra cannot compose, a config from another folder, a swept config group and a value that resolves in the job
    alone are left to Hydra and to each job's own checks."""
    args = get_args_parser().parse_args(argv)
    # What only prints (--cfg job shows a config as it is), or composes a config from another folder.
    if args.help or args.hydra_help or args.shell_completion or args.cfg or args.info or args.config_path \
            or args.config_dir:
        return
    parser, groups = OverridesParser.create(), config_groups()
    try:
        refuse_the_other_modes_folder(args.overrides, args.multirun)
        overrides = parser.parse_overrides(settings_overrides(args.overrides))
        choices = [o.input_line for o in overrides if o.key_or_group in groups]
        values = [o.input_line for o in overrides if o.key_or_group not in groups]
        if any(o.is_sweep_override() for o in overrides if o.key_or_group in groups or not args.multirun):
            return
        # With the run's or sweep's folder and the launcher as the command line gives them, resolved as Hydra does
        where = [override for override in args.overrides
                 if override_key(override) in ("hydra.run.dir", "hydra.sweep.dir")
                 or override_key(override).startswith(LAUNCHER)]
        # with the values too: a folder may name one (hydra.sweep.dir=runs/e${trainer.epochs}), as Hydra resolves it
        plain = [o.input_line for o in overrides if o.key_or_group not in groups and not o.is_sweep_override()]
        composed = train_config(*choices, *plain, *where, name=args.config_name or TRAIN_CONFIG, with_hydra=True)
        sweep = OmegaConf.select(composed, "hydra.sweeper.params") or {}
        # None where it names what Hydra knows at run time alone (${hydra:job.name}, say): left to Hydra
        sweep_dir = OmegaConf.select(composed, "hydra.sweep.dir", throw_on_resolution_failure=False)
        if not args.multirun:
            refuse_a_sweep(sweep, {o.key_or_group for o in overrides},
                           OmegaConf.select(composed, "hydra.runtime.choices.experiment"))
            run_dir = OmegaConf.select(composed, "hydra.run.dir", throw_on_resolution_failure=False)
            if run_dir:  # before Hydra writes its files there
                refuse_a_sweeps_folder(Path(run_dir))
            sweep = {}
        elif sweep_dir:
            refuse_a_runs_folder(Path(sweep_dir))
        if any(override_key(key) in groups for key in sweep):  # an experiment sweeping a config group
            return
        base = OmegaConf.masked_copy(composed, [key for key in composed if key != "hydra"])
        jobs = BasicSweeper.split_arguments(parser.parse_overrides(
            [f"{key}={value}" for key, value in sweep.items()] + values), None)[0]
        trainers, configs = [], {}
        for job in jobs:
            cfg = copy.deepcopy(base)
            for override in parser.parse_overrides(job):
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
            try:
                check_settings(cfg)
                if not args.multirun:
                    check_part_fits(cfg.model.part, cfg.model.width)
                configs[" ".join(job)] = OmegaConf.to_container(cfg, resolve=True)
            except OmegaConfBaseException:  # an interpolation that resolves in the job alone: ${hydra:job.num}, say
                continue
            except ValueError as error:
                job_named = f"the sweep's job {' '.join(job)}: " if args.multirun else ""
                raise SystemExit(f"error: ValueError: {job_named}{error}") from None
            trainers.append(cfg.trainer)
        if args.multirun and sweep_dir:
            refuse_another_recipe(Path(sweep_dir), configs)
        if args.multirun and not is_slurm(composed.hydra.launcher):
            find_each_jobs_data(configs)
        if args.multirun:  # once for the sweep, not per job: each check asks nvidia-smi
            refuse_gpus_the_host_lacks(composed.hydra.launcher, trainers)
            if len(jobs) > 1:
                refuse_one_gpu_for_all(composed.hydra.launcher, composed.hydra.runtime.choices["hydra/launcher"],
                                       trainers)
    except (HydraException, OmegaConfBaseException):  # some OmegaConf errors are ValueErrors too: Hydra answers them
        return
    except (ValueError, DatasetError) as error:  # our refusals, without a traceback
        raise SystemExit(f"error: {type(error).__name__}: {error}") from None


def is_slurm(launcher: DictConfig) -> bool:
    return launcher.get("_target_", "").endswith("SlurmLauncher")


def find_each_jobs_data(configs: dict[str, dict]) -> None:
    """find_batches, once for each data folder that a sweep's jobs (`configs`) read: each job would fail alone, with
    Hydra's traceback for each at the end. Not for a SLURM sweep, whose jobs may read a folder that only their nodes
    have."""
    for root, download in dict.fromkeys((c["data"]["root"], c["data"]["download"]) for c in configs.values()):
        find_batches(Path(root).absolute(), download)


def refuse_the_other_modes_folder(overrides: list[str], multirun: bool) -> None:
    """Hydra reads hydra.run.* for a single run and hydra.sweep.* for a sweep (-m) alone, and ignores the other: the
    command would train in a new folder named by the time, not in the one it names (where a resume would start
    over)."""
    ignored = [override for override in overrides
               if override_key(override).startswith("hydra.run." if multirun else "hydra.sweep.")]
    if ignored and multirun:
        raise ValueError(f"{ignored[0]}: Hydra reads hydra.run.* for a single run alone; this sweep (-m) would ignore "
                         f"it and train its jobs in a new folder. Name a sweep's folder with hydra.sweep.dir=..., or "
                         f"drop -m for a single run")
    if ignored:
        raise ValueError(f"{ignored[0]}: Hydra reads hydra.sweep.* with -m alone; this single run would ignore it and "
                         f"train in a new folder. Name a run's folder with hydra.run.dir=..., or add -m for a sweep "
                         f"(python train.py -m ...)")


def refuse_a_runs_folder(sweep_dir: Path) -> None:
    """A sweep is not launched into a folder where a single run trained: its jobs would train inside that run's
    folder, and Hydra's multirun.yaml there would make train.py refuse to resume the run."""
    if holds_a_run(sweep_dir):
        raise ValueError(f"{command_line_override('hydra.sweep.dir', sweep_dir)} holds a run that train.py "
                         f"trained: a sweep there would train its jobs inside that run's folder. Give the sweep a "
                         f"folder of its own (hydra.sweep.dir=..., or make reproduce SWEEP=...), or move the run away.")


def refuse_another_recipe(sweep_dir: Path, configs: dict[str, dict]) -> None:
    """A sweep folder holds one recipe, whose seeds make_table.py pools: a launch (`configs`: each job's config, by its
    overrides) none of whose jobs shares its recipe with a job in the folder is refused, naming what differs from the
    closest one. Relaunched with an override left out (trainer.epochs=2, say), a sweep would otherwise start every job
    over at full length beside the ones it has. New parts, widths and seeds of the folder's recipe are welcome, and so
    is a sweep over a recipe's setting (optim.lr=0.02,0.05), relaunched before its every value has a job there."""
    trained = {}
    for record in sorted(sweep_dir.glob("**/metrics.json")):
        try:
            trained[record.parent] = read_metrics(record.parent)
        except ValueError:  # an unreadable record is its own job's to report
            continue
    if not trained or not configs:
        return
    differences = {(job, folder): recipe_differences(metrics["config"], config)
                   for job, config in configs.items() for folder, metrics in trained.items()}
    if all(differences.values()):
        job, closest = min(differences, key=lambda pair: len(differences[pair]))
        overrides = last_launch_overrides(trained[closest])
        recipe = " ".join(o for o in overrides or [] if override_key(o) not in SWEPT_IN_A_RECIPE) or "no overrides"
        launched_with = f" (besides part, width and seed, that job had: {recipe})" if overrides is not None else ""
        raise ValueError(f"{command_line_override('hydra.sweep.dir', sweep_dir)} holds a sweep of another recipe: "
                         f"against its job {closest.relative_to(sweep_dir)}, this launch's job "
                         f"{job or '(no overrides)'} changes {'; '.join(differences[job, closest])}. A sweep folder "
                         f"holds one recipe, whose seeds make_table.py pools. To resume or extend that sweep, launch "
                         f"it with the settings its jobs had{launched_with}; for this recipe, give the sweep a folder "
                         f"of its own (hydra.sweep.dir=..., make reproduce SWEEP=... or make demo DEMO=...).")


def refuse_a_sweep(sweep: dict, given: set[str], experiment: str | None) -> None:
    """A single run's command that sets a sweep (`sweep`: hydra.sweeper.params, as experiment=paper sets it; `given`:
    the keys the command line sets) is refused: it would train one job of it. A swept key that the command line
    gives one value makes it a single run."""
    unset = [key for key in sweep if key not in given]
    if unset:
        raise ValueError(f"this command sets a sweep ({', '.join(f'{key}={sweep[key]}' for key in unset)}"
                         f"{f', from experiment={experiment}' if experiment else ''}), which only -m runs: add -m to "
                         f"the command (python train.py -m ...), or give {' and '.join(unset)} one value for a single "
                         f"run")


def check_overrides(overrides: list[str], readable: list[str], groups, script: str, *, hint: str) -> None:
    """Refuse a command-line setting that nothing would read: a key added with Hydra's `+` (which Hydra suggests
    for a mistyped key) or one the script does not use (`readable`: its settings; `groups`: the config groups it
    may be given, such as experiment=demo). Removing a setting (~key) is refused too: the script reads them all.
    `hint`, where to find the settings, ends the refusal."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        parts = key.split(".")
        known = any(".".join(parts[:i]) in readable for i in range(1, len(parts) + 1))  # data.mean.0: data.mean's
        if override.is_delete():
            raise ValueError(f"{override.input_line}: {script} does not take a setting away; set {key} instead")
        if key in groups and not_config_names(override):
            options = ", ".join(sorted(p.stem for p in (CONFIGS / key).glob("*.yaml")))
            raise ValueError(f"{override.input_line}: {key} is a config group, set to the name of one of its configs "
                             f"({options}); a setting inside it is {key}.<setting>=<value>")
        if key in groups or (known and not override.is_add()):
            continue
        problem = f"adds {key} with +, but {script} reads only its configs' settings" if override.is_add() else (
            f"{script} does not read {key}")
        close = closest_setting(key, [k for k in readable if k != key])
        added = override.is_add() or override.is_force_add()
        raise ValueError(f"{override.input_line}: {problem}, so it would be ignored"
                         + (f" (did you mean {close}?)" if close else "") + f". {hint}"
                         + (" Set one without + or ++." if added else ""))


def not_config_names(override) -> list:
    """What an override gives a config group that cannot name one of its configs: a number or null (trainer=1,
    trainer=1,2: Hydra refuses a sweep's with a traceback). A glob or interval sweep is left to Hydra."""
    if override.value_type in (ValueType.GLOB_CHOICE_SWEEP, ValueType.INTERVAL_SWEEP):
        return []
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    return [value for value in values if not isinstance(value, (str, list))]


def closest_setting(key: str, readable: list[str]) -> str | None:
    """What a mistyped key most likely meant: a setting of its own group with a close name (trainer.epoch:
    trainer.epochs), else one of that name in another group (optm.lr: optim.lr), else a key that is very close
    whole (optm.lrr: optim.lr). Compared whole at difflib's usual cutoff, trainer.foo was taken for trainer.amp."""
    group, _, name = key.rpartition(".")
    names = {k.rpartition(".")[2]: k for k in readable if k.rpartition(".")[0] == group}
    close = difflib.get_close_matches(name, list(names), n=1)
    if close:
        return names[close[0]]
    same_name = [k for k in readable if k.rpartition(".")[2] == name]
    return (same_name or difflib.get_close_matches(key, readable, n=1, cutoff=0.8) or [None])[0]


def ends_without_traceback(error: Exception) -> bool:
    """Whether a run stopped by this error ends with its message alone (exit status 1) rather than inside Hydra's
    traceback, which repeats it: a single run (a sweep's launcher records each job's error and runs the others), an
    error that this project's code raised for a setting, the data, a file, a refused resume or a diverged run, with
    a message that names the fix, and HYDRA_FULL_ERROR unset. A library's error, or one of another type, is a bug
    to trace: it keeps the traceback."""
    if HydraConfig.get().mode != RunMode.RUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return False
    return isinstance(error, (ValueError, OSError, DatasetError, FloatingPointError)) and raised_here(error)


def raised_here(error: Exception) -> bool:
    """Whether the innermost Python frame of the error's traceback is this repository's code, not a library's."""
    trace = error.__traceback__
    while trace.tb_next:
        trace = trace.tb_next
    path = Path(trace.tb_frame.f_code.co_filename).resolve()
    return path.is_relative_to(REPO_ROOT) and "site-packages" not in path.parts
