"""The contest's statistics by hand, and `tune` end to end on a tiny grid: the choice is the dev table's best."""
import dataclasses
import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

import config
import experiments
import stats
import tune

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--sft_iters=3", "--max_iters=12", "--eval_samples=1",
        "--warmup_iters=0", "--log_interval=4", "--utility_interval=4", "--task_dev=0.02", "--task_heldout=0.02", "--batch_size=8"]


def test_t_interval_and_paired_verdicts_by_hand():
    # [1..5]: mean 3, sd sqrt(2.5), half-width t(0.95, 4) = 2.132 times sd / sqrt(5) = 1.5076
    mean, low, high = stats.interval([1, 2, 3, 4, 5])
    assert mean == 3 and low == pytest.approx(3 - 1.5076, abs=1e-4) and high == pytest.approx(3 + 1.5076, abs=1e-4)
    assert stats.interval([0.7]) == (0.7, 0.7, 0.7)
    # differences 1, 2, 3: mean 2, sd 1, half-width 2.920 / sqrt(3) = 1.686 > 0: reproduced, on 3 of 3 seeds
    p = stats.paired([1, 2, 3], [0, 0, 0])
    assert (p["wins"], p["n"], p["verdict"]) == (3, 3, "reproduced") and p["low"] == pytest.approx(2 - 1.6859, abs=1e-4)
    assert stats.paired([0, 0, 0], [1, 2, 3])["verdict"] == "reversed"
    assert stats.paired([1, -1, 2], [0, 0, 0])["verdict"] == "not shown"
    assert stats.paired([1], [0])["verdict"] == "one seed"
    assert stats.fmt([0.1, 0.2, 0.3]) == f"20.0 [{20 - 2.920 * 10 / 3 ** 0.5:.1f}, {20 + 2.920 * 10 / 3 ** 0.5:.1f}]"


def test_choose_takes_the_best_mean_over_seeds_and_iterations():
    curves = {"a": {50: [0.2, 0.4], 100: [0.5, 0.5]},   # best 0.50 at 100
              "b": {50: [0.9, 0.2], 100: [0.6, 0.5]},   # best 0.55 at 50 and at 100: the earlier
              "c": {50: [1.0, 0.0], 100: [0.3, 0.3]}}   # best 0.50
    assert tune.choose(curves) == ("b", 50, pytest.approx(0.55))
    assert tune.choose({"a": {50: [0.5]}, "b": {50: [0.5]}})[0] == "a"  # a tie goes to the earlier setting


def test_tiny_tune_end_to_end(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(tune, "LRS", (1e-3,))
    monkeypatch.setattr(tune, "BETAS", (0.1, 0.5))
    args = ["experiments.py", "tune", "--seeds=2", f"--out_dir={tmp_path}"] + TINY
    monkeypatch.setattr(sys, "argv", args)
    experiments.main()
    saved = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert saved["seeds"] == [1337, 1] and set(saved["chosen"]) == set(tune.CONTEST)
    # The choice, worked out again from every run's own result.json: the best mean dev utility over the seeds.
    results = [json.loads(open(p).read()) for p in glob.glob(str(tmp_path / "runs" / "*" / "result.json"))]
    assert len(results) == 7 * 2  # KTO, DPO, DPO+NLL at two betas and the control, two seeds each
    for method, chosen in saved["chosen"].items():
        table = {}
        for r in results:
            if r["name"].startswith(method + ","):
                for row in r["dev"]:
                    table.setdefault((r["name"], row["iter"]), []).append(row["sampled"]["utility"])
        assert all(len(v) == 2 for v in table.values())
        best = max(np.mean(v) for v in table.values())
        assert chosen["dev_sampled"] == pytest.approx(best)
        assert np.mean(table[chosen["name"], chosen["max_iters"]]) == pytest.approx(best)
    control = [r for r in results if r["control"]]
    assert len(control) == 2 and all(r["name"] == "SFT+SFT (control), lr 0.001" for r in control)
    # dev utility every utility_interval iterations, one row each, sampled and greedy with length and EOT share
    for run in glob.glob(str(tmp_path / "runs" / "*" / "metrics.jsonl")):
        rows = [json.loads(line) for line in open(run)]
        dev = [row for row in rows if "dev" in row]
        assert [row["iter"] for row in dev] == [4, 8, 12]
        assert all(set(row["dev"][k]) == {"utility", "length", "eot"} for row in dev for k in ("sampled", "greedy"))
    # the lessons find the choice for these settings, and only for these
    base = config.parse_config([f"--{k}={v}" for k, v in experiments.LESSON_DEFAULTS.items()] + args[3:])
    plan = tune.with_tuned(base, [("SFT", {"loss": "none"}), ("DPO+NLL", {"loss": "dpo", "nll_weight": 1.0, "label_noise": 0.1})],
                           tuned_only=[("control", {"loss": "control"})])
    assert [name for name, _ in plan] == ["SFT", "DPO+NLL", "DPO+NLL [tuned]", "control [tuned]"]
    c = saved["chosen"]["DPO+NLL"]
    assert plan[2][1] == {"loss": "dpo", "nll_weight": 1.0, "label_noise": 0.1, "lr": c["lr"], "beta": c["beta"], "max_iters": c["max_iters"]}
    own = tune.with_tuned(base, [("DPO+NLL", {"loss": "dpo", "nll_weight": 1.0})], own={"DPO+NLL": {"lr": 0.1, "max_iters": 7}})
    assert own[1] == ("DPO+NLL [tuned]", {"loss": "dpo", "nll_weight": 1.0, "lr": 0.1, "max_iters": 7})  # a lesson's own choice wins
    assert tune.tuned(dataclasses.replace(base, n_embd=64))[0] is None
    assert tune.tuned(dataclasses.replace(base, lr=3e-3, seed=5))[0] is not None  # the free settings do not matter
    # a second call trains nothing: every run is read from its result.json
    before = {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "runs" / "*" / "*"))}
    experiments.main()
    assert {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "runs" / "*" / "*"))} == before
