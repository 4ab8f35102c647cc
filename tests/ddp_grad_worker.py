"""Run by tests/test_gslrm.py, alone or under torchrun: one training step's gradients of the
tiny GS-LRM on a global batch of 4 toy mice, sharded over the processes as train_gslrm.py
shards it (StepSampler + Accelerator(cpu=True)). Rank 0 saves the all-reduced gradients."""
import os
import sys

import torch
from accelerate import Accelerator

from cameras import load_rig
from data import MultiViewDataset, StepSampler
from models import GSLRM, GSLRM_CONFIGS

data_dir, out = sys.argv[1], sys.argv[2]
acc = Accelerator(cpu=True)
torch.manual_seed(0)
model = acc.prepare(GSLRM(**GSLRM_CONFIGS["tiny"]))
ds = MultiViewDataset(f"{data_dir}/data_train.txt", 16, range(6), 2, rig=load_rig("mouse_6view"))
keys = StepSampler(len(ds), 4, acc.process_index, acc.num_processes, seed=0).batch(0)
batch = torch.utils.data.default_collate([ds[k] for k in keys])
img = batch["images"]  # (b, 8, 4, H, W)
g = model(img[:, :6, :3], batch["c2w"][:, :6], batch["fxfycxcy"][:, :6])
pred = acc.unwrap_model(model).render(g, batch["c2w"][:, 6:], batch["fxfycxcy"][:, 6:], 16, 16)[:, :, :3]
acc.backward(torch.nn.functional.mse_loss(pred, img[:, 6:, :3]))  # DDP averages the per-rank means
samples = [k[0] for k in keys]
all_samples = acc.gather_for_metrics([samples], use_gather_object=True)
if acc.is_main_process:
    torch.save({"world": acc.num_processes, "samples": samples, "all_samples": all_samples,
                "grads": [p.grad for p in acc.unwrap_model(model).parameters()]}, out)
# all ranks reach the end together, then leave the process group: a rank that exits while
# another still talks to gloo sometimes aborts at shutdown ('terminate called without an active exception')
acc.wait_for_everyone()
acc.end_training()
# and skip C++ static destructors: under heavy load a leftover store thread can still abort the
# interpreter's exit (seen once in ~50 runs); everything this process had to do is on disk by now
os._exit(0)
