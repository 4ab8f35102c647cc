"""Mouse inference and provenance: sample.py --views_dir / --input_dir, --reference_view, pruning and its floater
measure, the millimetre .ply; phase 3's record of which diffusion checkpoint made its data; FaceLift's released
pipeline imported as a phase-1 checkpoint; GS-LRM positions under bf16; the original code base's flag names."""
import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_facelift_pipeline

import gen_synthetic
import sample
import train_gslrm
import train_mvdiff
from cameras import RigMismatch, load_rig, read_cameras, save_prompt_embeds, write_cameras
from data import load_ply
from models import GSLRM, GSLRM_CONFIGS, get_rays
from plumbing import InputError, load_config
from toy import toy_rig_prompt_embeds
from weights import import_facelift_mvdiff, load_mv_checkpoint

REPO = Path(__file__).parent.parent


def run_sample(*args):
    return sample.main(load_config(sample.Config, [*args, "--steps=1", "--turntable_frames=4"]))


def test_views_dir_reconstructs_real_views_without_diffusion(tiny_gslrm_ckpt, tiny_mice, tmp_path):
    d = tiny_mice / "mouse_00005"
    out = run_sample(f"--views_dir={d}", f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--out_dir={tmp_path / 'o'}",
                     "--mvdiff_checkpoint=/nonexistent", "--measure_floaters")  # no diffusion model is read
    info = json.loads((out / "chain.json").read_text())
    assert info["mvdiff_checkpoint"] is None and info["gaussians"] == 2 + 6 * 16 * 16
    assert (out / "views.png").is_file() and (out / "renders.png").is_file() and not (out / "multiview.png").exists()
    share = info["turntable_off_silhouette"]
    assert 0 <= share["pruned"] <= 1 and 0 <= share["unpruned"] <= 1
    # the sample's cameras are checked against the GS-LRM checkpoint's rig: two views swapped are refused
    bad = tmp_path / "swapped"
    shutil.copytree(d, bad)
    cams = read_cameras(bad / "opencv_cameras.json")
    cams["frames"][0], cams["frames"][3] = cams["frames"][3], cams["frames"][0]
    write_cameras(bad / "opencv_cameras.json", cams)
    with pytest.raises(RigMismatch, match="swapped/opencv_cameras.json.*another order"):
        run_sample(f"--views_dir={bad}", f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--out_dir={tmp_path / 'x'}")


def test_eval_scores_turntable_speckles_against_true_silhouettes(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice, tmp_path):
    m = run_sample(f"--eval_list={tiny_mice / 'data_val.txt'}", f"--mvdiff_checkpoint={tiny_mv_ckpt}",
                   f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--out_dir={tmp_path}", "--measure_floaters")
    assert 0 <= m["off_silhouette_pruned"] <= 1 and 0 <= m["off_silhouette_unpruned"] <= 1
    assert m["psnr_pruned"] != m["psnr"]  # the pruned Gaussians scored too (the tiny model's are faint)


def test_eval_all_views_writes_per_image_scores_and_reuses_generated_views(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice,
                                                                           tmp_path):
    """--eval_all_views: every rig view the reference once, one scores.csv row per scored image, whose means are
    metrics.json's; --eval_cache keeps the generated views, which do not depend on their batch (the single-view
    run makes the same views) and are read back, not made again, by a second run."""
    base = [f"--eval_list={tiny_mice / 'data_val.txt'}", f"--mvdiff_checkpoint={tiny_mv_ckpt}",
            f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--eval_cache={tmp_path / 'cache'}", "--eval_samples=1"]
    m = run_sample(*base, "--eval_all_views", f"--out_dir={tmp_path / 'all'}")
    with open(tmp_path / "all" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    frames = len(read_cameras(tiny_mice / read_list(tiny_mice / "data_val.txt")[0] / "opencv_cameras.json")["frames"])
    assert len(rows) == m["samples"] * 6 * (frames - 1) and m["reference_views"] == list(range(6))
    assert {int(r["reference_view"]) for r in rows} == set(range(6))
    assert all(r["camera"] != r["reference_view"] for r in rows)
    for key in ("psnr", "masked_psnr", "ssim", "alpha_iou"):
        assert abs(sum(float(r[key]) for r in rows) / len(rows) - m[key]) < 1e-3
    assert all(0 <= float(r["alpha_iou"]) <= 1 for r in rows)
    cached = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == m["samples"] * 6
    run_sample(*base[:3], base[4], "--reference_view=2", f"--out_dir={tmp_path / 'one'}")  # no cache, batch of 1
    with open(tmp_path / "one" / "scores.csv") as f:
        single = {(r["sample"], r["camera"]): float(r["psnr"]) for r in csv.DictReader(f)}
    batched = {(r["sample"], r["camera"]): float(r["psnr"]) for r in rows if r["reference_view"] == "2"}
    assert single.keys() == batched.keys()
    assert all(abs(single[k] - batched[k]) < 1e-2 for k in single), (single, batched)
    mtimes = [p.stat().st_mtime_ns for p in cached]
    again = run_sample(*base, "--eval_all_views", f"--out_dir={tmp_path / 'again'}")
    assert again["psnr"] == m["psnr"] and [p.stat().st_mtime_ns for p in cached] == mtimes


def test_eval_samples_on_another_rig_are_refused(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice, tmp_path):
    """--eval_list reconstructs generated views at the rig's cameras and scores at the sample's: a sample
    whose cameras are not the rig's (two swapped) is refused, naming its camera file."""
    bad = tmp_path / "mice" / "mouse_x"
    shutil.copytree(tiny_mice / read_list(tiny_mice / "data_val.txt")[0], bad)
    cams = read_cameras(bad / "opencv_cameras.json")
    cams["frames"][1], cams["frames"][4] = cams["frames"][4], cams["frames"][1]
    write_cameras(bad / "opencv_cameras.json", cams)
    (tmp_path / "mice" / "list.txt").write_text("mouse_x\n")
    with pytest.raises(RigMismatch, match="mouse_x/opencv_cameras.json"):
        run_sample(f"--eval_list={tmp_path / 'mice' / 'list.txt'}", f"--mvdiff_checkpoint={tiny_mv_ckpt}",
                   f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--out_dir={tmp_path / 'o'}")


def read_list(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def test_input_dir_writes_one_folder_per_image(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for name in ("a", "b"):
        shutil.copy(tiny_mice / "mouse_00004" / "images" / "cam_001.png", images / f"{name}.png")
    (images / "notes.txt").write_text("not an image")
    run_sample(f"--input_dir={images}", f"--mvdiff_checkpoint={tiny_mv_ckpt}",
               f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--out_dir={tmp_path / 'o'}", "--reference_view=1")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a", "b"]
    assert all((tmp_path / "o" / n / "gaussians.ply").is_file() for n in "ab")
    with pytest.raises(InputError, match="give one of"):
        run_sample(f"--input_dir={images}", f"--input_image={images / 'a.png'}")


def test_pruning_drops_faint_large_and_far_gaussians():
    rig = load_rig("mouse_6view")
    cfg = load_config(sample.Config, [])
    target = sample.camera_geometry(rig["frames"])["target"].float()
    g = {"means": target.repeat(4, 1), "scales": torch.full((4, 3), 0.01), "opacities": torch.full((4,), 0.9)}
    g["opacities"][1] = 0.03  # fainter than FaceLift's 0.04
    g["scales"][2, 1] = 0.2  # 0.1 world units is FaceLift's 20 px at 512 px: at 512 px, 0.2 is too large...
    g["means"][3, 0] += 2.0  # far from the point the cameras look at: a floater
    assert sample.prune(g, rig["frames"], 512, cfg).tolist() == [True, False, False, False]
    assert sample.prune(g, rig["frames"], 32, cfg)[2]  # ...but under a pixel of a 32 px toy view


def test_off_silhouette_share_counts_speckles_only():
    sil = torch.zeros(1, 8, 8, dtype=torch.bool)
    sil[0, 2:5, 2:5] = True
    rgb = torch.ones(1, 3, 8, 8)
    rgb[0, :, 2:5, 2:5] = 0.2  # the object
    assert sample.off_silhouette_share(rgb, sil) == 0
    rgb[0, 0, 7, 7] = 0.0  # a cyan speckle far off the object
    assert sample.off_silhouette_share(rgb, sil) == pytest.approx(1 / (64 - 25))


def test_millimetre_ply_maps_back_through_transform(tiny_gslrm_ckpt, tiny_mice, tmp_path):
    d = tmp_path / "sample"
    shutil.copytree(tiny_mice / "mouse_00005", d)
    angle = torch.tensor(0.7)  # a similarity: scale 100, a turn about z, a shift (as prepare_mouse.py writes)
    R = torch.tensor([[angle.cos(), -angle.sin(), 0], [angle.sin(), angle.cos(), 0], [0, 0, 1]])
    to_mm = torch.eye(4)
    to_mm[:3, :3], to_mm[:3, 3] = 100 * R, torch.tensor([5.0, -3.0, 40.0])
    (d / "transform.json").write_text(json.dumps({"to_mm": to_mm.tolist()}))
    out = run_sample(f"--views_dir={d}", f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--out_dir={tmp_path / 'o'}")
    g, mm = load_ply(out / "gaussians.ply"), load_ply(out / "gaussians_mm.ply")
    assert torch.allclose(mm["means"], g["means"] @ to_mm[:3, :3].T + to_mm[:3, 3], atol=1e-3)
    assert torch.allclose(mm["scales"], g["scales"] * 100, rtol=1e-4)

    def rot(q):  # (N, 4) -> (N, 3, 3)
        w, x, y, z = q.unbind(-1)
        return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).view(-1, 3, 3)
    q = torch.nn.functional.normalize(g["quats"], dim=-1)
    assert torch.allclose(rot(mm["quats"]), R @ rot(q), atol=1e-4)  # the Gaussians turn with the world


def test_reference_view_is_required_but_for_the_toy(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice, tmp_path):
    ck = tmp_path / "latent"
    shutil.copytree(tiny_mv_ckpt, ck)
    pipe = write_facelift_pipeline(tmp_path / "pipe")
    cfg = yaml.safe_load((ck / "config.yaml").read_text())  # the same model, now said to be a latent one
    cfg.update(pipeline_dir=str(pipe), prediction_type="v_prediction", beta_schedule="scaled_linear")
    (ck / "config.yaml").write_text(yaml.safe_dump(cfg))
    image = tiny_mice / "mouse_00005" / "images" / "cam_000.png"
    with pytest.raises(InputError, match="--reference_view: which rig view does the input show.*0 cam0"):
        run_sample(f"--input_image={image}", f"--mvdiff_checkpoint={ck}", f"--gslrm_checkpoint={tiny_gslrm_ckpt}",
                   f"--out_dir={tmp_path / 'o'}")


def test_facelift_release_imports_and_runs(tiny_gslrm_ckpt, tiny_mice, tmp_path):
    """FaceLift's pipeline folder (tiny weights in its layout) + a bare clr_embeds.pt -> a phase-1 checkpoint
    for the facelift_6view rig, which sample.py runs."""
    pipe = write_facelift_pipeline(tmp_path / "pipeckpts")
    torch.manual_seed(0)
    torch.save(torch.randn(6, 77, 16), tmp_path / "clr_embeds.pt")
    with pytest.raises(RigMismatch, match="bare tensor"):  # facelift_6view names FaceLift's own file by sha256
        import_facelift_mvdiff(pipe, tmp_path / "clr_embeds.pt", tmp_path / "bad")
    sha = hashlib.sha256((tmp_path / "clr_embeds.pt").read_bytes()).hexdigest()
    rig = tmp_path / "facelift_tiny.json"
    rig.write_text(json.dumps(dict(load_rig("facelift_6view"), prompt_embeds_sha256=sha)))
    subprocess.run([sys.executable, str(REPO / "weights.py"), "import_facelift_mvdiff", f"--pipeline_dir={pipe}",
                    f"--prompt_embeds={tmp_path / 'clr_embeds.pt'}", f"--out={tmp_path / 'fl'}", f"--rig={rig}",
                    "--image_size=32"], check=True, timeout=300, capture_output=True)
    ck = load_mv_checkpoint(tmp_path / "fl")
    assert ck["config"]["prediction_type"] == "v_prediction" and ck["model"].unet.config.in_channels == 8
    assert ck["prompt_embeds"].shape == (6, 77, 16) and ck["rig"]["name"] == "facelift_6view"
    gs = tmp_path / "gs"  # a GS-LRM for the horizontal rig
    shutil.copytree(tiny_gslrm_ckpt, gs)
    (gs / "rig.json").write_text(json.dumps(load_rig("facelift_6view")))
    image = tiny_mice / "mouse_00005" / "images" / "cam_000.png"
    out = run_sample(f"--input_image={image}", f"--mvdiff_checkpoint={tmp_path / 'fl'}", f"--gslrm_checkpoint={gs}",
                     f"--out_dir={tmp_path / 'o'}", "--reference_view=0")
    info = json.loads((out / "chain.json").read_text())
    assert info["rig"] == "facelift_6view" and (out / "multiview.png").is_file()
    assert any("not one chain" in line for line in info["gslrm_provenance"])


def test_gslrm_positions_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = GSLRM(**GSLRM_CONFIGS["tiny"]).eval()
    c2w = torch.linalg.inv(torch.tensor([fr["w2c"] for fr in load_rig("mouse_6view")["frames"]]))[None]  # (1, 6, 4, 4)
    K = torch.tensor([[17.15, 17.15, 8.0, 8.0]]).expand(1, 6, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        g = model(torch.rand(1, 6, 3, 16, 16), c2w, K)
    o, d = get_rays(c2w, K, 16, 16)  # (1, 6, 16, 16, 3) each, fp32
    xyz = g["means"][0, 2:].view(6, 16, 16, 3)  # the pixel-aligned ones
    assert g["means"].dtype == torch.float32
    off_ray = torch.linalg.cross(xyz - o[0], d[0]).norm(dim=-1)  # distance of each Gaussian from its ray
    assert off_ray.max() < 1e-4  # bf16 positions near 2.7 are off by ~0.01


def test_original_flag_names_are_accepted(tmp_path):
    cfg = load_config(train_mvdiff.Config, ["--max_train_steps=7", "--prompt_embed_path=x.pt", "--output_dir=o"],
                      train_mvdiff.ALIASES)
    assert (cfg.max_steps, cfg.prompt_embeds, cfg.out_dir) == (7, "x.pt", "o")
    cfg = load_config(train_gslrm.Config, ["--max_train_steps=3"], train_gslrm.ALIASES)
    assert cfg.max_steps == 3
    cfg = load_config(gen_synthetic.Config, ["--prompt_embed_path=y.pt"], gen_synthetic.ALIASES)
    assert cfg.prompt_embeds == "y.pt"
    (tmp_path / "c.yaml").write_text("max_steps: 5\nunknown_key: 1\n")
    run = subprocess.run([sys.executable, str(REPO / "train_gslrm.py"), "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "c.yaml: key 'unknown_key': unknown key" in run.stderr  # read as --cfg


# ---- provenance: which diffusion checkpoint made phase 3's data

def synthetic_set(tiny_mv_ckpt, tiny_mice, out, **kw):
    args = [f"--mvdiff_checkpoint={tiny_mv_ckpt}", f"--input_data={tiny_mice}/data_train.txt", f"--out_dir={out}",
            "--steps=1", "--batch_size=8", "--max_sources=1", "--val_fraction=0"]
    return gen_synthetic.main(load_config(gen_synthetic.Config, args + [f"--{k}={v}" for k, v in kw.items()]))


def test_phase3_records_the_diffusion_checkpoint_and_refuses_mixed_sets(tiny_mv_ckpt, tiny_gslrm_ckpt, tiny_mice,
                                                                       tiny_cfg, tmp_path):
    clean = synthetic_set(tiny_mv_ckpt, tiny_mice, tmp_path / "clean")
    meta = json.loads((clean / "sample_000000" / "metadata.json").read_text())
    assert meta["unet_sha256"] == hashlib.sha256(
        (tiny_mv_ckpt / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    # a set made across a rig mismatch (prompt embeddings of another rig, allowed)
    facelift = load_rig("facelift_6view")
    save_prompt_embeds(tmp_path / "horizontal.pt", toy_rig_prompt_embeds(facelift, 16), facelift, facelift["views"])
    bad = synthetic_set(tiny_mv_ckpt, tiny_mice, tmp_path / "bad", prompt_embeds=tmp_path / "horizontal.pt",
                        allow_rig_mismatch="true")
    data = tmp_path / "data"
    data.mkdir()
    (data / "data_val.txt").write_text(f"{clean / 'sample_000001'}\n")
    (data / "data_train.txt").write_text("".join(f"{clean / f'sample_{k:06d}'}\n" for k in range(6))
                                         + "".join(f"{bad / f'sample_{k:06d}'}\n" for k in range(6)))
    # a synthetic sample has the rig's 6 views only: 4 in, 2 novel (FaceLift's training split)
    few = dict(max_steps=1, ckpt_every=1, num_input_views=4, num_novel_views=2)
    cfg = tiny_cfg(train_gslrm, data, tmp_path / "gs", **few)
    with pytest.raises(InputError, match="6 synthetic samples made with an allowed rig mismatch.*beside 7 clean"):
        train_gslrm.main(cfg)
    # clean only: rig.json names the diffusion checkpoint and its hashes; sample.py sees one chain
    (data / "data_train.txt").write_text("".join(f"{clean / f'sample_{k:06d}'}\n" for k in range(6)))
    train_gslrm.main(tiny_cfg(train_gslrm, data, tmp_path / "gs", **few))
    prov = json.loads((tmp_path / "gs" / "checkpoint-1" / "rig.json").read_text())["provenance"]
    assert prov["real_samples"] == 0 and len(prov["synthetic"]) == 1
    entry = prov["synthetic"][0]
    assert entry["samples"] == 7 and entry["unet_sha256"] == meta["unet_sha256"] and not entry["allowed_rig_mismatch"]
    image = tiny_mice / "mouse_00005" / "images" / "cam_000.png"
    info = json.loads((run_sample(f"--input_image={image}", f"--mvdiff_checkpoint={tiny_mv_ckpt}",
                                  f"--gslrm_checkpoint={tmp_path / 'gs'}", f"--out_dir={tmp_path / 'o'}")
                       / "chain.json").read_text())
    assert "7 synthetic samples" in info["gslrm_provenance"][1]
    assert not any("not one chain" in line for line in info["gslrm_provenance"])
    # the GS-LRM trained on real views only is not one chain with this diffusion model
    info = json.loads((run_sample(f"--input_image={image}", f"--mvdiff_checkpoint={tiny_mv_ckpt}",
                                  f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--out_dir={tmp_path / 'p'}")
                       / "chain.json").read_text())
    assert any("not one chain" in line for line in info["gslrm_provenance"])
    # mixed, asked for: trains, and the mismatch is in rig.json
    (data / "data_train.txt").write_text(f"{clean / 'sample_000000'}\n{bad / 'sample_000000'}\n")
    train_gslrm.main(tiny_cfg(train_gslrm, data, tmp_path / "mixed", allow_mixed_provenance="true", **few))
    prov = json.loads((tmp_path / "mixed" / "checkpoint-1" / "rig.json").read_text())["provenance"]
    assert any("facelift_6view" in m for s in prov["synthetic"] for m in s["allowed_rig_mismatch"])


@pytest.mark.slow
def test_views_dir_on_a_prepared_capture(tiny_gslrm_ckpt, tmp_path):
    """prepare_mouse.py's samples of the tests' synthetic capture (published rig, millimetres) pass GS-LRM's rig
    check, and the .ply comes back in the capture's millimetres through the sample's transform.json."""
    from test_prepare_mouse import write_capture

    import prepare_mouse
    write_capture(tmp_path)
    prepare_mouse.main(load_config(prepare_mouse.Config, [
        f"--calibration={tmp_path / 'calibration.json'}", f"--videos={tmp_path / 'videos'}",
        f"--out_dir={tmp_path / 'prepared'}", "--image_size=32", "--morph_px=1", "--split_by=animal"]))
    d = (tmp_path / "prepared" / (tmp_path / "prepared" / "data_val.txt").read_text().split()[0])
    out = run_sample(f"--views_dir={d}", f"--gslrm_checkpoint={tiny_gslrm_ckpt}", f"--out_dir={tmp_path / 'o'}")
    to_mm = torch.tensor(json.loads((d / "transform.json").read_text())["to_mm"])
    g, mm = load_ply(out / "gaussians.ply"), load_ply(out / "gaussians_mm.ply")
    assert torch.allclose(mm["means"], g["means"] @ to_mm[:3, :3].T + to_mm[:3, 3], atol=1e-2)


def test_pruning_removes_a_floater_from_the_turntable():
    """An opaque ball where the rig looks, plus a cyan Gaussian far off it: the turntable's off-silhouette share
    is above 0 unpruned and 0 pruned, against the visual hull of the ball's own masks."""
    rig, S = load_rig("mouse_6view"), 32
    frames = rig["frames"]
    target = sample.camera_geometry(frames)["target"].float()
    torch.manual_seed(0)
    ball = torch.nn.functional.normalize(torch.randn(300, 3), dim=-1) * 0.3 * torch.rand(300, 1) ** (1 / 3)
    g = {"means": torch.cat([target + ball, target[None] + torch.tensor([[1.0, 0.8, 0.2]])]),
         "scales": torch.full((301, 3), 0.06), "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(301, 1),
         "opacities": torch.full((301,), 0.9), "rgb": torch.tensor([[0.5, 0.3, 0.2]]).repeat(301, 1)}
    g["rgb"][-1] = torch.tensor([0.0, 1.0, 1.0])
    model = GSLRM(**GSLRM_CONFIGS["tiny"])

    def render(gs, cams):
        w2c, K = sample.frames_to_tensors(cams, S)
        return model.render({k: v[None] for k, v in gs.items()}, torch.linalg.inv(w2c)[None], K[None], S, S)[0]

    masks = render({k: v[:-1] for k, v in g.items()}, frames)[:, 3] > 0.5  # the ball's own silhouettes
    cams = sample.turntable_frames(frames, 8)
    hull = sample.hull_silhouettes(masks, frames, cams, S)
    assert hull.float().mean() > 0.02  # the ball is seen
    keep = sample.prune(g, frames, S, load_config(sample.Config, []))
    assert keep[:-1].all() and not keep[-1]
    assert sample.off_silhouette_share(render(g, cams)[:, :3], hull) > 0.001
    assert sample.off_silhouette_share(render({k: v[keep] for k, v in g.items()}, cams)[:, :3], hull) == 0
