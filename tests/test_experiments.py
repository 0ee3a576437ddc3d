"""experiments.py end to end on tiny settings: tables, JSON, figures, finished runs skipped."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--sft_iters=3", "--max_iters=12", "--eval_samples=1",
        "--warmup_iters=0", "--log_interval=4"]
PNG = b"\x89PNG\r\n\x1a\n"


def lesson(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "experiments.py"] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_value_lesson_draws_prop_4_1(tmp_path):
    result = lesson(["value", f"--out_dir={tmp_path}"])
    numbers = json.loads((tmp_path / "value" / "value.json").read_text())
    assert (tmp_path / "value" / "value.png").read_bytes().startswith(PNG)
    x = numbers["x"]
    for beta, curves in numbers["kto"].items():
        beta = float(beta)
        for xi, w, vd in zip(x, curves["weight"], curves["value_desirable"]):  # against the closed form
            s = 1 / (1 + math.exp(-beta * xi))
            assert w == pytest.approx(4 * s * (1 - s), abs=1e-9) and vd == pytest.approx(s, abs=1e-9)
        # KTO saturates on both sides; DPO only for pairs ordered right
        assert curves["weight"][0] < 0.1 and curves["weight"][-1] < 0.1
        assert numbers["dpo"][str(beta)]["weight"][0] > 0.9 and numbers["dpo"][str(beta)]["weight"][-1] < 0.1
    assert "0.1" in result.stdout and "-36.2 to +36.2" in result.stdout  # |beta z| < 3.64 at beta 0.1


def test_a_training_lesson_end_to_end_and_finished_runs_are_skipped(tmp_path):
    args = ["noise", "--seeds=1", f"--out_dir={tmp_path}"] + TINY
    result = lesson(args)
    numbers = json.loads((tmp_path / "noise" / "noise.json").read_text())
    assert (tmp_path / "noise" / "noise.png").read_bytes().startswith(PNG)
    assert set(numbers["utility"]) == {f"{loss} noise {level}" for loss in ("KTO", "DPO") for level in (0.0, 0.1, 0.2, 0.3)}
    assert all(0 <= u <= 1 for row in numbers["utility"].values() for u in row["sampled"] + row["greedy"])
    assert len(numbers["weights"]["KTO noise 0.3"]["flipped"]) == 12  # one value per iteration
    for line in ("KTO noise 0.3", "DPO noise 0.3", "flipped / clean"):
        assert line in result.stdout
    # one SFT stage, shared by all eight runs of the seed; the runs kept under a digest of their settings
    assert len(os.listdir(tmp_path / "sft")) == 1
    runs = tmp_path / "runs"
    assert len(os.listdir(runs)) == 8
    results = {r["name"]: (runs / d) for d in os.listdir(runs) for r in [json.loads((runs / d / "result.json").read_text())]}
    metrics = results["KTO noise 0.3"] / "metrics.jsonl"
    before = metrics.read_text()
    report = json.loads((results["KTO noise 0.3"] / "result.json").read_text())["report"]
    assert any("label_noise=0.3" in line and "flipped" in line for line in report)
    again = lesson(args)
    assert metrics.read_text() == before and again.stdout.splitlines()[1:] == result.stdout.splitlines()[1:]
    # another lesson reuses the runs it shares (KTO and DPO without noise): only the SFT start is new (untuned,
    # the lesson has no control or DPO+NLL run to make)
    dpo = lesson(["dpo", "--seeds=1", f"--out_dir={tmp_path}"] + TINY)
    assert len(os.listdir(runs)) == 9
    assert "no tuned settings yet" in dpo.stdout and "SFT+KTO - SFT+DPO" in dpo.stdout
    assert (tmp_path / "dpo" / "dpo.png").read_bytes().startswith(PNG)
    # a changed setting is a new run, never the saved result of another
    lesson(["dpo", "--seeds=1", f"--out_dir={tmp_path}"] + TINY + ["--max_iters=6"])
    iters = sorted(json.loads((runs / d / "result.json").read_text())["settings"]["max_iters"] for d in os.listdir(runs))
    assert iters == [6] * 3 + [12] * 9


def test_settings_the_lessons_set_are_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"control": False}))
    for args, said in ((["--seed=3"], "seed=3"), (["--init_from=scratch"], "init_from='scratch'"),
                       (["--resume=true"], "resume=True"), ([str(preset)], "control=False")):
        result = subprocess.run([sys.executable, "experiments.py", "dpo"] + args + [f"--out_dir={tmp_path}"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.startswith(f"error: {said}:"), result.stderr
    unknown = subprocess.run([sys.executable, "experiments.py", "valu"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown lesson 'valu'" in unknown.stderr
