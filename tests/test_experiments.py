"""experiments.py end to end on tiny settings: tables, JSON, figures, finished runs skipped."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import experiments
import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--sft_iters=3", "--max_iters=12", "--eval_samples=1",
        "--warmup_iters=0", "--log_interval=4", "--eval_tokens=3", "--task_max_operand=2", "--batch_size=8"]
PNG = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def lesson(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "experiments.py"] + args, cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def png_size(path) -> tuple[int, int]:
    """Width and height of a PNG, from its IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head.startswith(PNG)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def window_by_hand(beta: float) -> float:
    """|r - z_ref| in nats where KTO's weight v (1 - v) falls to 10% of its peak 1/4: v = (1 + sqrt(0.9)) / 2."""
    v = (1 + math.sqrt(0.9)) / 2
    return math.log(v / (1 - v)) / beta


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_value_lesson_draws_prop_4_1_at_the_beta_it_is_given(tmp_path, beta):
    result = lesson(["value", f"--beta={beta}", "--lambda_u=2.25", f"--out_dir={tmp_path}"])
    numbers = json.loads((tmp_path / "value" / "value.json").read_text())
    assert png_size(tmp_path / "value" / "value.png")[0] == 1280
    assert numbers["beta"] == beta and numbers["lambda_u"] == 2.25 and numbers["lambda_d"] == 1.0
    z, nats = numbers["z"], numbers["nats"]
    sig, dpo = numbers["sigmoid"], numbers["dpo"]
    for i in range(0, len(z), 50):  # against the closed forms
        s = 1 / (1 + math.exp(-z[i]))
        assert nats[i] == pytest.approx(z[i] / beta)
        assert sig["desirable"]["value"][i] == pytest.approx(s, abs=1e-9)
        assert sig["undesirable"]["value"][i] == pytest.approx(1 - s, abs=1e-9)
        assert sig["desirable"]["share"][i] == pytest.approx(4 * s * (1 - s), abs=1e-9)
        assert numbers["logsigmoid"]["desirable"]["share"][i] == pytest.approx(1 - s, abs=1e-9)
        assert numbers["linear"]["desirable"]["share"][i] == pytest.approx(1.0)
        assert numbers["kahneman_tversky"][i] == pytest.approx(z[i] ** 0.88 if z[i] >= 0 else -2.25 * (-z[i]) ** 0.88)
        assert dpo["value"][i] == pytest.approx(math.log(s) + math.log(2), abs=1e-9)
    # KTO saturates on both sides, the logsigmoid ablation and DPO only on the right side, the linear one never
    assert sig["desirable"]["saturated"][0] and sig["desirable"]["saturated"][-1]
    assert not numbers["logsigmoid"]["desirable"]["saturated"][0] and numbers["logsigmoid"]["desirable"]["saturated"][-1]
    assert not any(numbers["linear"]["desirable"]["saturated"])
    assert not dpo["saturated"][0] and dpo["saturated"][-1]
    edge = window_by_hand(beta)  # 36.4 nats at beta 0.1
    line = next(line for line in result.stdout.splitlines() if line.startswith("KTO sigmoid"))
    low, high = (float(x) for x in line.split()[-3::2])
    assert high == pytest.approx(edge, abs=0.01 / beta + 1e-9) and low == -high
    assert f"beta {beta}" in result.stdout and "never saturates" in result.stdout


def test_figures_are_projector_sized(tmp_path, monkeypatch):
    """The value lesson's figure and a comparison's (on numbers made here): 1280 px wide, no text below 12 pt."""
    import experiments
    import figures
    fonts = []
    saved = figures.save
    monkeypatch.setattr(figures, "save", lambda d, name, fig: fonts.append(figures.smallest_font(fig)) or saved(d, name, fig))
    monkeypatch.setattr(sys, "argv", ["experiments.py", "value", f"--out_dir={tmp_path}"])
    experiments.main()
    numbers = {name: {"sampled": [0.4, 0.5, 0.45], "greedy": [0.3, 0.35, 0.4]}
               for name in ("SFT", "SFT+DPO", "SFT+KTO", "SFT+KTO [tuned]")}
    figures.compare(str(tmp_path), "compare", numbers)
    assert len(fonts) == 2 and min(fonts) >= 12
    assert png_size(tmp_path / "compare.png")[0] == png_size(tmp_path / "value" / "value.png")[0] == 1280


def test_a_training_lesson_end_to_end_and_finished_runs_are_skipped(tmp_path):
    args = ["noise", "--seeds=1", f"--out_dir={tmp_path}"] + TINY
    result = lesson(args)
    assert "arithmetic task" in result.stdout
    numbers = json.loads((tmp_path / "noise" / "noise.json").read_text())
    assert png_size(tmp_path / "noise" / "noise.png")[0] == 1280
    methods = ["KTO sigmoid", "KTO logsigmoid", "KTO linear", "DPO"]
    assert set(numbers["utility"]) == {"SFT"} | {f"{m} beta {b} noise {level}" for m in methods for b in (0.1, 0.5)
                                                 for level in (0.0, 0.1, 0.2, 0.3)}
    assert all(0 <= u <= 1 for row in numbers["utility"].values() for u in row["sampled"] + row["greedy"])
    w = numbers["weights"]["KTO sigmoid beta 0.5 noise 0.3"]
    assert len(w["weight_share"]["flipped"]) == len(w["saturated_wrong"]["clean"]) == 12  # one value per iteration
    assert all(0 <= x <= 1 for x in w["weight_share"]["flipped"] + w["saturated_wrong"]["flipped"] if x is not None)
    for line in ("KTO linear beta 0.5 noise 0.3", "DPO beta 0.1 noise 0.3", "flipped / clean", "wrong side"):
        assert line in result.stdout
    # one SFT stage, shared by all 33 runs of the seed; the runs kept under a digest of their settings
    assert len(os.listdir(tmp_path / "sft")) == 1
    runs = tmp_path / "runs"
    assert len(os.listdir(runs)) == 33
    results = {r["name"]: (runs / d) for d in os.listdir(runs) for r in [json.loads((runs / d / "result.json").read_text())]}
    metrics = results["KTO sigmoid beta 0.1 noise 0.3"] / "metrics.jsonl"
    before = metrics.read_text()
    report = json.loads((results["KTO sigmoid beta 0.1 noise 0.3"] / "result.json").read_text())["report"]
    assert any("label_noise=0.3" in line and "flipped" in line for line in report)
    again = lesson(args)
    assert metrics.read_text() == before and again.stdout.splitlines()[1:] == result.stdout.splitlines()[1:]
    # another lesson reuses the runs it shares (SFT, KTO and DPO without noise at beta 0.1)
    dpo = lesson(["dpo", "--seeds=1", f"--out_dir={tmp_path}"] + TINY)
    assert len(os.listdir(runs)) == 33
    assert "no tuned settings yet" in dpo.stdout and "SFT+KTO - SFT+DPO" in dpo.stdout
    assert png_size(tmp_path / "dpo" / "dpo.png")[0] == 1280
    # a changed setting is a new run, never the saved result of another
    lesson(["dpo", "--seeds=1", f"--out_dir={tmp_path}"] + TINY + ["--max_iters=6"])
    iters = sorted(json.loads((runs / d / "result.json").read_text())["settings"]["max_iters"] for d in os.listdir(runs))
    assert iters == [6] * 3 + [12] * 33


def test_two_lessons_side_by_side_train_each_shared_run_once(tmp_path):
    """imbalance and one-y-per-x started together on one out_dir share the SFT stage and three runs: each is
    trained by one of them (its log has every iteration once) and both tables give the shared runs alike."""
    both = [subprocess.Popen([sys.executable, "experiments.py", name, "--seeds=1", f"--out_dir={tmp_path}"] + TINY,
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("imbalance", "one-y-per-x")]
    for p in both:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert len(os.listdir(tmp_path / "sft")) == 1 and len(os.listdir(tmp_path / "runs")) == 6  # SFT itself: no log
    assert len(list((tmp_path / "runs").glob("*/metrics.jsonl"))) == 5
    for log in list((tmp_path / "sft").glob("*/metrics.jsonl")) + list((tmp_path / "runs").glob("*/metrics.jsonl")):
        iters = [json.loads(line)["iter"] for line in log.read_text().splitlines() if "loss" in json.loads(line)]
        assert len(iters) > 1 and iters == sorted(set(iters)), log
    imbalance, one_y = (json.loads((tmp_path / n / f"{n}.json").read_text())["utility"] for n in ("imbalance", "one-y-per-x"))
    for name in ("SFT", "DPO, all pairs", "KTO, all"):
        assert imbalance[name] == one_y[name]


def test_saturation_lesson_follows_flipped_examples_as_their_own_group(tmp_path):
    """With label_noise the flipped examples are a group of the table and the JSON, beside the two classes; its
    shares are those of the weighed examples, counted here from the run's own result.json."""
    result = lesson(["saturation", "--seeds=1", "--label_noise=0.3", "--beta=2", f"--out_dir={tmp_path}"] + TINY)
    numbers = json.loads((tmp_path / "saturation" / "saturation.json").read_text())
    assert set(numbers["weights"]) == set(numbers["over_training"]) == {"desirable", "undesirable", "flipped"}
    assert "flipped: label_noise's examples" in result.stdout
    run = next(json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/result.json") if "weights" in json.loads(p.read_text()))
    assert run["n_flipped"] > 0 and set(run["weights"]) == {"0", "6", "12"}
    for stop, w in run["weights"].items():
        mine = [i for i, g in enumerate(w["group"]) if g == "flipped"]
        assert len(mine) > 0
        wrong = sum(w["share"][i] < 0.1 and not w["right"][i] for i in mine) / len(mine)
        assert numbers["weights"]["flipped"][stop]["wrong"] == [pytest.approx(wrong)]
        share = sum(w["share"][i] for i in mine) / len(mine)
        assert numbers["weights"]["flipped"][stop]["share"] == [pytest.approx(share)]
    assert png_size(tmp_path / "saturation" / "saturation.png")[0] == 1280


def test_no_sft_lesson_chooses_each_methods_setting_from_the_random_start_on_dev_prompts(tmp_path):
    """no-sft's [tuned] runs take the setting and stop whose mean dev utility over two seeds is the best of its
    grid, worked out again here from every grid run's result.json; runs are as long as SFT and the loss (dev
    utility every 2 x 3 iterations: at 6 and 12 of 15)."""
    lesson(["no-sft", "--seeds=1", "--task_dev=0.05", "--utility_interval=3", f"--out_dir={tmp_path}"] + TINY)
    numbers = json.loads((tmp_path / "no-sft" / "no-sft.json").read_text())
    names = ("SFT from scratch", "DPO from scratch", "KTO from scratch")
    assert set(numbers["utility"]) == set(names) | {f"{n} [tuned]" for n in names}
    assert "DPO from scratch - KTO from scratch" in numbers["differences"]
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/result.json")]
    assert all(r["settings"]["init_from"] == "scratch" for r in results)
    for method in names:
        table = {}
        for r in results:
            if r["name"].startswith(method + ",") and r["settings"]["max_iters"] == 15:  # 3 SFT + 12 iterations
                for row in r["dev"]:
                    table.setdefault((r["name"], row["iter"]), []).append(row["sampled"]["utility"])
        assert len(table) == (2 if method.startswith("SFT") else 6) * 2 and all(len(v) == 2 for v in table.values())
        best = max(sum(v) / 2 for v in table.values())
        chosen = numbers["chosen"][method]
        assert chosen["dev_sampled"] == pytest.approx(best)
        assert sum(table[chosen["name"], chosen["max_iters"]]) / 2 == pytest.approx(best)
        tuned = [r for r in results if r["name"] == f"{method} [tuned]"]
        assert len(tuned) == 1 and tuned[0]["settings"]["lr"] == chosen["lr"]
        assert tuned[0]["settings"]["max_iters"] == chosen["max_iters"]


def test_jobs_share_a_lessons_runs_and_print_the_one_process_table(tmp_path):
    """--jobs=2: two processes of one thread train the lesson's runs, each once, and the table and numbers are
    those of one process at one thread, to the digit."""
    args = ["one-y-per-x", "--seeds=1"] + TINY
    one, two = lesson(args + [f"--out_dir={tmp_path / 'one'}"]), lesson(args + ["--jobs=2", f"--out_dir={tmp_path / 'two'}"])
    table = [line for line in one.stdout.splitlines() if not line.startswith(("lesson", "numbers", "figure"))]
    assert table == [line for line in two.stdout.splitlines() if not line.startswith(("lesson", "numbers", "figure"))]
    numbers = [json.loads((tmp_path / d / "one-y-per-x" / "one-y-per-x.json").read_text()) for d in ("one", "two")]
    assert numbers[0] == numbers[1] and len(numbers[0]["utility"]) == 4
    for log in (tmp_path / "two").glob("*/*/metrics.jsonl"):
        iters = [json.loads(line)["iter"] for line in log.read_text().splitlines() if "loss" in json.loads(line)]
        assert len(iters) > 1 and iters == sorted(set(iters)), log
    assert len(list((tmp_path / "two" / "runs").glob("*/result.json"))) == 4
    assert "--jobs helper" not in two.stderr and (tmp_path / "two" / "one-y-per-x" / "helper-1.log").exists()  # it ended well


def test_scores_lesson_end_to_end(tmp_path, monkeypatch, capsys):
    """KTO+margin's [tuned] runs take the setting and stop with the best mean dev utility over two seeds; the
    rater's noise mislabels examples (none without it), more with more noise; the margins give those less weight
    than the others; the table, JSON and figure are written."""
    torch.set_num_threads(1)
    monkeypatch.setattr(tune, "LRS", (1e-3,))
    monkeypatch.setattr(tune, "BETAS", (0.05, 0.5))  # the shared setting's beta, 0.1, is not among them
    monkeypatch.setattr(sys, "argv", ["experiments.py", "scores", "--seeds=1", "--task_dev=0.05", "--utility_interval=4",
                                      f"--out_dir={tmp_path}"] + TINY)
    experiments.main()
    stdout = capsys.readouterr().out
    numbers = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert png_size(tmp_path / "scores" / "scores.png")[0] == 1280
    assert set(numbers["utility"]) == {"SFT", "SFT+SFT (control)"} | {f"{m}, noise {n}{t}" for m in ("KTO", "KTO+margin", "DPO")
                                                                     for n in (0.0, 0.15, 0.3) for t in ("", " [tuned]" * (m == "KTO+margin"))}
    runs = [json.loads(open(os.path.join(tmp_path, "runs", d, "result.json")).read()) for d in os.listdir(tmp_path / "runs")]
    # The choice, worked out again from the tuning runs' own dev rows (seeds 1337 and 1, noise-free rating).
    margins = [(r["seed"], r["settings"]) for r in runs if r["settings"].get("score_weight") == "margin"]
    dev = {}
    for r in runs:
        s = r["settings"]
        if s.get("score_weight") == "margin" and "score_noise" not in s and s["max_iters"] == 12 and s["beta"] in tune.BETAS:
            for row in r["dev"]:
                dev.setdefault((s["beta"], row["iter"]), []).append(row["sampled"]["utility"])
    assert len(dev) == 2 * 3 and all(len(v) == 2 for v in dev.values())
    beta, stop = max(dev, key=lambda k: (round(float(np.mean(dev[k])), 9), -k[0], -k[1]))  # ties: the earlier
    for noise in (0.15, 0.3):  # each [tuned] run at the choice (at noise 0 it may be a tuning run itself)
        assert any(seed == 1337 and s.get("score_noise") == noise and (s["lr"], s["beta"], s["max_iters"]) == (1e-3, beta, stop)
                   for seed, s in margins)
    assert f"[tuned] KTO+margin: lr 0.001, beta {beta:g}, {stop} iterations (chosen by this lesson)" in stdout
    chosen = numbers["chosen"]["KTO+margin"]
    assert (chosen["lr"], chosen["beta"], chosen["max_iters"]) == (1e-3, beta, stop)
    flipped = {r["name"]: r["n_flipped"] / r["n_main"] for r in runs if r["seed"] == 1337}
    assert flipped["KTO, noise 0.0"] == flipped["DPO, noise 0.0"] == 0 < flipped["KTO, noise 0.15"] < flipped["KTO, noise 0.3"]
    margin = {r["name"]: r["margin_weight"] for r in runs if "margin_weight" in r}  # noise 0.0's is a tuning run's
    assert {"KTO+margin, noise 0.15", "KTO+margin, noise 0.3"} <= set(margin)
    assert all(margin[f"KTO+margin, noise {n}"]["flipped"] < margin[f"KTO+margin, noise {n}"]["clean"] for n in (0.15, 0.3))
    w = numbers["weights"]["KTO+margin, noise 0.3"]
    assert w["margin_ratio"] == [pytest.approx(margin["KTO+margin, noise 0.3"]["flipped"] / margin["KTO+margin, noise 0.3"]["clean"])]
    assert "KTO+margin, noise 0.3 - KTO, noise 0.3" in stdout and "gradient weight ratio" in stdout


def test_settings_the_lessons_set_are_refused(tmp_path):
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"control": False}))
    for args, said in ((["--seed=3"], "seed=3"), (["--init_from=scratch"], "init_from='scratch'"),
                       (["--resume=true"], "resume=True"), ([str(preset)], "control=False")):
        result = subprocess.run([sys.executable, "experiments.py", "dpo"] + args + [f"--out_dir={tmp_path}"], cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.startswith(f"error: {said}:"), result.stderr
    unknown = subprocess.run([sys.executable, "experiments.py", "valu"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown lesson 'valu'" in unknown.stderr
