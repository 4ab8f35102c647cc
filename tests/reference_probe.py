"""A probe (not collected by pytest; ~2 min on a CPU): can the stage-B DanceNet learn to copy a flat colour
from its reference? t = 999 (the input is pure noise), the target *is* the reference, zero pose and
context. With the reference concatenated to the UNet's input instead (--concat) the same UNet learns it in
~30 steps; through the ReferenceNet it did not in 300 (docs/experiments.md, dance stage B toy).

    python tests/reference_probe.py [--concat] [--steps 150] [--lr 1e-3]
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).parent.parent))
from models import DANCE_UNET_CONFIGS, DanceNet, FaceTokens, PoseGuider

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--concat", action="store_true")
p.add_argument("--steps", type=int, default=150)
p.add_argument("--lr", type=float, default=1e-3)
a = p.parse_args()
torch.manual_seed(0)
c = DANCE_UNET_CONFIGS["toy"]
B, g = 8, torch.Generator().manual_seed(1)
t, heat, keep = torch.full((B,), 999), torch.zeros(B, 24, 32, 32), torch.ones(B, dtype=torch.bool)
clip_emb, face_emb = torch.zeros(B, c["cross_attention_dim"]), torch.zeros(B, 512)
if a.concat:
    unet = UNet2DConditionModel(**dict(c, in_channels=6))
    ctx = torch.zeros(B, 5, c["cross_attention_dim"])
    model = lambda x, ref: unet(torch.cat([x, ref], 1), t, encoder_hidden_states=ctx).sample  # noqa: E731
    params = list(unet.parameters())
else:
    unet = UNet2DConditionModel(**c)
    net = DanceNet(unet, copy.deepcopy(unet), PoseGuider(24, c["block_out_channels"][0], (16,)),
                   FaceTokens(c["cross_attention_dim"]))
    model = lambda x, ref: net(x, t, heat, 1.0, ref, clip_emb, face_emb, keep)  # noqa: E731
    params = list(net.parameters())
opt = torch.optim.AdamW(params, a.lr)
t0 = time.time()
for step in range(a.steps + 1):
    ref = (torch.rand(B, 3, 1, 1, generator=g) * 2 - 1).expand(B, 3, 32, 32)  # (B, 3, 32, 32) flat colours
    loss = (model(torch.randn(B, 3, 32, 32, generator=g), ref) - ref).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if not a.concat:
        net.store.clear()
    if step % 30 == 0:  # copying gives 0; predicting the batch's mean colour gives ref.var()
        print(f"step {step} | loss {loss.item():.4f} | colour variance {ref.var().item():.4f} | "
              f"{time.time() - t0:.0f} s", flush=True)
