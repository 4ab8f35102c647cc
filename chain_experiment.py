"""The toy chain's experiment, end to end: does GS-LRM fine-tuned on phase 2's output (B) beat the same
fine-tuning on the true views (A') and GS-LRM trained on the true views only (A), and what does the
camera mismatch of the original recipe (C) cost? One entry point that runs the other scripts as a reader
would (subprocesses: no script imports another), resumable, two jobs at a time:

    python chain_experiment.py                       # ~2 h on 2 CPU cores; out/chain_exp/
    python chain_experiment.py --seeds 1 --eval_mice 8 --gslrm_steps 200 --mvdiff_steps 100   # a smoke run
    python chain_experiment.py --only eval_ --jobs 1   # beside a running one: the evaluations as they can start

Arms (every GS-LRM arm trained with `seeds` seeds; one phase-1 model P0 shared by all seeds, a second
phase-1 seed P1 once, to show its share of the variance):
  A   train_gslrm.py on the true toy views (defaults)                         read P0's views
  A'  A fine-tuned with B's exact recipe on the true 6 views of B's sources    read P0's views
  B   A fine-tuned on gen_synthetic.py's output of P0 (configs/toy_gslrm_synthetic.yaml)
  B1  A (seed 0) fine-tuned on P1's output                                    read P1's views
  C   A reading the views of a horizontal-rig model H (FaceLift's rig: the original recipe's failure)
  A_true, B_true: the true 6 views in (upper bounds); the mean image of the held-out views (sees no input)
Each arm runs the chain from every rig view of `eval_mice` held-out mice (another seed, seen by no phase)
and is scored at every other camera (sample.py --eval_list --eval_all_views: scores.csv per arm), at 10 DDIM
steps as phase 2 writes B's training views; the generated views are made once per phase-1 model and shared.
The summary pools them into <out>/scores.csv.gz and <out>/summary.md with paired bootstrap 95 % intervals
(mice and seeds resampled together) and <out>/psnr_by_arm.png. Steps already done (<out>/done/<step>)
are skipped: a killed run resumes where it stopped.
"""

import csv
import gzip
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from plumbing import InputError, cli


@dataclass
class Config:
    out: str = "out/chain_exp"
    seeds: int = 3  # of every trained GS-LRM arm
    eval_mice: int = 100  # held-out mice, every rig view the reference once
    jobs: int = 2  # steps run at once (each with cores / jobs threads)
    mvdiff_steps: int = 1000  # phase 1 (train_mvdiff.py's default)
    gslrm_steps: int = 2000  # A (train_gslrm.py's default)
    finetune_steps: int = 500  # B, A', B1 (configs/toy_gslrm_synthetic.yaml's)
    sources: int = 64  # phase 2's source mice (x 6 references)
    bootstrap: int = 4000
    only: str = ""  # run only the steps whose names start with one of these (comma-separated), e.g. "eval_";
    # steps they need are waited for: another driver (another machine on a shared disk) may be running them


def steps_of(cfg):
    """name -> (the steps it needs, the command: a list of arguments or a function)."""
    R, S, py = Path(cfg.out), range(cfg.seeds), sys.executable
    D = R / "data"
    mv, ev = D / "mice_mv", D / "mice_eval"
    steps = {
        "data_mice": ([], [py, "toy.py", "mice", "--out", D / "mice", "--n", 200, "--n_val", 20]),
        "data_mice_mv": ([], [py, "toy.py", "mice", "--out", mv, "--n", 400, "--n_extra", 0, "--n_val", 16,
                              "--yaw_deg", 30]),
        "data_horizontal": ([], [py, "toy.py", "mice", "--out", D / "mice_horizontal", "--rig", "facelift_6view",
                                 "--n", 400, "--n_extra", 0, "--n_val", 16, "--yaw_deg", 30]),
        "data_eval": ([], [py, "toy.py", "mice", "--out", ev, "--n", cfg.eval_mice, "--n_val", cfg.eval_mice,
                           "--seed", 1, "--yaw_deg", 30]),
    }
    mvdiff = [py, "train_mvdiff.py", "--data_dir", mv, "--prompt_embeds", mv / "toy_prompt_embeds.pt",
              "--max_steps", cfg.mvdiff_steps, "--val_every", cfg.mvdiff_steps]
    for p in (0, 1):
        steps[f"P{p}"] = (["data_mice_mv"], mvdiff + ["--seed", p, "--out_dir", R / f"P{p}"])
        steps[f"synthetic_P{p}"] = ([f"P{p}"], [py, "gen_synthetic.py", "--mvdiff_checkpoint", R / f"P{p}",
                                                "--input_data", mv / "data_train.txt", "--max_sources", cfg.sources,
                                                "--steps", 10, "--out_dir", D / f"synthetic_P{p}"])
    steps["H"] = (["data_horizontal"], [py, "train_mvdiff.py", "--cfg", "configs/toy_mvdiff_horizontal.yaml",
                                        "--data_dir", D / "mice_horizontal", "--prompt_embeds",
                                        D / "mice_horizontal/toy_prompt_embeds.pt", "--max_steps", cfg.mvdiff_steps,
                                        "--val_every", cfg.mvdiff_steps, "--out_dir", R / "H"])
    steps["lists_A'"] = (["synthetic_P0"], lambda: write_source_lists(D / "synthetic_P0", mv))
    finetune = [py, "train_gslrm.py", "--cfg", "configs/toy_gslrm_synthetic.yaml", "--max_steps", cfg.finetune_steps,
                "--val_every", cfg.finetune_steps, "--ckpt_every", cfg.finetune_steps]
    for s in S:
        A = R / f"A_s{s}"
        init = ["--init_from", A / f"checkpoint-{cfg.gslrm_steps}", "--seed", s]
        steps[f"A_s{s}"] = (["data_mice"], [py, "train_gslrm.py", "--data_dir", D / "mice", "--seed", s,
                                            "--max_steps", cfg.gslrm_steps, "--out_dir", A])
        steps[f"B_s{s}"] = ([f"A_s{s}", "synthetic_P0"],
                            finetune + init + ["--data_dir", D / "synthetic_P0", "--out_dir", R / f"B_s{s}"])
        steps[f"A'_s{s}"] = ([f"A_s{s}", "lists_A'"],
                             finetune + init + ["--data_dir", mv, "--train_list", "aprime_train.txt",
                                                "--val_list", "aprime_val.txt", "--out_dir", R / f"A'_s{s}"])
    steps["B1_s0"] = (["A_s0", "synthetic_P1"], finetune + ["--init_from", R / f"A_s0/checkpoint-{cfg.gslrm_steps}",
                                                            "--data_dir", D / "synthetic_P1", "--out_dir", R / "B1_s0"])

    # the evaluations: (arm, seed, phase-1 model or None for the true views, GS-LRM run)
    evals = [(arm, s, "P0", f"{arm}_s{s}") for arm in ("A", "A'", "B") for s in S]
    evals += [("C", s, "H", f"A_s{s}") for s in S] + [("B1", 0, "P1", "B1_s0")]
    evals += [(f"{arm}_true", s, None, f"{arm}_s{s}") for arm in ("A", "B") for s in S]
    for arm, s, p1, gs in evals:
        cmd = [py, "sample.py", "--eval_list", ev / "data_val.txt", "--eval_all_views", "--gslrm_checkpoint", R / gs,
               "--out_dir", R / "eval" / f"{arm}_s{s}", "--eval_cache", R / "eval_cache", "--steps", 10]
        cmd += ["--eval_views", "ground_truth"] if p1 is None else ["--mvdiff_checkpoint", R / p1]
        cmd += ["--allow_rig_mismatch"] if arm == "C" else []
        steps[f"eval_{arm}_s{s}"] = ([gs, "data_eval"] + ([p1] if p1 else []), cmd)
    return steps, evals


def write_source_lists(synthetic, mv):
    """A' trains on the true views of exactly the sources B's synthetic samples were made from, split as
    phase 2 split them (by source mouse)."""
    for split in ("train", "val"):
        names = sorted({json.loads((synthetic / d / "metadata.json").read_text())["source"]
                        for d in (synthetic / f"data_{split}.txt").read_text().split()})
        (mv / f"aprime_{split}.txt").write_text("".join(f"{n}\n" for n in names))


def run_steps(cfg, steps):
    """Run the steps whose needs are done, `jobs` at a time; a failed step stops the launching of others.
    Done markers are re-read every round, so two drivers (e.g. --only=eval_ beside a training one) share work."""
    R = Path(cfg.out)
    (R / "done").mkdir(parents=True, exist_ok=True)
    (R / "logs").mkdir(exist_ok=True)
    mine = [n for n in steps if not cfg.only or n.startswith(tuple(cfg.only.split(",")))]
    running, waiting_said = {}, False
    env = dict(os.environ)  # threads: cores / jobs, unless OMP_NUM_THREADS says (more threads than free cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // cfg.jobs)))  # spin: many x slower)
    done = {n for n in steps if (R / "done" / n).exists()}
    print(f"{len(mine)} steps, {len(set(mine) & done)} done already; logs in {R}/logs")
    while not set(mine) <= done:
        for name in mine:
            needs, cmd = steps[name]
            if len(running) >= cfg.jobs or name in done or name in running or not set(needs) <= done:
                continue
            if callable(cmd):
                cmd()
                (R / "done" / name).touch()
                done.add(name)
                continue
            log = open(R / "logs" / f"{name}.log", "w")
            print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(map(str, cmd))}", flush=True)
            running[name] = (subprocess.Popen(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, env=env),
                             time.perf_counter())
        if not running and not waiting_said:
            others = {n for m in mine if m not in done for n in steps[m][0]} - set(mine) - done
            if not others:
                raise RuntimeError(f"nothing can run: {sorted(set(mine) - done)} wait for each other")
            print(f"waiting for steps another driver runs: {sorted(others)}", flush=True)
            waiting_said = True
        time.sleep(2)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode:
                for other, _ in running.values():
                    other.wait()
                tail = (R / "logs" / f"{name}.log").read_text().splitlines()[-5:]
                raise InputError(f"step {name} failed (exit {proc.returncode}): {' | '.join(tail)}")
            took = time.perf_counter() - t0
            (R / "done" / name).write_text(f"{took:.0f} s\n")
            print(f"[{time.strftime('%H:%M:%S')}] done {name} in {took / 60:.1f} min", flush=True)
            waiting_said = False
        done = {n for n in steps if (R / "done" / n).exists()}


METRICS = ("psnr", "masked_psnr", "ssim", "alpha_iou")
# (arm, seed or None for all, arm, seed): B (seed 0) - B1 is the phase-1 seed's effect, from one A
PAIRS = (("B", None, "A'", None), ("B", None, "A", None), ("A'", None, "A", None), ("A", None, "C", None),
         ("B", 0, "B1", 0))


def summarise(cfg, evals):
    """Every arm's scores.csv -> <out>/scores.csv.gz (one row per arm, seed, mouse, reference view, camera),
    per-arm means with intervals, paired differences with intervals, a plot."""
    R = Path(cfg.out)
    rows = []
    for arm, s, _, _ in evals:
        with open(R / "eval" / f"{arm}_s{s}" / "scores.csv") as f:
            rows += [dict(r, arm=arm, seed=s) for r in csv.DictReader(f)]
    keys = ["arm", "seed", "sample", "reference_view", "camera", *METRICS, "psnr_mean_image"]
    with gzip.open(R / "scores.csv.gz", "wt", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    mice = sorted({r["sample"] for r in rows})
    arms = list(dict.fromkeys(arm for arm, *_ in evals))
    seeds = {arm: sorted({s for a, s, *_ in evals if a == arm}) for arm in arms}
    # per (arm, seed, mouse): the mean over reference views and cameras; a mouse is the unit resampled
    table = {}
    for arm in arms + ["mean image"]:
        for s in seeds.get(arm, [0]):
            src = [r for r in rows if r["arm"] == (arm if arm != "mean image" else arms[0]) and r["seed"] == s]
            for m in METRICS:
                col = "psnr_mean_image" if arm == "mean image" else m
                if arm == "mean image" and m != "psnr":
                    continue
                by_mouse = {}
                for r in src:
                    by_mouse.setdefault(r["sample"], []).append(float(r[col]))
                table[arm, s, m] = np.array([np.mean(by_mouse[k]) for k in mice])  # (mice,)
    rng = np.random.default_rng(0)
    n_seeds = min(len(v) for v in seeds.values() if len(v) > 1) if any(len(v) > 1 for v in seeds.values()) else 1
    mouse_draws = rng.integers(0, len(mice), (cfg.bootstrap, len(mice)))
    seed_draws = rng.integers(0, n_seeds, (cfg.bootstrap, n_seeds))  # shared: seed s of B, A', C came from A_s

    def boot(arm, m, seed=None):
        """(bootstrap,) resampled means of the arm (or of one of its seeds): seeds, paired across arms by
        index (B_s, A'_s and C_s all start from A_s), and mice, paired across all arms."""
        per_seed = np.stack([table[arm, s, m] for s in ([seed] if seed is not None else seeds.get(arm, [0]))])
        if len(per_seed) == n_seeds > 1:
            by = per_seed[seed_draws].mean(1)  # (bootstrap, mice)
        else:
            by = np.broadcast_to(per_seed.mean(0), (cfg.bootstrap, len(mice)))  # (bootstrap, mice)
        return np.take_along_axis(by, mouse_draws, 1).mean(1)

    def mean(arm, m, seed=None):
        return np.mean([table[arm, s, m].mean() for s in ([seed] if seed is not None else seeds.get(arm, [0]))])

    lines = [f"{len(mice)} held-out mice x every rig view as reference x every other camera; "
             f"{cfg.bootstrap} paired bootstrap resamples of mice and seeds", "",
             "| arm | seeds | " + " | ".join(METRICS) + " | PSNR by seed |", "|---|---|" + "---|" * (len(METRICS) + 1)]
    summary = {"arms": {}, "pairs": {}}
    for arm in arms + ["mean image"]:
        cells, entry = [], {}
        for m in METRICS:
            if (arm, seeds.get(arm, [0])[0], m) not in table:
                cells.append("")
                continue
            lo, hi = np.percentile(boot(arm, m), [2.5, 97.5])
            entry[m] = (mean(arm, m), lo, hi)
            cells.append(f"{mean(arm, m):.3f} [{lo:.3f}, {hi:.3f}]" if m in ("ssim", "alpha_iou")
                         else f"{mean(arm, m):.2f} [{lo:.2f}, {hi:.2f}]")
        by_seed = " / ".join(f"{table[arm, s, 'psnr'].mean():.2f}" for s in seeds.get(arm, [0]))
        lines.append(f"| {arm} | {len(seeds.get(arm, [0]))} | " + " | ".join(cells) + f" | {by_seed} |")
        summary["arms"][arm] = entry
    lines += ["", "| difference | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for a, sa, b, sb in PAIRS:
        if a not in arms or b not in arms:
            continue
        name = f"{a}{'' if sa is None else f' (seed {sa})'} - {b}"
        cells, entry = [], {}
        for m in METRICS:
            d = boot(a, m, sa) - boot(b, m, sb)
            lo, hi = np.percentile(d, [2.5, 97.5])
            diff = mean(a, m, sa) - mean(b, m, sb)
            entry[m] = (diff, lo, hi)
            f = ".3f" if m in ("ssim", "alpha_iou") else ".2f"
            cells.append(f"{diff:+{f}} [{lo:+{f}}, {hi:+{f}}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        summary["pairs"][name] = entry
    (R / "summary.md").write_text("\n".join(lines) + "\n")
    (R / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary["arms"], summary["pairs"], R / "psnr_by_arm.png")
    print("\n".join(lines))
    print(f"wrote {R}/scores.csv.gz ({len(rows)} rows), summary.md, summary.json, psnr_by_arm.png")


def plot(arms, pairs, path, w=640, row=30):
    """Two panels, a dot at the mean and a bar over the 95 % interval (PIL: no plotting library needed):
    each arm's PSNR (wide intervals: mice differ), then the paired differences (narrow: pairing removes that)."""
    panels = [("held-out PSNR by arm (dB), 95 % interval", [(a, e["psnr"]) for a, e in arms.items() if "psnr" in e]),
              ("paired differences (dB), 95 % interval", [(k, e["psnr"]) for k, e in pairs.items()])]
    img = Image.new("RGB", (w, sum(row * (len(items) + 3) for _, items in panels)), "white")
    d, top = ImageDraw.Draw(img), 0
    for title, items in panels:
        lo = min([v[1] for _, v in items] + [0.0 if "differences" in title else np.inf]) - 0.3
        hi = max(v[2] for _, v in items) + 0.3
        x = lambda v, lo=lo, hi=hi: 130 + (v - lo) / (hi - lo) * (w - 160)  # noqa: E731
        step = 1.0 if hi - lo > 3 else 0.5
        bottom = top + row * (len(items) + 1)
        for t in np.arange(np.ceil(lo / step) * step, hi, step):  # grid lines
            d.line([(x(t), top + row // 2), (x(t), bottom)], fill=(150, 150, 150) if t == 0 else (225, 225, 225))
            d.text((x(t) - 8, bottom + 4), f"{t + 0.0:g}", fill="black")  # + 0.0: no "-0"
        d.text((w // 2 - 110, top + 2), title, fill="black")
        for i, (a, (m, low, high)) in enumerate(items):
            y = top + row * (i + 1)
            d.text((8, y - 6), a, fill="black")
            d.line([(x(low), y), (x(high), y)], fill=(60, 90, 200), width=3)
            d.ellipse([x(m) - 4, y - 4, x(m) + 4, y + 4], fill=(200, 40, 40))
        top += row * (len(items) + 3)
    img.save(path)


def main(cfg):
    if cfg.seeds < 1 or cfg.eval_mice < 1 or cfg.jobs < 1:
        raise InputError("seeds, eval_mice and jobs must be at least 1")
    steps, evals = steps_of(cfg)
    t0 = time.perf_counter()
    run_steps(cfg, steps)
    print(f"steps took {(time.perf_counter() - t0) / 60:.1f} min this time")
    if not cfg.only:
        summarise(cfg, evals)


if __name__ == "__main__":
    cli(main, Config)
