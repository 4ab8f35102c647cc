"""The mouse chain after phase 1: the camera/prompt guard, gen_synthetic.py (layout, metadata, split by
source object, resumable and kill-safe, several processes) and sample.py (image -> views -> .ply)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gen_synthetic
import sample
from cameras import RigMismatch, load_prompt_embeds, load_rig, read_cameras, save_prompt_embeds, write_cameras
from data import load_ply, read_list_file
from plumbing import load_config
from toy import toy_rig_prompt_embeds

REPO = Path(__file__).parent.parent


def swapped(rig, i, j):
    frames, views = list(rig["frames"]), list(rig["views"])
    frames[i], frames[j], views[i], views[j] = frames[j], frames[i], views[j], views[i]
    return dict(rig, frames=frames, views=views, name=f"{rig['name']}_swapped")


def test_prompt_embeds_guard(tmp_path):
    mouse, facelift = load_rig("mouse_6view"), load_rig("facelift_6view")
    # FaceLift's file is a bare tensor: only a rig that names it by sha256 accepts it
    torch.save(torch.randn(6, 77, 16), tmp_path / "clr_embeds.pt")
    with pytest.raises(RigMismatch, match="bare tensor that records no rig.*'mouse_6view' does not name it"):
        load_prompt_embeds(tmp_path / "clr_embeds.pt", mouse, 16)
    sha = __import__("hashlib").sha256((tmp_path / "clr_embeds.pt").read_bytes()).hexdigest()
    pe, problem = load_prompt_embeds(tmp_path / "clr_embeds.pt", dict(facelift, prompt_embeds_sha256=sha), 16)
    assert pe.shape == (6, 77, 16) and problem is None
    # horizontal (FaceLift) embeddings for the mouse rig: refused naming both rigs
    horizontal = toy_rig_prompt_embeds(facelift, 16)
    save_prompt_embeds(tmp_path / "horizontal.pt", horizontal, facelift, facelift["views"])
    with pytest.raises(RigMismatch, match="names rig 'facelift_6view'.*this run's rig is 'mouse_6view'"):
        load_prompt_embeds(tmp_path / "horizontal.pt", mouse, 16)
    # a rig with two views swapped has other cameras in view order
    save_prompt_embeds(tmp_path / "mouse.pt", toy_rig_prompt_embeds(mouse, 16), mouse, mouse["views"])
    with pytest.raises(RigMismatch, match="mouse_6view_swapped"):
        load_prompt_embeds(tmp_path / "mouse.pt", swapped(mouse, 1, 4), 16)
    pe, problem = load_prompt_embeds(tmp_path / "horizontal.pt", mouse, 16, allow_mismatch=True)
    assert "facelift_6view" in problem


def test_facelift_rig_names_facelifts_embeddings_by_sha256():
    # FaceLift's mvdiffusion/data/fixed_prompt_embeds_6view/clr_embeds.pt (not shipped with this repo)
    assert load_rig("facelift_6view")["prompt_embeds_sha256"] == (
        "b9e51666588d0f075e031262744d371e12076160231aab19a531dbf7ab976e4d")
    assert "prompt_embeds_sha256" not in load_rig("mouse_6view")


def gen_cfg(ckpt, mice, out, **kw):
    args = [f"--mvdiff_checkpoint={ckpt}", f"--input_data={mice}/data_train.txt", f"--output_dir={out}",
            "--steps=2", "--batch_size=4", "--val_fraction=0.25"]
    return load_config(gen_synthetic.Config, args + [f"--{k}={v}" for k, v in kw.items()])


def tree(root):
    """Every file under root -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_gen_synthetic_layout_metadata_and_split(tiny_mv_ckpt, tiny_mice, tmp_path):
    out = gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice, tmp_path / "syn"))
    sources = read_list_file(tiny_mice / "data_train.txt")  # 4 mice x 6 references
    train, val = read_list_file(out / "data_train.txt"), read_list_file(out / "data_val.txt")
    assert len(train) + len(val) == 24 and len(val) == 6  # one source of 4 (0.25), all six references
    by_split = {"train": set(), "val": set()}
    for d in train + val:
        meta = json.loads((d / "metadata.json").read_text())
        by_split[meta["split"]].add(meta["source"])
        k = int(d.name.split("_")[1])
        assert (meta["source_index"], meta["reference_view"]) == divmod(k, 6)
        assert {"mvdiff_checkpoint", "rig", "camera_hash", "prompt_embeds_sha256", "steps", "guidance",
                "seed", "noise_seed", "reference_view_name"} <= set(meta)
        frames = read_cameras(d / "opencv_cameras.json")["frames"]
        assert [fr["file_path"] for fr in frames] == [f"images/cam_{v:03d}.png" for v in range(6)]
        assert all((d / fr["file_path"]).is_file() and fr["w"] == 16 for fr in frames)
    assert by_split["val"] and not by_split["train"] & by_split["val"]  # split by source object
    assert by_split["train"] | by_split["val"] == {s.name for s in sources}
    assert (train[0] in [out / f"sample_{k:06d}" for k in range(24)])
    # the phase-3 loader reads it, with the rig check
    from data import MultiViewDataset
    item = MultiViewDataset(out / "data_train.txt", 16, range(6), 2, load_rig("mouse_6view"), 0, 4)[0]
    assert item["images"].shape == (6, 4, 16, 16)


def test_gen_synthetic_resumes_to_identical_files(tiny_mv_ckpt, tiny_mice, tmp_path):
    full = gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice, tmp_path / "full"))
    reference = tree(full)
    part = gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice, tmp_path / "part"))
    for k in (3, 9, 10, 23):  # "killed" before these were renamed into place; plus a half-written one
        import shutil
        shutil.rmtree(part / f"sample_{k:06d}")
    (part / ".tmp-sample_000003-deadbeef" / "images").mkdir(parents=True)
    (part / "data_train.txt").unlink()
    gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice, part))
    assert tree(part) == reference  # byte-identical, stale temporary folder gone


@pytest.mark.slow
def test_gen_synthetic_sigkill_then_rerun_is_identical(tiny_mv_ckpt, tiny_mice, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [f"--mvdiff_checkpoint={tiny_mv_ckpt}", f"--input_data={tiny_mice}/data_train.txt", "--steps=2",
            "--batch_size=2"]
    def cmd(out):
        return [sys.executable, str(REPO / "gen_synthetic.py"), *args, f"--output_dir={out}"]
    subprocess.run(cmd(tmp_path / "full"), check=True, env=env, timeout=600, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not (tmp_path / "killed" / "sample_000004").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "data_train.txt").exists()  # it really died mid-way
    subprocess.run(cmd(tmp_path / "killed"), check=True, env=env, timeout=600, capture_output=True)
    assert tree(tmp_path / "killed") == tree(tmp_path / "full")


@pytest.mark.slow
def test_gen_synthetic_two_processes_write_the_same_files(tiny_mv_ckpt, tiny_mice, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [f"--mvdiff_checkpoint={tiny_mv_ckpt}", f"--input_data={tiny_mice}/data_train.txt", "--steps=2",
            "--batch_size=2"]
    one = [sys.executable, str(REPO / "gen_synthetic.py"), *args, f"--output_dir={tmp_path / 'one'}"]
    subprocess.run(one, check=True, env=env, timeout=600, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(REPO / "gen_synthetic.py"), *args, f"--output_dir={tmp_path / 'two'}"],
                   check=True, env=env, timeout=600, capture_output=True)
    assert tree(tmp_path / "two") == tree(tmp_path / "one")


def test_gen_synthetic_guard(tiny_mv_ckpt, tiny_mice, tmp_path):
    mouse, facelift = load_rig("mouse_6view"), load_rig("facelift_6view")
    horizontal = tmp_path / "horizontal.pt"
    save_prompt_embeds(horizontal, toy_rig_prompt_embeds(facelift, 16), facelift, facelift["views"])
    with pytest.raises(RigMismatch, match="names rig 'facelift_6view'"):
        gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice, tmp_path / "a", prompt_embeds=horizontal))
    # the rig's cameras in another order
    write_cameras(tmp_path / "permuted.json", {"frames": swapped(mouse, 0, 2)["frames"]})
    with pytest.raises(RigMismatch, match="another order"):
        gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice, tmp_path / "b",
                                   camera_json=tmp_path / "permuted.json"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    out = gen_synthetic.main(gen_cfg(tiny_mv_ckpt, tiny_mice, tmp_path / "c", prompt_embeds=horizontal,
                                     allow_rig_mismatch="true", max_sources=1))
    meta = json.loads((out / "sample_000000" / "metadata.json").read_text())
    assert any("facelift_6view" in m for m in meta["allowed_rig_mismatch"])  # the record it leaves


def test_sample_writes_every_file(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice, tmp_path):
    image = tiny_mice / "mouse_00005" / "images" / "cam_002.png"  # a held-out mouse, rig view 2
    cfg = load_config(sample.Config, [f"--input_image={image}", f"--mvdiff_checkpoint={tiny_mv_ckpt}",
                                      f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--output_dir={tmp_path}",
                                      "--reference_view=2", "--steps=2", "--turntable_frames=4"])
    sample.main(cfg)
    for name in ("input.png", "multiview.png", "gaussians.ply", "renders.png", "chain.json"):
        assert (tmp_path / name).is_file(), name
    assert list(tmp_path.glob("turntable.*"))
    g, info = load_ply(tmp_path / "gaussians.ply"), json.loads((tmp_path / "chain.json").read_text())
    assert len(g["means"]) == info["gaussians_kept"] > 0 and (g["opacities"] > 0.04).all()
    assert info["gaussians"] == 2 + 6 * 16 * 16  # 2 extra + one per pixel of the 6 views


def test_sample_refuses_checkpoints_of_different_rigs(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice, tmp_path):
    gs = tmp_path / "gs"
    import shutil
    shutil.copytree(tiny_gslrm_ckpt, gs)
    # a GS-LRM trained on horizontal views
    (gs / "rig.json").write_text(json.dumps(load_rig("facelift_6view")))
    args = [f"--input_image={tiny_mice / 'mouse_00005' / 'images' / 'cam_000.png'}",
            f"--mvdiff_checkpoint={tiny_mv_ckpt}", f"--gslrm_checkpoint={gs}",
            f"--output_dir={tmp_path / 'o'}", "--steps=1", "--turntable_frames=2"]
    with pytest.raises(RigMismatch, match="'mouse_6view'.*'facelift_6view'"):
        sample.main(load_config(sample.Config, args))
    sample.main(load_config(sample.Config, args + ["--allow_rig_mismatch"]))
    record = json.loads((tmp_path / "o" / "chain.json").read_text())["allowed_rig_mismatch"]
    assert "facelift_6view" in record[0]


def test_sample_eval_scores_held_out_cameras(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice, tmp_path):
    base = [f"--mvdiff_checkpoint={tiny_mv_ckpt}", f"--gslrm_checkpoint={tiny_gslrm_ckpt}", "--steps=1",
            f"--eval_list={tiny_mice / 'data_val.txt'}"]
    m = sample.main(load_config(sample.Config, base + [f"--output_dir={tmp_path / 'g'}"]))
    gt = sample.main(load_config(sample.Config, base + [f"--output_dir={tmp_path / 't'}",
                                                         "--eval_views=ground_truth"]))
    assert m["samples"] == gt["samples"] == 2 and "views_psnr" in m and "views_psnr" not in gt
    assert m["psnr"] != gt["psnr"] and m["psnr_mean_image"] == gt["psnr_mean_image"]
    assert (tmp_path / "g" / "eval.png").is_file()
