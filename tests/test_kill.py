"""Kill safety of every trainer: SIGKILL at a step, and in the middle of writing a checkpoint, then
`--resume=auto` finishes with weights bitwise equal to an uninterrupted run's, and no folder that
`latest_checkpoint` could pick is ever half written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS
from safetensors.torch import load_file

from plumbing import latest_checkpoint

REPO = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "kill_worker.py"
# every weight file a finished run leaves, per trainer (relative to out_dir)
FINAL = {"train_gslrm": ["checkpoint-6/model.safetensors"],
         "train_mvdiff": ["checkpoint-6/unet/diffusion_pytorch_model.safetensors",
                          "checkpoint-6/unet_ema/diffusion_pytorch_model.safetensors"],
         "train_dance": ["stage_A/checkpoint-6/m2p.safetensors", "stage_A/final/m2p.safetensors"]}


def run(script, data_dir, out, *extra, **kill):
    args = [f"--data_dir={data_dir}", f"--out_dir={out}", *TINY_ARGS[script], "--ckpt_every=2", "--val_every=2",
            *extra]
    if script == "train_mvdiff":
        args.append(f"--prompt_embeds={data_dir}/pe.pt")
    steps = "--max_steps_a=6" if script == "train_dance" else "--max_steps=6"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{k: str(v) for k, v in kill.items()})
    return subprocess.run([sys.executable, str(WORKER), script, *args, steps], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_gslrm", "train_mvdiff", "train_dance"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(script, tiny_mice, tiny_dance, tmp_path):
    data_dir = tiny_dance if script == "train_dance" else tiny_mice
    ckpt_dir = lambda out: out / ("stage_A" if script == "train_dance" else "")  # noqa: E731
    assert run(script, data_dir, tmp_path / "full").returncode == 0
    for name, kill in (("step", {"KILL_AT_STEP": 3}), ("save", {"KILL_IN_SAVE": 4})):
        out = tmp_path / name
        killed = run(script, data_dir, out, **kill)
        assert killed.returncode == -9, killed.stderr[-2000:]  # it really died by SIGKILL
        assert latest_checkpoint(ckpt_dir(out)) == ckpt_dir(out) / "checkpoint-2"  # never the half-written 4
        if name == "save":
            assert list(ckpt_dir(out).glob(".tmp-checkpoint-4-*"))  # what the kill left
        resumed = run(script, data_dir, out, "--resume=auto")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resumed from" in resumed.stdout and "checkpoint-2" in resumed.stdout
        assert not list(ckpt_dir(out).glob(".tmp-*"))  # cleaned at start-up
        # validation is logged once per step, as in the uninterrupted run (not again at the resume step)
        steps = [[json.loads(line)["step"] for line in (o / "metrics.jsonl").read_text().splitlines()]
                 for o in (ckpt_dir(tmp_path / "full"), ckpt_dir(out))]
        assert steps[0] == steps[1] and len(set(steps[1])) == len(steps[1]) >= 3, steps
        for rel in FINAL[script]:
            a, b = load_file(tmp_path / "full" / rel), load_file(out / rel)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, rel)


def weights_of(out, script):
    return {rel: load_file(out / rel) for rel in FINAL[script]}


def same(a, b):
    return a.keys() == b.keys() and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                        for x, y in zip(a.values(), b.values()))


def files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_gslrm", "train_mvdiff", "train_dance"])
def test_sigkill_during_overwrite_leaves_one_whole_run(script, tiny_mice, tiny_dance, tmp_path):
    """An earlier run (seed 1; for dance with a later stage's folder made from it) is --overwritten by a
    run SIGKILLed at each move and deletion of the overwrite, and at a step before the new run's first
    checkpoint. `--resume=auto` then ends with the earlier run put back whole, or the new run finished
    bitwise equal to an uninterrupted one; a second --overwrite leaves no file of the earlier run."""
    data_dir = tiny_dance if script == "train_dance" else tiny_mice
    assert run(script, data_dir, tmp_path / "new").returncode == 0
    old = tmp_path / "old"
    assert run(script, data_dir, old, "--seed=1").returncode == 0
    if script == "train_dance":  # stage B's folder, made from the stage A that the overwrite replaces
        (old / "stage_B" / "checkpoint-2").mkdir(parents=True)
        (old / "stage_B" / "checkpoint-2" / "dance.safetensors").write_text("stage B of the earlier stage A")
    # the k-th of: the moves of each folder, the trash's rename, its deletion (gslrm: every one; the others
    # share that code: a kill between moves or before the rename, and the last deletion)
    points = {"train_gslrm": ["op1", "op2", "op3", "step"], "train_mvdiff": ["op2", "step"],
              "train_dance": ["op2", "op4", "step"]}[script]
    for point in points:
        kill = {"KILL_AT_STEP": 1} if point == "step" else {"KILL_AT_OVERWRITE": int(point[2:])}
        out = tmp_path / point
        shutil.copytree(old, out)
        killed = run(script, data_dir, out, "--overwrite", **kill)
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
        resumed = run(script, data_dir, out, "--resume=auto")
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        assert not list(tmp_path.glob(f".{point}.overwrit*")) and not list(out.glob(".stage_*.overwrit*")), point
        kept_old = same(weights_of(out, script), weights_of(old, script))
        assert kept_old or same(weights_of(out, script), weights_of(tmp_path / "new", script)), point
        assert kept_old == (point in ("op1", "op2", "step") or script == "train_dance" and point == "op3"), point
        if script == "train_dance":  # the later stage goes and comes back with the stage it was made from
            assert (out / "stage_B").exists() == kept_old, point
        if point == "step":  # the earlier run put back; a second --overwrite then replaces it (once: slow)
            again = run(script, data_dir, out, "--overwrite")
            assert again.returncode == 0, (point, again.stderr[-2000:])
            assert files(out) == files(tmp_path / "new"), point  # nothing of the earlier run is left
            assert same(weights_of(out, script), weights_of(tmp_path / "new", script)), point
