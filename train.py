"""Train a GPT with SFT, then KTO, on one process or many.

    python train.py                                      # the main job: SFT, then KTO, with a control
    python train.py configs/quick.json --max_iters=50    # a preset file, then overrides
    torchrun --standalone --nproc_per_node=2 train.py    # DDP: nccl on CUDA, gloo on CPU
    python train.py --help                               # every setting, with its default

The run is made of stages, each with its own checkpoint in out_dir:
  sft      the starting point: SFT on every completion, labels ignored (when init_from="sft"), from sft_init
  kto      the main loss (dpo or sft, and named so, when loss says), starting from that point; its frozen
           copy is the reference
  control  SFT continued from the same point for as many steps as kto, labels ignored
On the built-in task each model is then sampled on held-out prompts and scored by the judge.
"""
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import sys
import time
import types
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import kto
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    # data
    data: str = "arithmetic"  # "arithmetic" (the built-in task) or a .jsonl / .jsonl.gz file (shapes: see data.py)
    eval_fraction: float = 0.0  # of a file's prompts, held out (with all their examples) for the eval loss
    task_p_correct: float = 0.4  # built-in task: how often its demonstrator answers correctly
    task_heldout: float = 0.1  # built-in task: fraction of prompts kept for evaluation
    task_max_operand: int = 4  # built-in task: operands run from 0 to this
    task_demos: int = 1  # built-in task: answers per prompt; above 1, one (correct, wrong) pair per prompt with both
    seed: int = 1337
    # the paper's data settings, seeded, applied in this order to the data of the main loss and the control
    # (the SFT stage imitates the data as given)
    contradict: float = 0.0  # fraction of examples (pairs) also given the opposite label by a second annotator
    label_noise: float = 0.0  # fraction of labels flipped (pairs: chosen and rejected swapped)
    one_y_per_x: bool = False  # keep one completion per prompt
    desirable_fraction: float = 1.0  # keep this fraction of the desirable examples (the paper's 1:10 run: 0.1)
    # model (ignored when starting from a checkpoint, which carries its own shape; dropout always applies)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    # stages
    loss: str = "kto"  # the main loss: "kto", "dpo" (on pairs, beside it) or "sft"
    init_from: str = "sft"  # "sft" (train the SFT stage first), "scratch", or a checkpoint (ours or Hugging Face GPT-2)
    sft_init: str = "scratch"  # where the SFT stage starts: "scratch" or a checkpoint (ours or Hugging Face GPT-2)
    sft_iters: int = 1500
    sft_lr: float = 3e-3  # learning rate of the SFT stage
    max_iters: int = 400  # iterations of the main loss (and of the control)
    lr: float = 1e-3  # learning rate of the main loss (and of the control)
    control: bool = True  # also continue SFT from the same start (with loss kto or dpo)
    # KTO, eq. (7); beta outside the log-ratio (see kto.py)
    beta: float = 0.1
    lambda_d: float | None = None  # None: from the data by the paper's advice (kto.advised_lambdas), or 1 if lambda_u is set
    lambda_u: float | None = None  # None: from the data by the paper's advice, or 1 if lambda_d is set
    # optimization
    batch_size: int = 32  # completions per micro-step, over all processes together (DPO: batch_size/2 pairs)
    grad_accum: int = 1  # micro-steps per optimizer step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    warmup_iters: int = 50
    # evaluation on the built-in task
    eval_samples: int = 8  # samples per held-out prompt at temperature 1
    eval_tokens: int = 8  # tokens generated per sample, at most
    # i/o
    out_dir: str = "out"
    resume: bool = False  # continue each stage from its checkpoint in out_dir
    log_interval: int = 50
    eval_interval: int = 200  # iterations between eval losses (with eval_fraction > 0)
    ckpt_interval: int = 200
    device: str = "auto"  # "auto", "cpu", "cuda"
    reference: str = "live"  # "live": the frozen reference runs every step; "precomputed": its log-probs first, then freed
    compile: bool = False  # torch.compile the policy and the reference


def usage() -> str:
    """--help: how to call, then every setting with its default and its comment in the source."""
    comments = {}
    with open(__file__) as f:
        for line in f:
            name, colon, rest = line.strip().partition(":")
            if colon and name in TrainConfig.__dataclass_fields__ and "#" in rest and name not in comments:
                comments[name] = rest.split("#", 1)[1].strip()
    lines = [__doc__.strip(), "", "settings (--key=value, or keys of a JSON preset file):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name}={f.default}" + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def parse_config(args: list[str]) -> TrainConfig:
    """Defaults, then each argument in the order given: a JSON preset file or a --key=value override."""
    if any(arg in ("-h", "--help") for arg in args):
        print(usage())
        raise SystemExit(0)
    cfg = TrainConfig()
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}

    def set_value(key: str, value, source: str) -> None:
        if key not in fields:
            raise SystemExit(f"error: {source}: unknown config key '{key}'; known keys: {', '.join(fields)}")
        kind = fields[key]
        if isinstance(kind, types.UnionType):  # float | None: "none" (or JSON null) asks for the default rule
            if value is None or isinstance(value, str) and value.lower() == "none":
                setattr(cfg, key, None)
                return
            kind = float
        if isinstance(value, str) and kind is not str:  # from the command line
            words = {"true": True, "false": False} if kind is bool else {}
            try:
                value = words[value.lower()] if kind is bool else kind(value)
            except (KeyError, ValueError):
                pass
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool)) or \
            kind is float and isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise SystemExit(f"error: {source}: '{key}' expects {kind.__name__}, got {value!r}")
        setattr(cfg, key, kind(value))

    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"error: argument '{arg}': expected --key=value")
            set_value(key, value, "command line")
        else:
            try:
                with open(arg) as f:
                    preset = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"error: preset file {arg}: {e}") from None
            if not isinstance(preset, dict):
                raise SystemExit(f"error: preset file {arg}: expected a JSON object of config keys")
            for key, value in preset.items():
                set_value(key, value, f"preset file {arg}")

    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot run, with one line naming the key."""
    def require(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise SystemExit(f"error: {key}={getattr(cfg, key)!r}: expected {expected}")

    for key in ("n_layer", "n_head", "n_embd", "block_size", "sft_iters", "max_iters", "batch_size",
                "grad_accum", "eval_samples", "eval_tokens", "log_interval", "eval_interval", "ckpt_interval", "task_demos"):
        require(getattr(cfg, key) >= 1, key, "an integer of at least 1")
    for key in ("seed", "warmup_iters", "task_max_operand"):
        require(getattr(cfg, key) >= 0, key, "a non-negative integer")
    for key in ("sft_lr", "lr", "beta"):
        require(0 < getattr(cfg, key) < math.inf, key, "a positive finite number")
    for key in ("lambda_d", "lambda_u"):
        require(getattr(cfg, key) is None or 0 < getattr(cfg, key) < math.inf, key, "a positive finite number or none")
    for key in ("weight_decay", "grad_clip"):
        require(0 <= getattr(cfg, key) < math.inf, key, "a non-negative finite number")
    for key in ("beta1", "beta2", "dropout"):
        require(0 <= getattr(cfg, key) < 1, key, "a number in [0, 1)")
    require(0 <= cfg.task_p_correct <= 1, "task_p_correct", "a probability in [0, 1]")
    for key in ("contradict", "label_noise"):
        require(0 <= getattr(cfg, key) < 1, key, "a fraction in [0, 1)")
    require(0 < cfg.desirable_fraction <= 1, "desirable_fraction", "a fraction in (0, 1]")
    require(0 <= cfg.eval_fraction < 1, "eval_fraction", "a fraction in [0, 1)")
    require(cfg.eval_fraction == 0 or cfg.data != "arithmetic", "eval_fraction",
            "0 with the built-in task, which holds out its own prompts (task_heldout)")
    require(bool(cfg.out_dir), "out_dir", "a directory path")
    require(bool(cfg.data), "data", "'arithmetic' or the path of a .jsonl or .jsonl.gz file")
    require(bool(cfg.init_from), "init_from", "'sft', 'scratch' or a checkpoint path")
    require(bool(cfg.sft_init), "sft_init", "'scratch' or a checkpoint path")
    require(0 < cfg.task_heldout < 1, "task_heldout", "a fraction strictly between 0 and 1")
    require(cfg.n_embd % cfg.n_head == 0, "n_embd", f"a multiple of n_head={cfg.n_head}")
    require(cfg.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'")
    require(cfg.device != "cuda" or torch.cuda.is_available(), "device", "a machine with CUDA")
    require(cfg.loss in ("kto", "dpo", "sft"), "loss", "'kto', 'dpo' or 'sft'")
    require(cfg.reference in ("live", "precomputed"), "reference", "'live' or 'precomputed'")
    require(cfg.loss != "dpo" or cfg.desirable_fraction == 1, "desirable_fraction",
            "1 with loss='dpo': dropping desirable examples breaks DPO's pairs")
    require(cfg.loss != "dpo" or not cfg.one_y_per_x, "one_y_per_x", "false with loss='dpo': a pair has two completions")
    require(cfg.loss != "dpo" or cfg.batch_size % 2 == 0, "batch_size", "an even number with loss='dpo' (two completions a pair)")
    require(not (cfg.loss == "sft" and cfg.init_from == "sft"), "init_from",
            "'scratch' or a checkpoint with loss='sft' (the SFT stage followed by more SFT is the control)")
    require(cfg.loss != "kto" or cfg.batch_size >= 2, "batch_size",
            "at least 2 for KTO, to pair prompts with other completions for z_ref (8-16 or more is advised)")


# ----------------------------------------------------------------------------- set-up

def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK; a plain `python train.py` is rank 0 of 1."""
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cuda:  # TF32 matmuls where fp32 remains (bf16 autocast covers the rest)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


class Data(NamedTuple):
    sft: list[data.Tokens]  # the SFT stage's: every completion as given, labels ignored
    main: data.Units  # the main loss's, after the data settings (pairs for DPO)
    control: list[data.Tokens]  # the control's: the main loss's completions
    eval: data.Units  # held-out prompts' examples (pairs for DPO), for the eval loss
    heldout: list[str] | None  # the built-in task's evaluation prompts
    report: list[str]  # what reading and the data settings did, for the start of the run


def load_data(cfg: TrainConfig, progress: bool = False) -> Data:
    """Read and tokenize the data, hold out eval prompts, then apply the data settings in their config order."""
    if cfg.data == "arithmetic":
        units, heldout = data.arithmetic_task(cfg.seed, cfg.task_p_correct, cfg.task_heldout, cfg.task_max_operand,
                                              cfg.task_demos)
        n_prompts = len(data.task_prompts(cfg.task_max_operand)) - len(heldout)
        if not units or not heldout:
            raise data.DataError(f"built-in task: task_heldout={cfg.task_heldout} and task_max_operand={cfg.task_max_operand} "
                                 f"leave {len(units)} training examples and {len(heldout)} held-out prompts; "
                                 f"expected at least one of each")
        report = [f"built-in task: {n_prompts} training prompts, {len(heldout)} held out"]
        if cfg.task_demos > 1:
            report.append(f"built-in task: {cfg.task_demos} answers per prompt; {len(units)} prompts got a correct and a wrong "
                          f"one (a pair each), {n_prompts - len(units)} got only one kind (no pair)")
        units, too_long = data.tokenize(units, cfg.block_size)
        if too_long:
            report.append(f"built-in task: dropped {too_long} examples longer than block_size={cfg.block_size}")
        if not units:
            raise data.DataError(f"built-in task: no example fits block_size={cfg.block_size}")
    else:
        (units, report), heldout = data.load_file(cfg.data, cfg.block_size, progress), None
    paired = isinstance(units[0], data.PairTokens)
    report.append(f"data: {data.describe(units)}")
    units, held = data.split_by_prompt(units, cfg.eval_fraction, cfg.seed)
    if held:
        report.append(f"eval_fraction={cfg.eval_fraction}: {data.describe(held)} held out, by prompt")
    sft = data.split_pairs(units) if paired else units

    def setting(name: str, new: data.Units) -> data.Units:
        report.append(f"{name}: {data.describe(new)}")
        return new

    if cfg.contradict:
        units = setting(f"contradict={cfg.contradict}", data.add_contradictions(units, cfg.contradict, cfg.seed))
    if cfg.label_noise:
        units = setting(f"label_noise={cfg.label_noise}", data.flip_labels(units, cfg.label_noise, cfg.seed))
    if cfg.loss == "dpo" and not paired:
        units, unused = data.pair_up(units)
        held = data.pair_up(held)[0]
        setting("DPO", units)
        report[-1] += f"; {unused} examples without a partner of the other label are not used"
        if not units:
            raise data.DataError(f"{cfg.data}: no prompt has both a desirable and an undesirable example; DPO needs pairs")
    elif cfg.loss != "dpo" and paired:
        units, held = setting("pairs split", data.split_pairs(units)), data.split_pairs(held)
    if cfg.one_y_per_x:
        units = setting("one_y_per_x", data.one_per_prompt(units, cfg.seed))
    if cfg.desirable_fraction < 1:
        units = setting(f"desirable_fraction={cfg.desirable_fraction}",
                        data.keep_desirable(units, cfg.desirable_fraction, cfg.seed))
    control = data.split_pairs(units) if cfg.loss == "dpo" else units
    return Data(sft, units, control, held, heldout, report)


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file, then rename: a crash while saving leaves the old checkpoint intact."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "optimizer", "iter", "model_args", "settings", "data", "start")


def read_checkpoint(path: str, device: str | torch.device = "cpu") -> dict:
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
    """A Hugging Face GPT-2 checkpoint (a directory, a .safetensors or a .bin file), not one of ours."""
    return os.path.isdir(path) or path.endswith((".safetensors", ".bin"))


def build_model(cfg: TrainConfig, init: str | None, device: torch.device) -> GPT:
    """A fresh GPT (seeded identically on every rank), or the model of a checkpoint: a Hugging Face GPT-2 (a
    directory, a .safetensors or a .bin file) or ours (any other file). The run's dropout governs every model."""
    if init is None:
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    elif not hugging_face(init):
        ckpt = read_checkpoint(init)
        model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": cfg.dropout}))
        model.load_state_dict(ckpt["model"])
    else:
        if not os.path.exists(init):
            raise SystemExit(f"error: {init}: no such checkpoint")
        try:
            model = GPT.from_pretrained(init, dropout=cfg.dropout)
        except ValueError as e:
            raise SystemExit(f"error: {e} (expected a Hugging Face GPT-2: a directory with config.json and "
                             f"model.safetensors or pytorch_model.bin, or one such file)") from None
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
            "warmup_iters", "dropout", lr_key]
    keys += {"kto": ["beta", "lambda_d", "lambda_u"], "dpo": ["beta"], "sft": []}[loss_name]
    return {key: getattr(cfg, key) for key in keys}


# ----------------------------------------------------------------------------- the losses

def compute_loss(policy: torch.nn.Module, reference: GPT | None, batch: dict[str, torch.Tensor],
                 cfg: TrainConfig, loss_name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch (this rank's shard) and its stats (see kto.py). reference is the frozen
    model, or None when the batch carries the reference's precomputed log-probs."""
    def logps(model: torch.nn.Module, prefix: str = "") -> torch.Tensor:
        scored = batch[prefix + "scored"]
        return kto.sequence_logps(model(batch[prefix + "idx"], batch[prefix + "targets"], scored, batch[prefix + "positions"]),
                                  scored)

    policy_logps = logps(policy)
    if loss_name == "sft":
        return kto.sft_loss(policy_logps)
    with torch.no_grad():
        reference_logps = batch["reference_logps"] if reference is None else logps(reference)
    if loss_name == "dpo":  # rows alternate chosen, rejected (data.make_batch)
        return kto.dpo_loss(policy_logps[0::2], policy_logps[1::2], reference_logps[0::2], reference_logps[1::2], cfg.beta)
    with torch.no_grad():  # the KL pairs only set z_ref, which is held constant: no gradient
        policy_kl_logps = logps(policy.module if isinstance(policy, DDP) else policy, "kl_")
        reference_kl_logps = batch["reference_kl_logps"] if reference is None else logps(reference, "kl_")
    return kto.kto_loss(policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, batch["desirable"],
                        cfg.beta, cfg.lambda_d, cfg.lambda_u)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (GPT.forward keeps log_softmax in fp32); plain fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_step(policy: torch.nn.Module, model: GPT, reference: GPT | None, optimizer: torch.optim.Optimizer,
               batches: list[dict[str, torch.Tensor]], cfg: TrainConfig, loss_name: str,
               world_size: int) -> list[dict[str, torch.Tensor]]:
    """One optimizer step over micro-batches already on the device; returns each one's stats (on the device)."""
    amp = autocast(batches[0]["idx"].device)
    stats = []
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        # Gradients are all-reduced once per optimizer step, on the last micro-step.
        sync = contextlib.nullcontext() if last or world_size == 1 else policy.no_sync()
        with sync:
            with amp:
                loss, s = compute_loss(policy, reference, batch, cfg, loss_name)
            (loss / len(batches)).backward()
        stats.append(s)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Pinned memory and non-blocking copies on CUDA: the host prepares the next batch while the GPU works."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def load_batches(units: data.Units, it: int, cfg: TrainConfig, loss_name: str, rank: int, world_size: int,
                 device: torch.device, precomputed: dict[str, torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of iteration `it`, on the device, with the precomputed reference
    log-probs of their rows and KL pairs when there are any."""
    per_batch = cfg.batch_size // 2 if loss_name == "dpo" else cfg.batch_size
    batches = []
    for micro in range(cfg.grad_accum):
        number = it * cfg.grad_accum + micro
        indices = data.batch_indices(len(units), per_batch, number, cfg.seed)
        batch = data.make_batch([units[i] for i in indices], cfg.block_size, with_kl=loss_name == "kto")
        if precomputed is not None:
            batch["reference_logps"] = precomputed["rows"][indices].reshape(-1)  # pairs: chosen, rejected
            if loss_name == "kto":
                batch["reference_kl_logps"] = precomputed["kl"][number]
        batches.append(to_device(data.shard(batch, rank, world_size), device))
    return batches


@torch.no_grad()
def reference_logps(reference: GPT, rows: list[tuple[list[int], list[int]]], cfg: TrainConfig,
                    device: torch.device) -> torch.Tensor:
    """log pi_ref(y|x) of (prompt, completion) rows, in no-grad inference batches of 8 training batches."""
    amp = autocast(device)
    out = [torch.zeros(0)]
    for i in range(0, len(rows), 8 * cfg.batch_size):
        idx, targets, scored = data.collate(rows[i:i + 8 * cfg.batch_size], cfg.block_size)
        batch = to_device(data.shard({"idx": idx, "targets": targets, "scored": scored}, 0, 1), device)
        with amp:
            out.append(kto.sequence_logps(reference(batch["idx"], batch["targets"], batch["scored"], batch["positions"]),
                                          batch["scored"]).float().cpu())
    return torch.cat(out)


def precompute_reference(reference: GPT, units: data.Units, eval_units: data.Units, cfg: TrainConfig, loss_name: str,
                         iters: int, key: str, directory: str, rank: int, world_size: int,
                         device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """reference="precomputed": the reference's log-probs of every training example (or pair) and of the
    KL pairs of every batch that iterations 0..iters-1 draw (the batches follow from the seed alone), and
    the same for the eval batches. Rank 0 computes them once and stores them in `directory`, where runs with
    the same start, data and batches (a sweep) find them again. Returns (training, eval) tensors."""
    path = os.path.join(directory, f"reference-{key}.pt")
    per_batch = cfg.batch_size // 2 if loss_name == "dpo" else cfg.batch_size
    n_batches = iters * cfg.grad_accum
    if rank == 0 and not (os.path.exists(path) and torch.load(path, weights_only=True)["batches"] >= n_batches):
        def rows(us: data.Units) -> list[tuple[list[int], list[int]]]:
            if us and isinstance(us[0], data.PairTokens):
                return [(p.prompt, c) for p in us for c in (p.chosen, p.rejected)]
            return [(ex.prompt, ex.completion) for ex in us]

        def kl_rows(batches: list[data.Units]) -> list[tuple[list[int], list[int]]]:
            return [row for b in batches for row in data.kl_pairs(b)] if loss_name == "kto" else []

        train_batches = [[units[i] for i in data.batch_indices(len(units), per_batch, b, cfg.seed)] for b in range(n_batches)]
        eval_batches = [eval_units[i:i + per_batch] for i in range(0, len(eval_units) - per_batch + 1, per_batch)]
        width = 2 if loss_name == "dpo" else 1
        state = {"batches": n_batches,
                 "rows": reference_logps(reference, rows(units), cfg, device).view(len(units), width),
                 "kl": reference_logps(reference, kl_rows(train_batches), cfg, device).view(-1, per_batch) if loss_name == "kto" else torch.zeros(0),
                 "eval_rows": reference_logps(reference, rows(eval_units), cfg, device).view(len(eval_units), width) if eval_units else torch.zeros(0),
                 "eval_kl": reference_logps(reference, kl_rows(eval_batches), cfg, device).view(-1, per_batch) if eval_batches and loss_name == "kto" else torch.zeros(0)}
        save_checkpoint(path, state)
    if world_size > 1:
        dist.barrier()
    state = torch.load(path, weights_only=True)
    return ({"rows": state["rows"], "kl": state["kl"]}, {"rows": state["eval_rows"], "kl": state["eval_kl"]})


def lr_at(it: int, lr: float, warmup_iters: int) -> float:
    """Linear warmup, then constant (so a run extended by resume follows the same schedule)."""
    return lr * min(1.0, (it + 1) / (warmup_iters + 1))


# ----------------------------------------------------------------------------- metrics
# Each step's stats stay on the device; they reach the host, in one all-reduce and one all-gather over
# the ranks for all the steps since the last, only when rows are written (log and checkpoint intervals).

# Examples are followed in groups: by label (KTO) or as pairs (DPO) when clean, else by their tag.
GROUPS = ("desirable", "undesirable", "pairs", "flipped", "contradicted")


def step_stats(micro_stats: list[dict[str, torch.Tensor]], micro_batches: list[dict[str, torch.Tensor]],
               loss_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step's stats on the device: its sums (sorted keys) and per-example rows (z, weight, saturated,
    tag, desirable) x n, desirable -1 for pairs."""
    sums = torch.stack([sum(s[k] for s in micro_stats).float() for k in sorted(micro_stats[0]) if micro_stats[0][k].dim() == 0])
    if "z" not in micro_stats[0]:
        return sums, None
    rows = []
    for s, b in zip(micro_stats, micro_batches):
        tag = b["tag"][0::2] if loss_name == "dpo" else b["tag"]  # DPO: one row per pair
        desirable = b["desirable"] if "desirable" in b else torch.full_like(tag, -1)
        rows.append(torch.stack([s["z"].float(), s["weight"].float(), s["saturated"].float(), tag.float(), desirable.float()]))
    return sums, torch.cat(rows, dim=1)


def gather_rows(pending: list[tuple[dict, torch.Tensor, torch.Tensor | None]], keys: list[str]) -> list[dict]:
    """metrics.jsonl rows for the pending steps: sums over ranks, per-example values from every rank."""
    sums = torch.stack([s for _, s, _ in pending])
    examples = torch.stack([e for _, _, e in pending]) if pending[0][2] is not None else None
    if dist.is_initialized():
        dist.all_reduce(sums)
        if examples is not None:
            parts = [torch.empty_like(examples) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, examples)
            examples = torch.cat(parts, dim=2)
    sums = sums.tolist()
    examples = examples.cpu().numpy() if examples is not None else None
    out = []
    for i, (record, _, _) in enumerate(pending):
        record = {**record, **kto.summarize(dict(zip(keys, sums[i])))}
        if examples is not None:
            z, weight, saturated, tag, desirable = examples[i]
            groups = [data.TAGS[int(t)] if t else "pairs" if d < 0 else "desirable" if d else "undesirable"
                      for t, d in zip(tag, desirable)]
            record["groups"] = kto.group_summary(z, weight, saturated, groups, GROUPS)
        out.append(record)
    return out


def format_metrics(m: dict) -> str:
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.2f}"

    parts = [f"loss {m['loss']:.4f}"]
    if "z_ref" in m:
        parts += [f"reward D {fmt(m['reward_desirable'])} U {fmt(m['reward_undesirable'])} margin {fmt(m.get('margin'))}",
                  f"kl raw {m['kl_raw']:+.3f} z_ref {m['z_ref']:.3f}"]
    if "ordered" in m:
        parts += [f"reward chosen {fmt(m['reward_chosen'])} rejected {fmt(m['reward_rejected'])} "
                  f"margin {fmt(m['margin'])} ordered {100 * m['ordered']:.0f}%"]
    if "groups" in m:
        parts += [f"grad weight {m['grad_weight']:.4f}", "saturated " +
                  " ".join(f"{name} {100 * g['saturated']:.0f}%" for name, g in m["groups"].items())]
    return " | ".join(parts)


# ----------------------------------------------------------------------------- one stage

def train_stage(cfg: TrainConfig, name: str, loss_name: str, init: str | None, iters: int, lr_key: str,
                units: data.Units, rank: int, world_size: int, device: torch.device, progress: bool = True,
                eval_units: data.Units = ()) -> GPT:
    """Train one stage to `iters` iterations from `init` (None: a fresh model) at the learning rate
    cfg.<lr_key>; return the model. With eval_units, the eval loss is written every eval_interval."""
    path = os.path.join(cfg.out_dir, f"{name}.pt")
    model = build_model(cfg, init, device)
    lr = getattr(cfg, lr_key)
    identity = {"settings": stage_settings(cfg, loss_name, lr_key), "data": fingerprint(units), "start": fingerprint(model)}
    reference = None
    if loss_name in ("kto", "dpo"):  # a frozen copy of the starting policy, never wrapped in DDP
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = model.configure_optimizer(cfg.weight_decay, lr, (cfg.beta1, cfg.beta2))
    start = 0
    if cfg.resume and os.path.exists(path):
        ckpt = read_checkpoint(path, device)
        for key, value in ckpt["settings"].items():
            if identity["settings"].get(key) != value:
                raise SystemExit(f"error: {path} was trained with {key}={value!r}, this run has "
                                 f"{key}={identity['settings'].get(key)!r}; use another out_dir or the same value")
        for key, what in (("data", "training data"), ("start", f"start ({init or 'a fresh model'})")):
            if ckpt[key] != identity[key]:
                raise SystemExit(f"error: {path} was trained from another {what} than this run's; "
                                 f"use another out_dir or the same {'data and settings' if key == 'data' else 'start'}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["iter"]
    elif os.path.exists(path):
        raise SystemExit(f"error: {path} exists; pass --resume=true to continue it, or choose another --out_dir")
    if start >= iters:
        if rank == 0 and progress:
            print(f"{name}: checkpoint at iteration {start}, nothing to train")
        return model

    precomputed = eval_precomputed = None
    if reference is not None and cfg.reference == "precomputed":
        key = fingerprint((identity["start"], identity["data"], fingerprint(eval_units), loss_name, cfg.seed,
                           cfg.batch_size, cfg.grad_accum, cfg.block_size))
        directory = os.path.dirname(init) if init and not hugging_face(init) else cfg.out_dir
        precomputed, eval_precomputed = precompute_reference(reference, units, eval_units, cfg, loss_name, iters, key,
                                                             directory, rank, world_size, device)
        reference = None  # the reference is no longer needed: its memory is freed
    forward = torch.compile(model) if cfg.compile else model
    frozen = torch.compile(reference) if cfg.compile and reference is not None else reference
    policy = DDP(forward) if world_size > 1 else forward
    bar = tqdm(total=iters, initial=start, desc=name, disable=rank != 0 or not progress, dynamic_ncols=True)
    pending, keys = [], None
    model.train()
    for it in range(start, iters):
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, lr, cfg.warmup_iters)
        # Dropout masks depend only on (seed, rank, iteration): a resumed run draws the same ones.
        torch.manual_seed(cfg.seed + 1_000_003 * rank + it)
        micro_batches = load_batches(units, it, cfg, loss_name, rank, world_size, device, precomputed)
        micro_stats = train_step(policy, model, frozen, optimizer, micro_batches, cfg, loss_name, world_size)

        keys = keys or sorted(k for k, v in micro_stats[0].items() if v.dim() == 0)
        record = {"stage": name, "iter": it + 1, "lr": optimizer.param_groups[0]["lr"], "ms": round(1000 * (time.time() - t0), 1)}
        pending.append((record, *step_stats(micro_stats, micro_batches, loss_name)))
        bar.update(1)
        log = (it + 1) % cfg.log_interval == 0 or it + 1 == iters
        save = (it + 1) % cfg.ckpt_interval == 0 or it + 1 == iters
        rows = []
        if log or save:
            rows, pending = gather_rows(pending, keys), []
        if eval_units and ((it + 1) % cfg.eval_interval == 0 or it + 1 == iters):
            rows.append({"stage": name, "iter": it + 1, "eval": eval_loss(forward, frozen, eval_units, cfg, loss_name, rank,
                                                                         world_size, device, eval_precomputed)})
        if rank == 0 and rows:
            with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            for row in rows:
                if "eval" in row and progress:
                    bar.write(f"{name} eval iter {it + 1}: {format_metrics(row['eval'])}")
            if log and progress:
                bar.write(f"{name} iter {it + 1}: {format_metrics(rows[-1] if 'eval' not in rows[-1] else rows[-2])}")
        if rank == 0 and save:
            save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "iter": it + 1, "model_args": dataclasses.asdict(model.config),
                                   "config": dataclasses.asdict(cfg), **identity})
    bar.close()
    if world_size > 1:
        dist.barrier()  # the next stage reads this checkpoint on every rank
    return model


@torch.no_grad()
def eval_loss(model: torch.nn.Module, reference: GPT | None, units: data.Units, cfg: TrainConfig, loss_name: str,
              rank: int, world_size: int, device: torch.device, precomputed: dict[str, torch.Tensor] | None) -> dict:
    """The loss and its stats on the held-out examples, in whole batches taken in order; every rank
    computes its shard of each batch and the sums are reduced over ranks."""
    per_batch = cfg.batch_size // 2 if loss_name == "dpo" else cfg.batch_size
    amp = autocast(device)
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for number, i in enumerate(range(0, len(units) - per_batch + 1, per_batch)):
        batch = data.make_batch(units[i:i + per_batch], cfg.block_size, with_kl=loss_name == "kto")
        if precomputed is not None:
            batch["reference_logps"] = precomputed["rows"][i:i + per_batch].reshape(-1)
            if loss_name == "kto":
                batch["reference_kl_logps"] = precomputed["kl"][number]
        with amp:
            _, stats = compute_loss(model, reference, to_device(data.shard(batch, rank, world_size), device), cfg, loss_name)
        for k, v in stats.items():
            if v.dim() == 0:
                totals[k] = totals.get(k, 0) + v.float()
    model.train()
    keys = sorted(totals)
    sums = torch.stack([totals[k] for k in keys])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return kto.summarize(dict(zip(keys, sums.tolist())))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: GPT, prompts: list[str], samples: int, temperature: float, seed: int, device: torch.device,
             max_new_tokens: int = 8) -> dict[str, float]:
    """Sample `samples` completions per prompt (temperature 0: greedy) and report the judge's mean score
    ("utility"), the mean completion length in tokens before EOT ("length"), and the share of completions
    that end with EOT within max_new_tokens ("eot")."""
    enc = data.get_tokenizer()
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    by_length: dict[int, list[tuple[str, list[int]]]] = {}
    for p in prompts:  # prompts of one length share a batch, so no padding is needed
        ids = enc.encode_ordinary(p)
        by_length.setdefault(len(ids), []).append((p, ids))
    scores, lengths, ended = [], [], []
    for group in by_length.values():
        for i in range(0, len(group), 64):  # 64 prompts at a time bound the (rows, 50257) logits in memory
            chunk = group[i:i + 64]
            idx = torch.tensor([ids for _, ids in chunk], device=device).repeat_interleave(samples, dim=0)
            out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
            for row, completion in enumerate(out[:, idx.size(1):].tolist()):
                ended.append(data.EOT in completion)
                completion = completion[:completion.index(data.EOT)] if ended[-1] else completion
                lengths.append(len(completion))
                scores.append(data.judge(chunk[row // samples][0], enc.decode(completion)))
    n = len(scores)
    return {"utility": sum(scores) / n, "length": sum(lengths) / n, "eot": sum(ended) / n}


# ----------------------------------------------------------------------------- main

def prepare(cfg: TrainConfig, world_size: int, progress: bool = False) -> tuple[TrainConfig, Data]:
    """Load the data, check it against the batch, and settle lambda_d and lambda_u (the returned config)."""
    d = load_data(cfg, progress)
    per_batch = cfg.batch_size // 2 if cfg.loss == "dpo" else cfg.batch_size
    for units, size in ((d.sft, cfg.batch_size), (d.control, cfg.batch_size), (d.main, per_batch)):
        data.batch_indices(len(units), size, 0, cfg.seed)  # every stage draws whole batches of distinct examples
    if d.eval and len(d.eval) < per_batch:
        raise data.DataError(f"eval_fraction={cfg.eval_fraction} holds out {len(d.eval)} examples (or pairs), fewer than "
                             f"one batch of {per_batch}; expected a larger eval_fraction or a smaller batch_size")
    if d.eval:
        d.report.append(f"eval: {len(d.eval) // per_batch} batches of {per_batch} every {cfg.eval_interval} iterations"
                        + (f" ({len(d.eval) % per_batch} left over)" if len(d.eval) % per_batch else ""))
    if cfg.loss != "kto":
        return cfg, d
    for units in (d.main, d.eval):
        if units:
            data.check_kl_pairs(units, cfg.batch_size)
    n_d = sum(ex.desirable for ex in d.main)
    n_u = len(d.main) - n_d
    advised = kto.advised_lambdas(n_d, n_u)
    if cfg.lambda_d is None and cfg.lambda_u is None:
        cfg = dataclasses.replace(cfg, lambda_d=advised[0], lambda_u=advised[1])
        how = "from the data, by the paper's advice"
    else:
        cfg = dataclasses.replace(cfg, lambda_d=cfg.lambda_d or 1.0, lambda_u=cfg.lambda_u or 1.0)
        how = f"as set; the paper's advice gives lambda_d={advised[0]:.3g}, lambda_u={advised[1]:.3g}"
    ratio = f"{cfg.lambda_d * n_d / (cfg.lambda_u * n_u):.2f}" if n_d and n_u else "undefined (one class only)"
    d.report.append(f"lambda_d={cfg.lambda_d:.3g}, lambda_u={cfg.lambda_u:.3g} ({how}): "
                    f"lambda_d*n_d / (lambda_u*n_u) = {ratio}; the paper advises 1 to 4/3")
    return cfg, d


def run(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> None:
    """The stages of one run, then the utility table on the built-in task."""
    per_rank = cfg.batch_size // 2 if cfg.loss == "dpo" else cfg.batch_size
    if per_rank % world_size:
        raise SystemExit(f"error: batch_size={cfg.batch_size}: expected {per_rank} {'pairs' if cfg.loss == 'dpo' else 'examples'} "
                         f"to be a multiple of the {world_size} processes")
    os.makedirs(cfg.out_dir, exist_ok=True)
    try:
        cfg, d = prepare(cfg, world_size, progress=rank == 0)
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None
    if rank == 0:
        print("\n".join(d.report))
        print(f"device {device}, {world_size} process(es)")
        if cfg.loss == "kto" and cfg.batch_size < 8:
            print(f"note: z_ref pools each global micro-batch of {cfg.batch_size} examples; 8 to 16 or more give a steadier z_ref")

    stage = functools.partial(train_stage, cfg, rank=rank, world_size=world_size, device=device)
    examples_eval = data.split_pairs(d.eval) if d.eval and isinstance(d.eval[0], data.PairTokens) else d.eval
    start_path = None
    models = {}
    if cfg.init_from == "sft":
        sft_init = None if cfg.sft_init == "scratch" else cfg.sft_init
        models["SFT"] = stage("sft", "sft", sft_init, cfg.sft_iters, "sft_lr", d.sft, eval_units=examples_eval)
        start_path = os.path.join(cfg.out_dir, "sft.pt")
    elif cfg.init_from != "scratch":
        start_path = cfg.init_from
    models[f"SFT+{cfg.loss.upper()}" if start_path else cfg.loss.upper()] = \
        stage(cfg.loss, cfg.loss, start_path, cfg.max_iters, "lr", d.main, eval_units=d.eval)
    if cfg.control and cfg.loss != "sft":
        models["SFT+SFT (control)" if start_path else "SFT (control)"] = \
            stage("control", "sft", start_path, cfg.max_iters, "lr", d.control, eval_units=examples_eval)

    if rank == 0 and d.heldout is not None:
        print(f"\nheld-out utility: the judge's mean score on {len(d.heldout)} unseen prompts")
        print(f"{'model':<20}{'sampled (T=1)':>15}{'greedy':>10}")
        for label, model in models.items():
            sampled = evaluate(model, d.heldout, cfg.eval_samples, 1.0, cfg.seed, device, cfg.eval_tokens)
            greedy = evaluate(model, d.heldout, 1, 0.0, cfg.seed, device, cfg.eval_tokens)
            print(f"{label:<20}{100 * sampled['utility']:>14.1f}%{100 * greedy['utility']:>9.1f}%")
            with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"eval": label, "sampled": sampled, "greedy": greedy}) + "\n")


def main() -> None:
    try:
        cfg = parse_config(sys.argv[1:])
        rank, world_size, device = setup_distributed(cfg)
        try:
            run(cfg, rank, world_size, device)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except SystemExit as e:
        # Under torchrun every rank meets the same error: rank 0 alone prints it.
        if isinstance(e.code, str) and os.environ.get("RANK", "0") != "0":
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    main()
