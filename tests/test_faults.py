"""Faults, tried: divergence, a NaN on one rank, kill -9 while training and while saving, a full disk, dropout,
truncated and replaced files under the lessons' cache. Nothing saved is lost; nothing non-finite is written."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
import lab
import train
from test_train import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args: list[str], nproc: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    script = "tests/faulty_train.py" if fault else "train.py"
    launcher = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **({"FAULT": fault} if fault else {})}
    return subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def strict_rows(path) -> list[dict]:
    """Every line of metrics.jsonl through a JSON parser that refuses NaN and Infinity."""
    def refuse(constant):
        raise ValueError(f"non-finite {constant} in {path}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]


def all_finite(state) -> bool:
    tensors = [t for t in state["model"].values()] + \
              [t for s in state["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path):
    args = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--warmup_iters=0", "--sft_iters=60",
            "--sft_lr=50", "--ckpt_interval=5", "--log_interval=1", f"--out_dir={tmp_path}"]
    result = run(args)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert line.startswith("error: sft stage, iteration ") and "not finite" in line and "is kept" in line, line
    failed = int(line.split("iteration ")[1].split(":")[0])
    saved = torch.load(tmp_path / "sft.pt", weights_only=True)
    assert saved["iter"] == (failed - 1) // 5 * 5 and f"(iteration {saved['iter']}) is kept" in line
    assert all_finite(saved)
    assert not (tmp_path / "kto.pt").exists() and not (tmp_path / "control.pt").exists()
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r["iter"] for r in rows] == list(range(1, failed))  # the finite steps, then nothing
    # resumed, it meets the same step: the saved checkpoint survives byte for byte
    before = (tmp_path / "sft.pt").read_bytes()
    again = run(args + ["--resume=true"])
    assert again.returncode != 0 and error_lines(again) == [line]
    assert (tmp_path / "sft.pt").read_bytes() == before
    strict_rows(tmp_path / "metrics.jsonl")


def test_a_nan_on_one_rank_stops_both_and_saves_nothing(tmp_path):
    args = TINY + ["--sft_iters=2", "--max_iters=6", "--batch_size=8", "--control=false", "--ckpt_interval=4",
                   f"--out_dir={tmp_path}"]
    result = run(args, nproc=2, fault="nan_rank1:3")  # rank 1's third KTO micro-batch
    assert result.returncode != 0
    [line] = [line for line in error_lines(result) if line.startswith("error:")]
    assert line.startswith("error: kto stage, iteration 3: not finite: the loss") and "no checkpoint was written" in line
    assert not (tmp_path / "kto.pt").exists()
    assert [r["iter"] for r in strict_rows(tmp_path / "metrics.jsonl") if r.get("stage") == "kto"] == [1, 2]


def params_and_rows(out_dir) -> tuple[dict, list]:
    state = {s: torch.load(os.path.join(out_dir, f"{s}.pt"), weights_only=True)["model"] for s in ("sft", "kto", "control")}
    rows = [(r.get("stage"), r.get("iter"), r.get("loss")) for r in strict_rows(os.path.join(out_dir, "metrics.jsonl"))
            if "iter" in r]
    return state, rows


@pytest.mark.parametrize("fault", ["kill_step:7", "kill_save:4"])  # KTO iteration 3; the save at KTO iteration 4
def test_kill_9_then_resume_equals_one_run(tmp_path, fault):
    args = TINY + ["--sft_iters=4", "--max_iters=6", "--batch_size=4", "--ckpt_interval=2", "--dropout=0.1"]
    assert run(args + [f"--out_dir={tmp_path / 'straight'}"]).returncode == 0
    killed = run(args + [f"--out_dir={tmp_path / 'killed'}"], fault=fault)
    assert killed.returncode == -9
    assert torch.load(tmp_path / "killed" / "kto.pt", weights_only=True)["iter"] == 2  # the last whole checkpoint
    assert run(args + [f"--out_dir={tmp_path / 'killed'}", "--resume=true"]).returncode == 0
    (a, rows_a), (b, rows_b) = params_and_rows(tmp_path / "straight"), params_and_rows(tmp_path / "killed")
    for stage in a:
        assert all(torch.equal(a[stage][k], b[stage][k]) for k in a[stage]), stage
    assert rows_a == rows_b
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "kto.pt")
    checkpoint.save(path, {"iter": 1})

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match=r"cannot write .*kto.pt \(No space left on device\); the file already there is kept"):
        checkpoint.save(path, {"iter": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iter": 1} and not list(tmp_path.glob("*.tmp"))


def test_a_non_finite_state_is_never_written():
    bad = {"model": {"w": torch.tensor([1.0, float("inf")])}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}}
    assert checkpoint.nonfinite(bad) == "model.w"
    assert checkpoint.nonfinite({"a": [1.0, {"b": float("nan")}]}) == "a.1.b"
    assert checkpoint.nonfinite({"a": torch.tensor([1, 2]), "b": 3}) is None


def test_dropout_acts_on_sft_only_so_kto_and_dpo_start_at_zero(tmp_path):
    """At the first step the policy equals the reference: rewards and the KL estimate are exactly 0 (with
    dropout in the policy's passes they were -0.09, -0.11 and -0.097 at dropout 0.2)."""
    base = TINY + ["--task_demos=2", "--sft_iters=3", "--max_iters=1", "--batch_size=8", "--control=false"]
    for dropout in ("0.0", "0.2"):
        assert run(base + [f"--dropout={dropout}", f"--out_dir={tmp_path / dropout}"]).returncode == 0
    first = [r for r in strict_rows(tmp_path / "0.2" / "metrics.jsonl") if r.get("stage") == "kto"][0]
    assert first["reward_desirable"] == 0 and first["reward_undesirable"] == 0 and first["kl_raw"] == 0
    sft = [[r["loss"] for r in strict_rows(tmp_path / d / "metrics.jsonl") if r.get("stage") == "sft"] for d in ("0.0", "0.2")]
    assert sft[0][0] != sft[1][0]  # dropout does act on the SFT stage
    assert run(base + ["--dropout=0.2", "--loss=dpo", f"--out_dir={tmp_path / 'dpo'}"]).returncode == 0
    first = [r for r in strict_rows(tmp_path / "dpo" / "metrics.jsonl") if r.get("stage") == "dpo"][0]
    assert first["reward_chosen"] == 0 and first["reward_rejected"] == 0


def test_precomputed_reference_is_kept_per_device_and_precision(tmp_path):
    args = TINY + ["--sft_iters=2", "--max_iters=2", "--batch_size=8", "--control=false", "--reference=precomputed",
                   f"--out_dir={tmp_path}"]
    assert run(args).returncode == 0
    assert len(list(tmp_path.glob("reference-*-cpu-fp32.pt"))) == 1
    assert train.precision(torch.device("cuda")) == "bf16" and train.precision(torch.device("cpu")) == "fp32"


# ----------------------------------------------------------------------------- the lessons' cache

def small_lab(tmp_path, **settings) -> lab.Lab:
    base = config.TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, sft_iters=2, max_iters=2, eval_samples=1,
                              warmup_iters=0, out_dir=str(tmp_path / "lessons"), **settings)
    return lab.Lab("test", base, 1, torch.device("cpu"))


def sft_checkpoint(tmp_path, name: str, seed: int) -> None:
    assert run(TINY + ["--loss=sft", "--init_from=scratch", "--max_iters=1", f"--seed={seed}",
                       f"--out_dir={tmp_path / name}"]).returncode == 0


def test_a_replaced_sft_init_makes_new_runs(tmp_path):
    sft_checkpoint(tmp_path, "a", 1)
    sft_checkpoint(tmp_path, "b", 2)
    start = tmp_path / "start.pt"
    os.replace(tmp_path / "a" / "sft.pt", start)
    runs = small_lab(tmp_path, sft_init=str(start))
    first = runs.run("SFT", 1337, loss="none")
    os.replace(tmp_path / "b" / "sft.pt", start)  # another model at the same path
    second = runs.run("SFT", 1337, loss="none")
    assert len(os.listdir(tmp_path / "lessons" / "sft")) == 2 and len(os.listdir(tmp_path / "lessons" / "runs")) == 2
    assert first["settings"]["sft_init_sha256"] != second["settings"]["sft_init_sha256"]


def test_a_truncated_result_is_evaluated_again_and_a_diverged_run_is_kept_as_such(tmp_path):
    runs = small_lab(tmp_path)
    result = runs.run("KTO", 1337, loss="kto")
    path = os.path.join(runs.dirs["KTO", 1337], "result.json")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[:len(text) // 2])  # a kill mid-write by an older version
    again = runs.run("KTO", 1337, loss="kto")
    assert again == result and json.loads(open(path).read()) == result
    plan = [("KTO diverging", {"loss": "kto", "lr": 1e6, "max_iters": 20})]
    with pytest.raises(SystemExit, match="kto stage, iteration .*: not finite") as first:
        runs.runs(plan)
    folder = runs.dirs["KTO diverging", 1337]
    kept = json.loads(open(os.path.join(folder, "result.json")).read())
    assert kept["diverged"] == first.value.code and "sampled" not in kept
    # read back, not trained again: the same line ends the lesson, and tune's candidates see the divergence
    log = os.path.join(folder, "metrics.jsonl")
    before = (open(log).read(), os.path.getmtime(log))
    with pytest.raises(SystemExit) as second:
        runs.runs(plan)
    assert second.value.code == first.value.code and (open(log).read(), os.path.getmtime(log)) == before
    assert runs.runs(plan, diverged_ok=True) == {"KTO diverging": [kept]}
