"""Checkpoints: written so that a crash never loses one, read back with one clear line on failure, and
recognised on resume by what the stage depends on. A model is built fresh, from one of ours, or from a
Hugging Face GPT-2 checkpoint.
"""
import hashlib
import math
import os
import pickle
from typing import IO, Callable

import torch

from config import TrainConfig
from model import GPT, GPTConfig


def nonfinite(obj, name: str = "") -> str | None:
    """The name of the first non-finite number in obj (nested dicts, lists, tensors, floats), or None."""
    if isinstance(obj, dict):
        obj = obj.items()
    elif isinstance(obj, (list, tuple)):
        obj = enumerate(obj)
    else:
        finite = (not obj.is_floating_point() or bool(torch.isfinite(obj).all())) if isinstance(obj, torch.Tensor) \
            else not isinstance(obj, float) or math.isfinite(obj)
        return None if finite else name or "value"
    for key, value in obj:
        found = nonfinite(value, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """write(f) into a temporary file, flushed to disk, then renamed to path: a crash, a kill or a full disk
    while writing leaves the file already at path as it was (a full disk ends the run in one line)."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two lessons' processes may write the same file
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            kept = "the file already there is kept" if os.path.exists(path) else "nothing was written"
            raise SystemExit(f"error: cannot write {path} ({e.strerror or e}); {kept}") from None
        raise


def save(path: str, state: dict) -> None:
    """Save a checkpoint (write_atomic); one holding a non-finite number is refused and never written."""
    bad = nonfinite(state)
    if bad:
        raise SystemExit(f"error: {path}: {bad} is not finite; not written, the file already there is kept")
    write_atomic(path, lambda f: torch.save(state, f))


CHECKPOINT_KEYS = ("model", "optimizer", "iter", "model_args", "settings", "data", "start")


def read(path: str, device: str | torch.device = "cpu") -> dict:
    """A checkpoint written by this script; anything else ends the run with one line."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: not a checkpoint (no such file)") from None
    except Exception as e:  # its message can run to many lines (weights_only advice): the type says enough
        raise SystemExit(f"error: {path}: not a checkpoint written by train.py (torch.load: {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt:
        raise SystemExit(f"error: {path}: not a checkpoint written by train.py (no model_args)")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} was written by an older train.py (no {', '.join(missing)}); "
                         f"start it again in another out_dir")
    return ckpt


def hugging_face(path: str) -> bool:
    """A Hugging Face GPT-2 checkpoint (a directory, a .safetensors or .bin file, a shard index), not one of ours."""
    return os.path.isdir(path) or path.endswith((".safetensors", ".bin", ".index.json"))


def stage_dropout(cfg: TrainConfig, loss_name: str) -> float:
    """The run's dropout for SFT; none for KTO and DPO (as TRL's disable_dropout): dropout in the policy's
    passes would bias the rewards and the KL estimate against the reference, which runs without it."""
    return cfg.dropout if loss_name == "sft" else 0.0


def build_model(cfg: TrainConfig, init: str | None, device: torch.device, dropout: float | None = None) -> GPT:
    """A fresh GPT (seeded identically on every rank), or the model of a checkpoint: a Hugging Face GPT-2 (a
    directory, a .safetensors or .bin file, the .index.json of shards) or ours (any other file). `dropout`
    (default: the run's) governs every model, whatever the checkpoint says."""
    dropout = cfg.dropout if dropout is None else dropout
    if init is None:
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, dropout=dropout, bias=cfg.bias))
    elif not hugging_face(init):
        ckpt = read(init)
        model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
    else:
        if not os.path.exists(init):
            raise SystemExit(f"error: {init}: no such checkpoint")
        try:
            model = GPT.from_pretrained(init, dropout=dropout)
        except ValueError as e:
            raise SystemExit(f"error: {e} (expected a Hugging Face GPT-2: a directory with config.json and "
                             f"model.safetensors, pytorch_model.bin or their shards' .index.json, or one such file)") from None
    if cfg.block_size > model.config.block_size:
        raise SystemExit(f"error: block_size={cfg.block_size}: expected at most {model.config.block_size}, "
                         f"the context of {init}")
    return model.to(device)


def fingerprint(obj) -> str:
    """A short hash of a model's weights or of a stage's training data, to recognise them on resume."""
    digest = hashlib.sha256()
    if isinstance(obj, torch.nn.Module):
        for name, t in obj.state_dict().items():
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(pickle.dumps(obj))
    return digest.hexdigest()[:16]


def stage_settings(cfg: TrainConfig, loss_name: str, lr_key: str) -> dict:
    """The settings a stage's checkpoint must share with a run that resumes it (data and start weights are
    compared by fingerprint); iterations, intervals, device and evaluation may change."""
    keys = ["seed", "block_size", "batch_size", "grad_accum", "weight_decay", "beta1", "beta2", "grad_clip",
            "warmup_iters", lr_key]
    keys += {"kto": ["beta", "lambda_d", "lambda_u"], "dpo": ["beta", "nll_weight"], "sft": []}[loss_name]
    return {**{key: getattr(cfg, key) for key in keys}, "dropout": stage_dropout(cfg, loss_name)}
