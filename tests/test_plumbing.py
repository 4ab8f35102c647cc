"""load_config: defaults -> --cfg yaml -> --key=value, type coercion, errors that name the valid keys."""
from __future__ import annotations  # the loader must resolve string annotations

from dataclasses import dataclass, field

import pytest

import plumbing
from plumbing import ConfigError, config_to_dict, load_config, precision_here, save_config


@dataclass
class Cfg:
    steps: int = 10             # optimizer steps
    lr: float = 1e-3            # peak learning rate
    flag: bool = False          # some switch
    name: str = "run"           # run name
    resume: str | None = None   # None, 'auto' or a path
    seed: int | None = 0
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    betas: tuple[float, float] = (0.9, 0.95)
    views: tuple[int, ...] = (0, 1, 2)
    loss_weights: dict = field(default_factory=lambda: {"mse": 1.0})


KEYS = ["steps", "lr", "flag", "name", "resume", "seed", "sizes", "betas", "views", "loss_weights"]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults():
    assert load_config(Cfg, []) == Cfg()


def test_order_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "steps: 5\nlr: 2.0e-4\nname: from_yaml\n")
    cfg = load_config(Cfg, ["--steps=7", "--cfg", path])  # yaml applies first wherever --cfg stands
    assert (cfg.steps, cfg.lr, cfg.name, cfg.flag) == (7, 2e-4, "from_yaml", False)
    assert load_config(Cfg, [f"--cfg={path}", "--steps", "3", "--steps=4"]).steps == 4  # argv order


def test_both_cli_forms_and_numbers(tmp_path):
    assert load_config(Cfg, ["--lr", "0.5"]).lr == 0.5
    assert load_config(Cfg, ["--lr=-1"]).lr == -1.0  # a negative value in the '=' form
    cfg = load_config(Cfg, ["--lr=3"])
    assert cfg.lr == 3.0 and isinstance(cfg.lr, float)  # int accepted for float
    # yaml 1.1 reads 1e-4 as a str
    cfg = load_config(Cfg, ["--cfg", write(tmp_path, "lr: 1e-4\nsteps: 2.0\n")])
    assert (cfg.lr, cfg.steps) == (1e-4, 2) and isinstance(cfg.steps, int)
    assert load_config(Cfg, ["--steps=1e3"]).steps == 1000


@pytest.mark.parametrize("text,want", [("true", True), ("False", False), ("TRUE", True), ("1", True),
                                       ("0", False)])
def test_bools(text, want):
    assert load_config(Cfg, [f"--flag={text}"]).flag is want


def test_bools_from_yaml(tmp_path):
    assert load_config(Cfg, ["--cfg", write(tmp_path, "flag: true\n")]).flag is True
    assert load_config(Cfg, ["--cfg", write(tmp_path, "flag: 1\n")]).flag is True


def test_lists_tuples_dicts(tmp_path):
    cfg = load_config(Cfg, ["--sizes=[3,4]", "--betas=[0.8, 1]", "--views", "[5]", "--loss_weights={mse: 2}"])
    assert cfg.sizes == [3, 4] and cfg.betas == (0.8, 1.0) and cfg.views == (5,)
    assert isinstance(cfg.betas[1], float) and cfg.loss_weights == {"mse": 2}
    cfg = load_config(Cfg, ["--cfg", write(tmp_path, "sizes: [7]\nbetas: [0.5, 0.6]\nviews: [1, 2, 3, 4]\n")])
    assert cfg.sizes == [7] and cfg.betas == (0.5, 0.6) and cfg.views == (1, 2, 3, 4)
    with pytest.raises(ConfigError, match="betas"):
        load_config(Cfg, ["--betas=[1,2,3]"])  # fixed-length tuple
    with pytest.raises(ConfigError, match="sizes"):
        load_config(Cfg, ["--sizes=[1,x]"])  # elements are coerced too


def test_optional_and_str(tmp_path):
    assert load_config(Cfg, ["--resume=auto"]).resume == "auto"
    assert load_config(Cfg, ["--resume=auto", "--resume=None"]).resume is None
    assert load_config(Cfg, ["--seed=null"]).seed is None
    assert load_config(Cfg, ["--seed=3"]).seed == 3
    assert load_config(Cfg, ["--cfg", write(tmp_path, "seed: null\nresume: out/x\n")]).resume == "out/x"
    assert load_config(Cfg, ["--name=007"]).name == "007"  # CLI strings are not yaml-parsed
    assert load_config(Cfg, ["--name", "[a]"]).name == "[a]"


@pytest.mark.parametrize("argv", [["--nope=1"], ["--nope", "1"], ["positional"]])
def test_unknown_key_from_cli(argv):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, argv)
    assert all(key in str(err.value) for key in KEYS) and argv[0] in str(err.value)


def test_unknown_key_from_yaml(tmp_path):
    path = write(tmp_path, "steps: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, ["--cfg", path])
    msg = str(err.value)
    assert path in msg and "learning_rate" in msg and all(key in msg for key in KEYS)


@pytest.mark.parametrize("arg,key,typ", [("--lr=abc", "lr", "float"), ("--steps=1.5", "steps", "int"),
                                         ("--flag=maybe", "flag", "bool"), ("--steps=true", "steps", "int"),
                                         ("--sizes=3", "sizes", "list[int]")])
def test_bad_values(arg, key, typ):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, [arg])
    msg = str(err.value)
    assert arg in msg and typ in msg and all(k in msg for k in KEYS)


def test_bad_values_from_yaml(tmp_path):
    for text in ["steps: true\n", "flag: 2\n", "name: 007\n", "lr: [1]\n"]:  # yaml reads 007 as the int 7
        path = write(tmp_path, text)
        with pytest.raises(ConfigError, match=text.split(":")[0]) as err:
            load_config(Cfg, ["--cfg", path])
        assert path in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(Cfg, ["--cfg", str(tmp_path / "missing.yaml")])
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping") as err:
        load_config(Cfg, ["--cfg", path])
    assert path in str(err.value)
    with pytest.raises(ConfigError, match="missing value"):
        load_config(Cfg, ["--steps"])


def test_save_round_trip(tmp_path):
    cfg = load_config(Cfg, ["--name=007", "--resume=none", "--betas=[0.1,0.2]", "--lr=1e-5", "--flag=1",
                            "--loss_weights={mse: 1.0, lpips: 0.5}", "--seed=null"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert list(config_to_dict(cfg)) == KEYS and config_to_dict(cfg)["betas"] == [0.1, 0.2]
    assert path.read_text().splitlines()[0].startswith("steps:")  # field order, not sorted
    assert load_config(Cfg, ["--cfg", str(path)]) == cfg


def test_defaults_not_shared():
    a, b = load_config(Cfg, []), load_config(Cfg, [])
    a.sizes.append(99)
    a.loss_weights["x"] = 1
    assert b.sizes == [1, 2] and Cfg().sizes == [1, 2] and "x" not in b.loss_weights
    a, b = (load_config(Cfg, ["--sizes=[5]", "--loss_weights={mse: 2}"]) for _ in range(2))
    assert a.sizes is not b.sizes and a.loss_weights is not b.loss_weights  # values given: parsed per call too


def test_help_prints_source(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(Cfg, ["--steps=3", "--help"])
    assert exit_.value.code == 0
    assert "# peak learning rate" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["train_gslrm", "train_mvdiff", "train_dance"])
def test_help_prints_the_scripts_config(script, capsys):
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        load_config(module.Config, ["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "class Config:" in out and "out_dir: str" in out


def test_earlier_names_still_load(tmp_path):
    """Configs and command lines written with the fields' earlier names load, a changed meaning converted."""
    import sample
    import train_dance
    import train_mvdiff
    old = tmp_path / "old.yaml"
    old.write_text("stage_a_steps: 7\nstage_b_lr: 0.0002\nuncond_prob: 0.2\nface_region_weight: 2.0\n"
                   "stage_c_val_clips: 3\nval_clips: 5\n")
    cfg = load_config(train_dance.Config, ["--cfg", str(old), "--m2p_lr_stage_c=0.001", "--output_dir=x"])
    assert (cfg.max_steps_a, cfg.lr_b, cfg.cond_drop_prob, cfg.val_samples_c, cfg.val_samples) == (7, 2e-4, 0.2, 3, 5)
    assert cfg.face_loss_scale == 3.0 and cfg.m2p_lr_c == 1e-3 and cfg.out_dir == "x"  # the extra weight 2 was x3
    cfg = load_config(train_mvdiff.Config, ["--snr_gamma=3", "--cond_drop_rate=0.1", "--reference_view_idx=0"])
    assert (cfg.min_snr_gamma, cfg.cond_drop_prob, cfg.reference_view) == (3.0, 0.1, "0")
    assert load_config(sample.Config, ["--output_dir=y"]).out_dir == "y"


@dataclass
class Staged:
    steps: int = 10
    lr: float = 1e-3
    sections: dict = field(default_factory=lambda: {"stage_a": {}, "stage_b": {}})


def test_sections_hold_one_parts_values_and_the_command_line_wins(tmp_path):
    path = write(tmp_path, "steps: 5\nstage_b:\n  lr: 1e-4\n  steps: 7\n")
    cfg = load_config(Staged, ["--cfg", path, "--steps=9"])
    assert (cfg.steps, cfg.lr) == (9, 1e-3)  # the top-level values are every part's
    assert cfg.sections == {"stage_a": {}, "stage_b": {"lr": 1e-4}}  # coerced; --steps wins over the section
    save_config(cfg, tmp_path / "saved.yaml")  # a saved config keeps them under `sections`: it reloads the same
    assert load_config(Staged, ["--cfg", str(tmp_path / "saved.yaml")]) == cfg
    for text, match in (("stage_b:\n  lrr: 1\n", r"key stage_b.lrr: unknown key 'lrr' .*; sections: stage_a, stage_b"),
                        ("stage_b:\n  lr: fast\n", r"key stage_b.lr: lr expects float"),
                        ("stage_a: 3\n", "stage_a must be a mapping")):
        with pytest.raises(ConfigError, match=match):
            load_config(Staged, ["--cfg", write(tmp_path, text)])
    with pytest.raises(ConfigError, match="unknown key 'sections'"):  # only a yaml's mappings set them
        load_config(Staged, ["--sections={}"])
    with pytest.raises(ConfigError, match="unknown key 'stage_b'"):  # a class without sections has none
        load_config(Cfg, ["--cfg", write(tmp_path, "stage_b:\n  lr: 1\n")])


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_on_a_cpu_only_where_bf16_is_native(native, monkeypatch):
    monkeypatch.setattr(plumbing, "native_bf16_cpu", lambda: native)
    assert precision_here("bf16", cuda=False) == ("bf16" if native else "no")
    assert precision_here("fp16", cuda=False) == "no"
    assert precision_here("no", cuda=False) == "no"
    assert precision_here("fp16", cuda=True) == "fp16" and precision_here("bf16", cuda=True) == "bf16"


def test_runs_with_other_precisions_in_one_process(monkeypatch):
    """accelerate refuses a second Accelerator with another precision; ours starts a new state."""
    from plumbing import make_accelerator
    monkeypatch.setattr(plumbing, "native_bf16_cpu", lambda: True)
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
