"""Run by tests/test_kill.py and test_multiprocess.py: a trainer (argv[1], a module name) with its command
line (argv[2:]), SIGKILLed at the start of step $KILL_AT_STEP, or in the middle of saving step
$KILL_IN_SAVE (weights written, state.pt and the COMPLETE marker not yet): what a crash, an OOM kill or a
pre-emption does. $KILL_AT_OVERWRITE=k kills it at the k-th move or deletion of an --overwrite's trash
folder (a deletion after removing one file of it: a kill in the middle). Under torchrun, $KILL_RANK
limits the kill to one rank, and $HANG_AT_STEP makes that rank hang instead (a stuck process: the others
must time out)."""
import importlib
import os
import shutil
import signal
import sys
import time

import plumbing
import weights

script = importlib.import_module(sys.argv[1])
kill_step, kill_save = int(os.environ.get("KILL_AT_STEP", -1)), int(os.environ.get("KILL_IN_SAVE", -1))
lr_at, write_state = script.lr_at, plumbing.write_state


this_rank = os.environ.get("KILL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")


def killing_lr_at(step, *args):  # every trainer asks for the step's learning rate first
    if step == kill_step and this_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    if step == int(os.environ.get("HANG_AT_STEP", -1)) and this_rank:
        time.sleep(3600)
    return lr_at(step, *args)


def killing_write_state(path, step, *args):  # called inside the save, after the weights
    if step == kill_save:
        os.kill(os.getpid(), signal.SIGKILL)
    return write_state(path, step, *args)


overwrite_ops, replace, rmtree = [0], os.replace, shutil.rmtree


def counted(op):
    def run(path, *args, **kw):
        if any(".overwrit" in str(p) for p in (path, *args)):
            overwrite_ops[0] += 1
            if overwrite_ops[0] == int(os.environ.get("KILL_AT_OVERWRITE", -1)):
                if op is rmtree:  # killed in the middle of deleting: one file of the folder is gone
                    os.remove(next(os.path.join(d, n) for d, _, files in os.walk(path) for n in files))
                os.kill(os.getpid(), signal.SIGKILL)
        return op(path, *args, **kw)
    return run


os.replace, shutil.rmtree = counted(replace), counted(rmtree)
# weights.save_mv_checkpoint holds its own reference to write_state
script.lr_at, plumbing.write_state, weights.write_state = killing_lr_at, killing_write_state, killing_write_state
plumbing.cli(script.main, script.Config, getattr(script, "ALIASES", None), sys.argv[2:])
