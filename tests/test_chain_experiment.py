"""chain_experiment.py: its steps form one graph, and the summary's paired bootstrap finds a difference
that is there and not one that is not."""
import csv
import json

import numpy as np

import chain_experiment as ce


def test_every_step_needs_only_steps_that_exist_and_each_arm_is_evaluated():
    cfg = ce.Config(seeds=2)
    steps, evals = ce.steps_of(cfg)
    assert all(set(needs) <= set(steps) for needs, _ in steps.values())
    assert {f"eval_{a}_s{s}" for a, s, *_ in evals} <= set(steps)
    assert {a for a, *_ in evals} == {"A", "A'", "B", "B1", "C", "A_true", "B_true"}
    # B and A' start from the same A and differ only in their data
    b, ap = (list(map(str, steps[k][1])) for k in ("B_s1", "A'_s1"))
    assert b[b.index("--init_from") + 1] == ap[ap.index("--init_from") + 1]
    assert b[:b.index("--init_from")] == ap[:ap.index("--init_from")]


def fake_scores(root, arm, seed, offset, noise, mice):
    """An arm's scores.csv: every mouse's own level (mice differ far more than the arms: pairing must remove
    that) plus the arm's offset plus per-image noise."""
    d = root / "eval" / f"{arm}_s{seed}"
    d.mkdir(parents=True)
    with open(d / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", "reference_view", "camera", *ce.METRICS, "psnr_mean_image"])
        for m, level in enumerate(mice):
            for k in range(2):
                w.writerow([f"m{m}", k, 1 - k, 25 + level + offset + noise.normal(0, 0.3), 19 + level, 0.8, 0.7, 21])


def test_paired_bootstrap_separates_a_real_difference_from_none(tmp_path):
    mice = np.random.default_rng(0).normal(0, 2, 30)
    cfg = ce.Config(out=str(tmp_path), seeds=2, bootstrap=1000)
    evals = []
    for i, (arm, offset) in enumerate((("A", 0.0), ("A'", 0.3), ("B", 0.3), ("C", -1.0))):
        for s in range(2):
            fake_scores(tmp_path, arm, s, offset, np.random.default_rng((i, s)), mice)
            evals.append((arm, s, None, None))
    ce.summarise(cfg, evals)
    pairs = json.loads((tmp_path / "summary.json").read_text())["pairs"]
    diff, lo, hi = pairs["B - A"]["psnr"]
    assert abs(diff - 0.3) < 0.1 and lo > 0.1 and hi < 0.5  # a 0.3 dB gain among mice 2 dB apart: found
    diff, lo, hi = pairs["B - A'"]["psnr"]
    assert lo < 0 < hi  # none: the interval holds 0
    assert pairs["A - C"]["psnr"][1] > 0.7
    assert (tmp_path / "psnr_by_arm.png").is_file() and (tmp_path / "scores.csv.gz").is_file()
