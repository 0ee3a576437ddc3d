"""The training loop: 1 process against 2, stop and resume, checkpoints, configuration, bad input."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--warmup_iters=0",
        "--sft_lr=0.01", "--lr=0.01", "--eval_samples=1", "--log_interval=1"]


def run(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(out_dir, stage: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("stage") == stage]


def params(out_dir, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out_dir, f"{stage}.pt"), weights_only=True)["model"]


def test_two_processes_match_one_process(tmp_path):
    """Same global batch, 1 process vs torchrun with 2 (gloo): same losses, KL and parameters.

    lr 1e-3: Adam's first steps are about lr * sign(gradient), so a gradient element that float rounding
    leaves near zero can move by up to lr either way; at 1e-3 the worst such element stays within 1e-5.
    """
    args = TINY + ["--sft_iters=2", "--max_iters=2", "--batch_size=8", "--grad_accum=2", "--control=false",
                   "--sft_lr=1e-3", "--lr=1e-3", "--label_noise=0.3"]
    run(args + [f"--out_dir={tmp_path / 'one'}"])
    run(args + [f"--out_dir={tmp_path / 'two'}"], nproc=2)
    for stage in ("sft", "kto"):
        one, two = metrics(tmp_path / "one", stage), metrics(tmp_path / "two", stage)
        assert len(one) == len(two) == 2
        for a, b in zip(one, two):
            for key in ("loss", "kl_raw", "z_ref", "reward_desirable", "n_desirable", "grad_weight"):
                assert (a.get(key) is None) == (b.get(key) is None)
                if a.get(key) is not None:
                    assert a[key] == pytest.approx(b[key], abs=1e-5), (stage, key)
            # per-example stats gathered from both ranks: the same groups, counts and quantiles
            assert (a.get("groups") is None) == (b.get("groups") is None)
            for name, group in a.get("groups", {}).items():
                assert group == pytest.approx(b["groups"][name], abs=1e-5), (stage, name)
        p1, p2 = params(tmp_path / "one", stage), params(tmp_path / "two", stage)
        for name in p1:
            assert torch.allclose(p1[name], p2[name], atol=1e-5), name
    # the run moved: KTO changed the parameters and its rewards are no longer all zero
    assert any(not torch.equal(params(tmp_path / "one", "sft")[n], params(tmp_path / "one", "kto")[n])
               for n in p1)
    assert metrics(tmp_path / "one", "kto")[1]["reward_desirable"] != 0


def test_stop_and_resume_equals_one_run(tmp_path):
    base = TINY + ["--sft_iters=2", "--batch_size=4", "--dropout=0.1", "--warmup_iters=3"]  # warmup spans the stop
    straight = tmp_path / "straight"
    run(base + ["--max_iters=4", f"--out_dir={straight}"])
    stopped = tmp_path / "stopped"
    run(base + ["--max_iters=2", f"--out_dir={stopped}"])
    run(base + ["--max_iters=4", "--resume=true", f"--out_dir={stopped}"])
    for stage in ("kto", "control"):
        a, b = params(straight, stage), params(stopped, stage)
        for name in a:
            assert torch.equal(a[name], b[name]), (stage, name)
        assert [m["loss"] for m in metrics(straight, stage)] == [m["loss"] for m in metrics(stopped, stage)]
    assert torch.load(stopped / "kto.pt", weights_only=True)["iter"] == 4


def test_main_job_prints_utility_table(tmp_path):
    result = run(TINY + ["--sft_iters=3", "--max_iters=2", "--batch_size=8", f"--out_dir={tmp_path}"])
    for label in ("SFT ", "SFT+KTO", "SFT+SFT (control)"):
        assert label in result.stdout
    evals = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "eval" in r]
    assert [e["eval"] for e in evals] == ["SFT", "SFT+KTO", "SFT+SFT (control)"]
    assert all(0 <= e["sampled"]["utility"] <= 1 and 0 <= e["greedy"]["eot"] <= 1 for e in evals)
    # a second fresh run refuses to overwrite the checkpoints
    again = run(TINY + ["--sft_iters=3", "--max_iters=2", f"--out_dir={tmp_path}"], check=False)
    assert again.returncode != 0 and "exists" in again.stderr


def test_jsonl_training_and_bad_input_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    rows = [{"prompt": f"Q: {i} plus one? A:", "completion": f" {i + 1}", "label": i % 3 != 0} for i in range(12)]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(TINY + [f"--data={good}", "--sft_iters=2", "--max_iters=2", "--batch_size=4", f"--out_dir={tmp_path / 'o'}"])
    assert len(metrics(tmp_path / "o", "kto")) == 2
    # SFT alone, from scratch: one stage, no KTO metrics, no utility table (no judge for a JSONL file)
    result = run(TINY + [f"--data={good}", "--loss=sft", "--init_from=scratch", "--max_iters=2", "--batch_size=1",
                         f"--out_dir={tmp_path / 's'}"])
    assert [m["iter"] for m in metrics(tmp_path / "s", "sft")] == [1, 2] and "utility" not in result.stdout
    assert not (tmp_path / "s" / "control.pt").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "x", "completion": " y", "label": 1}\n')
    result = run(TINY + [f"--data={bad}", f"--out_dir={tmp_path / 'b'}"], check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: field 'label': expected a JSON boolean")

    result = run(TINY + [f"--init_from={good}", f"--out_dir={tmp_path / 'd'}"], check=False)
    assert result.returncode != 0 and result.stderr.strip().startswith(f"error: {good}: not a checkpoint")
    result = run(TINY + ["--task_heldout=0.0004", f"--out_dir={tmp_path / 'e'}"], check=False)
    assert result.returncode != 0 and "leave 2000 training examples and 0 held-out prompts" in result.stderr

    result = run(TINY + ["--batch_size=1", f"--out_dir={tmp_path / 'c'}"], check=False)
    assert result.returncode != 0 and result.stderr.strip().startswith("error: batch_size=1: expected at least 2 for KTO")


def test_config_parsing(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"lr": 0.001, "n_layer": 3, "control": False}))
    cfg = train.parse_config([str(preset), "--lr=.0002", "--resume=True", "--data=x.jsonl", "--beta=1"])
    assert (cfg.lr, cfg.n_layer, cfg.control, cfg.resume, cfg.data, cfg.beta) == (2e-4, 3, False, True, "x.jsonl", 1.0)
    assert cfg.lambda_d is None and train.parse_config(["--lambda_d=2"]).lambda_d == 2.0
    assert train.parse_config(["--lambda_d=2", "--lambda_d=none"]).lambda_d is None
    preset.write_text(json.dumps({"n_layer": 2.0}))
    with pytest.raises(SystemExit, match="'n_layer' expects int, got 2.0"):
        train.parse_config([str(preset)])
    for bad, message in [("--nope=1", "unknown config key 'nope'"), ("--n_layer=2.5", "'n_layer' expects int"),
                         ("--resume=yes", "'resume' expects bool"), ("--lr", "expected --key=value"),
                         ("--loss=orpo", "loss='orpo': expected 'kto', 'dpo' or 'sft'"),
                         ("--loss=dpo --batch_size=5", "batch_size=5: expected an even number"),
                         ("--loss=dpo --desirable_fraction=0.5", "desirable_fraction=0.5: expected 1 with loss='dpo'"),
                         ("--label_noise=1", "label_noise=1.0: expected a fraction in [0, 1)"),
                         ("--lambda_d=0", "lambda_d=0.0: expected a positive finite number or none"),
                         ("--grad_accum=0", "grad_accum=0: expected an integer of at least 1"),
                         ("--lr=nan", "lr=nan: expected a positive finite number"),
                         ("--task_heldout=1", "task_heldout=1.0: expected a fraction"),
                         ("--n_embd=30", "n_embd=30: expected a multiple of n_head=4"),
                         ("--seed=-1", "seed=-1: expected a non-negative integer"),
                         ("--device=gpu", "device='gpu'"),
                         ("--loss=sft", "init_from='sft': expected 'scratch' or a checkpoint")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            train.parse_config(bad.split())


def test_checkpoint_survives_a_crash_while_saving(tmp_path, monkeypatch):
    path = str(tmp_path / "kto.pt")
    train.save_checkpoint(path, {"iter": 1})

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"iter": 2})
    assert torch.load(path, weights_only=True) == {"iter": 1}


def test_flipped_examples_are_followed_in_the_metrics(tmp_path):
    """Each step's group counts match the flipped examples of its batch, found here from the data settings."""
    args = TINY + ["--sft_iters=1", "--max_iters=6", "--batch_size=16", "--label_noise=0.25", "--control=false",
                   "--log_interval=4", f"--out_dir={tmp_path}"]
    result = run(args)
    assert re.search(r"label_noise=0.25: 1800 examples: \d+ desirable, \d+ undesirable \(450 flipped\)", result.stdout)
    cfg, d = train.prepare(train.parse_config(args), 1)
    rows = metrics(tmp_path, "kto")
    assert [r["iter"] for r in rows] == list(range(1, 7))  # one row per step, written at intervals
    for it, row in enumerate(rows):
        batch = [d.main[i] for i in data.batch_indices(len(d.main), 16, it, cfg.seed)]
        flipped = sum(ex.tag == "flipped" for ex in batch)
        clean_desirable = sum(ex.tag == "clean" and ex.desirable for ex in batch)
        groups = row["groups"]
        assert groups.get("flipped", {"n": 0})["n"] == flipped and groups["desirable"]["n"] == clean_desirable
        assert sum(g["n"] for g in groups.values()) == 16
        assert groups["desirable"]["z_q10"] <= groups["desirable"]["z_q50"] <= groups["desirable"]["z_q90"]


def test_dpo_and_kto_on_the_same_pairs(tmp_path):
    """The built-in task with several answers per prompt: DPO on its pairs, KTO on the same completions."""
    base = TINY + ["--task_demos=3", "--sft_iters=2", "--max_iters=2", "--batch_size=8"]
    dpo = run(base + ["--loss=dpo", f"--out_dir={tmp_path / 'dpo'}"])
    kto_run = run(base + [f"--out_dir={tmp_path / 'kto'}"])
    assert "SFT+DPO" in dpo.stdout and "SFT+SFT (control)" in dpo.stdout
    n_pairs = int(re.search(r"data: (\d+) pairs", dpo.stdout)[1])
    assert f"pairs split: {2 * n_pairs} examples: {n_pairs} desirable, {n_pairs} undesirable" in kto_run.stdout
    assert "lambda_d=1, lambda_u=1 (from the data" in kto_run.stdout  # balanced pairs: the paper's defaults
    row = metrics(tmp_path / "dpo", "dpo")[-1]
    assert row["groups"]["pairs"]["n"] == 4 and 0 <= row["ordered"] <= 1 and "margin" in row
    # the SFT stage saw the same completions in both runs
    assert torch.equal(params(tmp_path / "dpo", "sft")["lm_head.weight"], params(tmp_path / "kto", "sft")["lm_head.weight"])
