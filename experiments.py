"""The paper's claims and Prop. 4.1 as lessons on the built-in task, one command each.

    python experiments.py value                     # KTO's and DPO's value and gradient weight (seconds)
    python experiments.py noise --seeds=3           # KTO vs DPO with 0-30% of labels flipped
    python experiments.py dpo --seeds=1 --max_iters=100 --device=cuda   # any train.py setting after the lesson

    python experiments.py tune                      # each method's own lr, beta and stop, on the dev prompts

Lessons: tune, value, dpo, saturation, noise, imbalance, one-y-per-x, no-sft, beta, contradict.
Each trains with train.py's own functions, shares one SFT stage per seed and data set, keeps every run in
out_dir/runs/ under a digest of its settings (a run finished by any lesson is not trained again; a changed
setting makes a new run), prints its table (mean and 90% t interval over seeds; comparisons as paired
differences per seed) and writes out_dir/LESSON/LESSON.json and LESSON.png. After `tune`, the comparison
lessons also run each method at its tuned setting ("[tuned]"). Figures need matplotlib; without it the numbers
still come. The lessons set seed, resume, control and init_from themselves; --seeds=N (default 5, tune 2)
takes the first N of 1337, 1, 2, 3, ..., 9.
"""
import os
import sys

import numpy as np
import torch

import config
import data
import kto
import stats
import train
import tune
from lab import SEEDS, Lab

# The lessons' scale: about a minute a run on a 2-core CPU. The built-in task with 4 answers per prompt
# gives pairs (one correct, one wrong answer), so DPO, KTO and SFT see the same completions.
# A tenth of the prompts is kept as a dev split, whose utility every 50 iterations is what `tune` chooses by.
LESSON_DEFAULTS = {"task_demos": 4, "sft_iters": 500, "max_iters": 300, "eval_samples": 4, "log_interval": 10,
                   "task_dev": 0.1, "utility_interval": 50, "out_dir": "out-lessons"}
# Settings each lesson sets for its runs: the command line cannot change them.
LESSON_KEYS = ("seed", "resume", "control", "init_from")


# ----------------------------------------------------------------------------- tables and figures

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


def pyplot():
    """matplotlib's pyplot, or None (with a note) when it is not installed: figures are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure, the numbers are in the JSON")
        return None
    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def save_figure(lab: Lab, fig) -> None:
    path = os.path.join(lab.dir, f"{lab.lesson}.png")
    fig.tight_layout()
    fig.savefig(path)
    print(f"figure: {path}")


def bars(ax, numbers: dict, names: list[str], key: str = "sampled", scale: float = 100, ylabel: str = "",
         offset: float = 0.0, width: float = 0.8, color: str = "#8fb3d9", label: str | None = None) -> None:
    """Mean over seeds per run, with 90% t-interval whiskers; utility in % unless key and ylabel say otherwise."""
    intervals = [stats.interval([scale * v for v in numbers[n][key]]) for n in names]
    means = [m for m, _, _ in intervals]
    low, high = [m - lo for m, lo, _ in intervals], [hi - m for m, _, hi in intervals]
    ax.bar([i + offset for i in range(len(names))], means, width=width, yerr=[low, high], capsize=4, color=color,
           edgecolor="#444444", label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel or f"held-out utility, {key} (%)")
    if scale == 100:
        ax.set_ylim(0, 100)
    ax.tick_params(axis="x", labelsize=7, labelrotation=12)
    ax.set_title(f"mean of {len(numbers[names[0]][key])} seed(s), 90% t interval", fontsize=8)


def compare(lab: Lab, plan: list[tuple[str, dict]], comparisons: list[tuple[str, str]],
            extra: dict[str, tuple[str, float]] | None = None, draw: bool = True,
            tuned_only: list[tuple[str, dict]] = ()) -> tuple[dict[str, list[dict]], dict]:
    """Run the plan, and its tuned runs (tune.with_tuned); print, save and (draw) plot as sampled and greedy
    bars its utility table and the paired differences of `comparisons`."""
    results = lab.runs(tune.with_tuned(lab.base, plan, tuned_only))
    numbers = utility_table(results, extra)
    lab.save({"utility": numbers, "differences": stats.claims(numbers, comparisons)})
    plt = pyplot() if draw else None
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(numbers)), 3.6))
        for ax, key in zip(axes, ("sampled", "greedy")):
            bars(ax, numbers, list(numbers), key)
        save_figure(lab, fig)
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


def dev_curve(start: list[dict], runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Iterations and the mean over seeds of a sampled dev-utility `key`, from the SFT start (iteration 0)."""
    its = [0] + [row["iter"] for row in runs[0]["dev"]]
    return its, [np.mean([s["dev"][0]["sampled"][key] for s in start])] + \
        [np.mean([r["dev"][i]["sampled"][key] for r in runs]) for i in range(len(its) - 1)]


def smooth(y: np.ndarray, window: int = 10) -> np.ndarray:
    """Running mean over `window` iterations, ignoring NaN."""
    ok = ~np.isnan(y)
    kernel = np.ones(window)
    return np.convolve(np.where(ok, y, 0), kernel, mode="same") / np.maximum(np.convolve(ok, kernel, mode="same"), 1)


# ----------------------------------------------------------------------------- the lessons

def lesson_value(lab: Lab) -> None:
    """Prop. 4.1, no training: value and gradient weight against the reward's distance from the reference
    point, computed by kto.kto_loss and kto.dpo_loss themselves on a grid of log-ratios."""
    x = np.linspace(-100, 100, 801)  # r - z_ref (KTO) or the margin h (DPO), nats
    zero = torch.zeros(1, dtype=torch.float64)
    numbers = {"x": x.tolist(), "kto": {}, "dpo": {}}
    print("where each loss learns: gradient weight above 10% of its largest, for r - z_ref (KTO) or the margin h (DPO)")
    print(f"{'beta':<8}{'KTO (nats)':>20}{'DPO (nats)':>20}")
    for beta in (0.05, 0.1, 0.5):
        curves = {"value_desirable": [], "value_undesirable": [], "weight": [], "saturated": []}
        dpo_curves = {"value": [], "weight": [], "saturated": []}
        for xi in x:
            logp = torch.tensor([xi], dtype=torch.float64)
            for desirable in (True, False):  # one example, z_ref = 0 (KL pairs with equal log-probs)
                loss, stats = kto.kto_loss(logp, zero, zero, zero, torch.tensor([desirable]), beta)
                curves["value_desirable" if desirable else "value_undesirable"].append(1 - loss.item())
            # The weight, lambda beta v (1 - v), is the same for either label: the last call's serves.
            curves["weight"].append(stats["weight"].item() / (beta / 4))  # of the peak, lambda beta / 4
            curves["saturated"].append(bool(stats["saturated"]))
            loss, stats = kto.dpo_loss(logp, zero, zero, zero, beta)
            dpo_curves["value"].append(-loss.item())  # DPO's implied value: log sigmoid(beta h)
            dpo_curves["weight"].append(stats["weight"].item() / beta)  # of its supremum, beta
            dpo_curves["saturated"].append(bool(stats["saturated"]))
        numbers["kto"][beta], numbers["dpo"][beta] = curves, dpo_curves
        windows = []
        for c in (curves, dpo_curves):
            live = x[~np.array(c["saturated"])]
            # Still learning at the grid's lower edge (DPO, pairs ordered wrong): no lower end, "-inf".
            windows.append(f"{'-inf' if live.min() == x.min() else f'{live.min():+.1f}'} to {live.max():+.1f}")
        print(f"{beta:<8}{windows[0]:>20}{windows[1]:>20}")
    print("SFT: every example, weight 1, whatever its likelihood")
    lab.save(numbers)
    plt = pyplot()
    if plt is None:
        return
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = {0.05: "#1f77b4", 0.1: "#2ca02c", 0.5: "#d62728"}
    for beta, c in numbers["kto"].items():
        left.plot(x, c["value_desirable"], color=colors[beta], label=f"desirable, beta={beta}")
        left.plot(x, c["value_undesirable"], color=colors[beta], ls=":", label=f"undesirable, beta={beta}")
        mid.plot(x, numbers["dpo"][beta]["value"], color=colors[beta], ls="--", label=f"beta={beta}")
        right.plot(x, c["weight"], color=colors[beta], label=f"KTO, beta={beta}")
        right.plot(x, numbers["dpo"][beta]["weight"], color=colors[beta], ls="--", label=f"DPO, beta={beta}")
    right.axhline(1.0, color="black", lw=1, label="SFT (constant)")
    right.axhline(0.1, color="gray", lw=0.8, ls=":", label="saturated below 10%")
    left.set(xlabel="r - z_ref (nats)", ylabel="value v", title="KTO's value (eq. 7): flat at both ends")
    mid.set(xlabel="margin h (nats)", ylabel="log sigmoid(beta h)", title="DPO's implied value: steep for wrong pairs",
            ylim=(-12, 0.5))
    right.set(xlabel="r - z_ref (KTO) or margin h (DPO), nats", ylabel="gradient weight / its largest",
              title="Prop. 4.1: where each loss stops learning")
    for ax in (left, mid, right):
        ax.legend(fontsize=6.5)
    save_figure(lab, fig)


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
    plt = pyplot()
    if plt is None or not results["SFT"][0]["dev"]:  # the figure is of the dev prompts (task_dev)
        return
    # Over training, on the dev prompts: the dip, DPO's displacement, and where each tuned run stops.
    fig, axes = plt.subplots(2, 2, figsize=(12.8, 8.4))
    colors = {"SFT+SFT (control)": "#7f7f7f", "SFT+DPO": "#1f77b4", "SFT+DPO+NLL": "#9467bd", "SFT+KTO": "#2ca02c"}
    for name, color in colors.items():
        for run, ls in ((name, "--"), (f"{name} [tuned]", "-")):
            if run not in results:
                continue
            for ax, key, scale in ((axes[0, 0], "utility", 100), (axes[0, 1], "length", 1)):
                its, values = dev_curve(results["SFT"], results[run], key)
                ax.plot(its, scale * np.array(values), color=color, ls=ls, marker="o" if ls == "-" else None, label=run)
            if name in ("SFT+DPO", "SFT+DPO+NLL"):
                rows = [lab.rows(run, seed) for seed in lab.seeds]
                for key, alpha in (("reward_chosen", 1.0), ("reward_rejected", 0.5)):
                    axes[1, 0].plot(smooth(np.mean([[row[key] for row in r] for r in rows], axis=0)), color=color, ls=ls,
                                    alpha=alpha, label=f"{run}: {key.split('_')[1]}")
    axes[0, 0].axhline(100 * dev_curve(results["SFT"], results["SFT"], "utility")[1][0], color="black", lw=1, label="SFT start")
    axes[0, 0].set(xlabel="iteration", ylabel="dev utility, sampled (%)", ylim=(0, 100),
                   title="dev utility (dashed: shared setting; solid: tuned, to its stop)")
    axes[0, 1].set(xlabel="iteration", ylabel="mean sampled length (tokens)", title="dev completion length")
    axes[1, 0].axhline(0, color="black", lw=1)
    axes[1, 0].set(xlabel="iteration", ylabel="log pi / pi_ref (nats)", title="DPO: chosen and rejected log-ratio")
    bars(axes[1, 1], numbers, list(numbers))
    axes[1, 1].tick_params(axis="x", labelsize=9, labelrotation=60)
    for ax in axes.flat[:3]:
        ax.legend(fontsize=8)
    save_figure(lab, fig)


def lesson_saturation(lab: Lab) -> None:
    """One KTO run: the saturated share and mean weight by class over training, and the weights of every
    training example at the start, middle and end (Prop. 4.1: KTO stops learning from what it already
    rates far from z_ref, on either side)."""
    results = lab.runs([("KTO", {"loss": "kto"})], weigh=True)
    numbers = {"utility": utility_table(results), "over_training": {}, "weights": {}}
    stops = list(results["KTO"][0]["weights"])
    print(f"\nsaturated, % of each class's training examples (all whole batches), mean [90% t interval] over {len(lab.seeds)} seed(s)")
    print(f"{'class':<14}" + "".join(f"{'iteration ' + s:>20}" for s in stops))
    for group in ("desirable", "undesirable"):
        numbers["over_training"][group] = {key: over_training(lab, "KTO", (group,), key).tolist()
                                           for key in ("saturated", "grad_weight")}
        shares = {}
        for stop in stops:
            shares[stop] = [np.mean([s for s, g in zip(r["weights"][stop]["saturated"], r["weights"][stop]["group"])
                                     if g == group]) for r in results["KTO"]]
        numbers["weights"][group] = shares
        print(f"{group:<14}" + "".join(f"{stats.fmt(shares[s]):>20}" for s in stops))
    lab.save(numbers)
    plt = pyplot()
    if plt is None:
        return
    shown = stops[1:]  # at iteration 0 the policy is the reference: every z is 0
    fig, axes = plt.subplots(1, 2 + len(shown), figsize=(3.6 * (2 + len(shown)), 3.6))
    colors = {"desirable": "#2ca02c", "undesirable": "#d62728"}
    first = results["KTO"][0]
    for group, color in colors.items():
        o = numbers["over_training"][group]
        axes[0].plot(np.arange(1, len(o["saturated"]) + 1), 100 * smooth(np.array(o["saturated"])), color=color, label=group)
        axes[1].plot(np.arange(1, len(o["grad_weight"]) + 1), smooth(np.array(o["grad_weight"])), color=color, label=group)
        for ax, stop in zip(axes[2:], shown):
            w = first["weights"][stop]
            ax.hist([x for x, g in zip(w["z"], w["group"]) if g == group], bins=40, range=(-12, 12), color=color,
                    alpha=0.6, label=group)
    every = f"mean of {len(lab.seeds)} seed(s)"
    axes[0].set(xlabel="KTO iteration", ylabel="saturated (%)", title=f"share saturated, per batch ({every})")
    axes[1].set(xlabel="KTO iteration", ylabel="mean weight", title=f"mean weight lambda beta v (1 - v) ({every})")
    for ax, stop in zip(axes[2:], shown):
        for z in (-3.64, 3.64):  # beyond |z| = 3.64 the weight is below 10% of its peak
            ax.axvline(z, color="gray", lw=0.8, ls=":")
        ax.set(xlabel="z = beta (r - z_ref)", ylabel="training examples", title=f"all examples at iteration {stop}, seed {lab.seeds[0]}")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.title.set_fontsize(8)
    save_figure(lab, fig)


def lesson_noise(lab: Lab) -> None:
    """KTO vs DPO with 0-30% of labels flipped; do flipped examples saturate (and so get ignored)?"""
    levels = (0.0, 0.1, 0.2, 0.3)
    plan = [(f"{loss.upper()} noise {level}", {"loss": loss, "label_noise": level}) for level in levels for loss in ("kto", "dpo")]
    results = lab.runs(tune.with_tuned(lab.base, plan))
    numbers = {"utility": utility_table(results), "weights": {}}
    numbers["differences"] = stats.claims(numbers["utility"], [(f"KTO noise {lv}", f"DPO noise {lv}") for lv in levels])
    print("\nshared setting: mean gradient weight over training, as a share of the loss's largest (KTO beta/4, DPO beta)")
    print(f"{'run':<22}{'clean':>10}{'flipped':>10}{'flipped / clean':>18}")
    for level in levels[1:]:
        for loss, peak, clean in (("KTO", lab.base.beta / 4, ("desirable", "undesirable")), ("DPO", lab.base.beta, ("pairs",))):
            name = f"{loss} noise {level}"
            w = {"clean": over_training(lab, name, clean, "grad_weight") / peak,
                 "flipped": over_training(lab, name, ("flipped",), "grad_weight") / peak}
            numbers["weights"][name] = {k: v.tolist() for k, v in w.items()}
            c, f = np.nanmean(w["clean"]), np.nanmean(w["flipped"])
            print(f"{name:<22}{c:>10.3f}{f:>10.3f}{f / c:>18.2f}")
    lab.save(numbers)
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for loss, color in (("KTO", "#2ca02c"), ("DPO", "#1f77b4")):
        u = [numbers["utility"][f"{loss} noise {level}"]["sampled"] for level in levels]
        left.errorbar([100 * lv for lv in levels], [100 * np.mean(v) for v in u],
                      yerr=[[100 * (np.mean(v) - min(v)) for v in u], [100 * (max(v) - np.mean(v)) for v in u]],
                      color=color, marker="o", capsize=3, label=loss)
        w = numbers["weights"][f"{loss} noise 0.3"]
        right.plot(smooth(np.array(w["clean"])), color=color, label=f"{loss} clean")
        right.plot(smooth(np.array(w["flipped"])), color=color, ls="--", label=f"{loss} flipped")
    left.set(xlabel="labels flipped (%)", ylabel="held-out utility, sampled (%)", title="utility under label noise", ylim=(0, 100))
    right.set(xlabel="iteration", ylabel="mean weight / its largest", title="30% flipped: weight of flipped vs clean")
    left.legend()
    right.legend()
    save_figure(lab, fig)


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
    """KTO and DPO from a random init, no SFT: utility, completion length and how often it ends (EOT)."""
    scratch = {"init_from": "scratch", "eval_tokens": 16, "max_iters": 800, "lr": 3e-3}  # a random start needs more
    print("one setting for all three: tune chooses from the SFT start, and its choices do not carry to a random one")
    results = lab.runs([("SFT from scratch", {"loss": "sft", **scratch}), ("DPO from scratch", {"loss": "dpo", **scratch}),
                        ("KTO from scratch", {"loss": "kto", **scratch})])
    numbers = utility_table(results, extra={"length (tokens)": ("sampled.length", 1), "ends with EOT (%)": ("sampled.eot", 100)})
    lab.save(numbers)
    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        bars(axes[0], numbers, list(numbers))
        bars(axes[1], numbers, list(numbers), "length (tokens)", 1, "mean sampled completion length (tokens, of 16)",
             color="#d9a38f")
        bars(axes[2], numbers, list(numbers), "ends with EOT (%)", 100, "sampled completions ending with EOT (%)",
             color="#b3d98f")
        save_figure(lab, fig)


def lesson_beta(lab: Lab) -> None:
    """A beta sweep: larger beta saturates more examples sooner; what does that do to utility?"""
    betas = (0.02, 0.1, 0.5, 2.0)
    results = lab.runs([(f"KTO beta={b}", {"loss": "kto", "beta": b}) for b in betas])
    numbers = {"utility": utility_table(results), "saturated": {}}
    print(f"\n{'run':<16}{'saturated, mean over training (%)':>36}")
    for b in betas:
        name = f"KTO beta={b}"
        sat = [np.mean([r["saturated"] for r in lab.rows(name, s)]) for s in lab.seeds]
        numbers["saturated"][name] = sat
        print(f"{name:<16}{stats.fmt(sat):>36}")
    lab.save(numbers)
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for b in betas:
            name = f"KTO beta={b}"
            ax.scatter([100 * s for s in numbers["saturated"][name]], [100 * u for u in numbers["utility"][name]["sampled"]],
                       label=f"beta={b}")
        ax.set(xlabel="saturated examples, mean over training (%)", ylabel="held-out utility, sampled (%)", ylim=(0, 103))
        ax.legend(loc="lower right")
        save_figure(lab, fig)


def lesson_contradict(lab: Lab) -> None:
    """30% of the pairs also come from a second annotator with the opposite preference (Theorem 4.3)."""
    results = lab.runs(tune.with_tuned(lab.base, [("KTO", {"loss": "kto"}), ("DPO", {"loss": "dpo"}),
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
    plt = pyplot()
    if plt:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        bars(left, numbers, list(numbers))
        names = ["KTO, 30% contradicted", "DPO, 30% contradicted"]
        for offset, key, color in ((-0.2, "contradicted_prompts", "#d9a38f"), (0.2, "other_prompts", "#8fb3d9")):
            bars(right, numbers, names, key, ylabel="greedy utility on training prompts (%)", offset=offset, width=0.4,
                 color=color, label=key.replace("_", " "))
        right.legend(fontsize=7)
        save_figure(lab, fig)


LESSONS = {"tune": tune.tune, "value": lesson_value, "dpo": lesson_dpo, "saturation": lesson_saturation, "noise": lesson_noise,
           "imbalance": lesson_imbalance, "one-y-per-x": lesson_one_y_per_x, "no-sft": lesson_no_sft,
           "beta": lesson_beta, "contradict": lesson_contradict}


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if args else 1)
    if args[0] not in LESSONS:
        raise SystemExit(f"error: unknown lesson '{args[0]}': expected one of {', '.join(LESSONS)}")
    lesson, seeds, overrides = args[0], 2 if args[0] == "tune" else 5, []
    for arg in args[1:]:
        key, _, value = arg.removeprefix("--").partition("=")
        if key == "seeds":
            if not value.isdigit() or not 1 <= int(value) <= len(SEEDS):
                raise SystemExit(f"error: --seeds={value}: expected an integer from 1 to {len(SEEDS)}")
            seeds = int(value)
        else:
            overrides.append(arg)
    base = config.parse_config([f"--{k}={v}" for k, v in LESSON_DEFAULTS.items()] + overrides)
    for key in LESSON_KEYS:  # given on the command line or in a preset file
        if getattr(base, key) != getattr(config.TrainConfig(), key):
            raise SystemExit(f"error: {key}={getattr(base, key)!r}: the lessons set {', '.join(LESSON_KEYS)} themselves "
                             f"(seeds: --seeds=N)")
    _, _, device = train.setup_distributed(base)
    trains = "" if lesson == "value" else f"seeds {', '.join(map(str, SEEDS[:seeds]))}; "
    print(f"lesson {lesson}: {trains}device {device}, torch {torch.__version__}")
    try:
        LESSONS[lesson](Lab(lesson, base, seeds, device))
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
