"""Score-based feedback: scored files in each shape, thresholds, the noisy rater, margin weights and their loss."""
import json
import math
import os

import pytest
import torch

import config
import data
import dataset
import kto
import task
import train
from test_dataset import write_jsonl
from test_train import TINY, metrics, run


def test_each_scored_shape_reads_its_scores(tmp_path):
    unpaired = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"prompt": "q", "completion": " a", "score": 4}),
                                                  json.dumps({"prompt": "q", "completion": " b", "score": -1.5})])
    assert dataset.read_jsonl(unpaired)[0] == [data.Example("q", " a", None, f"{unpaired}:1", 4.0),
                                               data.Example("q", " b", None, f"{unpaired}:2", -1.5)]
    helpsteer = {"prompt": "q", "response": " a", "helpfulness": 3, "correctness": 4, "coherence": 4}
    path = write_jsonl(tmp_path / "h.jsonl", [json.dumps(helpsteer)])
    assert dataset.read_jsonl(path, "helpfulness")[0] == [data.Example("q", " a", None, f"{path}:1", 3.0)]
    assert dataset.read_jsonl(path, "correctness")[0][0].score == 4.0
    paired = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "q", "chosen": " a", "rejected": " b",
                                                            "score_chosen": 7.5, "score_rejected": 7.5})])
    assert dataset.read_jsonl(paired)[0] == [data.Pair("q", " a", " b", f"{paired}:1", 7.5, 7.5)]


@pytest.mark.parametrize("row, expected", [
    ('{"prompt": "q", "completion": " a", "score": "4"}', "field 'score': expected a finite JSON number, got \"4\""),
    ('{"prompt": "q", "completion": " a", "score": true}', "field 'score': expected a finite JSON number, got true"),
    ('{"prompt": "q", "completion": " a", "score": null}', "field 'score': expected a finite JSON number, got null"),
    ('{"prompt": "q", "completion": " a", "score": NaN}', "field 'score': expected a finite JSON number, got NaN"),
    ('{"prompt": "q", "completion": " a", "score": -Infinity}', "field 'score': expected a finite JSON number"),
    ('{"prompt": "q", "completion": " a", "score": 1e400}', "field 'score': expected a finite JSON number"),
    ('{"prompt": "q", "completion": " a", "score": 1' + "0" * 400 + '}', "field 'score': expected a finite JSON number"),
    ('{"prompt": "q", "completion": " a", "score": [4]}', "field 'score': expected a finite JSON number"),
    ('{"prompt": "q", "completion": " a", "score": 4, "label": true}', "fields 'label' and 'score' both given"),
    ('{"prompt": "q", "completion": " a", "response": " b", "score": 4}', "fields 'completion' and 'response' both given"),
    ('{"prompt": "q", "completion": " a", "label": true}', "an unpaired row in a file whose first row"),
])
def test_malformed_scores_are_one_error_naming_file_line_and_field(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "q", "completion": " a", "score": 1}), row])
    with pytest.raises(data.DataError) as err:
        dataset.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "q", "chosen": " a", "rejected": " b", "score_chosen": 2}, "field 'score_rejected' is missing"),
    ({"prompt": "q", "chosen": " a", "rejected": " b", "score_chosen": 2, "score_rejected": "1"}, "field 'score_rejected': expected"),
    ({"prompt": "q", "chosen": " a", "rejected": " b"}, "a paired row in a file whose first row"),
])
def test_malformed_paired_scores_are_one_error(tmp_path, row, expected):
    first = {"prompt": "q", "chosen": " a", "rejected": " b", "score_chosen": 2, "score_rejected": 1}
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(first), json.dumps(row)])
    with pytest.raises(data.DataError) as err:
        dataset.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and expected in str(err.value) and "\n" not in str(err.value)


def scored(scores: list[float]) -> list[data.Tokens]:
    return [data.Tokens([i], [100 + i, data.EOT], None, score=s) for i, s in enumerate(scores)]


@pytest.mark.parametrize("threshold, value, desirable, at", [
    (4, 4.0, [4, 6], 1),  # a number: at least it is desirable
    ("median", 2.0, [2, 2, 4, 6], 2),  # the median is 2; both 2s are at it, and desirable
    ("mean", 3.0, [4, 6], 0),  # (1 + 2 + 2 + 4 + 6) / 5
])
def test_thresholds_keep_exactly_the_examples_they_should(threshold, value, desirable, at):
    units, t, report = data.rate(scored([1, 2, 2, 4, 6]), threshold, 0.0, 1337, dpo=False)
    assert t == value and len(units) == 5
    assert sorted(u.score for u in units if u.desirable) == desirable
    assert all(u.tag == "clean" for u in units) and [u.completion for u in units] == [[100 + i, data.EOT] for i in range(5)]
    assert f"{len(desirable) - at} above, {at} at it (desirable: at least the threshold), {5 - len(desirable)} below" in report[0]


def test_dpo_pairs_are_ordered_by_score_and_ties_dropped():
    pairs = [data.PairTokens([1], [10], [11], score_chosen=8, score_rejected=2),
             data.PairTokens([2], [20], [21], score_chosen=3, score_rejected=5),
             data.PairTokens([3], [30], [31], score_chosen=4, score_rejected=4)]
    out, t, report = data.rate(pairs, "mean", 0.0, 1337, dpo=True)
    assert t == pytest.approx(26 / 6)
    assert out == [data.PairTokens([1], [10], [11], "clean", 8, 2), data.PairTokens([2], [21], [20], "clean", 5, 3)]
    assert "2 pairs ordered by score (1 with the rejected completion scored higher, swapped); 1 ties dropped" in report[1]
    # For KTO the same pairs are six examples, each labelled by its own score against the threshold
    examples, _, _ = data.rate(pairs, "mean", 0.0, 1337, dpo=False)
    assert [(e.completion, e.desirable) for e in examples] == [([10], True), ([11], False), ([20], False),
                                                               ([21], True), ([30], False), ([31], False)]


def test_the_noisy_rater_mislabels_mostly_near_the_threshold():
    """Gaussian noise of sd 0.2: an example 0.05 above the threshold flips with probability Phi(-0.25) = 0.401,
    one 1.0 above with Phi(-5) < 1e-6. 2000 of each: the 99.9% binomial band of 0.401 is about +-0.036."""
    near, far = [0.55] * 2000, [1.5] * 2000
    units, t, report = data.rate(scored(near + far), 0.5, 0.2, 1337, dpo=False)
    flipped = [u.tag == "flipped" for u in units]
    assert all(f == (not u.desirable) for f, u in zip(flipped, units))  # all were desirable without the noise
    assert abs(sum(flipped[:2000]) / 2000 - 0.401) < 0.036 and sum(flipped[2000:]) == 0
    noise = torch.tensor([u.score - s for u, s in zip(units, near + far)])
    assert abs(noise.std().item() - 0.2) < 0.01 and abs(noise.mean().item()) < 0.01
    assert f"score_noise=0.2: {sum(flipped)} labels differ" in report[-1]
    again, _, _ = data.rate(scored(near + far), 0.5, 0.2, 1337, dpo=False)
    assert again == units  # seeded


def test_margin_weights_by_hand():
    examples = [data.Tokens([0], [1], True, score=0.9), data.Tokens([0], [2], True, score=0.6),
                data.Tokens([0], [3], False, score=0.2), data.Tokens([0], [4], False, score=0.45)]
    weights = [ex.weight for ex in data.margin_weights(examples, 0.5)]
    # desirable margins 0.4, 0.1 (mean 0.25); undesirable 0.3, 0.05 (mean 0.175)
    assert weights == pytest.approx([1.6, 0.4, 0.3 / 0.175, 0.05 / 0.175])
    assert sum(weights[:2]) / 2 == pytest.approx(1) and sum(weights[2:]) / 2 == pytest.approx(1)
    ties = [data.Tokens([0], [1], True, score=0.5), data.Tokens([0], [2], False, score=0.1)]
    with pytest.raises(data.DataError, match="every desirable example scores exactly the threshold 0.5"):
        data.margin_weights(ties, 0.5)


def test_the_weighted_loss_and_its_gradient_by_hand():
    """loss = mean s * lambda_y * (1 - sigmoid(u)); d loss / d log pi_theta(y|x) = -/+ s lambda_y beta v (1 - v) / B."""
    beta, lambda_d, lambda_u = 0.5, 1.5, 0.8
    policy = torch.tensor([-3.0, -5.0, -2.0, -7.0], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([-4.0, -4.5, -2.5, -6.0], dtype=torch.float64)
    kl_policy, kl_reference = torch.tensor([-9.0, -8.0], dtype=torch.float64), torch.tensor([-9.4, -8.2], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    s = torch.tensor([1.6, 0.4, 1.2, 0.8], dtype=torch.float64)
    loss, stats = kto.kto_loss(policy, reference, kl_policy, kl_reference, desirable, beta, lambda_d, lambda_u, score_weight=s)
    loss.backward()
    z_ref = 0.3  # mean of 0.4 and 0.2
    expected_loss, expected_grad = 0.0, []
    for p, r, d, w in zip(policy.tolist(), reference.tolist(), desirable.tolist(), s.tolist()):
        u = beta * ((p - r) - z_ref) * (1 if d else -1)
        v = 1 / (1 + math.exp(-u))
        lam = lambda_d if d else lambda_u
        expected_loss += w * lam * (1 - v) / 4
        expected_grad.append((-1 if d else 1) * w * lam * beta * v * (1 - v) / 4)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert policy.grad.tolist() == pytest.approx(expected_grad, rel=1e-12)
    assert (stats["weight"] * torch.tensor([-1, -1, 1, 1]) / 4).tolist() == pytest.approx(expected_grad, rel=1e-12)
    plain, plain_stats = kto.kto_loss(policy, reference, kl_policy, kl_reference, desirable, beta, lambda_d, lambda_u)
    assert torch.equal(plain_stats["share"], stats["share"])  # saturation is the value function's, whatever s


def test_the_built_in_tasks_rate_as_their_judge_labels():
    prompt = "Q: Ann had 3 apples, got 4 more. Total? A:"
    assert [task.rating(prompt, c) for c in (" 7", " 8", " 5", " 10", " seven")] == pytest.approx(
        [1, math.exp(-1), math.exp(-2), math.exp(-3), 0])
    lists = "Q: Bob wants 3 different numbers for his cards. A:"
    assert task.rating(lists, " 13 58 13") == task.judge(lists, " 13 58 13") == pytest.approx(2 / 3)
    for name in task.TASKS:
        examples, _, _ = task.make_task(name, 1337)
        assert all((ex.score >= task.DESIRABLE_SCORE) == ex.desirable for ex in examples)
        pairs, _, _ = task.make_task(name, 1337, demos=4)
        assert all(p.score_chosen >= 0.5 > p.score_rejected for p in pairs)


def test_config_reads_thresholds_and_refuses_what_cannot_run(tmp_path):
    assert config.parse_config(["--score_threshold=median"]).score_threshold == "median"
    assert config.parse_config(["--score_threshold=0.25"]).score_threshold == 0.25
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"score_threshold": 3, "score_weight": "margin", "score_noise": 0.1}))
    cfg = config.parse_config([str(preset)])
    assert (cfg.score_threshold, cfg.score_weight, cfg.score_noise) == (3.0, "margin", 0.1)
    for args, message in ((["--score_threshold=middle"], "score_threshold='middle': expected a finite number, 'median'"),
                          (["--score_threshold=nan"], "score_threshold=nan: expected a finite number"),
                          (["--score_noise=0.1"], "score_noise=0.1: expected 0 unless score_threshold is set"),
                          (["--score_weight=margin", "--score_threshold=1", "--loss=dpo"], "score_weight='margin': expected 'none' unless loss='kto'"),
                          (["--score_weight=stars", "--score_threshold=1"], "expected 'none' or 'margin'")):
        with pytest.raises(SystemExit, match=message):
            config.parse_config(args)


def scored_file(path, n: int = 24) -> str:
    rows = [{"prompt": f"Q: {i % 12} plus one? A:", "response": f" {i % 12 + 1 + (i >= 12)}",
             "helpfulness": (i * 7) % 5} for i in range(n)]
    return write_jsonl(path, [json.dumps(r) for r in rows])


def test_load_labels_a_scored_file_and_weighs_it(tmp_path):
    path = scored_file(tmp_path / "h.jsonl")
    base = ["--batch_size=4", f"--data={path}", "--score_field=helpfulness"]
    with pytest.raises(data.DataError, match="rows carry scores; expected score_threshold=NUMBER, median or mean"):
        dataset.load(config.parse_config(base))
    d = dataset.load(config.parse_config(base + ["--score_threshold=median", "--score_weight=margin"]))
    scores = [(i * 7) % 5 for i in range(24)]  # 0..4, each 4 or 5 times: the median is 2
    assert sorted(ex.score for ex in d.main) == sorted(scores)
    assert all(ex.desirable == (ex.score >= 2) for ex in d.main)
    for label in (True, False):
        mine = [ex for ex in d.main if ex.desirable == label]
        mean_margin = sum(abs(ex.score - 2) for ex in mine) / len(mine)
        assert [ex.weight for ex in mine] == pytest.approx([abs(ex.score - 2) / mean_margin for ex in mine])
    assert [ex.completion for ex in d.sft] == [ex.completion for ex in d.main]  # SFT sees every completion as read
    assert any("of 24 scores 9 above, 5 at it" in line for line in d.report)
    with pytest.raises(data.DataError, match="but the rows carry labels, not scores"):
        dataset.load(config.parse_config(["--score_threshold=0.5", "--data=" + write_jsonl(
            tmp_path / "l.jsonl", [json.dumps({"prompt": "q", "completion": f" {i}", "label": True}) for i in range(4)])]))


def test_train_with_margin_weights_and_dpo_by_score(tmp_path):
    path = scored_file(tmp_path / "h.jsonl")
    args = TINY + [f"--data={path}", "--score_field=helpfulness", "--score_threshold=mean", "--sft_iters=2", "--max_iters=3",
                   "--batch_size=4"]
    result = run(args + ["--score_weight=margin", f"--out_dir={tmp_path / 'k'}"])
    assert "score_weight=margin: desirable weights from" in result.stdout
    assert [r["iter"] for r in metrics(tmp_path / "k", "kto")] == [1, 2, 3]
    cfg, d = train.prepare(config.parse_config(args + ["--score_weight=margin"]))
    batch = data.make_batch([d.main[i] for i in data.batch_indices(len(d.main), 4, 0, cfg.seed)], cfg.block_size, True)
    assert batch["weight"].tolist() == pytest.approx([d.main[i].weight for i in data.batch_indices(len(d.main), 4, 0, cfg.seed)])
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q: {i}? A:", "chosen": f" {i}", "rejected": f" {i + 1}",
                                         "score_chosen": i % 3, "score_rejected": 1}) + "\n" for i in range(12)))
    result = run(TINY + [f"--data={pairs}", "--score_threshold=1", "--loss=dpo", "--sft_iters=1", "--max_iters=2",
                         "--batch_size=4", f"--out_dir={tmp_path / 'd'}"])
    assert "DPO: 8 pairs ordered by score (4 with the rejected completion scored higher, swapped); 4 ties dropped" in result.stdout
    assert os.path.exists(tmp_path / "d" / "dpo.pt")
