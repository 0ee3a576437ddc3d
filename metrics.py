"""What the losses' stats become: means by class and by group, one metrics.jsonl row per step, a log line.

Each step's stats stay on the device; they reach the host, in one all-reduce and one all-gather over
the ranks for all the steps since the last, only when rows are written (log and checkpoint intervals).
"""
import json
import os
import sys
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import data


def summarize(sums: dict[str, float]) -> dict[str, float | None]:
    """Turn summed stats (over micro-batches and ranks) into means; None where a class is empty."""
    def mean(key: str, count: str) -> float | None:
        return sums[key] / sums[count] if sums.get(count) else None

    out = {"loss": mean("loss_sum", "n")}
    if "n_batches" in sums:
        out.update(kl_raw=mean("kl_raw_sum", "n_batches"), z_ref=mean("z_ref_sum", "n_batches"))
    if "n_desirable" in sums:
        out.update(
            reward_desirable=mean("reward_desirable_sum", "n_desirable"),
            reward_undesirable=mean("reward_undesirable_sum", "n_undesirable"),
            n_desirable=sums["n_desirable"],
            n_undesirable=sums["n_undesirable"],
        )
        if out["reward_desirable"] is not None and out["reward_undesirable"] is not None:
            out["margin"] = out["reward_desirable"] - out["reward_undesirable"]
    if "n_ordered" in sums:
        out.update(reward_chosen=mean("reward_chosen_sum", "n"), reward_rejected=mean("reward_rejected_sum", "n"),
                   ordered=mean("n_ordered", "n"))
        out["margin"] = out["reward_chosen"] - out["reward_rejected"]
    if "grad_weight_sum" in sums:
        out.update(grad_weight=mean("grad_weight_sum", "n"), weight_share=mean("weight_share_sum", "n"),
                   saturated=mean("n_saturated", "n"), saturated_right=mean("n_saturated_right", "n"),
                   saturated_wrong=mean("n_saturated_wrong", "n"))
    return out


def reduce(totals: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Summed stats over the ranks, in one all-reduce, then their means (`summarize`)."""
    keys = sorted(totals)
    sums = torch.stack([totals[k] for k in keys])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return summarize(dict(zip(keys, sums.tolist())))


def group_summary(examples: dict[str, np.ndarray], group: list[str], names: tuple[str, ...]) -> dict[str, dict]:
    """Per group of examples, in the order of `names`: how many, their mean gradient weight and its mean share
    of the peak, the share saturated (in all, on the right side, on the wrong side; kto.side_stats), and the
    10/50/90% quantiles of z. examples: per-example arrays z, weight, share, saturated, right; group[i] names
    example i's group."""
    group = np.asarray(group)
    z, saturated, right = examples["z"], examples["saturated"].astype(bool), examples["right"].astype(bool)
    out = {}
    for name in names:
        mask = group == name
        if not mask.any():
            continue
        q10, q50, q90 = np.quantile(z[mask], [0.1, 0.5, 0.9]).tolist()
        out[name] = {"n": int(mask.sum()), "grad_weight": float(examples["weight"][mask].mean()),
                     "weight_share": float(examples["share"][mask].mean()), "saturated": float(saturated[mask].mean()),
                     "saturated_right": float((saturated & right)[mask].mean()),
                     "saturated_wrong": float((saturated & ~right)[mask].mean()), "z_q10": q10, "z_q50": q50, "z_q90": q90}
    return out


# Examples are followed in groups: by label (KTO) or as pairs (DPO) when clean, else by their tag.
GROUPS = ("desirable", "undesirable", "pairs", "flipped", "contradicted")
# The per-example stats of the losses that rows follow by group.
EXAMPLE_KEYS = ("z", "weight", "share", "saturated", "right")


def group_of(tag: int, desirable: int) -> str:
    """An example's group: its tag (data.TAGS) if a data setting changed it, else its class (desirable = -1
    for a DPO pair)."""
    return data.TAGS[tag] if tag else "pairs" if desirable < 0 else "desirable" if desirable else "undesirable"


def step_stats(micro_stats: list[dict[str, torch.Tensor]], micro_batches: list[dict[str, torch.Tensor]],
               loss_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step's stats on the device: its sums (sorted keys) and per-example rows (EXAMPLE_KEYS, tag,
    desirable) x n, desirable -1 for pairs."""
    sums = torch.stack([sum(s[k] for s in micro_stats).float() for k in sorted(micro_stats[0]) if micro_stats[0][k].dim() == 0])
    if "z" not in micro_stats[0]:
        return sums, None
    rows = []
    for s, b in zip(micro_stats, micro_batches):
        tag = b["tag"][0::2] if loss_name == "dpo" else b["tag"]  # DPO: one row per pair
        desirable = b["desirable"] if "desirable" in b else torch.full_like(tag, -1)
        rows.append(torch.stack([s[k].float() for k in EXAMPLE_KEYS] + [tag.float(), desirable.float()]))
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
        record = {**record, **summarize(dict(zip(keys, sums[i])))}
        if examples is not None:
            *values, tag, desirable = examples[i]
            groups = [group_of(int(t), int(d)) for t, d in zip(tag, desirable)]
            record["groups"] = group_summary(dict(zip(EXAMPLE_KEYS, values)), groups, GROUPS)
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
        parts += [f"grad weight {m['grad_weight']:.4f} ({100 * m['weight_share']:.0f}% of peak)", "saturated right/wrong side " +
                  " ".join(f"{name} {100 * g['saturated_right']:.0f}/{100 * g['saturated_wrong']:.0f}%"
                           for name, g in m["groups"].items())]
    return " | ".join(parts)


def append_rows(path: str, rows: list[dict]) -> None:
    """Append rows to metrics.jsonl as strict JSON: a non-finite number is an error, never a bare NaN."""
    with open(path, "a") as f:
        f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows)


def drop_rows(path: str, stale: Callable[[dict], bool]) -> None:
    """Rewrite metrics.jsonl without the rows `stale` picks (those a resumed stage will write again, say)
    and without lines a crash cut short (counted on stderr), through checkpoint.write_atomic."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept, broken = [], 0
    for line in lines:
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            row = None
        if not isinstance(row, dict):
            broken += 1
        elif not stale(row):
            kept.append(line)
    if broken:
        print(f"note: {path}: dropped {broken} unreadable lines (cut short by a crash?)", file=sys.stderr)
    if len(kept) < len(lines):
        checkpoint.write_atomic(path, lambda f: f.write("".join(kept).encode()))
