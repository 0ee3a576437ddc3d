"""The training loop: 1 process against 2, stop and resume, checkpoints, configuration, bad input."""
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
import data
import dataset
import metrics as metrics_module
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
    # a crash after the checkpoint: rows past it, and a last line cut short
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"stage": "kto", "iter": 3, "loss": -1.0}) + "\n" + '{"stage": "kto", "it')
    run(base + ["--max_iters=4", "--resume=true", f"--out_dir={stopped}"])
    for stage in ("sft", "kto", "control"):
        a, b = params(straight, stage), params(stopped, stage)
        for name in a:
            assert torch.equal(a[name], b[name]), (stage, name)
        # one row per iteration, as in the straight run
        assert [(m["iter"], m["loss"]) for m in metrics(straight, stage)] == [(m["iter"], m["loss"]) for m in metrics(stopped, stage)]
    assert torch.load(stopped / "kto.pt", weights_only=True)["iter"] == 4
    utilities = [r["eval"] for r in map(json.loads, open(stopped / "metrics.jsonl")) if "sampled" in r]
    assert utilities == ["SFT", "SFT+KTO", "SFT+SFT (control)"]  # the rerun's replace the first run's


def test_drop_rows_drops_the_stale_and_the_broken_only(tmp_path):
    kept = [{"stage": "sft", "iter": 3}, {"stage": "kto", "iter": 1}, {"stage": "kto", "iter": 1, "eval": {"loss": 1.0}},
            {"eval": "SFT", "sampled": {"utility": 0.5}}]
    stale = [{"stage": "kto", "iter": 2}]
    lines = [json.dumps(r) + "\n" for r in kept[:2] + stale] + ['{"stage": "kto", "it{"stage": "kto", "iter": 5}\n', "[1, 2]\n"]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(lines + [json.dumps(r) + "\n" for r in kept[2:]]) + '{"stage": "kto"')
    metrics_module.drop_rows(str(path), lambda row: row.get("stage") == "kto" and row.get("iter", 0) > 1)
    assert [json.loads(line) for line in path.read_text().splitlines()] == kept


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
    cfg = config.parse_config([str(preset), "--lr=.0002", "--resume=True", "--data=x.jsonl", "--beta=1"])
    assert (cfg.lr, cfg.n_layer, cfg.control, cfg.resume, cfg.data, cfg.beta) == (2e-4, 3, False, True, "x.jsonl", 1.0)
    assert cfg.lambda_d is None and config.parse_config(["--lambda_d=2"]).lambda_d == 2.0
    assert config.parse_config(["--lambda_d=2", "--lambda_d=none"]).lambda_d is None
    preset.write_text(json.dumps({"n_layer": 2.0}))
    with pytest.raises(SystemExit, match="'n_layer' expects int, got 2.0"):
        config.parse_config([str(preset)])
    for bad, message in [("--nope=1", "unknown config key 'nope'"), ("--n_layer=2.5", "'n_layer' expects int"),
                         ("--task=lists", "a built-in task is chosen with --data=arithmetic or --data=lists"),
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
            config.parse_config(bad.split())


def test_checkpoint_survives_a_crash_while_saving(tmp_path, monkeypatch):
    path = str(tmp_path / "kto.pt")
    checkpoint.save(path, {"iter": 1})

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"iter": 2})
    assert torch.load(path, weights_only=True) == {"iter": 1}


def test_flipped_examples_are_followed_in_the_metrics(tmp_path):
    """Each step's group counts match the flipped examples of its batch, found here from the data settings."""
    args = TINY + ["--sft_iters=1", "--max_iters=6", "--batch_size=16", "--label_noise=0.25", "--control=false",
                   "--log_interval=4", f"--out_dir={tmp_path}"]
    result = run(args)
    assert re.search(r"label_noise=0.25: 1800 examples: \d+ desirable, \d+ undesirable \(450 flipped\)", result.stdout)
    cfg, d = train.prepare(config.parse_config(args))
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


# ----------------------------------------------------------------------------- real checkpoints and data files

def hh_file(path, n: int = 40) -> str:
    """A small HH-RLHF-shaped file, gzipped: transcripts that differ in their last reply."""
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: What is {i} plus one?\n\nAssistant:"
        rows.append(json.dumps({"chosen": f"{prompt} {i + 1}.", "rejected": f"{prompt} I do not know."}))
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    return str(path)


def test_kto_from_a_hugging_face_checkpoint_on_hh_data_ignores_its_dropout(tmp_path):
    """config.json says dropout 0.1, as GPT-2's does; the run's dropout (0) governs, so at the first step the
    policy equals the reference: rewards and the KL estimate are exactly 0."""
    from test_model import gpt2_like, hf_config, hf_state, write_safetensors
    model = gpt2_like()
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config(model)))
    write_safetensors(hf / "model.safetensors", hf_state(model, "", buffers=True, head=False))
    hh = hh_file(tmp_path / "hh.jsonl.gz")
    result = run(["--block_size=32", f"--data={hh}", f"--init_from={hf}", "--max_iters=2", "--batch_size=8",
                  "--control=false", "--log_interval=1", "--lr=1e-3", f"--out_dir={tmp_path / 'o'}"])
    assert "data: 40 pairs" in result.stdout and "pairs split: 80 examples: 40 desirable, 40 undesirable" in result.stdout
    first = metrics(tmp_path / "o", "kto")[0]
    assert first["reward_desirable"] == 0 and first["reward_undesirable"] == 0 and first["kl_raw"] == 0
    # SFT from the same checkpoint (sft_init), then KTO: the SFT stage starts from GPT-2's weights
    run(["--block_size=32", f"--data={hh}", f"--sft_init={hf / 'model.safetensors'}", "--sft_iters=1", "--max_iters=1",
         "--batch_size=8", "--control=false", f"--out_dir={tmp_path / 's'}"])
    assert params(tmp_path / "s", "sft")["transformer.wpe.weight"].shape == (32, 128)


def test_resume_compares_what_matters(tmp_path):
    data_file = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Q: {i} plus one? A:", "completion": f" {i + 1}", "label": i % 3 != 0} for i in range(12)]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = TINY + [f"--data={data_file}", "--sft_iters=2", "--batch_size=4", "--control=false"]
    run(base + ["--max_iters=2", f"--out_dir={tmp_path / 'a'}"])
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    # a copied out_dir, a trailing slash and a copied data file resume; the SFT stage is already done
    copied = tmp_path / "copy.jsonl"
    shutil.copy(data_file, copied)
    result = run(base[:-3] + [f"--data={copied}", "--sft_iters=2", "--batch_size=4", "--control=false",
                              "--max_iters=3", "--resume=true", f"--out_dir={tmp_path / 'copy'}/"])
    assert "sft: checkpoint at iteration 2, nothing to train" in result.stdout
    assert torch.load(tmp_path / "copy" / "kto.pt", weights_only=True)["iter"] == 3
    # what matters does not match: other data, another SFT learning rate
    copied.write_text("".join(json.dumps({**r, "label": not r["label"]}) + "\n" for r in rows))
    result = run(base[:-3] + [f"--data={copied}", "--sft_iters=2", "--batch_size=4", "--control=false",
                              "--max_iters=4", "--resume=true", f"--out_dir={tmp_path / 'copy'}"], check=False)
    assert result.returncode != 0 and "was trained from another training data than this run's" in result.stderr
    result = run(base + ["--sft_lr=0.02", "--max_iters=4", "--resume=true", f"--out_dir={tmp_path / 'a'}"], check=False)
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'a' / 'sft.pt'} was trained with sft_lr=0.01, "
                                                  "this run has sft_lr=0.02; use another out_dir or the same value"]
    # the SFT stage cannot grow under the KTO stage that started from it
    before = (tmp_path / "a" / "sft.pt").read_bytes()
    result = run(base + ["--sft_iters=3", "--max_iters=4", "--resume=true", f"--out_dir={tmp_path / 'a'}"], check=False)
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'a' / 'kto.pt'} was trained from {tmp_path / 'a' / 'sft.pt'} "
                                                  "at iteration 2; sft_iters=3 would replace that start; use another out_dir, "
                                                  "or sft_iters=2"]
    assert (tmp_path / "a" / "sft.pt").read_bytes() == before
    # a checkpoint of an older train.py: one line
    old = torch.load(tmp_path / "a" / "kto.pt", weights_only=True)
    for key in ("settings", "data", "start"):
        del old[key]
    torch.save(old, tmp_path / "a" / "kto.pt")
    result = run(base + ["--max_iters=4", "--resume=true", f"--out_dir={tmp_path / 'a'}"], check=False)
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'a' / 'kto.pt'} was written by an older train.py "
                                                  "(no settings, data, start); start it again in another out_dir"]


def test_command_line_edges_give_one_line(tmp_path):
    result = run(["--help"])
    assert "--lambda_d=None" in result.stdout and "--eval_fraction=0.0" in result.stdout and "torchrun" in result.stdout
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a", "completion": " b", "label": True}) + "\n")
    for args, expected in [(["--out_dir="], "error: out_dir='': expected a directory path"),
                           (["--data="], "error: data='': expected 'arithmetic', 'lists' or the path of a .jsonl"),
                           (["--init_from="], "error: init_from='': expected 'sft', 'scratch' or a checkpoint path"),
                           ([f"--init_from={jsonl}"], f"error: {jsonl}: "),
                           ([f"--init_from={tmp_path / 'nothing.pt'}"], f"error: {tmp_path / 'nothing.pt'}: not a checkpoint")]:
        result = run(TINY + args + [f"--out_dir={tmp_path / 'o'}"] * (args != ["--out_dir="]), check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(expected), (args, result.stderr)


def test_eval_split_is_reduced_over_ranks_and_errors_print_once(tmp_path):
    hh = hh_file(tmp_path / "hh.jsonl.gz", n=60)
    args = TINY + [f"--data={hh}", "--eval_fraction=0.2", "--eval_interval=2", "--sft_iters=2", "--max_iters=2",
                   "--batch_size=8", "--control=false", "--sft_lr=1e-3", "--lr=1e-3"]
    one = run(args + [f"--out_dir={tmp_path / 'one'}"])
    run(args + [f"--out_dir={tmp_path / 'two'}"], nproc=2)
    assert "eval_fraction=0.2: 12 pairs held out, by prompt" in one.stdout
    evals = {}
    for name in ("one", "two"):
        with open(tmp_path / name / "metrics.jsonl") as f:
            evals[name] = [r for r in map(json.loads, f) if "eval" in r and "stage" in r]
    assert [(r["stage"], r["iter"]) for r in evals["one"]] == [("sft", 2), ("kto", 2)]
    for a, b in zip(evals["one"], evals["two"]):
        assert a["eval"] == pytest.approx(b["eval"], abs=1e-5)
    eval_kto = evals["one"][1]["eval"]  # 3 batches of 8: the 24 examples of the 12 held-out pairs
    assert eval_kto["n_desirable"] == eval_kto["n_undesirable"] == 12
    bad = run(TINY + [f"--data={tmp_path / 'missing.jsonl'}", f"--out_dir={tmp_path / 'b'}"], nproc=2, check=False)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and errors == [f"error: {tmp_path / 'missing.jsonl'}: cannot open (No such file or directory)"]


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_precomputed_reference_gives_the_live_losses(tmp_path, loss):
    """reference=precomputed against the live reference: the same losses, rewards, KL and weights (1e-5);
    a second run from the same start and data (another beta: a sweep) reuses the stored log-probs."""
    base = TINY + ["--task_demos=3", "--sft_iters=3", "--max_iters=4", "--batch_size=8", "--grad_accum=2",
                   f"--loss={loss}", "--control=false", "--lr=1e-3"]
    run(base + [f"--out_dir={tmp_path / 'sft'}", "--max_iters=1"])
    start = str(tmp_path / "sft" / "sft.pt")
    run(base + [f"--init_from={start}", f"--out_dir={tmp_path / 'live'}"])
    run(base + [f"--init_from={start}", "--reference=precomputed", f"--out_dir={tmp_path / 'pre'}"])
    live, pre = metrics(tmp_path / "live", loss), metrics(tmp_path / "pre", loss)
    assert len(live) == len(pre) == 4
    for a, b in zip(live, pre):
        for key in ("loss", "kl_raw", "reward_desirable", "reward_undesirable", "reward_chosen", "margin", "grad_weight"):
            assert (key in a) == (key in b)
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
    stored = list((tmp_path / "sft").glob("reference-*.pt"))
    assert len(stored) == 1  # beside the start checkpoint
    made = stored[0].stat().st_mtime_ns
    run(base + [f"--init_from={start}", "--reference=precomputed", "--beta=0.3", f"--out_dir={tmp_path / 'beta'}"])
    assert list((tmp_path / "sft").glob("reference-*.pt")) == stored and stored[0].stat().st_mtime_ns == made


def test_eval_batches_are_checked_for_kl_pairs_before_training(tmp_path):
    """One prompt with 4 pairs (8 examples) fills a whole eval batch of 8 when it is held out: refused at the
    start, as the training data would be, not in the middle of the run."""
    rows = [{"prompt": "Q: same? A:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(4)]
    rows += [{"prompt": f"Q: {i}? A:", "chosen": " yes", "rejected": " no"} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--block_size=32", f"--data={path}", "--eval_fraction=0.2", "--batch_size=8"]
    units, _ = dataset.load_file(str(path), 32, progress=False)
    same = tuple(units[0].prompt)
    seed = next(s for s in range(1000) if any(tuple(u.prompt) == same for u in data.split_by_prompt(units, 0.2, s)[1]))
    with pytest.raises(data.DataError, match="one prompt has 8 examples.*batch_size of at least 16"):
        train.prepare(config.parse_config(base + [f"--seed={seed}"]))
