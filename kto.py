"""The KTO objective of Ethayarajh et al. 2024 (arXiv 2402.01306), equation by equation, and DPO beside it.

Convention: beta sits outside the log-ratio. The reward r and the reference point z_ref are plain
log-ratios (nats) and beta multiplies their difference inside the sigmoid. The paper's text with eq. (7)
writes r = beta * log-ratio and z_ref = beta * KL, and the loss as w(y) (1 - v) with w = lambda_D or lambda_U;
a later arXiv revision puts beta outside, as here, and folds lambda_y into v (lambda_y - v). The loss is the
same in all three.

Every function is pure apart from the all-reduce in `kl_reference_point`, which averages over the
processes that share a batch.

The losses return (loss, stats). Stats of 0 dimensions are sums and counts, which add up across
micro-batches and ranks (metrics.py turns them into means); stats of 1 dimension are per example (per
pair for DPO): z, the gradient weight of Prop. 4.1, its share of the largest, whether it is saturated, and
whether it lies on the side its label asks for.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

# An example is "saturated" when its gradient weight is below this fraction of the largest weight the
# loss can give (KTO: lambda_y * beta / 4 at r = z_ref; DPO: beta, for a pair ordered far wrong).
# Saturated examples are counted by side: "right" (the loss already rates them as their label asks:
# desirable above z_ref, undesirable below, a pair ordered right) or "wrong".
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
    total = _sum_over_ranks(torch.stack([log_ratios.sum(), torch.full((), float(log_ratios.numel()), device=log_ratios.device)]))
    kl_raw = total[0] / total[1]
    return kl_raw.clamp(min=0), kl_raw


# The value functions: eq. (7)'s sigmoid, and two ablations as the authors' code had them for ablations.
# u = beta (r - z_ref) for a desirable example, beta (z_ref - r) for an undesirable one: u > 0 on the right side.
#   sigmoid     v = sigmoid(u)        weight lambda beta v (1 - v): vanishes on both sides (Prop. 4.1)
#   logsigmoid  loss -lambda log v    weight lambda beta (1 - v): vanishes only on the right side, like DPO
#   linear      v = 1/2 + u/4         weight lambda beta / 4 for every u: the sigmoid's tangent at the reference
#                                     point, the same weight there and never saturating (unbounded below)
VALUES = ("sigmoid", "logsigmoid", "linear")


def side_stats(weight: torch.Tensor, peak: torch.Tensor, right: torch.Tensor,
               score_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Saturation split by side: an example is saturated when its weight is below SATURATION_FRACTION of the
    loss's largest (`peak`), "right" when the loss already rates it on the side its label asks for. Sums and
    per-example values (`share`: weight as a share of the peak, the continuous measure). A score weight
    (see `kto_loss`) scales the weights reported, not the share: saturation is the value function's."""
    share = weight / peak
    saturated = share < SATURATION_FRACTION
    weight = weight if score_weight is None else weight * score_weight
    return {"grad_weight_sum": weight.sum(), "weight_share_sum": share.sum(), "n_saturated": saturated.float().sum(),
            "n_saturated_right": (saturated & right).float().sum(), "n_saturated_wrong": (saturated & ~right).float().sum(),
            "weight": weight, "share": share, "saturated": saturated, "right": right}


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    value: str = "sigmoid",
    score_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KTO loss, eq. (7), and the stats that describe it.

    policy_logps, reference_logps: (B,) log pi(y|x) of each example's own completion.
    policy_kl_logps, reference_kl_logps: log-probs of the mismatched KL pairs (see `kl_reference_point`).
    desirable: (B,) bool, the label of each example.
    value: "sigmoid" (eq. 7) or an ablation, "logsigmoid" or "linear" (see VALUES).
    score_weight: (B,) or None: score-based feedback's one factor s on each example's term of eq. (7), the
    margin |score - threshold| normalised to a mean of 1 in each class (data.margin_weights), so that
    lambda_D n_D / (lambda_U n_U) keeps its meaning. None: s = 1, the paper's loss.

    Returns the mean over examples of s * lambda(y) * (1 - v(x, y)) and the stats (see the module docstring),
    per example: z = beta * (r - z_ref), the weight s * lambda(y) * beta * v * (1 - v), its share of the peak,
    `saturated` and `right` (see `side_stats`).
    The mean is over this rank's examples; DDP's average of the ranks' gradients is then the global mean
    because every rank holds an equal share of the batch (train.run refuses anything else).
    """
    if value not in VALUES:
        raise ValueError(f"value={value!r}: expected one of {', '.join(VALUES)}")
    z_ref, kl_raw = kl_reference_point(policy_kl_logps, reference_kl_logps)
    r = implied_reward(policy_logps, reference_logps)
    # The value function v of eq. (7): desirable outputs gain value above the reference point,
    # undesirable ones below it.
    u = torch.where(desirable, beta * (r - z_ref), beta * (z_ref - r))
    lam = torch.where(desirable, torch.full_like(r, lambda_d), torch.full_like(r, lambda_u))
    if value == "sigmoid":
        v = torch.sigmoid(u)
        losses = lam * (1 - v)  # eq. (7): w(y) (1 - v), w = lambda_D or lambda_U
        # Prop. 4.1 / eq. (9): d loss / d log pi_theta(y|x) = -/+ lambda(y) * beta * v * (1 - v):
        # near zero for examples whose reward is far from z_ref on either side (saturation).
        weight, peak = lam * beta * v * (1 - v), lam * beta / 4
    elif value == "logsigmoid":
        losses = -lam * F.logsigmoid(u)
        weight, peak = lam * beta * torch.sigmoid(-u), lam * beta
    else:
        losses = lam * (1 - (0.5 + u / 4))
        weight, peak = lam * beta / 4, lam * beta / 4
    if score_weight is not None:
        losses = score_weight * losses  # s (1 - v) lambda(y): eq. (9)'s gradient weight gains the same factor
    loss = losses.mean()

    r, d, un = r.detach(), desirable.float(), (~desirable).float()
    stats = {
        "loss_sum": losses.detach().sum(),
        "n": torch.full((), float(r.numel()), device=r.device),
        "n_desirable": d.sum(),
        "n_undesirable": un.sum(),
        "reward_desirable_sum": (r * d).sum(),
        "reward_undesirable_sum": (r * un).sum(),
        "kl_raw_sum": kl_raw,  # z_ref and the raw estimate, once per batch: the clamp shows when they differ
        "z_ref_sum": z_ref,
        "n_batches": torch.ones((), device=r.device),
        "z": beta * (r - z_ref),
        **side_stats(torch.broadcast_to(weight, r.shape).detach(), peak, u.detach() > 0, score_weight),
    }
    return loss, stats


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss (Rafailov et al. 2023, eq. 7), for comparison, and the stats that describe it.

    Each argument is (P,): log pi(y|x) of the chosen (y_w) or rejected (y_l) completion of P pairs.
    The loss is the mean over pairs of -log sigmoid(beta * h), h the margin of implied rewards
    r(x, y_w) - r(x, y_l) (nats, beta outside as in `kto_loss`), plus nll_weight times the negative
    log-likelihood of y_w, summed over its tokens like `sft_loss` (after RPO, Pang et al. 2024, and TRL's loss_type
    ["sigmoid", "sft"], which average over the tokens instead): it holds the chosen completion's probability up, against likelihood displacement,
    where the margin grows while both completions lose probability. Per pair: z = beta * h, the weight and
    `saturated` of the preference term.
    """
    r_chosen = implied_reward(policy_chosen_logps, reference_chosen_logps)
    r_rejected = implied_reward(policy_rejected_logps, reference_rejected_logps)
    z = beta * (r_chosen - r_rejected)
    losses = -F.logsigmoid(z) - nll_weight * policy_chosen_logps
    loss = losses.mean()

    # d loss / d log pi_theta(y_w|x) = -beta * sigmoid(-z) - nll_weight, and +beta * sigmoid(-z) for y_l: the weight is largest
    # for pairs ordered wrong and vanishes only once a pair is ordered right by a wide margin. Unlike
    # KTO's, it never saturates on the wrong side (see the `value` lesson).
    weight = (beta * torch.sigmoid(-z)).detach()
    z = z.detach()
    stats = {
        "loss_sum": losses.detach().sum(),
        "n": torch.full((), float(z.numel()), device=z.device),
        "reward_chosen_sum": r_chosen.detach().sum(),
        "reward_rejected_sum": r_rejected.detach().sum(),
        "n_ordered": (z > 0).float().sum(),  # pairs whose chosen completion already has the larger reward
        "z": z,
        **side_stats(weight, torch.full_like(z, beta), z > 0),
    }
    return loss, stats


def sft_loss(policy_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning: the negative log-likelihood of each completion, mean over examples."""
    losses = -policy_logps
    stats = {"loss_sum": losses.detach().sum(), "n": torch.full((), float(losses.numel()), device=losses.device)}
    return losses.mean(), stats


def advised_lambdas(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """The paper's advice (section 4.1, eq. 8): lambda_D n_D / (lambda_U n_U) in [1, 4/3], one lambda at 1.

    Data already in range keeps lambda_D = lambda_U = 1; otherwise the smaller class is weighted up
    just enough to reach the nearer end of the range.
    """
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if ratio < 1:
        return 1 / ratio, 1.0
    if ratio > 4 / 3:
        return 1.0, ratio * 3 / 4
    return 1.0, 1.0
