"""What every run needs and a reader may skip (nanoGPT keeps its configurator apart the same way):
errors that end as one line, the config loader and command line, the Accelerator, checkpoint folders
(atomic saves, resume, stale temporaries), the bad-step guard, step-seeded generators, and the small
helpers every training loop shares (run start, resume, the step line, validation logging).
"""
import contextlib
import ctypes
import dataclasses
import errno
import inspect
import io
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import types
import typing
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_model, save_model


class UserError(Exception):
    """A problem with the user's files or flags, not a bug: the scripts print it as one line
    `error: ...` and exit with code 2 (a traceback with --debug or MOUSELIFT_DEBUG=1)."""


class InputError(UserError, ValueError):
    """A file's content or a flag's value is wrong (the message names which)."""


# ----------------------------------------------------------------------------------------------
# Config: dataclass defaults -> --cfg file.yaml -> --key=value

class ConfigError(InputError):
    pass


class TrainingDiverged(UserError):
    """max_bad_steps steps in a row had a non-finite loss or gradient: the run stops without saving."""


class SkipGuard:
    """Every trainer's rule for a bad step (a non-finite loss or gradient): skip it, weights, optimizer
    state and EMA untouched; count it (`skipped`, kept in checkpoints); `limit` in a row stop the run
    before anything more is saved. Decide on the all-reduced gradient norm: every rank skips alike."""

    def __init__(self, limit, skipped=0):
        self.limit, self.skipped, self.in_a_row, self.norm = limit, skipped, 0, None

    def check_weights(self, module, step, growth=10.0):
        """Call at the start and before every save: weights whose norm grew more than `growth`-fold since the
        last call stop the run (TrainingDiverged) before they are saved; a huge learning rate blows them up
        with every gradient finite."""
        norm = torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in module.parameters()]))
        if self.norm is not None and not norm.item() <= growth * self.norm:  # NaN too
            raise TrainingDiverged(f"step {step}: the weights' norm grew from {self.norm:.4g} to {norm.item():.4g} "
                                   "since the last checkpoint: nothing saved; lower the learning rate")
        self.norm = norm.item()

    def should_step(self, good, step, why, log=True):
        if good:
            self.in_a_row = 0
            return True
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        if log:
            print(f"step {step}: skipped ({why}), {self.skipped} so far")
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(f"{self.in_a_row} steps in a row skipped (last at step {step}: {why}): "
                                   "nothing saved; lower the learning rate or check the data")
        return False


# why writing fails on the user's machine, not in the code, and what to do about it
WRITE_FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space or raise the disk quota",
               errno.EFBIG: "free disk space or raise the file-size limit (ulimit -f)",
               errno.EROFS: "choose a path on a writable file system",
               **dict.fromkeys((errno.EACCES, errno.EPERM), "get write permission there or choose another path"),
               **dict.fromkeys((errno.ENOTDIR, errno.EEXIST), "move that file or choose another path")}


def write_failure(err, path=None):
    """The OSError behind `err` when it is a write that failed for a reason in WRITE_FIXES, named `path`
    where it names no file; else None (a bug). Found as `err` itself, the error it was raised from or while
    (torch's writer raises a RuntimeError while a file's OSError is handled), or the errno in its text
    (safetensors: '... (os error 28)')."""
    found = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, OSError)), None)
    code = found.errno if found is not None else None
    if code is None and (m := re.search(r"\(os error (\d+)\)", str(err))):
        code = int(m[1])
    if code not in WRITE_FIXES:
        return None
    name = (found.filename if found is not None else None) or path
    return OSError(code, os.strerror(code), None if name is None else os.fsdecode(name))  # errno's subclass


def write_failure_line(err):
    """One line `<path>: <reason>: <fix>` for a named OSError of WRITE_FIXES, else None (a bug); EEXIST and
    ENOTDIR only where a file stands in a folder's place (the path or one of its parents)."""
    if err.errno not in WRITE_FIXES or not err.filename:
        return None
    fix, path = WRITE_FIXES[err.errno], Path(os.fsdecode(err.filename))
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is None or blocker.is_dir():
            return None
        fix = f"{'it' if blocker == path else blocker} is a file, not a folder: {fix}"
    return f"{path}: {err.strerror}: {fix}"


@contextlib.contextmanager
def writing(file):
    """Re-raises a failed write of `file` that torch or safetensors wrap in errors of their own as the
    OSError behind it, named `file`, for atomic_dir and cli to say which file and why."""
    try:
        yield
    except Exception as err:
        if (failed := write_failure(err, file)) is None:
            raise
        raise failed from err


def cli(main, cls=None, aliases=None, argv=None):
    """The scripts' entry point: main(load_config(cls, argv)) (cls None: main(argv)). A UserError (a bad
    file or flag), a missing file or a failed write (a full disk, a read-only folder, a file where a folder
    should be: WRITE_FIXES) ends as one line `error: ...` with exit code 2; --debug or MOUSELIFT_DEBUG=1
    shows the traceback instead. Other exceptions (bugs) keep their tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MOUSELIFT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        try:
            return main(argv if cls is None else load_config(cls, argv, aliases))
        except BaseException:
            put_back_failed()
            raise
    except (UserError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        failed = None if debug else write_failure(err)
        line = failed and write_failure_line(failed)
        if not line:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def type_name(tp):
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce(value, tp, cli=False):
    """value (from yaml, or a command-line string when cli=True) -> type tp, else ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or cli and str(value).lower() in ("none", "null")):
            return None
        for arm in (a for a in args if a is not type(None)):
            with contextlib.suppress(TypeError, ValueError):
                return coerce(value, arm, cli)
    elif tp is str:  # yaml reads `name: 007` as the int 7: refuse non-strings rather than str() them
        if isinstance(value, str):
            return value
        raise InputError(f"{value!r} is not a string (quote it in the yaml)")
    elif tp is bool:
        if isinstance(value, (bool, int, str)) and str(value).strip().lower() in ("true", "1", "false", "0"):
            return str(value).strip().lower() in ("true", "1")
    elif tp in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):  # strings too: yaml 1.1 reads `lr: 1e-4` as a string
            number = value if isinstance(value, int) else float(value)
            if tp is float:
                return float(number)
            if float(number).is_integer():  # '1e3' and 2.0 are ints, 1.5 is not
                return int(number)
    elif (kind := origin or tp) in (list, tuple, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)  # '[1,2]' or '{a: 1}' from the command line
        if kind is dict and isinstance(value, dict):
            kt, vt = args or (object, object)
            return {coerce(k, kt): coerce(v, vt) for k, v in value.items()}
        if kind is not dict and isinstance(value, (list, tuple)):
            if not args or kind is list or args[1:] == (...,):
                return kind(coerce(v, args[0] if args else object) for v in value)
            if len(args) == len(value):
                return tuple(coerce(v, a) for v, a in zip(value, args))
    elif tp in (object, typing.Any):  # elements of a bare list/tuple/dict
        return value
    raise InputError(f"{value!r} is not a {type_name(tp)}")


# Earlier names of fields, still accepted in yaml files and on the command line (when the script has the
# new field): old -> new, or old -> (new, convert) where the meaning changed with the name
RENAMED = {"output_dir": "out_dir", "snr_gamma": "min_snr_gamma", "cond_drop_rate": "cond_drop_prob",
           "uncond_prob": "cond_drop_prob", "reference_view_idx": "reference_view", "val_clips": "val_samples",
           "stage_c_val_clips": "val_samples_c", "stage_a_steps": "max_steps_a", "stage_b_steps": "max_steps_b",
           "stage_c_steps": "max_steps_c", "stage_a_lr": "lr_a", "stage_b_lr": "lr_b", "stage_c_lr": "lr_c",
           "m2p_lr_stage_b": "m2p_lr_b", "m2p_lr_stage_c": "m2p_lr_c", "stage_c_batch_size": "batch_size_c",
           "face_region_weight": ("face_loss_scale", lambda w: 1 + float(w))}  # was the extra weight: 2 meant x3


def load_config(cls, argv=None, aliases=None):
    """`cls` defaults, then every `--cfg x.yaml` (before any --key, wherever it stands), then --key=value /
    --key value in argv order. `aliases` maps other names (e.g. another code base's) to fields; RENAMED
    maps earlier names. A yaml's sections (see `field` below) go to cfg.sections, less the keys given on the
    command line. Errors: ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(cls)
    aliases = {**{k: v for k, v in RENAMED.items() if k not in hints}, **(aliases or {})}
    if "-h" in argv or "--help" in argv:
        also = "".join(f"\n  --{a} = --{k}" for a, k in aliases.items() if isinstance(k, str) and k in hints)
        print(f"usage: {Path(sys.argv[0]).name} [--cfg x.yaml] [--key=value ...]\n\n{inspect.getsource(cls)}"
              + (f"\naliases:{also}" if also else ""))
        raise SystemExit(0)
    # a class with a `sections` field: a yaml mapping under one of its default's names (e.g. `stage_b:`) holds
    # values for one part of the run only, kept in cfg.sections for the script to apply
    field = next((f for f in dataclasses.fields(cls) if f.name == "sections"), None)
    names = sorted(field.default_factory()) if field else []
    valid = [f.name for f in dataclasses.fields(cls) if f.init and f is not field]

    def fail(where, msg):
        also = f"; sections: {', '.join(names)}" if names else ""
        return ConfigError(f"{where}: {msg} (valid keys: {', '.join(valid)}{also})")

    files, cli, args = [], [], iter(enumerate(argv))  # cli: (key, value, where, from_cli, section)
    for i, arg in args:
        key, eq, value = arg.partition("=")
        if not key.startswith("--") or key == "--":
            raise fail(f"command line {arg!r}", "expected --key=value or --key value")
        if not eq and hints.get(aliases.get(key[2:], key[2:])) is bool and (
                not argv[i + 1:] or argv[i + 1].startswith("--")):
            value = "true"  # a bare boolean flag: --augment_all_views
        elif not eq:
            value = next(args, (None, None))[1]
            if value is None:
                raise fail(f"command line {arg!r}", "missing value")
            arg = f"{arg} {value}"
        if key == "--cfg":
            files.append(value)
        else:
            cli.append((key[2:], value, f"command line {arg!r}", True, None))
    overrides = []
    for file in files:
        try:
            data = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"config file {file}: cannot read it ({err})") from None
        data = {} if data is None else data  # an empty file overrides nothing
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file} must be a mapping (key: value), "
                              f"not a {type(data).__name__}")
        if names and isinstance(data.get("sections"), dict):  # a saved config.yaml keeps them there
            data = {**{k: v for k, v in data.items() if k != "sections"}, **data["sections"]}
        for key, value in data.items():
            if key in names and not isinstance(value, (dict, type(None))):
                raise ConfigError(f"config file {file}: {key} must be a mapping (key: value), not {value!r}")
            if key not in names:
                overrides.append((key, value, f"{file}: key {key!r}", False, None))
            else:  # `stage_b:` with nothing under it sets nothing
                overrides += [(k, v, f"{file}: key {key}.{k}", False, key) for k, v in (value or {}).items()]
    values, parts, from_cli = {}, {name: {} for name in names}, set()
    for key, value, where, cli_value, part in overrides + cli:
        key = aliases.get(key, key)
        if isinstance(key, tuple):  # a renamed field whose meaning changed: the old value converted
            key, value = key[0], key[1](value)
        if key not in valid:
            raise fail(where, f"unknown key {key!r}")
        try:
            (parts[part] if part else values)[key] = coerce(value, hints[key], cli=cli_value)
        except (TypeError, ValueError, yaml.YAMLError) as err:
            raise fail(where, f"{key} expects {type_name(hints[key])}: {err}") from None
        if cli_value:
            from_cli.add(key)
    if field:  # the command line wins over the sections too
        values["sections"] = {n: {k: v for k, v in p.items() if k not in from_cli} for n, p in parts.items()}
    return cls(**values)  # the fields not given get fresh defaults (default_factory runs per call)


def check_flags(cfg, choices=None, positive=()):
    """Flags with a fixed set of values ({name: allowed}) and counts that must be >= 1, checked before a run
    starts, so that a typo ends in one line instead of a KeyError or an empty batch deep inside."""
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name}={getattr(cfg, name)!r}: expected one of {sorted(allowed)}")
    for name in positive:
        if not getattr(cfg, name) >= 1:
            raise ConfigError(f"--{name}={getattr(cfg, name)!r}: must be at least 1")


def config_to_dict(cfg):
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg, path):
    # a temporary file renamed over `path`: a full disk leaves an earlier config.yaml whole, not truncated
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err  # named as the file it was to become


# ----------------------------------------------------------------------------------------------
# Checkpoints: <ckpt_dir>/checkpoint-<step>/{<module>.safetensors, state.pt, config.yaml}


# a rank waiting longer than this for the others (a hung or dead process) stops with an error instead of
# hanging forever; long enough for rank 0's validation while the others wait at the barrier
DDP_TIMEOUT_S = int(os.environ.get("MOUSELIFT_DDP_TIMEOUT_S", 1800))


def die_with_parent():
    """SIGKILL this process when its parent (the launcher) dies: a killed launcher otherwise leaves its
    workers training on, unwatched, to the end (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the line above: adopted by init
        raise SystemExit("error: the launcher of this worker is gone")


def native_bf16_cpu():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls run ~2x
    faster than fp32; elsewhere bf16 is emulated and slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def precision_here(mixed_precision, cuda):
    """The mixed precision a run asks for, on a GPU; on a CPU only bf16, where it is native (fp16 and
    emulated bf16 are slower than fp32 there)."""
    return mixed_precision if cuda or (mixed_precision == "bf16" and native_bf16_cpu()) else "no"


def make_accelerator(mixed_precision="no", wandb=False):
    """Every script's Accelerator: cpu=True without CUDA (torchrun / `accelerate launch --multi_gpu` then
    give real DDP over gloo; without it each process would train alone), `precision_here`, and the
    process-group timeout above. A worker of a launcher (torchrun, accelerate launch) ends with it."""
    if "LOCAL_RANK" in os.environ and sys.platform.startswith("linux"):
        die_with_parent()
    cuda = torch.cuda.is_available()
    precision = precision_here(mixed_precision, cuda)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # another run in this process (`--training_stage all`, a notebook, the tests) set another precision:
        # accelerate keeps one global state and refuses to change it; the process group stays
        AcceleratorState._reset_state()
    return Accelerator(cpu=not cuda, mixed_precision=precision,
                       log_with="wandb" if wandb else None,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=DDP_TIMEOUT_S))])


COMPLETE = "COMPLETE"  # written last into a checkpoint: only marked folders are ever resumed from


@contextlib.contextmanager
def atomic_dir(final_path, marker=True, earlier="files"):
    """A temporary sibling folder that becomes final_path only if the block finishes (+ the COMPLETE
    marker, last). An existing final_path (re-saving a step) is renamed aside, the new one renamed in,
    then the old one deleted: a kill at any moment leaves a complete folder or none under the name.
    A write in the block that fails for want of space or permission (WRITE_FIXES) ends as a UserError
    naming the file as final_path/<name> and saying that the `earlier` ones are intact."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = final.parent / f".tmp-{final.name}-{tag}"
    try:
        tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the renamed checkpoint
    except OSError as err:  # named as the folder it was to become: the temporary name means nothing to a user
        raise OSError(err.errno, err.strerror, str(final)) from err
    try:
        yield tmp
        if marker:
            (tmp / COMPLETE).write_text("")
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = write_failure(err) if isinstance(err, Exception) else None
        if failed is None or failed.errno in (errno.ENOTDIR, errno.EEXIST) or not failed.filename:
            raise
        file = Path(failed.filename)
        file = final / file.relative_to(tmp) if file.is_relative_to(tmp) else file
        raise UserError(f"{file}: cannot write it ({failed.strerror}): {WRITE_FIXES[failed.errno]}; "
                        f"{final.name} was not saved, earlier {earlier} are intact") from err
    if final.exists():
        old = final.parent / f".old-{final.name}-{tag}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def clean_stale(folder):
    """Removes the temporaries of killed saves in `folder`; an old checkpoint renamed aside for a re-save
    whose new one never arrived is put back. Returns what it did, as lines."""
    done = []
    for p in sorted(Path(folder).glob(".old-*")) if Path(folder).is_dir() else []:
        name = p.name[len(".old-"):].rsplit("-", 1)[0]
        if (Path(folder) / name).exists():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p} (replaced by a complete {name})")
        else:
            os.replace(p, Path(folder) / name)
            done.append(f"restored {name} (a re-save of it was killed)")
    for p in sorted(Path(folder).glob(".tmp-*")) if Path(folder).is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p} (a killed save)")
    return done


def prepare_run(ckpt_dir, resume, overwrite, accelerator):
    """Before a run writes anything: the checkpoint to resume from (None: a fresh run). A fresh run into
    a folder holding checkpoints is refused without --overwrite (which sets them aside later, in
    open_run); temporaries of killed saves and of killed overwrites are cleaned (main process), and
    --resume=auto says when there is nothing to resume."""
    ckpt_dir = Path(ckpt_dir)
    if accelerator.is_main_process:
        for line in clean_overwrites(ckpt_dir) + clean_stale(ckpt_dir):
            print(f"start-up: {line}")
    accelerator.wait_for_everyone()
    existing = sorted(ckpt_dir.glob("checkpoint-*")) if ckpt_dir.is_dir() else []
    if not resume and existing and not overwrite:
        names = ", ".join(p.name for p in existing)
        raise UserError(f"{ckpt_dir} holds checkpoints of an earlier run ({names}): "
                        "use --resume=auto to continue it, another out_dir, or --overwrite to replace that run")
    # a real write (a nameless file); --overwrite also writes beside the folder (its trash)
    for folder in (ckpt_dir, ckpt_dir.parent) if overwrite else (ckpt_dir,):
        if not folder.is_dir():
            continue
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            if err.errno not in WRITE_FIXES:
                raise
            raise UserError(f"{folder}: cannot write into this output folder ({err.strerror}): "
                            f"{WRITE_FIXES[err.errno]}; nothing in it was changed") from err
    if resume != "auto":
        return resume or None
    found = latest_checkpoint(ckpt_dir)
    if found is None and accelerator.is_main_process:
        print(f"--resume=auto: no complete checkpoint in {ckpt_dir}: starting from step 0")
    return found


# --overwrite as a transaction. The earlier run's folder (and, for dance, the later stages' folders made
# from it) move into one trash folder beside it: `.<run>.overwriting-<tag>` while they move, renamed
# `.<run>.overwritten-<tag>` (one atomic step) once all are in. Only then does the new run write. The
# trash is deleted once the new run has a complete checkpoint; if the new run fails before that, its
# folder goes and the earlier run comes back. After a kill, clean_overwrites applies the same rules.
TRASH = re.compile(r"\.(?P<run>.+)\.(?P<state>overwriting|overwritten)-[0-9a-f]{8}")
SET_ASIDE = []  # trash folders this process made: cli puts their runs back when this run fails


def set_aside(cfg, run, downstream=()):
    """Moves the run folder `run` and the existing `downstream` folders (its siblings) into one trash
    folder named for `run`. Refused when a path in the config (data, weights to start from) lies inside one
    of them."""
    run = Path(run)
    folders = [f for f in (run, *map(Path, downstream)) if f.exists()]
    for key, value in config_to_dict(cfg).items():
        if key in ("out_dir", "resume") or not isinstance(value, str) or not value:
            continue
        if any(Path(value).resolve().is_relative_to(f.resolve()) for f in folders):
            raise UserError(f"--overwrite would delete {key}={value} (it lies in {run}): "
                            "copy it elsewhere or choose another out_dir")
    if any(Path.cwd().resolve().is_relative_to(f.resolve()) for f in folders):
        raise UserError(f"--overwrite would delete the current folder {Path.cwd()}: choose another out_dir")
    tag = uuid.uuid4().hex[:8]
    moving = run.parent / f".{run.name}.overwriting-{tag}"
    moving.mkdir()
    for f in folders:
        os.replace(f, moving / f.name)
    trash = run.parent / f".{run.name}.overwritten-{tag}"
    os.replace(moving, trash)  # the one step after which the earlier run counts as replaced
    SET_ASIDE.append(trash)
    return trash


def put_back(trash):
    """Undoes an overwrite: the new run's folders (those the trash holds names of) go, the earlier ones
    come back. Safe to kill at any point: the next clean_overwrites finishes it."""
    parent = trash.parent
    if TRASH.fullmatch(trash.name)["state"] == "overwritten":
        for f in trash.iterdir():
            if (parent / f.name).exists():
                shutil.rmtree(parent / f.name)
        moving = trash.with_name(trash.name.replace(".overwritten-", ".overwriting-"))
        os.replace(trash, moving)
        trash = moving
    for f in sorted(trash.iterdir()):
        if not (parent / f.name).exists():
            os.replace(f, parent / f.name)
    shutil.rmtree(trash)


def clean_overwrites(folder):
    """Finishes or undoes the overwrites of `folder` (the trash folders beside it that hold a folder of its
    name): a kill while moving is undone; a new run with a complete checkpoint keeps its place (the trash
    is deleted), a new run without one is removed and the earlier run put back. Returns lines."""
    folder, done = Path(folder), []
    for trash in sorted(folder.parent.glob(".*.overwrit*-*")) if folder.parent.is_dir() else []:
        m = TRASH.fullmatch(trash.name)
        if not m or not (m["run"] == folder.name or (trash / folder.name).exists()):
            continue
        if m["state"] == "overwritten" and latest_checkpoint(folder.parent / m["run"]):
            shutil.rmtree(trash)
            done.append(f"deleted the run that --overwrite replaced ({trash})")
        else:
            put_back(trash)
            done.append(f"put back the run in {folder.parent / m['run']}: an --overwrite of it was stopped before "
                        "the new run's first checkpoint")
    return done


def put_back_failed():
    """cli's clean-up when a run fails: an earlier run this process set aside comes back, unless the new
    run already has a complete checkpoint."""
    for trash in SET_ASIDE:
        run = trash.parent / TRASH.fullmatch(trash.name)["run"]
        if trash.exists() and not latest_checkpoint(run):
            put_back(trash)
            print(f"--overwrite: the earlier run in {run} is back (this run stopped before its first checkpoint)",
                  file=sys.stderr)


def save_checkpoint(ckpt_dir, step, modules, optimizers=None, cfg=None, extra=None, rig=None):
    """Writes <ckpt_dir>/checkpoint-<step>/ atomically (+ rig.json: the cameras the weights were trained
    on, for the next stage's checks). Pass unwrapped modules (not DDP/compiled)."""
    buf = io.BytesIO()
    torch.save(extra or {}, buf)
    try:  # fail now, not at resume: weights_only loading refuses e.g. numpy scalars
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"extra={extra!r}: use only tensors, python numbers, strings, "
                         "lists, dicts") from None
    final = Path(ckpt_dir) / f"checkpoint-{step}"
    with atomic_dir(final, earlier="checkpoints") as tmp:
        for name, module in modules.items():
            wrapped = [k for k in module.state_dict() if k.startswith(("module.", "_orig_mod."))]
            if wrapped:  # a DDP/compiled wrapper's key prefixes would make the file unloadable elsewhere
                raise InputError(f"{name}: save the unwrapped model, got keys like {wrapped[0]!r}")
            with writing(tmp / f"{name}.safetensors"):
                save_model(module, str(tmp / f"{name}.safetensors"))  # save_model handles tied weights
        write_state(tmp, step, optimizers or {}, extra)
        if cfg is not None:
            save_config(cfg, tmp / "config.yaml")
        if rig is not None:
            (tmp / "rig.json").write_text(json.dumps(rig, indent=1))
    clean_overwrites(ckpt_dir)  # a run this one --overwrote is deleted now that this one has a checkpoint
    return final


def write_state(path, step, optimizers, extra):
    optim_states = {k: opt.state_dict() for k, opt in optimizers.items()}
    file = Path(path) / "state.pt"
    # through a Python file: torch's own writer drops the OSError (the errno) of a failed write
    with writing(file), open(file, "wb") as f:
        torch.save({"step": int(step), "optimizers": optim_states, "extra": extra or {}}, f)


def latest_checkpoint(ckpt_dir):
    """The checkpoint-<step> dir marked complete with the highest step, or None."""
    ckpt_dir = Path(ckpt_dir)
    found = [(int(m[1]), p) for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / COMPLETE).is_file()]
    return max(found)[1] if found else None


def check_resumable(path):
    """Stops unless `path` is a complete checkpoint, naming what is missing and what else exists."""
    path = Path(path)
    if not (path / COMPLETE).is_file() or not (path / "state.pt").is_file():
        other = latest_checkpoint(path.parent)
        raise UserError(f"{path} is not a complete checkpoint (no {COMPLETE} marker or state.pt)"
                        + (f"; the latest complete one is {other}" if other else ""))


def read_state(path):
    """state.pt of a checkpoint, a truncated or foreign file named as such."""
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a broken file
        raise InputError(f"{Path(path) / 'state.pt'}: cannot read it ({type(err).__name__}: {err})") from None


def check_finite_weights(where, module):
    """Refuses weights with NaN or inf (a checkpoint of a diverged run)."""
    bad = [k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{where}: non-finite weights in {len(bad)} tensors (e.g. {bad[0]}): "
                         "refusing to resume")


def earlier_checkpoints(path):
    """'; earlier complete checkpoints: ...' for an error about checkpoint `path`, or ''."""
    m = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    found = sorted((int(n[1]), p.name) for p in Path(path).parent.glob("checkpoint-*")
                   if (n := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / COMPLETE).is_file()
                   and m and int(n[1]) < int(m[1]))
    return f"; earlier complete checkpoints: {[name for _, name in found]}" if found else ""


def load_checkpoint(path, modules, optimizers=None):
    """Loads weights (strict) and optimizer states; returns the state dict {step, optimizers, extra}.
    A broken file stops with its name (and the earlier complete checkpoints): never a silent fallback."""
    try:
        return _load_checkpoint(Path(path), modules, optimizers)
    except InputError as err:
        raise InputError(f"{err}{earlier_checkpoints(path)}") from None


def _load_checkpoint(path, modules, optimizers):
    check_resumable(path)
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            have = sorted(p.stem for p in path.glob("*.safetensors"))
            raise FileNotFoundError(f"{file} not found (the checkpoint holds modules {have})")
        try:
            load_model(module, file, strict=True)
        except RuntimeError as err:  # missing/unexpected keys, or a truncated file
            raise InputError(f"{file}: cannot load it into {name} ({' '.join(str(err).split())})") from None
        except Exception as err:  # safetensors raises its own kinds for a broken header
            raise InputError(f"{file}: cannot read it ({type(err).__name__}: {err})") from None
        check_finite_weights(file, module)
    state = read_state(path)
    for name, opt in (optimizers or {}).items():
        if name not in state["optimizers"]:
            raise KeyError(f"{path}: no optimizer state {name!r}, checkpoint has {list(state['optimizers'])}")
        opt.load_state_dict(state["optimizers"][name])
    return state


def seeded(*key):
    """A generator seeded by (seed, rank, step, ...): a step's randomness does not depend on how the run
    got there, so a resumed run draws what the uninterrupted one drew."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def log_metrics(metrics, step, out_dir, tag="val"):
    """Prints `val step N | key value | ...` and appends {"step": N, ...} to <out_dir>/metrics.jsonl."""
    fmt = lambda v: f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"  # noqa: E731
    line = f"{tag} step {step} | " + " | ".join(f"{k} {fmt(v)}" for k, v in metrics.items())
    file = Path(out_dir) / "metrics.jsonl"
    size = file.stat().st_size if file.is_file() else 0
    try:
        with open(file, "a") as f:
            f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    except OSError:
        with contextlib.suppress(OSError):  # a full disk: no half line for a reader of the file to choke on
            os.truncate(file, size)
        raise
    print(line)
    return line


# ----------------------------------------------------------------------------------------------
# What the five training loops share; the loops themselves stay written out in each script.

def start_run(cfg, accelerator):
    """A run's start: per-rank seed and the printed config. Nothing is written yet (open_run)."""
    set_seed(cfg.seed + accelerator.process_index)
    if accelerator.is_main_process:
        print(f"config: {cfg}\nprocesses: {accelerator.num_processes}, device: {accelerator.device}")


def open_run(cfg, out_dir, accelerator, loader, start_step, downstream=()):
    """The first writes of a run, once its data, model and checkpoint are read: the first batch is read
    now (a bad file stops the run before it has changed anything); then --overwrite sets the earlier run
    aside (with the `downstream` folders made from it), and out_dir gets config.yaml, metrics.jsonl
    without the lines of steps this run logs again, and wandb. Returns the loader, first batch first."""
    first = next(loader)
    if accelerator.is_main_process:
        out_dir = Path(out_dir)
        if cfg.overwrite and not start_step and any(Path(f).exists() for f in (out_dir, *downstream)):
            trash = set_aside(cfg, out_dir, downstream)
            print(f"--overwrite: the earlier run is set aside in {trash}, deleted at this run's first "
                  "checkpoint (put back if this run stops before it)")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        forget_metrics_after(out_dir, start_step if start_step else -1)  # step 0 is validated again
        if cfg.wandb:
            accelerator.init_trackers(cfg.wandb_project, config=vars(cfg),
                                      init_kwargs={"wandb": {"dir": str(out_dir)}})
    accelerator.wait_for_everyone()
    return itertools.chain([first], loader)


def resume_run(cfg, out_dir, accelerator, load):
    """prepare_run, then `load(path)` -> the checkpoint's state dict when there is one to resume from.
    Returns (start_step, SkipGuard with the skipped count so far); per-rank randomness is re-seeded from
    (seed, rank, step), as only the data order and the step-seeded generators are saved."""
    path = prepare_run(out_dir, cfg.resume, cfg.overwrite, accelerator)
    if not path:
        return 0, SkipGuard(cfg.max_bad_steps)
    state = load(path)
    set_seed(cfg.seed + accelerator.process_index + 1000 * state["step"])
    if accelerator.is_main_process:
        print(f"resumed from {path} at step {state['step']}")
    return state["step"], SkipGuard(cfg.max_bad_steps, state["extra"].get("skipped", 0))


def forget_metrics_after(out_dir, step):
    """Drops the metrics.jsonl lines of steps after `step`: a killed run logged them from weights that were
    never saved, and the resumed run logs those steps again."""
    file = Path(out_dir) / "metrics.jsonl"
    if file.is_file():
        lines = [line for line in file.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        tmp = file.with_name(f".tmp-{file.name}")
        tmp.write_text("".join(lines))
        os.replace(tmp, file)


def log_step(accelerator, step, parts, lr, grad_norm, skipped, dt, samples, **extra):
    """Every trainer's step line, `step N | loss parts | extra | lr | grad norm | skipped | ms/step |
    samples/s`, and the same scalars to wandb. parts: {name: float}; dt: seconds per step."""
    print(f"step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
          + "".join(f" | {k} {v:.4g}" for k, v in extra.items())
          + f" | lr {lr:.2e} | grad norm {grad_norm:.3f} | skipped {skipped}"
          + f" | {dt * 1000:.0f} ms/step | {samples / dt:.1f} samples/s")
    accelerator.log({"train/lr": lr, "train/grad_norm": grad_norm, "train/skipped": skipped,
                     "train/samples_per_s": samples / dt, **{f"train/{k}": v for k, v in {**parts, **extra}.items()}},
                    step=step)


def log_eval(accelerator, metrics, step, out_dir, images=None, tag="val"):
    """Validation's line and metrics.jsonl (log_metrics), and wandb: the scalars, and `images`
    ({name: png path}) as pictures beside them."""
    log_metrics(metrics, step, out_dir, tag)
    accelerator.log({f"{tag}/{k}": v for k, v in metrics.items()}, step=step)
    if images and any(t.name == "wandb" for t in accelerator.trackers):
        import wandb  # optional: only runs with wandb=true get here
        accelerator.log({f"{tag}/{k}": wandb.Image(str(p)) for k, p in images.items()}, step=step)
