"""The README's figure (docs/figure.png), composed from what sample.py wrote; nothing is trained or sampled here.

    python docs/make_figure.py          # the folders of the README's figure commands, under out/figure/

Mouse row: the input view -> the 6 generated views -> the Gaussians rendered at the rig's 6 cameras (sample.py's
input.png, multiview.png, renders.png). Dance row: the reference + the music (waveform, librosa's beats, the
times of the frames shown) -> the generated frames over M2P's poses (sample.py --music: contact_sheet.png, poses.npy).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for data.py
from data import music_beats, read_audio  # noqa: E402

CELL, GAP, LABEL = 64, 6, 18  # px: one image, the space between groups, a label line
FONT = ImageFont.load_default(12)


def grid_cells(path, n_rows, pad=2, top=16):
    """The cells of a data.save_image_grid PNG (a 16 px header, pad px gaps, square cells), each at its
    native size (save_image_grid upscales by an integer factor with nearest: undone here)."""
    im = np.asarray(Image.open(path).convert("RGB"))
    size = (im.shape[0] - top - pad) // n_rows - pad
    cols = (im.shape[1] - pad) // (size + pad)
    rows = []
    for i in range(n_rows):
        y = top + pad + i * (size + pad)
        rows.append([native(im[y:y + size, pad + j * (size + pad):pad + j * (size + pad) + size]) for j in range(cols)])
    return rows


def native(cell):
    """An image upscaled k x by nearest -> the original (the largest k that reproduces it)."""
    for k in range(8, 1, -1):
        small = cell[::k, ::k]
        if cell.shape[0] % k == 0 and np.array_equal(np.repeat(np.repeat(small, k, 0), k, 1), cell):
            return small
    return cell


def cell(a):
    return Image.fromarray(a).resize((CELL, CELL), Image.NEAREST)


def music_panel(music, n_frames, fps, shown, width):
    """The waveform of the music that drove the video, librosa's beats (dark lines) and the shown frames (red)."""
    audio, sr = read_audio(music)
    audio = audio[: int(n_frames / fps * sr)]
    im = Image.new("RGB", (width, CELL), "white")
    draw = ImageDraw.Draw(im)
    chunks = np.array_split(np.abs(audio), width)  # one column per pixel: the peak amplitude
    peak = np.array([c.max() if len(c) else 0.0 for c in chunks])
    peak = peak / max(peak.max(), 1e-8) * (CELL / 2 - 8)
    for x, h in enumerate(peak):
        draw.line([(x, CELL / 2 - h), (x, CELL / 2 + h)], fill=(120, 150, 210))
    for t in music_beats(audio, sr, fps):  # over the waveform: the beats fall on its attacks
        x = int(t * fps / n_frames * width)
        draw.line([(x, 0), (x, CELL - 9)], fill=(60, 60, 60))
    for i in shown:
        x = int((i + 0.5) / n_frames * width)
        draw.polygon([(x - 3, CELL - 1), (x + 3, CELL - 1), (x, CELL - 7)], fill=(210, 30, 30))
    return im


def arrow(draw, x, y):
    draw.line([(x + 1, y), (x + GAP * 2 - 3, y)], fill="black", width=2)
    draw.polygon([(x + GAP * 2 - 1, y), (x + GAP * 2 - 6, y - 4), (x + GAP * 2 - 6, y + 4)], fill="black")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mouse", default="out/figure/sample", help="sample.py --out_dir of the mouse chain")
    p.add_argument("--dance", default="out/figure/dance_sample", help="sample.py --music's --out_dir")
    p.add_argument("--music", default="data/toy_dance/clip_00095/audio.wav", help="the --music it was made from")
    p.add_argument("--fps", type=int, default=30, help="the dance video's frame rate")
    p.add_argument("--out", default="docs/figure.png")
    a = p.parse_args(argv)
    mouse, dance = Path(a.mouse), Path(a.dance)

    ref = native(np.asarray(Image.open(mouse / "input.png").convert("RGB")))
    views = grid_cells(mouse / "multiview.png", 1)[0]
    renders = grid_cells(mouse / "renders.png", 1)[0]
    frames, skeletons = grid_cells(dance / "contact_sheet.png", 2)  # [reference, 8 frames] each
    n_frames = len(np.load(dance / "poses.npy"))
    shown = np.linspace(0, n_frames - 1, len(frames) - 1).round().astype(int)  # as sample.py picks them

    music_w = 4 * CELL - GAP
    width = max(13 * CELL + 4 * GAP, CELL + GAP + music_w + 2 * GAP + (len(frames) - 1) * CELL) + 2 * GAP
    height = 4 * LABEL + 3 * CELL + 5 * GAP
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)

    def label(x, y, text):
        draw.text((x, y + 3), text, fill="black", font=FONT)

    # mouse: input -> 6 views -> renders
    y = 0
    label(GAP, y, "Mouse: one image -> the rig's 6 views (multi-view diffusion) -> 3D Gaussians (GS-LRM)")
    y += LABEL
    x = GAP
    groups = [("input view", [ref]), ("6 generated views", views), ("Gaussians rendered at the 6 cameras", renders)]
    for g, (text, ims) in enumerate(groups):
        label(x, y, text)
        for i, im in enumerate(ims):
            fig.paste(cell(im), (x + i * CELL, y + LABEL))
        x += len(ims) * CELL
        if g < len(groups) - 1:
            arrow(draw, x, y + LABEL + CELL // 2)
            x += 2 * GAP
    # dance: reference + music -> frames over their poses
    y += LABEL + CELL + 2 * GAP
    label(GAP, y, f"Dance: a reference image + music -> {n_frames / a.fps:.1f} s of video (stages A -> B -> C)")
    y += LABEL
    x = GAP
    label(x, y, "reference")
    fig.paste(cell(frames[0]), (x, y + LABEL))
    x += CELL + GAP
    label(x, y, "music (lines: beats, red: frames shown)")
    fig.paste(music_panel(a.music, n_frames, a.fps, shown, music_w), (x, y + LABEL))
    x += music_w
    arrow(draw, x, y + LABEL + CELL // 2)
    x += 2 * GAP
    label(x, y, "generated frames " + ", ".join(map(str, shown)))
    for i, (im, sk) in enumerate(zip(frames[1:], skeletons[1:])):
        fig.paste(cell(im), (x + i * CELL, y + LABEL))
        fig.paste(cell(sk), (x + i * CELL, y + LABEL + CELL + GAP))
    label(GAP, y + LABEL + CELL + GAP + CELL // 2 - 9, "the M2P poses that drove them ->")
    fig = fig.crop((0, 0, width, y + LABEL + 2 * CELL + GAP + GAP))
    fig.save(a.out, optimize=True)
    print(f"wrote {a.out} ({fig.width} x {fig.height}, {Path(a.out).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
