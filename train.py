"""Train a GPT with SFT, then KTO, on one process or many.

    python train.py                                      # the main job: SFT, then KTO, with a control
    python train.py configs/quick.json --max_iters=50    # a preset file, then overrides
    torchrun --standalone --nproc_per_node=2 train.py    # DDP: nccl on CUDA, gloo on CPU

The run is made of stages, each with its own checkpoint in out_dir:
  sft      the starting point: SFT on every completion, labels ignored (when init_from="sft")
  kto      the main loss (or sft, when loss="sft"), starting from that point; its frozen copy is the reference
  control  SFT continued from the same point for as many steps as kto, labels ignored
On the built-in task each model is then sampled on held-out prompts and scored by the judge.
"""
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

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
    data: str = "arithmetic"  # "arithmetic" (the built-in task) or a JSONL file of {"prompt", "completion", "label"}
    task_p_correct: float = 0.4  # built-in task: how often its demonstrator answers correctly
    task_heldout: float = 0.1  # built-in task: fraction of prompts kept for evaluation
    task_max_operand: int = 4  # built-in task: operands run from 0 to this
    seed: int = 1337
    # model (ignored when starting from a checkpoint, which carries its own shape)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    # stages
    loss: str = "kto"  # the main loss: "kto" or "sft"
    init_from: str = "sft"  # "sft" (train the SFT stage first), "scratch", or a checkpoint path
    sft_iters: int = 1500
    sft_lr: float = 3e-3  # learning rate of the SFT stage
    max_iters: int = 400  # iterations of the main loss (and of the control)
    lr: float = 1e-3  # learning rate of the main loss (and of the control)
    control: bool = True  # also continue SFT from the same start (only with loss="kto")
    # KTO, eq. (7); beta outside the log-ratio (see kto.py)
    beta: float = 0.1
    lambda_d: float = 1.6  # built-in task, 40% desirable: 1.6*0.4 / (1*0.6) = 1.07, in the paper's [1, 4/3]
    lambda_u: float = 1.0
    # optimization
    batch_size: int = 32  # examples per micro-step, over all processes together
    grad_accum: int = 1  # micro-steps per optimizer step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    warmup_iters: int = 50
    # evaluation on the built-in task
    eval_samples: int = 8  # samples per held-out prompt at temperature 1
    # i/o
    out_dir: str = "out"
    resume: bool = False  # continue each stage from its checkpoint in out_dir
    log_interval: int = 50
    ckpt_interval: int = 200
    device: str = "auto"  # "auto", "cpu", "cuda"


# Keys that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = {"resume", "max_iters", "control", "eval_samples", "log_interval",
                     "ckpt_interval", "device"}


def parse_config(args: list[str]) -> TrainConfig:
    """Defaults, then JSON preset files, then --key=value overrides, in the order given."""
    cfg = TrainConfig()
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}

    def set_value(key: str, value, source: str) -> None:
        if key not in fields:
            raise SystemExit(f"error: {source}: unknown config key '{key}'; known keys: {', '.join(fields)}")
        kind = fields[key]
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
                "grad_accum", "eval_samples", "log_interval", "ckpt_interval"):
        require(getattr(cfg, key) >= 1, key, "an integer of at least 1")
    for key in ("seed", "warmup_iters", "task_max_operand"):
        require(getattr(cfg, key) >= 0, key, "a non-negative integer")
    for key in ("sft_lr", "lr", "beta", "lambda_d", "lambda_u"):
        require(0 < getattr(cfg, key) < math.inf, key, "a positive finite number")
    for key in ("weight_decay", "grad_clip"):
        require(0 <= getattr(cfg, key) < math.inf, key, "a non-negative finite number")
    for key in ("beta1", "beta2", "dropout"):
        require(0 <= getattr(cfg, key) < 1, key, "a number in [0, 1)")
    require(0 <= cfg.task_p_correct <= 1, "task_p_correct", "a probability in [0, 1]")
    require(0 < cfg.task_heldout < 1, "task_heldout", "a fraction strictly between 0 and 1")
    require(cfg.n_embd % cfg.n_head == 0, "n_embd", f"a multiple of n_head={cfg.n_head}")
    require(cfg.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'")
    require(cfg.device != "cuda" or torch.cuda.is_available(), "device", "a machine with CUDA")
    require(cfg.loss in ("kto", "sft"), "loss", "'kto' or 'sft'")
    require(not (cfg.loss == "sft" and cfg.init_from == "sft"), "init_from",
            "'scratch' or a checkpoint with loss='sft' (the SFT stage followed by more SFT is the control)")
    require(cfg.loss != "kto" or cfg.batch_size >= 2, "batch_size",
            "at least 2 for KTO, to pair prompts with other completions for z_ref (8-16 or more per device is advised)")


# ----------------------------------------------------------------------------- set-up

def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK; a plain `python train.py` is rank 0 of 1."""
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def load_data(cfg: TrainConfig) -> tuple[list[data.Tokens], list[str] | None]:
    """Tokenized training examples and, for the built-in task, held-out prompts."""
    if cfg.data == "arithmetic":
        examples, heldout = data.arithmetic_task(cfg.seed, cfg.task_p_correct, cfg.task_heldout, cfg.task_max_operand)
        if not examples or not heldout:
            raise data.DataError(f"built-in task: task_heldout={cfg.task_heldout} and task_max_operand={cfg.task_max_operand} "
                                 f"leave {len(examples)} training and {len(heldout)} held-out prompts; expected at least one of each")
    else:
        examples, heldout = data.read_jsonl(cfg.data), None
    return data.tokenize(examples, cfg.block_size), heldout


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file, then rename: a crash while saving leaves the old checkpoint intact."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path: str, device: str | torch.device = "cpu") -> dict:
    """A checkpoint written by this script; anything else ends the run with one line."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not all(key in ckpt for key in ("model", "optimizer", "iter", "model_args", "config")):
            raise KeyError("model, optimizer, iter, model_args or config")
        return ckpt
    except Exception as e:
        raise SystemExit(f"error: {path}: not a checkpoint written by train.py ({type(e).__name__}: {e})") from None


def build_model(cfg: TrainConfig, init: str | None, device: torch.device) -> GPT:
    """A fresh GPT (seeded identically on every rank) or the model of a checkpoint."""
    if init is None:
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    else:
        ckpt = read_checkpoint(init)
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    return model.to(device)


# ----------------------------------------------------------------------------- the losses

def compute_loss(policy: torch.nn.Module, reference: GPT | None, batch: dict[str, torch.Tensor],
                 cfg: TrainConfig, loss_name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch (this rank's shard) and its summed stats."""
    policy_logps = kto.sequence_logps(policy(batch["idx"], batch["targets"], batch["scored"]), batch["scored"])
    if loss_name == "sft":
        return kto.sft_loss(policy_logps)
    raw_policy = policy.module if isinstance(policy, DDP) else policy
    with torch.no_grad():
        reference_logps = kto.sequence_logps(reference(batch["idx"], batch["targets"], batch["scored"]), batch["scored"])
        kl_args = (batch["kl_idx"], batch["kl_targets"], batch["kl_scored"])
        policy_kl_logps = kto.sequence_logps(raw_policy(*kl_args), batch["kl_scored"])
        reference_kl_logps = kto.sequence_logps(reference(*kl_args), batch["kl_scored"])
    return kto.kto_loss(policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, batch["desirable"],
                        cfg.beta, cfg.lambda_d, cfg.lambda_u)


def lr_at(it: int, lr: float, warmup_iters: int) -> float:
    """Linear warmup, then constant (so a run extended by resume follows the same schedule)."""
    return lr * min(1.0, (it + 1) / (warmup_iters + 1))


def reduce_stats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum stats over ranks in one all-reduce; every rank has every key, so none can hang."""
    keys = sorted(stats)
    values = torch.stack([stats[k].float() for k in keys])
    if dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def format_metrics(m: dict) -> str:
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.2f}"

    parts = [f"loss {m['loss']:.4f}"]
    if "z_ref" in m:
        parts += [f"reward D {fmt(m['reward_desirable'])} U {fmt(m['reward_undesirable'])} margin {fmt(m.get('margin'))}",
                  f"kl raw {m['kl_raw']:+.3f} z_ref {m['z_ref']:.3f}",
                  f"grad weight {m['grad_weight']:.4f} saturated {100 * m['saturated']:.0f}%"]
    return " | ".join(parts)


# ----------------------------------------------------------------------------- one stage

def train_stage(cfg: TrainConfig, name: str, loss_name: str, init: str | None, iters: int, lr: float,
                examples: list[data.Tokens], rank: int, world_size: int, device: torch.device) -> GPT:
    """Train one stage to `iters` iterations from `init` (None: a fresh model); return the model."""
    path = os.path.join(cfg.out_dir, f"{name}.pt")
    model = build_model(cfg, init, device)
    reference = None
    if loss_name == "kto":  # a frozen copy of the starting policy, never wrapped in DDP
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = model.configure_optimizer(cfg.weight_decay, lr, (cfg.beta1, cfg.beta2))
    start = 0
    if cfg.resume and os.path.exists(path):
        ckpt = read_checkpoint(path, device)
        for key, value in ckpt["config"].items():
            if key not in RESUMABLE_CHANGES and getattr(cfg, key) != value:
                raise SystemExit(f"error: {path} was trained with {key}={value!r}, this run has "
                                 f"{key}={getattr(cfg, key)!r}; use another out_dir or the same value")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["iter"]
    elif os.path.exists(path):
        raise SystemExit(f"error: {path} exists; pass --resume=true to continue it, or choose another --out_dir")
    if start >= iters:
        if rank == 0:
            print(f"{name}: checkpoint at iteration {start}, nothing to train")
        return model

    policy = DDP(model) if world_size > 1 else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    metrics_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=iters, initial=start, desc=name, disable=rank != 0, dynamic_ncols=True)
    model.train()
    for it in range(start, iters):
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, lr, cfg.warmup_iters)
        # Dropout masks depend only on (seed, rank, iteration): a resumed run draws the same ones.
        torch.manual_seed(cfg.seed + 1_000_003 * rank + it)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            indices = data.batch_indices(len(examples), cfg.batch_size, it * cfg.grad_accum + micro, cfg.seed)
            batch = data.make_batch([examples[i] for i in indices], cfg.block_size, with_kl=loss_name == "kto")
            batch = {k: v.to(device) for k, v in data.shard(batch, rank, world_size).items()}
            last = micro == cfg.grad_accum - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-step.
            sync = contextlib.nullcontext() if last or world_size == 1 else policy.no_sync()
            with sync:
                with amp:
                    loss, stats = compute_loss(policy, reference, batch, cfg, loss_name)
                (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = kto.summarize(reduce_stats(totals))
        bar.update(1)
        if rank == 0:
            record = {"stage": name, "iter": it + 1, "lr": optimizer.param_groups[0]["lr"],
                      "ms": round(1000 * (time.time() - t0), 1), **metrics}
            metrics_file.write(json.dumps(record) + "\n")
            if (it + 1) % cfg.log_interval == 0 or it + 1 == iters:
                bar.write(f"{name} iter {it + 1}: {format_metrics(metrics)}")
        if rank == 0 and ((it + 1) % cfg.ckpt_interval == 0 or it + 1 == iters):
            save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "iter": it + 1, "model_args": dataclasses.asdict(model.config),
                                   "config": dataclasses.asdict(cfg)})
    bar.close()
    if metrics_file:
        metrics_file.close()
    if world_size > 1:
        dist.barrier()  # the next stage reads this checkpoint on every rank
    return model


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def utility(model: GPT, prompts: list[str], samples: int, temperature: float, seed: int, device: torch.device) -> float:
    """The judge's mean score of completions sampled for `prompts` (temperature 0: greedy)."""
    enc = data.get_tokenizer()
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    by_length: dict[int, list[tuple[str, list[int]]]] = {}
    for p in prompts:  # prompts of one length share a batch, so no padding is needed
        ids = enc.encode_ordinary(p)
        by_length.setdefault(len(ids), []).append((p, ids))
    scores = []
    for group in by_length.values():
        for i in range(0, len(group), 64):  # 64 prompts at a time bound the (rows, 50257) logits in memory
            chunk = group[i:i + 64]
            idx = torch.tensor([ids for _, ids in chunk], device=device).repeat_interleave(samples, dim=0)
            out = model.generate(idx, max_new_tokens=3, temperature=temperature, generator=generator)
            for row, completion in enumerate(out[:, idx.size(1):].tolist()):
                completion = completion[:completion.index(data.EOT)] if data.EOT in completion else completion
                scores.append(data.judge(chunk[row // samples][0], enc.decode(completion)))
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- main

def main() -> None:
    cfg = parse_config(sys.argv[1:])
    rank, world_size, device = setup_distributed(cfg)
    if cfg.batch_size % world_size:
        raise SystemExit(f"error: batch_size={cfg.batch_size}: expected a multiple of the {world_size} processes")
    if rank == 0 and cfg.loss == "kto" and cfg.batch_size // world_size < 8:
        print(f"note: {cfg.batch_size // world_size} KTO examples per device; 8 to 16 or more give a steadier z_ref")
    os.makedirs(cfg.out_dir, exist_ok=True)
    try:
        examples, heldout = load_data(cfg)
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None
    if rank == 0:
        n_d = sum(ex.desirable for ex in examples)
        n_u = len(examples) - n_d
        print(f"{len(examples)} examples: {n_d} desirable, {n_u} undesirable; device {device}, {world_size} process(es)")
        ratio = cfg.lambda_d * n_d / (cfg.lambda_u * n_u) if n_u else math.inf
        if cfg.loss == "kto" and not 1 <= ratio <= 4 / 3:
            print(f"note: lambda_d*n_d / (lambda_u*n_u) = {ratio:.2f}; the paper advises 1 to 4/3")

    stage = functools.partial(train_stage, cfg, examples=examples, rank=rank, world_size=world_size, device=device)
    start_path = None
    models = {}
    if cfg.init_from == "sft":
        models["SFT"] = stage("sft", "sft", None, cfg.sft_iters, cfg.sft_lr)
        start_path = os.path.join(cfg.out_dir, "sft.pt")
    elif cfg.init_from != "scratch":
        context = read_checkpoint(cfg.init_from)["model_args"]["block_size"]
        if cfg.block_size > context:
            raise SystemExit(f"error: block_size={cfg.block_size}: expected at most {context}, the context of {cfg.init_from}")
        start_path = cfg.init_from
    models[f"SFT+{cfg.loss.upper()}" if start_path else cfg.loss.upper()] = \
        stage(cfg.loss, cfg.loss, start_path, cfg.max_iters, cfg.lr)
    if cfg.control and cfg.loss == "kto":
        models["SFT+SFT (control)" if start_path else "SFT (control)"] = \
            stage("control", "sft", start_path, cfg.max_iters, cfg.lr)

    if rank == 0 and heldout is not None:
        print(f"\nheld-out utility: the judge's mean score on {len(heldout)} unseen prompts")
        print(f"{'model':<20}{'sampled (T=1)':>15}{'greedy':>10}")
        for label, model in models.items():
            sampled = utility(model, heldout, cfg.eval_samples, 1.0, cfg.seed, device)
            greedy = utility(model, heldout, 1, 0.0, cfg.seed, device)
            print(f"{label:<20}{100 * sampled:>14.1f}%{100 * greedy:>9.1f}%")
            with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"eval": label, "utility_sampled": sampled, "utility_greedy": greedy}) + "\n")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
