"""The paper's claims and Prop. 4.1 as lessons on the built-in tasks, one command each.

    python experiments.py value --beta=0.5          # KTO's value and gradient weight against z (seconds)
    python experiments.py noise --seeds=1           # KTO (three value functions) and DPO, 0-30% of labels flipped
    python experiments.py dpo --seeds=1 --max_iters=100 --device=cuda   # any train.py setting after the lesson

    python experiments.py tune --jobs=2             # each method's own lr, beta and stop, on the dev prompts

Lessons: tune, value, dpo, saturation, noise, scores, imbalance, one-y-per-x, no-sft, beta, contradict.
They run on the arithmetic task; --data=lists runs one on the lists task (long completions: room for the
reward to saturate on both sides; its own scale, TASK_DEFAULTS). Each trains with train.py's own functions, shares one SFT stage
per seed and data set, keeps every run in out_dir/runs/ under a digest of its settings (a run finished by
any lesson is not trained again; a changed setting makes a new run), prints its table (mean and 90% t
interval over seeds; comparisons as paired differences per seed) and writes out_dir/LESSON/LESSON.json and
LESSON.png (figures.py). After `tune`, the comparison lessons also run each method at its tuned setting
("[tuned]"). The lessons set seed, resume, control and init_from themselves; --seeds=N (default 5, tune 2)
takes the first N of 1337, 1, 2, 3, ..., 9. --jobs=N shares a lesson's runs among N processes of one thread
each (on a 2-core CPU a step at two threads is only 1.6-1.7x as fast as at one, so --jobs=2 is the faster
way; and at one thread a run gives the same numbers on every machine tried). value --run=RESULT.json draws a
weighed run's examples (the saturation lesson prints the path).
"""
import os
import signal
import subprocess
import sys

import numpy as np
import torch

import config
import data
import figures
import kto
import stats
import task
import train
import tune
from lab import SEEDS, Lab, read_weighed

# The lessons' scale: about a minute a run on a 2-core CPU. The built-in tasks with 4 answers per prompt
# give pairs (a desirable and an undesirable answer), so DPO, KTO and SFT see the same completions.
# A tenth of the prompts is kept as a dev split, whose utility every 50 iterations is what `tune` chooses by.
LESSON_DEFAULTS = {"task_demos": 4, "sft_iters": 500, "max_iters": 300, "eval_samples": 4, "log_interval": 10,
                   "task_dev": 0.1, "utility_interval": 50, "out_dir": "out-lessons"}
# The lists task's completions are 8 to 19 tokens, each scored against 50257 others: a step costs about
# seven arithmetic ones, so fewer, smaller steps (about a minute a run at 2 threads).
TASK_DEFAULTS = {"arithmetic": {}, "lists": {"batch_size": 16, "sft_iters": 300, "max_iters": 150, "eval_tokens": 24,
                                             "utility_interval": 25}}
# Settings each lesson sets for its runs: the command line cannot change them.
LESSON_KEYS = ("seed", "resume", "control", "init_from")
# Set in the environment of the processes --jobs starts, to their parent's pid (experiments.main).
HELPER = "KTO_LESSON_HELPER"
# The seeds a lesson's own choice of settings is made on (tune's default; no-sft).
TUNE_SEEDS = 2


# ----------------------------------------------------------------------------- tables

def utility_table(results: dict[str, list[dict]], extra: dict[str, tuple[str, float]] | None = None) -> dict:
    """Print utility (sampled and greedy, % over held-out prompts) per run name, and any `extra` columns
    (label: ("section.key" of the result, scale)); return the numbers."""
    extra = extra or {}
    print(f"mean [90% t interval] over {len(next(iter(results.values())))} seed(s)")
    print(f"{'run':<34}{'sampled (T=1)':>22}{'greedy':>22}" + "".join(f"{h:>22}" for h in extra))
    numbers = {}
    for name, rs in results.items():
        row = {"sampled": [r["sampled"]["utility"] for r in rs], "greedy": [r["greedy"]["utility"] for r in rs]}
        for label, (path, _) in extra.items():
            section, key = path.split(".")
            row[label] = [r[section][key] for r in rs]
        numbers[name] = row
        print(f"{name:<34}{stats.fmt(row['sampled']):>22}{stats.fmt(row['greedy']):>22}" +
              "".join(f"{stats.fmt(row[label], scale):>22}" for label, (_, scale) in extra.items()))
    return numbers


def compare(lab: Lab, plan: list[tuple[str, dict]], comparisons: list[tuple[str, str]],
            extra: dict[str, tuple[str, float]] | None = None, draw: bool = True,
            tuned_only: list[tuple[str, dict]] = ()) -> tuple[dict[str, list[dict]], dict]:
    """Run the plan, and its tuned runs (tune.with_tuned); print, save and (draw) plot its utility table and
    the paired differences of `comparisons`."""
    results = lab.runs(tune.with_tuned(lab.base, plan, tuned_only))
    numbers = utility_table(results, extra)
    lab.save({"utility": numbers, "differences": stats.claims(numbers, comparisons)})
    if draw:
        figures.compare(lab.dir, lab.lesson, numbers)
    return results, numbers


def over_training(lab: Lab, name: str, groups: tuple[str, ...], key: str) -> np.ndarray:
    """Per iteration, groups' `key` (weighted by their counts), mean over seeds; NaN where none is present."""
    per_seed = []
    for seed in lab.seeds:
        values = []
        for row in lab.rows(name, seed):
            present = [row["groups"][g] for g in groups if g in row.get("groups", {})]
            n = sum(g["n"] for g in present)
            values.append(sum(g["n"] * g[key] for g in present) / n if n else np.nan)
        per_seed.append(values)
    values = np.array(per_seed)
    present = (~np.isnan(values)).sum(axis=0)
    return np.where(present > 0, np.nansum(values, axis=0) / np.maximum(present, 1), np.nan)


# ----------------------------------------------------------------------------- the lessons

def lesson_value(lab: Lab) -> None:
    """Prop. 4.1, no training: value and gradient weight against z = beta (r - z_ref), for the lesson's beta,
    lambda_d and lambda_u, computed by kto.kto_loss (each value function) and kto.dpo_loss themselves, beside
    the Kahneman-Tversky value function; with --run, a weighed run's examples on top."""
    beta, lambda_d, lambda_u = lab.base.beta, lab.base.lambda_d or 1.0, lab.base.lambda_u or 1.0
    z = np.linspace(-10, 10, 2001)
    logratio = torch.tensor(z / beta, dtype=torch.float64)  # r - z_ref in nats (z_ref = 0: KL pairs with equal log-probs)
    zero = torch.zeros_like(logratio)
    numbers = {"beta": beta, "lambda_d": lambda_d, "lambda_u": lambda_u, "z": z.tolist(), "nats": (z / beta).tolist()}
    print(f"beta {beta}, lambda_d {lambda_d:g}, lambda_u {lambda_u:g}: z = beta (r - z_ref); r - z_ref = z / beta nats")
    print(f"where each loss learns: gradient weight at least {kto.SATURATION_FRACTION:.0%} of its largest")
    print(f"{'loss':<26}{'z':>20}{'r - z_ref (nats)':>24}")

    def window(name: str, saturated: list[bool]) -> None:  # the z where the loss learns, edges of the grid as infinite
        live = z[~np.array(saturated)]
        if live.size == len(z):
            print(f"{name:<26}{'everywhere: never saturates':>44}")
            return
        ends = [("-inf" if live.min() == z.min() else f"{live.min() * f:+.2f}", "+inf" if live.max() == z.max() else
                 f"{live.max() * f:+.2f}") for f in (1, 1 / beta)]
        print(f"{name:<26}{' to '.join(ends[0]):>20}{' to '.join(ends[1]):>24}")

    for value in kto.VALUES:
        curves = {}
        for label, desirable in (("desirable", True), ("undesirable", False)):
            lam = lambda_d if desirable else lambda_u
            flags = torch.full(logratio.shape, desirable)
            _, s = kto.kto_loss(logratio, zero, zero, zero, flags, beta, lambda_d, lambda_u, value)
            # each z alone (the loss is a mean): v = 1 - loss / lambda, the value of eq. (7)
            v = [1 - kto.kto_loss(logratio[i:i + 1], zero[:1], zero[:1], zero[:1], flags[:1], beta, lambda_d, lambda_u,
                                  value)[0].item() / lam for i in range(len(z))]
            curves[label] = {"value": v, "share": s["share"].tolist(), "saturated": s["saturated"].tolist(),
                             "right": s["right"].tolist()}
        numbers[value] = curves
        window(f"KTO {value}, desirable", curves["desirable"]["saturated"])
    _, s = kto.dpo_loss(logratio, zero, zero, zero, beta)  # the margin h = r_w - r_l in place of r - z_ref
    numbers["dpo"] = {"share": s["share"].tolist(), "saturated": s["saturated"].tolist(),
                      "value": (torch.nn.functional.logsigmoid(torch.tensor(z)) + np.log(2)).tolist()}
    window("DPO (the margin h)", numbers["dpo"]["saturated"])
    print("SFT: every example, weight 1, whatever its likelihood")
    # Kahneman and Tversky (1992): v(x) = x^0.88 for gains, -2.25 (-x)^0.88 for losses
    numbers["kahneman_tversky"] = [float(np.sign(x) * abs(x) ** 0.88 * (1 if x >= 0 else 2.25)) for x in z]
    run = None
    if lab.run_file:
        run = read_weighed(lab.run_file)
        print(f"examples of {lab.run_file} (seed {run['seed']}, {run['name']}): z at iterations {', '.join(run['weights'])}")
    lab.save(numbers)
    figures.value(lab.dir, numbers, run)


def lesson_dpo(lab: Lab) -> None:
    """SFT, DPO and KTO from one SFT start on the same pairs at the shared setting, and after `tune` each of
    DPO, KTO, DPO+NLL and the SFT control at its tuned one (the paper: KTO matches or beats DPO); their dev
    utility over training."""
    plan = [("SFT", {"loss": "none"}), ("SFT+DPO", {"loss": "dpo"}), ("SFT+KTO", {"loss": "kto"})]
    new = [("SFT+SFT (control)", {"loss": "control"}), ("SFT+DPO+NLL", {"loss": "dpo", "nll_weight": 1.0})]  # tuned only
    results, numbers = compare(lab, plan, [("SFT+KTO", "SFT+DPO"), ("SFT+KTO", "SFT+DPO+NLL"), ("SFT+KTO", "SFT"),
                                           ("SFT+KTO", "SFT+SFT (control)"), ("SFT+DPO", "SFT"), ("SFT+DPO+NLL", "SFT")],
                               extra={"length (tokens)": ("sampled.length", 1), "ends with EOT (%)": ("sampled.eot", 100)},
                               draw=False, tuned_only=new)
    if not results["SFT"][0]["dev"]:  # the figure is of the dev prompts (task_dev)
        return
    log_ratios = {}
    for run in results:
        if "DPO" in run:
            rows = [lab.rows(run, seed) for seed in lab.seeds]
            log_ratios[run] = {key: np.mean([[row[key] for row in r] for r in rows], axis=0).tolist()
                               for key in ("reward_chosen", "reward_rejected")}
    figures.dpo(lab.dir, results, numbers, log_ratios)


def lesson_saturation(lab: Lab) -> None:
    """One KTO run: the saturated share of each class by side over training ("already right": desirable above
    z_ref, undesirable below; "wrong side"), its mean weight as a share of the peak, and every training
    example's z at the start, middle and end (Prop. 4.1 both ways: KTO stops learning from what it already
    rates far from z_ref, right or wrong). With label_noise, the flipped examples as a group of their own."""
    results = lab.runs([("SFT", {"loss": "none"}), ("KTO", {"loss": "kto"})], weigh=True)
    numbers = {"utility": utility_table(results), "over_training": {}, "weights": {}}
    stops = list(results["KTO"][0]["weights"])
    groups = ("desirable", "undesirable") + (("flipped",) if any(r["n_flipped"] for r in results["KTO"]) else ())
    print(f"\n% of each group's training examples (all whole batches), mean [90% t interval] over {len(lab.seeds)} seed(s): "
          "saturated on the right side / on the wrong side / mean weight as a share of the peak" +
          ("; flipped: label_noise's examples, either label, the side their flipped label asks for" if "flipped" in groups else ""))
    print(f"{'group':<14}" + "".join(f"{'iteration ' + s:>42}" for s in stops))
    for group in groups:
        numbers["over_training"][group] = {key: over_training(lab, "KTO", (group,), key).tolist()
                                           for key in ("saturated_right", "saturated_wrong", "weight_share")}
        numbers["weights"][group] = {}
        cells = []
        for stop in stops:
            per_seed = {"right": [], "wrong": [], "share": []}
            for r in results["KTO"]:
                w = r["weights"][stop]
                mine = [i for i, g in enumerate(w["group"]) if g == group]
                per_seed["right"].append(np.mean([w["saturated"][i] and w["right"][i] for i in mine]))
                per_seed["wrong"].append(np.mean([w["saturated"][i] and not w["right"][i] for i in mine]))
                per_seed["share"].append(np.mean([w["share"][i] for i in mine]))
            numbers["weights"][group][stop] = per_seed
            cells.append(" / ".join(stats.fmt(per_seed[k]).split(" [")[0] for k in ("right", "wrong", "share")))
        print(f"{group:<14}" + "".join(f"{c:>42}" for c in cells))
    first = lab.dirs["KTO", lab.seeds[0]]
    print(f"\nthe examples on the value curve: python experiments.py value --beta={lab.base.beta} "
          f"--run={os.path.join(first, 'result.json')}")
    lab.save(numbers)
    figures.saturation(lab.dir, numbers, results, lab.seeds, groups)


def lesson_noise(lab: Lab) -> None:
    """0-30% of labels flipped: KTO with each value function (kto.VALUES) and DPO, at beta 0.1 and 0.5, and after
    `tune` KTO and DPO at their tuned settings. Does wrong-side saturation protect KTO? Flipped examples'
    weight and wrong-side share against the clean ones'."""
    levels, betas = (0.0, 0.1, 0.2, 0.3), (0.1, 0.5)
    plan, tuned = [("SFT", {"loss": "none"})], []
    for beta in betas:
        for level in levels:
            plan += [(f"KTO {value} beta {beta} noise {level}", {"loss": "kto", "value": value, "beta": beta, "label_noise": level})
                     for value in kto.VALUES]
            plan.append((f"DPO beta {beta} noise {level}", {"loss": "dpo", "beta": beta, "label_noise": level}))
    for level in levels:  # the tuned lr, beta and stop replace the shared ones: only eq. (7)'s KTO and DPO
        tuned += [(f"KTO noise {level}", {"loss": "kto", "label_noise": level}), (f"DPO noise {level}", {"loss": "dpo", "label_noise": level})]
    results = lab.runs(plan + tune.with_tuned(lab.base, [], tuned))
    numbers = {"utility": utility_table(results), "weights": {}}
    numbers["differences"] = stats.claims(numbers["utility"], [(f"KTO sigmoid beta {b} noise {lv}", f"{other} beta {b} noise {lv}")
                                                              for b in betas for lv in levels[1:]
                                                              for other in ("DPO", "KTO linear", "KTO logsigmoid")] +
                                          [(f"KTO noise {lv} [tuned]", f"DPO noise {lv} [tuned]") for lv in levels])
    print("\nmean over training: weight as a share of the loss's largest, and % saturated on the wrong side")
    print(f"{'run':<38}{'clean share':>13}{'flipped share':>15}{'flipped / clean':>17}{'wrong side: clean':>19}{'flipped':>9}")
    for name, _ in plan[1:]:
        if "noise 0.0" in name:
            continue
        clean = ("pairs",) if name.startswith("DPO") else ("desirable", "undesirable")
        w = {key: {part: over_training(lab, name, groups, key).tolist() for part, groups in (("clean", clean), ("flipped", ("flipped",)))}
             for key in ("weight_share", "saturated_wrong")}
        numbers["weights"][name] = w
        c, f = np.nanmean(w["weight_share"]["clean"]), np.nanmean(w["weight_share"]["flipped"])
        wc, wf = 100 * np.nanmean(w["saturated_wrong"]["clean"]), 100 * np.nanmean(w["saturated_wrong"]["flipped"])
        print(f"{name:<38}{c:>13.3f}{f:>15.3f}{f / c:>17.2f}{wc:>18.1f}%{wf:>8.1f}%")
    lab.save(numbers)
    figures.noise(lab.dir, numbers, levels, betas)


RATER_NOISE = (0.0, 0.15, 0.3)


def lesson_scores(lab: Lab) -> None:
    """Score-based feedback: the task's rating (task.rating) through a noisy rater (score_noise), labelled at the
    judge's 1/2. KTO on the labels, KTO with margin weights, DPO on the pairs ordered by score, beside SFT: does
    the magnitude help, and what weight do the examples the noise mislabelled get? KTO+margin's setting is
    chosen here, on dev prompts and the noise-free rating, as `tune` chooses the others'."""
    rated = {"score_threshold": task.DESIRABLE_SCORE}
    plan = [("SFT", {"loss": "none"}), ("SFT+SFT (control)", {"loss": "control"})]
    for noise in RATER_NOISE:
        rater = {**rated, **({"score_noise": noise} if noise else {})}
        plan += [(f"KTO, noise {noise}", {"loss": "kto", **rater}),
                 (f"KTO+margin, noise {noise}", {"loss": "kto", "score_weight": "margin", **rater}),
                 (f"DPO, noise {noise}", {"loss": "dpo", **rater})]
    print(f"KTO+margin's lr, beta and stop, chosen on dev prompts over seeds {', '.join(map(str, SEEDS[:TUNE_SEEDS]))}:")
    chosen = tune.choose_settings(Lab(lab.lesson, lab.base, TUNE_SEEDS, lab.device, parent=lab.parent),
                                  {"KTO+margin": tune.grid("KTO+margin")})
    print()
    results = lab.runs(tune.with_tuned(lab.base, plan, own={m: tune.overrides_of(c) for m, c in chosen.items()}))
    numbers = utility_table(results)
    diffs = stats.claims(numbers, [(f"KTO+margin, noise {n}", f"KTO, noise {n}") for n in RATER_NOISE] +
                         [(f"KTO{m}, noise {n}", f"DPO, noise {n}") for m in ("", "+margin") for n in RATER_NOISE])
    print("\nthe examples (pairs) the noise mislabelled, flipped: their share of the training data, and their margin weight "
          "and mean gradient weight over training as a ratio to the clean ones' (mean over seeds)")
    print(f"{'run':<36}{'flipped':>10}{'margin weight ratio':>22}{'gradient weight ratio':>24}")
    weights = {}
    for name in results:
        if "noise 0.0" in name or "noise" not in name:
            continue
        clean = ("pairs",) if name.startswith("DPO") else ("desirable", "undesirable")
        ratio = [np.nanmean(over_training(lab, name, ("flipped",), "grad_weight")) /
                 np.nanmean(over_training(lab, name, clean, "grad_weight"))]
        share = [r["n_flipped"] / r["n_main"] for r in results[name]]
        margin = [r["margin_weight"]["flipped"] / r["margin_weight"]["clean"] for r in results[name] if "margin_weight" in r]
        weights[name] = {"flipped": share, "margin_ratio": margin, "gradient_ratio": ratio}
        print(f"{name:<36}{stats.fmt(share) + '%':>10}{f'{np.mean(margin):.2f}' if margin else '-':>22}{ratio[0]:>24.2f}")
    lab.save({"utility": numbers, "weights": weights, "differences": diffs,
              "chosen": tune.without_curves(chosen)})
    figures.scores(lab.dir, numbers, weights, RATER_NOISE)


def lesson_imbalance(lab: Lab) -> None:
    """90% of the desirable examples dropped (1:10): lambda_D = 1 against the paper's advised lambda_D."""
    results, _ = compare(lab, [("SFT", {"loss": "none"}), ("DPO, all pairs", {"loss": "dpo"}), ("KTO, all", {"loss": "kto"}),
                               ("KTO 1:10, lambda_d=1", {"loss": "kto", "desirable_fraction": 0.1, "lambda_d": 1.0}),
                               ("KTO 1:10, advised", {"loss": "kto", "desirable_fraction": 0.1})],
                         [("KTO 1:10, advised", "SFT"), ("KTO 1:10, advised", "DPO, all pairs"),
                          ("KTO 1:10, advised", "KTO 1:10, lambda_d=1")])
    advised = ", ".join(f"{r['lambda_d']:.2f}" for r in results["KTO 1:10, advised"])
    print(f"lambda_d advised at 1:10, per seed: {advised}")


def lesson_one_y_per_x(lab: Lab) -> None:
    """One completion per prompt (half of the pairs' completions) against all of them."""
    compare(lab, [("SFT", {"loss": "none"}), ("DPO, all pairs", {"loss": "dpo"}), ("KTO, all", {"loss": "kto"}),
                  ("KTO, one y per x", {"loss": "kto", "one_y_per_x": True})],
            [("KTO, one y per x", "SFT"), ("KTO, one y per x", "DPO, all pairs")])


def lesson_no_sft(lab: Lab) -> None:
    """SFT, DPO and KTO from a random init, no SFT first: utility, completion length and how often it ends (EOT),
    at one shared setting and at each method's own, chosen on dev prompts from the random start (tune's
    choices, made from the SFT start, do not carry over)."""
    # As many iterations as SFT and then the loss (800), twice the tokens to ramble in (16), dev utility half as often.
    scratch = {"init_from": "scratch", "max_iters": lab.base.sft_iters + lab.base.max_iters, "lr": 3e-3,
               "eval_tokens": 2 * lab.base.eval_tokens, "utility_interval": 2 * lab.base.utility_interval}
    methods = {"SFT from scratch": {"loss": "sft"}, "DPO from scratch": {"loss": "dpo"}, "KTO from scratch": {"loss": "kto"}}
    # A smaller grid than tune's, each run being as long as SFT and the loss together: the shared setting is in it.
    betas = {"sft": ({},), "dpo": ({"beta": 0.1}, {"beta": 0.5}, {"beta": 2.0})}
    grids = {m: [{**scratch, **o, "lr": lr, **b} for lr in (1e-3, 3e-3) for b in betas.get(o["loss"], betas["dpo"])]
             for m, o in methods.items()}
    print(f"each method's lr, beta and stop from the random start, chosen on dev prompts over seeds "
          f"{', '.join(map(str, SEEDS[:TUNE_SEEDS]))}:")
    chosen = tune.choose_settings(Lab(lab.lesson, lab.base, TUNE_SEEDS, lab.device, parent=lab.parent), grids)
    plan = [(m, {**scratch, **o}) for m, o in methods.items()]
    plan += [(f"{m} [tuned]", {**scratch, **o, **tune.overrides_of(chosen[m])}) for m, o in methods.items()]
    print()
    results = lab.runs(plan)
    numbers = utility_table(results, extra={"length (tokens)": ("sampled.length", 1), "ends with EOT (%)": ("sampled.eot", 100)})
    diffs = stats.claims(numbers, [("KTO from scratch", "DPO from scratch"), ("SFT from scratch", "KTO from scratch")])
    diffs.update(stats.claims(numbers, [("DPO from scratch", "KTO from scratch")], {"length (tokens)": 1}))
    lab.save({"utility": numbers, "differences": diffs,
              "chosen": tune.without_curves(chosen)})
    figures.no_sft(lab.dir, numbers, scratch["eval_tokens"])


def lesson_beta(lab: Lab) -> None:
    """A beta sweep: larger beta saturates more examples sooner; what does that do to utility?"""
    betas = (0.02, 0.1, 0.5, 2.0)
    results = lab.runs([("SFT", {"loss": "none"})] + [(f"KTO beta={b}", {"loss": "kto", "beta": b}) for b in betas])
    numbers = {"utility": utility_table(results), "saturated": {}}
    print(f"\n{'run':<16}{'saturated, mean over training (%)':>36}")
    for b in betas:
        name = f"KTO beta={b}"
        sat = [np.mean([r["saturated"] for r in lab.rows(name, s)]) for s in lab.seeds]
        numbers["saturated"][name] = sat
        print(f"{name:<16}{stats.fmt(sat):>36}")
    numbers["differences"] = stats.claims(numbers["utility"], [(f"KTO beta={b}", f"KTO beta={a}") for a, b in zip(betas, betas[1:])])
    lab.save(numbers)
    figures.beta(lab.dir, numbers, betas)


def lesson_contradict(lab: Lab) -> None:
    """30% of the pairs also come from a second annotator with the opposite preference (Theorem 4.3)."""
    results = lab.runs(tune.with_tuned(lab.base, [("SFT", {"loss": "none"}), ("KTO", {"loss": "kto"}), ("DPO", {"loss": "dpo"}),
                                                  ("KTO, 30% contradicted", {"loss": "kto", "contradict": 0.3}),
                                                  ("DPO, 30% contradicted", {"loss": "dpo", "contradict": 0.3})]))
    numbers = utility_table(results)
    diffs = stats.claims(numbers, [("KTO, 30% contradicted", "DPO, 30% contradicted")])
    print(f"\ngreedy utility on the training prompts (%)\n{'run':<28}{'contradicted prompts':>24}{'other prompts':>18}")
    for name in ("KTO, 30% contradicted", "DPO, 30% contradicted"):
        c = [r["greedy_contradicted_prompts"]["utility"] for r in results[name]]
        o = [r["greedy_clean_prompts"]["utility"] for r in results[name]]
        numbers[name].update(contradicted_prompts=c, other_prompts=o)
        print(f"{name:<28}{stats.fmt(c):>24}{stats.fmt(o):>18}")
    lab.save({"utility": numbers, "differences": diffs})
    figures.contradict(lab.dir, numbers)


LESSONS = {"tune": tune.tune, "value": lesson_value, "dpo": lesson_dpo, "saturation": lesson_saturation, "noise": lesson_noise,
           "scores": lesson_scores, "imbalance": lesson_imbalance, "one-y-per-x": lesson_one_y_per_x, "no-sft": lesson_no_sft,
           "beta": lesson_beta, "contradict": lesson_contradict}


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if args else 1)
    if args[0] not in LESSONS:
        raise SystemExit(f"error: unknown lesson '{args[0]}': expected one of {', '.join(LESSONS)}")
    lesson, seeds, jobs, run_file, overrides = args[0], TUNE_SEEDS if args[0] == "tune" else 5, 1, None, []
    task_name = "arithmetic"
    for arg in args[1:]:
        key, _, value = arg.removeprefix("--").partition("=")
        if key == "seeds":
            if not value.isdigit() or not 1 <= int(value) <= len(SEEDS):
                raise SystemExit(f"error: --seeds={value}: expected an integer from 1 to {len(SEEDS)}")
            seeds = int(value)
        elif key == "jobs":
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"error: --jobs={value}: expected a whole number of processes, 1 or more")
            jobs = int(value)
        elif key == "run" and lesson == "value":
            run_file = value
        else:
            task_name = value if key == "data" else task_name
            overrides.append(arg)
    defaults = {**LESSON_DEFAULTS, "data": task_name, **TASK_DEFAULTS.get(task_name, {})}
    base = config.parse_config([f"--{k}={v}" for k, v in defaults.items()] + overrides)
    for key in LESSON_KEYS:  # given on the command line or in a preset file
        if getattr(base, key) != getattr(config.TrainConfig(), key):
            raise SystemExit(f"error: {key}={getattr(base, key)!r}: the lessons set {', '.join(LESSON_KEYS)} themselves "
                             f"(seeds: --seeds=N)")
    _, _, device = train.setup_distributed(base)
    trains = "" if lesson == "value" else f"{base.data} task; seeds {', '.join(map(str, SEEDS[:seeds]))}; "
    print(f"lesson {lesson}: {trains}device {device}, torch {torch.__version__}")
    parent = os.environ.get(HELPER)  # set: this process is a --jobs helper, and this is its parent's pid
    helpers = []
    if jobs > 1 and lesson != "value" and parent is None:  # jobs - 1 helpers train the lesson's runs beside this process
        torch.set_num_threads(1)
        command = [sys.executable, os.path.abspath(__file__)] + [a for a in args if a.removeprefix("--").partition("=")[0] != "jobs"]
        os.makedirs(os.path.join(base.out_dir, lesson), exist_ok=True)
        for i in range(1, jobs):
            with open(os.path.join(base.out_dir, lesson, f"helper-{i}.log"), "w") as log:
                helpers.append(subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", HELPER: str(os.getpid())},
                                                stdout=subprocess.DEVNULL, stderr=log))
    try:
        LESSONS[lesson](Lab(lesson, base, seeds, device, run_file, parent=int(parent) if parent else None))
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None
    except BaseException:  # this process failed or was stopped: its helpers stop too
        for helper in helpers:
            helper.terminate()
        raise
    finally:
        for i, helper in enumerate(helpers, 1):
            if helper.wait() not in (0, -signal.SIGTERM):  # the runs it left are trained here; say why it stopped
                print(f"note: --jobs helper {i} ended with exit code {helper.returncode}: "
                      f"{os.path.join(base.out_dir, lesson, f'helper-{i}.log')}", file=sys.stderr)

if __name__ == "__main__":
    main()
