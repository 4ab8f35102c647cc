"""Several processes, as users launch them on a CPU machine: `accelerate launch --multi_gpu` and torchrun
give real 2-process DDP (gloo) with the same result as one process on the doubled batch, and a dead or
hung rank ends the run in bounded time instead of hanging forever."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS
from safetensors.torch import load_file

REPO = Path(__file__).parent.parent
TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def env(**kw):
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{k: str(v) for k, v in kw.items()})


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_flag_gives_two_processes_on_a_cpu(tiny_mice, tmp_path):
    # plain `accelerate launch --num_processes=2` (with or without --cpu) starts ONE process here;
    # --multi_gpu makes it start torch.distributed.run, and our Accelerator(cpu=True) picks gloo
    worker = TESTS / "ddp_grad_worker.py"
    subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes=2", "--mixed_precision=no",
                    "--dynamo_backend=no", "--num_machines=1", str(worker), str(tiny_mice),
                    str(tmp_path / "a.pt")],
                   check=True, env=env(), timeout=300, capture_output=True)
    subprocess.run([sys.executable, str(worker), str(tiny_mice), str(tmp_path / "one.pt")], check=True,
                   env=env(), timeout=300, capture_output=True)
    two, one = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "one.pt")
    assert two["world"] == 2 and one["world"] == 1
    for a, b in zip(two["grads"], one["grads"]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def dance(out, data, batch, *launcher):
    args = [f"--data_dir={data}", f"--out_dir={out}", *TINY_ARGS["train_dance"], f"--batch_size={batch}",
            "--max_steps_a=3", "--val_every=100"]
    return subprocess.run([*launcher, str(REPO / "train_dance.py"), *args], env=env(), timeout=600,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_torchrun_dance_equals_one_process_on_the_doubled_batch(tiny_dance, tmp_path):
    one = dance(tmp_path / "one", tiny_dance, 2, sys.executable)
    two = dance(tmp_path / "two", tiny_dance, 1, *TORCHRUN)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "processes: 2" in two.stdout and "processes: 1" in one.stdout
    a = load_file(tmp_path / "one" / "stage_A" / "final" / "m2p.safetensors")
    b = load_file(tmp_path / "two" / "stage_A" / "final" / "m2p.safetensors")
    # the same samples and the same averaged gradient; only the all-reduce's summation order differs
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["KILL_AT_STEP", "HANG_AT_STEP"])
def test_a_dead_or_hung_rank_ends_the_run(fault, tiny_mice, tmp_path):
    args = [f"--data_dir={tiny_mice}", f"--out_dir={tmp_path / 'out'}", *TINY_ARGS["train_gslrm"],
            "--batch_size=1", "--max_steps=20"]
    t = time.perf_counter()
    run = subprocess.run([*TORCHRUN, str(TESTS / "kill_worker.py"), "train_gslrm", *args],
                         env=env(**{fault: 3, "KILL_RANK": 1, "MOUSELIFT_DDP_TIMEOUT_S": 20}), timeout=300,
                         capture_output=True, text=True)
    assert run.returncode != 0  # the survivors did not report success
    assert time.perf_counter() - t < 200  # and nobody waited forever (hang: the 20 s timeout fired)


@pytest.mark.slow
def test_torchrun_mvdiff_trains_in_step(tiny_mice, tmp_path):
    # its noise is drawn per rank (seeded by seed, step and rank): a 2-process run is another draw of the
    # same training, not bit-equal to one process; what must hold is that both ranks stay in step
    args = [f"--data_dir={tiny_mice}", f"--out_dir={tmp_path / 'out'}", *TINY_ARGS["train_mvdiff"],
            "--batch_size=1", f"--prompt_embeds={tiny_mice}/pe.pt", "--max_steps=2", "--ckpt_every=2"]
    run = subprocess.run([*TORCHRUN, str(REPO / "train_mvdiff.py"), *args], env=env(), timeout=600,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "processes: 2" in run.stdout and (tmp_path / "out" / "checkpoint-2" / "COMPLETE").is_file()


@pytest.mark.slow
def test_killed_launcher_ends_its_workers_and_the_run_resumes_exactly(tiny_mice, tmp_path):
    import psutil
    args = lambda out: [f"--data_dir={tiny_mice}", f"--out_dir={out}", *TINY_ARGS["train_gslrm"],  # noqa: E731
                        "--batch_size=1", "--max_steps=6", "--ckpt_every=2"]
    # both workers hang after saving checkpoint-4: the launcher is killed while they still run
    launcher = subprocess.Popen([*TORCHRUN, str(TESTS / "kill_worker.py"), "train_gslrm", *args(tmp_path / "out")],
                                env=env(HANG_AT_STEP=4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "out" / "checkpoint-4" / "COMPLETE").is_file():
        assert time.time() < deadline and launcher.poll() is None, "the run did not reach checkpoint-4"
        time.sleep(0.5)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert len(workers) >= 2
    launcher.kill()
    launcher.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"{len(alive)} workers outlived their launcher"
    resumed = subprocess.run([*TORCHRUN, str(REPO / "train_gslrm.py"), *args(tmp_path / "out"), "--resume=auto"],
                             env=env(), timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    full = subprocess.run([*TORCHRUN, str(REPO / "train_gslrm.py"), *args(tmp_path / "full")], env=env(),
                          timeout=600, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    a, b = (load_file(tmp_path / o / "checkpoint-6" / "model.safetensors") for o in ("full", "out"))
    assert all(torch.equal(a[k], b[k]) for k in a)
