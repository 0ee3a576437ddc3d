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
import glob
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
import dataset
import kto
import metrics
import task
from config import TrainConfig, parse_config, per_batch, settings_help
from model import GPT


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
        return kto.dpo_loss(policy_logps[0::2], policy_logps[1::2], reference_logps[0::2], reference_logps[1::2], cfg.beta,
                            cfg.nll_weight)
    with torch.no_grad():  # the KL pairs only set z_ref, which is held constant: no gradient
        policy_kl_logps = logps(policy.module if isinstance(policy, DDP) else policy, "kl_")
        reference_kl_logps = batch["reference_kl_logps"] if reference is None else logps(reference, "kl_")
    return kto.kto_loss(policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, batch["desirable"],
                        cfg.beta, cfg.lambda_d, cfg.lambda_u, cfg.value, batch["weight"] if cfg.score_weight == "margin" else None)


def precision(device: torch.device) -> str:
    """bf16 autocast on CUDA (GPT.forward keeps log_softmax in fp32); plain fp32 on the CPU."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of `precision`."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if precision(device) == "bf16" else contextlib.nullcontext()


class NonFinite(Exception):
    """A step whose loss, gradient norm or stats are not finite on some rank: it was not applied."""


class Diverged(SystemExit):
    """The end of a stage whose training stopped being finite: its message is the run's one error line."""


def train_step(policy: torch.nn.Module, model: GPT, reference: GPT | None, optimizer: torch.optim.Optimizer,
               batches: list[dict[str, torch.Tensor]], cfg: TrainConfig, loss_name: str,
               world_size: int) -> list[dict[str, torch.Tensor]]:
    """One optimizer step over micro-batches already on the device; returns each one's stats (on the device).
    Raises NonFinite, before the optimizer steps, if any rank's loss, gradient norm or stats are not finite."""
    amp = autocast(batches[0]["idx"].device)
    stats, losses = [], []
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        # Gradients are all-reduced once per optimizer step, on the last micro-step.
        sync = contextlib.nullcontext() if last or world_size == 1 else policy.no_sync()
        with sync:
            with amp:
                loss, s = compute_loss(policy, reference, batch, cfg, loss_name)
            (loss / len(batches)).backward()
        stats.append(s)
        losses.append(loss.detach().float())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    # One flag per quantity, the largest over ranks: every rank then stops at the same step (one host sync a step).
    sums = torch.stack([v.float() for s in stats for v in s.values() if v.dim() == 0])
    bad = torch.stack([~torch.isfinite(torch.stack(losses)).all(), ~torch.isfinite(norm), ~torch.isfinite(sums).all()]).float()
    if world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.any():
        optimizer.zero_grad(set_to_none=True)
        loss_bad, norm_bad, stats_bad = bad.tolist()
        raise NonFinite(", ".join(what for what, b in (("the loss", loss_bad), ("the gradient norm", norm_bad),
                                                     ("the stats (rewards, KL)", stats_bad and not loss_bad)) if b))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Pinned memory and non-blocking copies on CUDA: the host prepares the next batch while the GPU works."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def load_batch(units: data.Units, indices: list[int], number: int, cfg: TrainConfig, loss_name: str, rank: int,
               world_size: int, device: torch.device, precomputed: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """This rank's share of the batch of units[indices] (batch `number` of its stream), on the device, with the
    precomputed reference log-probs of its rows and its KL pairs when there are any."""
    batch = data.make_batch([units[i] for i in indices], cfg.block_size, with_kl=loss_name == "kto")
    if precomputed is not None:
        batch["reference_logps"] = precomputed["rows"][indices].reshape(-1)  # pairs: chosen, rejected
        if loss_name == "kto":
            batch["reference_kl_logps"] = precomputed["kl"][number]
    return to_device(data.shard(batch, rank, world_size), device)


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
    the same start, data, batches, device and precision (a sweep) find them again. Returns (training, eval) tensors."""
    path = os.path.join(directory, f"reference-{key}-{device.type}-{precision(device)}.pt")
    size = per_batch(cfg, loss_name)
    n_batches = iters * cfg.grad_accum
    if rank == 0 and not (os.path.exists(path) and torch.load(path, weights_only=True)["batches"] >= n_batches):
        def kl_rows(batches: list[data.Units]) -> list[tuple[list[int], list[int]]]:
            return [row for b in batches for row in data.kl_pairs(b)] if loss_name == "kto" else []

        train_batches = [[units[i] for i in data.batch_indices(len(units), size, b, cfg.seed)] for b in range(n_batches)]
        eval_batches = [[eval_units[i] for i in indices] for indices in data.eval_batches(len(eval_units), size)]
        width = 2 if loss_name == "dpo" else 1  # a pair's rows: chosen, rejected
        state = {"batches": n_batches,
                 "rows": reference_logps(reference, data.rows(units), cfg, device).view(len(units), width),
                 "kl": reference_logps(reference, kl_rows(train_batches), cfg, device).view(-1, size),
                 "eval_rows": reference_logps(reference, data.rows(eval_units), cfg, device).view(len(eval_units), width),
                 "eval_kl": reference_logps(reference, kl_rows(eval_batches), cfg, device).view(-1, size)}
        checkpoint.save(path, state)
    if world_size > 1:
        dist.barrier()
    state = torch.load(path, weights_only=True)
    return ({"rows": state["rows"], "kl": state["kl"]}, {"rows": state["eval_rows"], "kl": state["eval_kl"]})


def lr_at(it: int, lr: float, warmup_iters: int) -> float:
    """Linear warmup, then constant (so a run extended by resume follows the same schedule)."""
    return lr * min(1.0, (it + 1) / (warmup_iters + 1))


# ----------------------------------------------------------------------------- one stage

def divergence_line(name: str, it: int, what: str, path: str, lr_key: str) -> str:
    """The one line a stage ends with when training stops being finite; its last checkpoint is left as it was."""
    kept = f"{path} (iteration {checkpoint.read(path)['iter']}) is kept" if os.path.exists(path) else "no checkpoint was written"
    return f"error: {name} stage, iteration {it}: {what}; nothing was saved and {kept}; a lower {lr_key} may help"


def train_stage(cfg: TrainConfig, name: str, loss_name: str, init: str | None, iters: int, lr_key: str,
                units: data.Units, rank: int, world_size: int, device: torch.device, progress: bool = True,
                eval_units: data.Units = (), dev: list[str] | None = None) -> GPT:
    """Train one stage to `iters` iterations from `init` (None: a fresh model) at the learning rate
    cfg.<lr_key>; return the model. With eval_units, the eval loss is written every eval_interval; with dev
    prompts, their utility every utility_interval (rank 0)."""
    path, log_path = os.path.join(cfg.out_dir, f"{name}.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    model = checkpoint.build_model(cfg, init, device, checkpoint.stage_dropout(cfg, loss_name))
    lr = getattr(cfg, lr_key)
    identity = {"settings": checkpoint.stage_settings(cfg, loss_name, lr_key), "data": checkpoint.fingerprint(units),
                "start": checkpoint.fingerprint(model)}
    reference = None
    if loss_name in ("kto", "dpo"):  # a frozen copy of the starting policy, never wrapped in DDP
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = model.configure_optimizer(cfg.weight_decay, lr, (cfg.beta1, cfg.beta2))
    start = 0
    if cfg.resume and os.path.exists(path):
        ckpt = checkpoint.read(path, device)
        # Data and start first: the lambdas derived from the data would otherwise be reported as the change.
        for key, what in (("data", "training data"), ("start", f"start ({init or 'a fresh model'})")):
            if ckpt[key] != identity[key]:
                raise SystemExit(f"error: {path} was trained from another {what} than this run's; "
                                 f"use another out_dir or the same {'data and settings' if key == 'data' else 'start'}")
        for key, value in ckpt["settings"].items():
            if identity["settings"].get(key) != value:
                raise SystemExit(f"error: {path} was trained with {key}={value!r}, this run has "
                                 f"{key}={identity['settings'].get(key)!r}; use another out_dir or the same value")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["iter"]
    elif os.path.exists(path):
        raise SystemExit(f"error: {path} exists; pass --resume=true to continue it, or choose another --out_dir")
    if start >= iters:
        if rank == 0 and progress:
            print(f"{name}: checkpoint at iteration {start}, nothing to train")
        return model
    if rank == 0:  # rows written after the checkpoint (an interrupted run, an older run here) are written again
        metrics.drop_rows(log_path, lambda row: row.get("stage") == name and row.get("iter", 0) > start)
        for stale in glob.glob(f"{glob.escape(path)}.*.tmp"):  # a save a kill -9 cut short (checkpoint.write_atomic)
            os.remove(stale)

    precomputed = eval_precomputed = None
    if reference is not None and cfg.reference == "precomputed":
        key = checkpoint.fingerprint((identity["start"], identity["data"], checkpoint.fingerprint(eval_units), loss_name, cfg.seed,
                           cfg.batch_size, cfg.grad_accum, cfg.block_size))
        directory = os.path.dirname(init) if init and not checkpoint.hugging_face(init) else cfg.out_dir
        precomputed, eval_precomputed = precompute_reference(reference, units, eval_units, cfg, loss_name, iters, key,
                                                             directory, rank, world_size, device)
        reference = None  # the reference is no longer needed: its memory is freed
    forward = torch.compile(model) if cfg.compile else model
    frozen = torch.compile(reference) if cfg.compile and reference is not None else reference
    policy = DDP(forward) if world_size > 1 else forward
    pending, keys = [], None
    model.train()
    with tqdm(total=iters, initial=start, desc=name, disable=rank != 0 or not progress, dynamic_ncols=True) as bar:
        for it in range(start, iters):
            t0 = time.time()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, lr, cfg.warmup_iters)
            # Dropout masks depend only on (seed, rank, iteration): a resumed run draws the same ones.
            torch.manual_seed(cfg.seed + 1_000_003 * rank + it)
            numbers = range(it * cfg.grad_accum, (it + 1) * cfg.grad_accum)
            micro_batches = [load_batch(units, data.batch_indices(len(units), per_batch(cfg, loss_name), n, cfg.seed), n, cfg,
                                        loss_name, rank, world_size, device, precomputed) for n in numbers]
            try:
                micro_stats = train_step(policy, model, frozen, optimizer, micro_batches, cfg, loss_name, world_size)
            except NonFinite as e:
                rows = metrics.gather_rows(pending, keys) if pending else []  # the finite steps before it, for the record
                if rank == 0 and rows:
                    metrics.append_rows(log_path, rows)
                raise Diverged(divergence_line(name, it + 1, f"not finite: {e}; the step was not applied", path, lr_key)) from None

            keys = keys or sorted(k for k, v in micro_stats[0].items() if v.dim() == 0)
            record = {"stage": name, "iter": it + 1, "lr": optimizer.param_groups[0]["lr"], "ms": round(1000 * (time.time() - t0), 1)}
            pending.append((record, *metrics.step_stats(micro_stats, micro_batches, loss_name)))
            bar.update(1)
            log = (it + 1) % cfg.log_interval == 0 or it + 1 == iters
            save = (it + 1) % cfg.ckpt_interval == 0 or it + 1 == iters
            rows = []
            if log or save:
                rows, pending = metrics.gather_rows(pending, keys), []
            if eval_units and ((it + 1) % cfg.eval_interval == 0 or it + 1 == iters):
                rows.append({"stage": name, "iter": it + 1, "eval": eval_loss(forward, frozen, eval_units, cfg, loss_name, rank,
                                                                             world_size, device, eval_precomputed)})
            if dev and rank == 0 and cfg.utility_interval and (it + 1) % cfg.utility_interval == 0:
                rows.append({"stage": name, "iter": it + 1,
                             "dev": task.utility(model, dev, cfg.eval_samples, cfg.seed, device, cfg.eval_tokens)})
                model.train()
            # The same rows on every rank (reduced and gathered), but the dev row, rank 0's alone: a mean of the
            # judge's scores, finite by construction.
            bad = checkpoint.nonfinite(rows)
            if bad:
                raise Diverged(divergence_line(name, it + 1, f"not finite: metrics row value {bad}", path, lr_key))
            if rank == 0 and rows:
                metrics.append_rows(log_path, rows)
                for row in rows:
                    if "eval" in row and progress:
                        bar.write(f"{name} eval iter {it + 1}: {metrics.format_metrics(row['eval'])}")
                    if "dev" in row and progress:
                        bar.write(f"{name} dev utility iter {it + 1}: sampled {100 * row['dev']['sampled']['utility']:.1f}% "
                                  f"greedy {100 * row['dev']['greedy']['utility']:.1f}%")
                if log and progress:
                    bar.write(f"{name} iter {it + 1}: {metrics.format_metrics([r for r in rows if 'loss' in r][-1])}")
            if save:  # every rank checks the weights it holds; rank 0 writes them
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it + 1,
                         "model_args": dataclasses.asdict(model.config), "config": dataclasses.asdict(cfg), **identity}
                bad = checkpoint.nonfinite(state)
                if bad:
                    raise Diverged(divergence_line(name, it + 1, f"not finite after the step: {bad}", path, lr_key))
                if rank == 0:
                    checkpoint.save(path, state)
    if world_size > 1:
        dist.barrier()  # the next stage reads this checkpoint on every rank
    return model


@torch.no_grad()
def eval_loss(model: torch.nn.Module, reference: GPT | None, units: data.Units, cfg: TrainConfig, loss_name: str,
              rank: int, world_size: int, device: torch.device, precomputed: dict[str, torch.Tensor] | None) -> dict:
    """The loss and its stats on the held-out examples, in whole batches taken in order; every rank
    computes its shard of each batch and the sums are reduced over ranks."""
    amp = autocast(device)
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for number, indices in enumerate(data.eval_batches(len(units), per_batch(cfg, loss_name))):
        batch = load_batch(units, indices, number, cfg, loss_name, rank, world_size, device, precomputed)
        with amp:
            _, stats = compute_loss(model, reference, batch, cfg, loss_name)
        for k, v in stats.items():
            if v.dim() == 0:
                totals[k] = totals.get(k, 0) + v.float()
    model.train()
    return metrics.reduce(totals)


# ----------------------------------------------------------------------------- main

def prepare(cfg: TrainConfig, progress: bool = False) -> tuple[TrainConfig, dataset.Data]:
    """Load the data (dataset.load) and settle lambda_d and lambda_u (the returned config)."""
    d = dataset.load(cfg, progress)
    if cfg.loss != "kto":
        return cfg, d
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


def check_start_kept(cfg: TrainConfig) -> None:
    """Refuse to train sft.pt further once a later stage of out_dir started from it: that stage's start
    (and reference) would be gone, and the stage refused on every later resume."""
    sft = os.path.join(cfg.out_dir, "sft.pt")
    later = [p for p in (os.path.join(cfg.out_dir, f"{n}.pt") for n in (cfg.loss, "control")) if os.path.exists(p)]
    if cfg.resume and later and os.path.exists(sft):
        trained = checkpoint.read(sft)["iter"]
        if trained < cfg.sft_iters:
            raise SystemExit(f"error: {later[0]} was trained from {sft} at iteration {trained}; sft_iters={cfg.sft_iters} "
                             f"would replace that start; use another out_dir, or sft_iters={trained}")


def run(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> None:
    """The stages of one run, then the utility table on the built-in task."""
    per_rank = per_batch(cfg, cfg.loss)
    if per_rank % world_size:
        raise SystemExit(f"error: batch_size={cfg.batch_size}: expected {per_rank} {'pairs' if cfg.loss == 'dpo' else 'examples'} "
                         f"to be a multiple of the {world_size} processes")
    os.makedirs(cfg.out_dir, exist_ok=True)
    try:
        cfg, d = prepare(cfg, progress=rank == 0)
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
        check_start_kept(cfg)
        sft_init = None if cfg.sft_init == "scratch" else cfg.sft_init
        models["SFT"] = stage("sft", "sft", sft_init, cfg.sft_iters, "sft_lr", d.sft, eval_units=examples_eval)
        start_path = os.path.join(cfg.out_dir, "sft.pt")
    elif cfg.init_from != "scratch":
        start_path = cfg.init_from
    models[f"SFT+{cfg.loss.upper()}" if start_path else cfg.loss.upper()] = \
        stage(cfg.loss, cfg.loss, start_path, cfg.max_iters, "lr", d.main, eval_units=d.eval, dev=d.dev)
    if cfg.control and cfg.loss != "sft":
        models["SFT+SFT (control)" if start_path else "SFT (control)"] = \
            stage("control", "sft", start_path, cfg.max_iters, "lr", d.control, eval_units=examples_eval, dev=d.dev)

    if rank == 0 and d.heldout is not None:
        metrics.drop_rows(os.path.join(cfg.out_dir, "metrics.jsonl"), lambda row: "sampled" in row)  # a rerun's replace them
        print(f"\nheld-out utility: the judge's mean score on {len(d.heldout)} unseen prompts")
        print(f"{'model':<20}{'sampled (T=1)':>15}{'greedy':>10}")
        for label, model in models.items():
            u = task.utility(model, d.heldout, cfg.eval_samples, cfg.seed, device, cfg.eval_tokens)
            print(f"{label:<20}{100 * u['sampled']['utility']:>14.1f}%{100 * u['greedy']['utility']:>9.1f}%")
            metrics.append_rows(os.path.join(cfg.out_dir, "metrics.jsonl"), [{"eval": label, **u}])


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__.strip() + "\n\n" + settings_help())
        return
    try:
        cfg = parse_config(sys.argv[1:])
        rank, world_size, device = setup_distributed(cfg)
        try:
            run(cfg, rank, world_size, device)
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: the checkpoints in {cfg.out_dir} are kept; the same command with "
                             f"--resume=true continues from them") from None
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
