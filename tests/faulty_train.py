"""train.py with one fault injected, for tests/test_faults.py: FAULT=kind:N.

    nan_rank1:N    the Nth KTO loss on rank 1 is NaN (under torchrun)
    kill_step:N    SIGKILL before the Nth optimizer step
    kill_save:N    SIGKILL in the middle of the Nth torch.save (part of the file written)
"""
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kto  # noqa: E402
import train  # noqa: E402

kind, n = os.environ["FAULT"].split(":")
calls = 0


def counted(original, fault):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        return fault(original, *args, **kwargs) if calls == int(n) else original(*args, **kwargs)
    return wrapper


def nan_loss(original, *args, **kwargs):
    loss, stats = original(*args, **kwargs)
    return (loss * float("nan"), stats) if os.environ.get("RANK") == "1" else (loss, stats)


def kill(original, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def kill_mid_write(original, obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "nan_rank1":
    kto.kto_loss = counted(kto.kto_loss, nan_loss)
elif kind == "kill_step":
    train.train_step = counted(train.train_step, kill)
elif kind == "kill_save":
    torch.save = counted(torch.save, kill_mid_write)
train.main()
