"""The KTO objective of Ethayarajh et al. 2024 (arXiv 2402.01306), equation by equation.

Convention: beta sits outside the log-ratio. The reward r and the reference point z_ref are plain
log-ratios (nats) and beta multiplies their difference inside the sigmoid. The paper writes
r = beta * log-ratio and z_ref = beta * KL; the value function is the same.

Every function is pure apart from the all-reduce in `kl_reference_point`, which averages over the
processes that share a batch.
"""
import torch
import torch.distributed as dist

# An example is "saturated" when its Prop. 4.1 gradient weight is below this fraction of its peak.
SATURATION_FRACTION = 0.1


def sequence_logps(token_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x): per-token log-probs (B, T) summed over completion tokens only -> (B,).

    The mask covers the completion and the EOT that ends it; prompt and padding are 0.
    Summed, not averaged: the paper's policy likelihood is of the whole completion.
    """
    return (token_logps * completion_mask).sum(dim=-1)


def implied_reward(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """r(x, y) = log pi_theta(y|x) - log pi_ref(y|x), in nats (beta is applied in `kto_loss`)."""
    return policy_logps - reference_logps


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def kl_reference_point(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference point z_ref: an estimate of KL(pi_theta || pi_ref).

    The inputs are log-probs of mismatched pairs (x_i, y_j), j != i, built inside the batch.
    Returns (z_ref, kl_raw):
      kl_raw = mean over all pairs on all ranks of log pi_theta - log pi_ref. Summing the values and
               the count over ranks, then dividing, gives the same estimate however many processes
               share the batch.
      z_ref  = max(0, kl_raw), detached: a KL divergence is never negative (the estimate can be, from
               a small batch, or because the policy rightly finds completions written for other
               prompts less likely than the reference does), and the paper holds the reference
               point constant, so no gradient flows through it.
    """
    log_ratios = (policy_kl_logps - reference_kl_logps).detach()
    total = _sum_over_ranks(torch.stack([log_ratios.sum(), torch.tensor(float(log_ratios.numel()), device=log_ratios.device)]))
    kl_raw = total[0] / total[1]
    return kl_raw.clamp(min=0), kl_raw


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KTO loss, eq. (7), and the per-batch sums that describe it.

    policy_logps, reference_logps: (B,) log pi(y|x) of each example's own completion.
    policy_kl_logps, reference_kl_logps: log-probs of the mismatched KL pairs (see `kl_reference_point`).
    desirable: (B,) bool, the label of each example.

    Returns the mean over examples of lambda(y) * (1 - v(x, y)) and a dict of sums and counts,
    which add up across micro-batches and ranks (see `summarize`).
    """
    z_ref, kl_raw = kl_reference_point(policy_kl_logps, reference_kl_logps)
    r = implied_reward(policy_logps, reference_logps)
    # The value function of eq. (7) (the paper folds lambda_y into v): desirable outputs gain value
    # above the reference point, undesirable ones below it.
    v = torch.where(desirable, torch.sigmoid(beta * (r - z_ref)), torch.sigmoid(beta * (z_ref - r)))
    lam = torch.where(desirable, torch.full_like(r, lambda_d), torch.full_like(r, lambda_u))
    losses = lam * (1 - v)  # eq. (7)
    loss = losses.mean()

    # Prop. 4.1 / eq. (9): d loss / d log pi_theta(y|x) = -/+ lambda(y) * beta * v * (1 - v):
    # near zero for examples whose reward is far from z_ref on either side (saturation).
    weight = (lam * beta * v * (1 - v)).detach()
    saturated = weight < SATURATION_FRACTION * lam * beta / 4
    r, d, u = r.detach(), desirable.float(), (~desirable).float()
    stats = {
        "loss_sum": losses.detach().sum(),
        "n": torch.tensor(float(r.numel()), device=r.device),
        "n_desirable": d.sum(),
        "n_undesirable": u.sum(),
        "reward_desirable_sum": (r * d).sum(),
        "reward_undesirable_sum": (r * u).sum(),
        "grad_weight_sum": weight.sum(),
        "n_saturated": saturated.float().sum(),
        "kl_raw_sum": kl_raw,  # z_ref and the raw estimate, once per batch: the clamp shows when they differ
        "z_ref_sum": z_ref,
        "n_batches": torch.ones((), device=r.device),
    }
    return loss, stats


def sft_loss(policy_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning: the negative log-likelihood of each completion, mean over examples."""
    losses = -policy_logps
    stats = {"loss_sum": losses.detach().sum(), "n": torch.tensor(float(losses.numel()), device=losses.device)}
    return losses.mean(), stats


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
            grad_weight=mean("grad_weight_sum", "n"),
            saturated=mean("n_saturated", "n"),
            n_desirable=sums["n_desirable"],
            n_undesirable=sums["n_undesirable"],
        )
        if out["reward_desirable"] is not None and out["reward_undesirable"] is not None:
            out["margin"] = out["reward_desirable"] - out["reward_undesirable"]
    return out
