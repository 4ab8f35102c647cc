"""Checkpoint directories: exact round trip, RNG restore, atomic saves, latest pick, strict loading."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from plumbing import (
    InputError,
    UserError,
    atomic_dir,
    clean_stale,
    latest_checkpoint,
    load_checkpoint,
    load_config,
    prepare_run,
    save_checkpoint,
)


@dataclass
class Cfg:
    lr: float = 0.1
    name: str = "tiny"


class Tied(nn.Module):  # embedding and head share one tensor, which plain safetensors save_file refuses
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.head(self.norm(self.emb(x)))


def trained(seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.arange(5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip(tmp_path):
    model, opt = trained(0)
    path = save_checkpoint(tmp_path, 3, {"model": model}, {"opt": opt}, Cfg(name="x"), extra={"batch": 17})
    assert path == tmp_path / "checkpoint-3" and sorted(p.name for p in path.iterdir()) == [
        "COMPLETE", "config.yaml", "model.safetensors", "state.pt"]  # the marker is written last
    assert load_config(Cfg, ["--cfg", str(path / "config.yaml")]) == Cfg(name="x")

    new_model, new_opt = trained(1)  # different weights and optimizer moments
    assert not torch.equal(new_model.emb.weight, model.emb.weight)
    state = load_checkpoint(path, {"model": new_model}, {"opt": new_opt})
    assert state["step"] == 3 and state["extra"] == {"batch": 17}
    for (k, a), b in zip(model.state_dict().items(), new_model.state_dict().values()):
        assert torch.equal(a, b), k
    assert new_model.head.weight is new_model.emb.weight  # still tied after loading
    a, b = opt.state_dict(), new_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    # one more identical step on both gives identical weights
    for m, o in ((model, opt), (new_model, new_opt)):
        m(torch.arange(5)).square().mean().backward()
        o.step()
    assert torch.equal(model.emb.weight, new_model.emb.weight)


def test_state_holds_the_step_optimizers_and_extra(tmp_path):
    model, _ = trained()
    path = save_checkpoint(tmp_path, 1, {"model": model}, extra={"skipped": 2})
    state = load_checkpoint(path, {"model": model})
    # no RNG: draws are seeded by the step
    assert state == {"step": 1, "optimizers": {}, "extra": {"skipped": 2}}


def test_interrupted_saves_are_never_latest(tmp_path):
    model, _ = trained()
    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 5, {"model": model})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(tmp_path / "checkpoint-6") as tmp:
            assert tmp.name.startswith(".tmp-") and tmp.parent == tmp_path
            (tmp / "state.pt").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not (tmp_path / "checkpoint-6").exists() and not tmp.exists()
    crashed = tmp_path / ".tmp-checkpoint-8-abc"  # a killed process never reaches the rename
    crashed.mkdir()
    (crashed / "state.pt").write_bytes(b"half")
    (tmp_path / "checkpoint-7").mkdir()  # no state.pt
    (tmp_path / "checkpoint-7" / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    with pytest.raises(UserError, match="checkpoint-7 is not a complete checkpoint.*latest complete one is "
                                        ".*checkpoint-5"):
        load_checkpoint(tmp_path / "checkpoint-7", {"model": model})


def test_numeric_order_and_resave(tmp_path):
    model, _ = trained()
    for step in (9, 10, 2):
        save_checkpoint(tmp_path, step, {"model": model}, extra={"s": step})
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    save_checkpoint(tmp_path, 10, {"model": model}, extra={"s": 11})  # replaces the existing dir
    assert load_checkpoint(tmp_path / "checkpoint-10", {"model": model})["extra"] == {"s": 11}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_strict_loading(tmp_path):
    model, _ = trained()
    path = save_checkpoint(tmp_path, 1, {"model": model})
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(InputError, match=r"model.safetensors: cannot load it into model .*0\.weight"):
        load_checkpoint(path, {"model": other})
    model.extra = nn.Linear(2, 2)
    with pytest.raises(InputError, match=r"extra\.weight"):
        load_checkpoint(path, {"model": model})
    with pytest.raises(FileNotFoundError, match="ema"):
        load_checkpoint(path, {"ema": model})


def test_refuses_wrapped_module(tmp_path):
    wrapper = nn.Module()
    wrapper.module = nn.Linear(2, 2)  # the key layout of a DDP wrapper
    with pytest.raises(ValueError, match="unwrapped"):
        save_checkpoint(tmp_path, 1, {"model": wrapper})
    assert latest_checkpoint(tmp_path) is None and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="extra"):  # would only fail at resume, under weights_only
        save_checkpoint(tmp_path, 1, {"model": nn.Linear(2, 2)}, extra={"batch": np.int64(3)})


def test_checkpoint_dir_has_ordinary_permissions(tmp_path):  # others on a shared cluster can read it
    path = save_checkpoint(tmp_path, 1, {"model": nn.Linear(2, 2)})
    (tmp_path / "plain").mkdir()
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_resave_killed_between_the_renames_is_restored(tmp_path):
    model, _ = trained()
    save_checkpoint(tmp_path, 5, {"model": model}, extra={"s": 1})
    # a re-save of step 5 killed after renaming the old one aside, before renaming the new one in
    (tmp_path / "checkpoint-5").rename(tmp_path / ".old-checkpoint-5-1234abcd")
    (tmp_path / ".tmp-checkpoint-5-1234abcd").mkdir()
    assert latest_checkpoint(tmp_path) is None
    done = clean_stale(tmp_path)
    assert any("restored checkpoint-5" in line for line in done)
    assert any("killed save" in line for line in done)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert load_checkpoint(tmp_path / "checkpoint-5", {"model": model})["extra"] == {"s": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


class Acc:  # the two things prepare_run asks of an accelerate.Accelerator
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_prepare_run_never_mixes_runs(tmp_path, capsys):
    model, _ = trained()
    assert prepare_run(tmp_path, "auto", False, Acc()) is None
    assert "no complete checkpoint" in capsys.readouterr().out  # said, not silent
    save_checkpoint(tmp_path, 3, {"model": model})
    with pytest.raises(UserError, match="holds checkpoints of an earlier run.*--resume=auto.*--overwrite"):
        prepare_run(tmp_path, "", False, Acc())
    assert prepare_run(tmp_path, "auto", False, Acc()) == tmp_path / "checkpoint-3"
    assert prepare_run(tmp_path, "", True, Acc()) is None  # --overwrite: a fresh run, the old one set aside later
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"  # by open_run, once the new run is checked


def test_broken_checkpoints_are_named(tmp_path):
    model, _ = trained()
    path = save_checkpoint(tmp_path, 1, {"model": model})
    weights = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated by a full disk
    with pytest.raises(InputError, match="model.safetensors: cannot"):
        load_checkpoint(path, {"model": model})
    (path / "model.safetensors").write_bytes(weights)
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:20])
    with pytest.raises(InputError, match="state.pt: cannot read it"):
        load_checkpoint(path, {"model": model})
    with torch.no_grad():
        model.emb.weight[0, 0] = float("nan")  # a diverged run's weights
    path = save_checkpoint(tmp_path, 2, {"model": model})
    with pytest.raises(InputError, match="non-finite weights"):
        load_checkpoint(path, {"model": model})


@pytest.mark.parametrize("script", ["train_gslrm", "train_dance"])
def test_weights_blown_up_with_finite_gradients_are_never_saved(script, tiny_mice, tiny_dance, tiny_cfg, tmp_path):
    """lr 1e6 from the first step: every gradient is clipped and finite, the loss may stay finite, but the
    weights jump by orders of magnitude; the run stops before any checkpoint holds them."""
    import importlib

    from plumbing import TrainingDiverged, latest_checkpoint
    trainer = importlib.import_module(script)
    lr = {"train_gslrm": "lr", "train_dance": "lr_a"}[script]
    out = tmp_path / "out"
    cfg = tiny_cfg(trainer, tiny_dance if script == "train_dance" else tiny_mice, out, warmup_steps=1,
                   ckpt_every=1, **{lr: 1e6})
    with pytest.raises(TrainingDiverged, match="weights' norm grew from"):
        trainer.main(cfg)
    assert latest_checkpoint(out / ("stage_A" if script == "train_dance" else "")) is None
