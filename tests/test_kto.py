"""The KTO loss against the paper's formulas, evaluated by hand."""
import math

import numpy as np
import pytest
import torch

import kto
import metrics


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


POLICY = [-3.0, -7.5, -1.2, -20.0, -4.4]
REFERENCE = [-4.0, -6.0, -1.0, -2.0, -9.4]
DESIRABLE = [True, True, False, False, True]


def sums(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The summed stats (0 dimensions), as train.py reduces them."""
    return {k: v.item() for k, v in stats.items() if v.dim() == 0}


def kl_pairs_with_mean(z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference log-probs of KL pairs whose log-ratios average to z."""
    return torch.tensor([z - 1.0, z + 3.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)


def test_loss_matches_eq7_by_hand():
    beta, lambda_d, lambda_u, z_ref = 0.5, 1.3, 0.7, 0.8
    expected = 0.0
    for p, r_, d in zip(POLICY, REFERENCE, DESIRABLE):
        reward = p - r_
        value = sigmoid(beta * (reward - z_ref)) if d else sigmoid(beta * (z_ref - reward))
        expected += (lambda_d if d else lambda_u) * (1 - value)
    expected /= len(POLICY)
    loss, stats = kto.kto_loss(torch.tensor(POLICY, dtype=torch.float64), torch.tensor(REFERENCE, dtype=torch.float64),
                               *kl_pairs_with_mean(z_ref), torch.tensor(DESIRABLE), beta, lambda_d, lambda_u)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    summary = metrics.summarize(sums(stats))
    assert summary["loss"] == pytest.approx(expected, rel=1e-12)
    assert summary["n_desirable"] == 3 and summary["n_undesirable"] == 2
    assert summary["reward_desirable"] == pytest.approx((1.0 - 1.5 + 5.0) / 3)
    assert summary["reward_undesirable"] == pytest.approx((-0.2 - 18.0) / 2)
    assert summary["z_ref"] == pytest.approx(z_ref) and summary["kl_raw"] == pytest.approx(z_ref)


def test_gradient_matches_prop_4_1():
    """d loss / d log pi_theta(y|x) = -/+ lambda * beta * s * (1 - s) / B (eq. 9)."""
    beta, lambda_d, lambda_u, z_ref = 0.5, 2.0, 1.0, 1.5
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    loss, stats = kto.kto_loss(policy, torch.tensor(REFERENCE, dtype=torch.float64), *kl_pairs_with_mean(z_ref),
                               torch.tensor(DESIRABLE), beta, lambda_d, lambda_u)
    loss.backward()
    expected, weights = [], []
    for p, r_, d in zip(POLICY, REFERENCE, DESIRABLE):
        s = sigmoid(beta * ((p - r_) - z_ref)) if d else sigmoid(beta * (z_ref - (p - r_)))
        lam = lambda_d if d else lambda_u
        weights.append(lam * beta * s * (1 - s))
        expected.append((-1 if d else 1) * weights[-1] / len(POLICY))
    assert policy.grad.tolist() == pytest.approx(expected, rel=1e-10)
    assert stats["grad_weight_sum"].item() == pytest.approx(sum(weights), rel=1e-10)
    # the fourth example (reward -18, undesirable) is far below z_ref: saturated
    assert stats["n_saturated"].item() == sum(w < 0.1 * (lambda_d if d else lambda_u) * beta / 4
                                              for w, d in zip(weights, DESIRABLE))
    assert stats["n_saturated"].item() >= 1


def test_gradient_matches_finite_differences():
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    args = (torch.tensor(REFERENCE, dtype=torch.float64), *kl_pairs_with_mean(0.3), torch.tensor(DESIRABLE), 0.2, 1.0, 1.5)
    kto.kto_loss(policy, *args)[0].backward()
    eps = 1e-6
    for i in range(len(POLICY)):
        up, down = list(POLICY), list(POLICY)
        up[i] += eps
        down[i] -= eps
        numeric = (kto.kto_loss(torch.tensor(up, dtype=torch.float64), *args)[0] -
                   kto.kto_loss(torch.tensor(down, dtype=torch.float64), *args)[0]).item() / (2 * eps)
        assert policy.grad[i].item() == pytest.approx(numeric, rel=1e-6, abs=1e-12)


def test_contradicting_feedback_gives_no_gradient():
    """The same (x, y) once desirable, once undesirable, lambda_D = lambda_U: zero gradient (eq. 9; cf. Theorem 4.3)."""
    logp = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)  # one (x, y), so one log pi_theta(y|x)
    loss, _ = kto.kto_loss(torch.stack([logp, logp]), torch.tensor([-5.0, -5.0], dtype=torch.float64),
                           *kl_pairs_with_mean(0.4), torch.tensor([True, False]), 0.1, 1.0, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.5)  # (1 - s) + (1 - (1 - s)) = 1, over 2 examples
    assert abs(logp.grad.item()) < 1e-15


def test_z_ref_is_clamped_mean_and_detached():
    policy_kl = torch.tensor([-3.0, -1.0, -2.5, -6.0], requires_grad=True)
    reference_kl = torch.tensor([-2.0, -1.5, -2.0, -4.0])
    z_ref, kl_raw = kto.kl_reference_point(policy_kl, reference_kl)
    assert kl_raw.item() == pytest.approx((-1.0 + 0.5 - 0.5 - 2.0) / 4)  # negative estimate
    assert z_ref.item() == 0.0  # the clamp engages
    assert not z_ref.requires_grad and not kl_raw.requires_grad

    z_ref, kl_raw = kto.kl_reference_point(torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0, -2.5]))
    assert z_ref.item() == pytest.approx(1.25) and kl_raw.item() == pytest.approx(1.25)
    # No gradient reaches the KL log-probs through the loss, and the loss reports the clamp.
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy_kl = torch.tensor([-4.0, -2.0], requires_grad=True)
    loss, stats = kto.kto_loss(policy, torch.tensor([-1.5, -1.0]), policy_kl, torch.tensor([-3.0, -2.5]),
                               torch.tensor([True, False]))
    loss.backward()
    assert policy_kl.grad is None and policy.grad is not None
    assert stats["kl_raw_sum"].item() == pytest.approx(-0.25) and stats["z_ref_sum"].item() == 0.0


def test_sequence_logps_sums_only_masked_tokens():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -8.0, -9.0]])
    mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    assert kto.sequence_logps(token_logps, mask).tolist() == [-5.0, -0.75]


def test_summary_of_a_one_class_batch_has_no_nan():
    _, stats = kto.kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([-1.0, -2.0]),
                            torch.tensor([-1.0, -2.0]), torch.tensor([True, True]))
    summary = metrics.summarize(sums(stats))
    assert summary["reward_undesirable"] is None and "margin" not in summary
    assert summary["reward_desirable"] == pytest.approx(-0.25)


def test_sft_loss_is_mean_negative_log_likelihood():
    loss, _ = kto.sft_loss(torch.tensor([-2.0, -4.0]))
    assert loss.item() == pytest.approx(3.0)


def test_per_example_z_weight_and_saturation_by_hand():
    beta, lambda_d, lambda_u, z_ref = 0.5, 2.0, 1.0, 1.5
    _, stats = kto.kto_loss(torch.tensor(POLICY, dtype=torch.float64), torch.tensor(REFERENCE, dtype=torch.float64),
                            *kl_pairs_with_mean(z_ref), torch.tensor(DESIRABLE), beta, lambda_d, lambda_u)
    for i, (p, r_, d) in enumerate(zip(POLICY, REFERENCE, DESIRABLE)):
        z = beta * ((p - r_) - z_ref)  # signed by reward, whatever the label
        lam = lambda_d if d else lambda_u
        v = sigmoid(z) if d else sigmoid(-z)
        assert stats["z"][i].item() == pytest.approx(z, rel=1e-12)
        assert stats["weight"][i].item() == pytest.approx(lam * beta * v * (1 - v), rel=1e-10)
        assert bool(stats["saturated"][i]) == (v * (1 - v) < 0.1 / 4)
    # example 4 (reward -18) is far below z_ref, example 5 (reward +5) fairly far above
    assert stats["saturated"].tolist() == [False, False, False, True, False]


def dpo_by_hand(chosen, rejected, ref_chosen, ref_rejected, beta):
    margins = [(c - rc) - (r - rr) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
    losses = [-math.log(sigmoid(beta * h)) for h in margins]
    return margins, sum(losses) / len(losses)


CHOSEN, REJECTED = [-3.0, -9.0, -1.0, -30.0], [-4.0, -2.0, -6.0, -1.0]
REF_CHOSEN, REF_REJECTED = [-3.5, -5.0, -2.0, -4.0], [-3.0, -4.0, -2.5, -3.0]


def test_dpo_loss_matches_its_formula_by_hand():
    beta = 0.3
    margins, expected = dpo_by_hand(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    loss, stats = kto.dpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)),
                               beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    summary = metrics.summarize(sums(stats))
    assert summary["loss"] == pytest.approx(expected, rel=1e-12)
    assert summary["reward_chosen"] == pytest.approx(sum(c - rc for c, rc in zip(CHOSEN, REF_CHOSEN)) / 4)
    assert summary["reward_rejected"] == pytest.approx(sum(r - rr for r, rr in zip(REJECTED, REF_REJECTED)) / 4)
    assert summary["ordered"] == sum(h > 0 for h in margins) / 4 == 0.5
    assert stats["z"].tolist() == pytest.approx([beta * h for h in margins], rel=1e-12)


def test_dpo_gradient_matches_its_closed_form():
    """d loss / d log pi(y_w|x) = -beta * sigmoid(-beta h) / P, and the opposite for y_l."""
    beta = 0.3
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    loss, stats = kto.dpo_loss(chosen, rejected, torch.tensor(REF_CHOSEN, dtype=torch.float64),
                               torch.tensor(REF_REJECTED, dtype=torch.float64), beta)
    loss.backward()
    margins, _ = dpo_by_hand(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    weights = [beta * sigmoid(-beta * h) for h in margins]
    assert chosen.grad.tolist() == pytest.approx([-w / 4 for w in weights], rel=1e-10)
    assert rejected.grad.tolist() == pytest.approx([w / 4 for w in weights], rel=1e-10)
    assert stats["weight"].tolist() == pytest.approx(weights, rel=1e-10)
    # the pair ordered far wrong (h = -36) keeps nearly the largest weight; only a pair ordered right saturates
    assert stats["saturated"].tolist() == [w < 0.1 * beta for w in weights] == [False, False, False, False]
    _, far = kto.dpo_loss(torch.tensor([0.0]), torch.tensor([-40.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta)
    assert far["saturated"].tolist() == [True]


def test_dpo_with_an_nll_term_matches_its_formula_and_gradient_by_hand():
    """RPO: -log sigmoid(beta h) - alpha log pi(y_w|x), mean over pairs; the NLL term adds -alpha / P to the
    chosen completion's gradient and nothing to the rejected one's."""
    beta, alpha = 0.3, 0.7
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    loss, stats = kto.dpo_loss(chosen, rejected, torch.tensor(REF_CHOSEN, dtype=torch.float64),
                               torch.tensor(REF_REJECTED, dtype=torch.float64), beta, alpha)
    margins, dpo = dpo_by_hand(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    assert loss.item() == pytest.approx(dpo - alpha * sum(CHOSEN) / 4, rel=1e-12)
    assert metrics.summarize(sums(stats))["loss"] == pytest.approx(loss.item(), rel=1e-12)
    loss.backward()
    weights = [beta * sigmoid(-beta * h) for h in margins]
    assert chosen.grad.tolist() == pytest.approx([-(w + alpha) / 4 for w in weights], rel=1e-10)
    assert rejected.grad.tolist() == pytest.approx([w / 4 for w in weights], rel=1e-10)


@pytest.mark.parametrize("n_d, n_u, expected", [(50, 50, (1.0, 1.0)), (40, 60, (1.5, 1.0)), (60, 50, (1.0, 1.0)),
                                                (5, 50, (10.0, 1.0)), (80, 20, (1.0, 3.0))])
def test_advised_lambdas_put_the_ratio_in_the_papers_range(n_d, n_u, expected):
    lambda_d, lambda_u = kto.advised_lambdas(n_d, n_u)
    assert (lambda_d, lambda_u) == pytest.approx(expected)
    assert 1 - 1e-12 <= lambda_d * n_d / (lambda_u * n_u) <= 4 / 3 + 1e-12
    assert min(lambda_d, lambda_u) == 1.0


def test_group_summary_by_hand():
    examples = {"z": np.array([-3.0, 1.0, 2.0, 0.5, 10.0]), "weight": np.array([0.1, 0.2, 0.3, 0.4, 0.0]),
                "share": np.array([0.4, 0.8, 1.0, 0.2, 0.0]), "saturated": np.array([0.0, 0.0, 0.0, 0.0, 1.0]),
                "right": np.array([0.0, 1.0, 1.0, 1.0, 0.0])}
    out = metrics.group_summary(examples, ["desirable", "flipped", "desirable", "desirable", "flipped"],
                                ("desirable", "undesirable", "flipped"))
    assert list(out) == ["desirable", "flipped"]
    assert out["desirable"]["n"] == 3 and out["desirable"]["grad_weight"] == pytest.approx((0.1 + 0.3 + 0.4) / 3)
    assert out["desirable"]["weight_share"] == pytest.approx((0.4 + 1.0 + 0.2) / 3)
    assert out["desirable"]["z_q50"] == 0.5 and out["flipped"]["saturated"] == 0.5
    # the flipped example at z = 10 is saturated on the wrong side, none on the right
    assert out["flipped"]["saturated_wrong"] == 0.5 and out["flipped"]["saturated_right"] == 0.0
    # numpy's default (linear) quantile of (-3, 0.5, 2) at 10%: -3 + 0.2 * 3.5
    assert out["desirable"]["z_q10"] == pytest.approx(-2.3)


@pytest.mark.parametrize("value", ["sigmoid", "logsigmoid", "linear"])
def test_each_value_function_and_its_gradient_by_hand(value):
    """u = beta (r - z_ref) signed by the label; loss and d loss / d log pi per value function, by hand."""
    beta, lambda_d, lambda_u, z_ref = 0.5, 2.0, 1.0, 1.5
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    loss, stats = kto.kto_loss(policy, torch.tensor(REFERENCE, dtype=torch.float64), *kl_pairs_with_mean(z_ref),
                               torch.tensor(DESIRABLE), beta, lambda_d, lambda_u, value)
    loss.backward()
    expected_loss, expected_grad, shares, right = 0.0, [], [], []
    for p, r_, d in zip(POLICY, REFERENCE, DESIRABLE):
        u = beta * ((p - r_) - z_ref) * (1 if d else -1)
        lam, sign = (lambda_d, -1) if d else (lambda_u, 1)
        if value == "sigmoid":
            ell, du, peak = 1 - sigmoid(u), -sigmoid(u) * (1 - sigmoid(u)), beta / 4
        elif value == "logsigmoid":
            ell, du, peak = -math.log(sigmoid(u)), -(1 - sigmoid(u)), beta
        else:
            ell, du, peak = 1 - (0.5 + u / 4), -0.25, beta / 4
        expected_loss += lam * ell / len(POLICY)
        weight = -lam * du * beta  # |d loss_i / d log pi| = lambda beta |d ell / du|
        expected_grad.append(sign * weight / len(POLICY))
        shares.append(weight / (lam * peak))
        right.append(u > 0)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert policy.grad.tolist() == pytest.approx(expected_grad, rel=1e-10)
    assert stats["share"].tolist() == pytest.approx(shares, rel=1e-10)
    assert stats["right"].tolist() == right == [False, False, True, True, True]
    saturated = [s < 0.1 for s in shares]
    assert stats["saturated"].tolist() == saturated
    assert stats["n_saturated_right"].item() == sum(s and r for s, r in zip(saturated, right))
    assert stats["n_saturated_wrong"].item() == sum(s and not r for s, r in zip(saturated, right))
    # example 4 (undesirable, reward -18 far below z_ref: the right side) saturates but under the linear value
    assert saturated[3] == (value != "linear") and (value != "linear" or not any(saturated))


def test_saturation_by_side_on_hand_made_z():
    """A desirable example far above z_ref saturates on the right side, far below on the wrong one; the same
    for an undesirable one mirrored. z_ref = 0; log-ratios of +-40 nats at beta 0.5 give |z| = 20."""
    zero = torch.zeros(4, dtype=torch.float64)
    logratio = torch.tensor([40.0, -40.0, -40.0, 40.0], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    _, stats = kto.kto_loss(logratio, zero, zero, zero, desirable, beta=0.5)
    assert stats["saturated"].tolist() == [True] * 4
    assert stats["right"].tolist() == [True, False, True, False]
    assert stats["n_saturated_right"].item() == 2 and stats["n_saturated_wrong"].item() == 2
    _, stats = kto.kto_loss(logratio, zero, zero, zero, desirable, beta=0.5, value="logsigmoid")
    assert stats["saturated"].tolist() == [True, False, True, False]  # only the right side, like DPO
    _, stats = kto.dpo_loss(logratio[:2], torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                            torch.zeros(2, dtype=torch.float64), beta=0.5)
    assert stats["saturated"].tolist() == [True, False] and stats["right"].tolist() == [True, False]
