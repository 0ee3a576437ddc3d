"""The KTO loss against the paper's formulas, evaluated by hand."""
import math

import pytest
import torch

import kto


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


POLICY = [-3.0, -7.5, -1.2, -20.0, -4.4]
REFERENCE = [-4.0, -6.0, -1.0, -2.0, -9.4]
DESIRABLE = [True, True, False, False, True]


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
    summary = kto.summarize({k: v.item() for k, v in stats.items()})
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
    summary = kto.summarize({k: v.item() for k, v in stats.items()})
    assert summary["reward_undesirable"] is None and "margin" not in summary
    assert summary["reward_desirable"] == pytest.approx(-0.25)


def test_sft_loss_is_mean_negative_log_likelihood():
    loss, _ = kto.sft_loss(torch.tensor([-2.0, -4.0]))
    assert loss.item() == pytest.approx(3.0)
