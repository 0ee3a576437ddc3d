"""The lessons' figures, drawn for a projector: 1280 px wide, every font 12 pt or more, one idea per panel,
the SFT start as a line on every utility plot. experiments.py computes the numbers; this draws them.

matplotlib is optional: without it `pyplot()` says so and the lessons still print and save their numbers.
"""
import os

import numpy as np

import stats

WIDTH_PX, DPI = 1280, 100
FONT_PT = 12  # the smallest text on a figure: legends, ticks and panel titles alike
COLORS = {"KTO": "#2ca02c", "DPO": "#1f77b4", "DPO+NLL": "#9467bd", "SFT": "#000000", "control": "#7f7f7f",
          "desirable": "#2ca02c", "undesirable": "#d62728", "flipped": "#ff7f0e", "sigmoid": "#2ca02c",
          "logsigmoid": "#8c564b", "linear": "#e377c2", "KT": "#17becf"}


def pyplot():
    """matplotlib's pyplot set for the projector, or None (with a note) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure, the numbers are in the JSON")
        return None
    plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 14, "axes.titlesize": FONT_PT + 2,
                         "axes.labelsize": 14, "xtick.labelsize": FONT_PT, "ytick.labelsize": FONT_PT,
                         "legend.fontsize": FONT_PT, "axes.spines.top": False, "axes.spines.right": False,
                         "lines.linewidth": 2.5})
    return plt


def figure(plt, rows: int, cols: int, height_px: int | None = None):
    """A figure WIDTH_PX wide of rows x cols panels (about 480 px tall each unless height_px)."""
    height = (height_px or 480 * rows) / DPI
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_PX / DPI, height), squeeze=False)
    return fig, axes


def save(directory: str, name: str, fig) -> str:
    """Write NAME.png at WIDTH_PX width (no cropping: bbox stays the figure's) and return its path."""
    path = os.path.join(directory, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path)
    print(f"figure: {path}")
    return path


def smallest_font(fig) -> float:
    """The smallest font size (pt) of any visible text on the figure: the projector check."""
    from matplotlib.text import Text
    return min(t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text())


def sft_line(ax, numbers: dict, key: str = "sampled", name: str = "SFT") -> None:
    """The SFT start's mean utility as a horizontal line: every utility plot has one."""
    if name in numbers:
        ax.axhline(100 * np.mean(numbers[name][key]), color=COLORS["SFT"], lw=1.5, ls="--", label="SFT start")


def bars(ax, numbers: dict, names: list[str], key: str = "sampled", scale: float = 100, ylabel: str = "",
         offset: float = 0.0, width: float = 0.8, color: str = "#8fb3d9", label: str | None = None,
         short: dict[str, str] | None = None) -> None:
    """Mean over seeds per run, with 90% t-interval whiskers; utility in % unless key and ylabel say otherwise.
    short: names to print under the bars (long run names do not fit at 12 pt)."""
    intervals = [stats.interval([scale * v for v in numbers[n][key]]) for n in names]
    means = [m for m, _, _ in intervals]
    low, high = [m - lo for m, lo, _ in intervals], [hi - m for m, _, hi in intervals]
    ax.bar([i + offset for i in range(len(names))], means, width=width, yerr=[low, high], capsize=4, color=color,
           edgecolor="#444444", label=label)
    ax.set_xticks(range(len(names)), [(short or {}).get(n, n) for n in names], rotation=30, ha="right")
    ax.set_ylabel(ylabel or f"test utility, {key} (%)")
    if scale == 100:
        ax.set_ylim(0, 100)
    ax.set_title(f"mean of {len(numbers[names[0]][key])} seed(s), 90% t interval")


def compare(directory: str, lesson: str, numbers: dict) -> None:
    """A comparison lesson: sampled and greedy test utility per run, beside the SFT start."""
    plt = pyplot()
    if plt is None:
        return
    names = [n for n in numbers if n != "SFT"]
    fig, axes = figure(plt, 1, 2, 600)
    for ax, key in zip(axes[0], ("sampled", "greedy")):
        bars(ax, numbers, names, key)
        sft_line(ax, numbers, key)
        ax.legend(loc="upper left")
    save(directory, lesson, fig)


def smooth(y: np.ndarray, window: int = 10) -> np.ndarray:
    """Running mean over `window` iterations, ignoring NaN."""
    y = np.asarray(y, dtype=float)
    ok = ~np.isnan(y)
    kernel = np.ones(window)
    return np.convolve(np.where(ok, y, 0), kernel, mode="same") / np.maximum(np.convolve(ok, kernel, mode="same"), 1)


# ----------------------------------------------------------------------------- the lessons' figures

def value(directory: str, numbers: dict, run: dict | None = None) -> None:
    """Four panels against z = beta (r - z_ref), r - z_ref in nats on top: KTO's value with its learning window
    and regions named; the gradient weight of each loss (and a weighed run's examples); the Kahneman-Tversky
    value function beside KTO's and DPO's implied ones; the window in nats for several beta."""
    plt = pyplot()
    if plt is None:
        return
    z, beta = np.array(numbers["z"]), numbers["beta"]
    sig = numbers["sigmoid"]
    edge = float(max(abs(z[~np.array(sig["desirable"]["saturated"])])))  # |z| where the weight falls to 10% of its peak
    fig, axes = figure(plt, 2, 2, 1000)
    (a, b), (c, d) = axes

    def window(ax) -> None:
        ax.axvspan(-edge, edge, color="#e8f4e8", zorder=0)
        ax.secondary_xaxis("top", functions=(lambda x: x / beta, lambda n: n * beta)).set_xlabel(f"r - z_ref (nats), beta {beta:g}")

    window(a)
    a.plot(z, sig["desirable"]["value"], color=COLORS["desirable"], label="desirable: sigmoid(z)")
    a.plot(z, sig["undesirable"]["value"], color=COLORS["undesirable"], ls="--", label="undesirable: sigmoid(-z)")
    for x, y, text in ((-7, 0.5, "desirable:\nwrong side\n(saturated)"), (0, 0.93, f"learning: |z| < {edge:.2f}"),
                       (7, 0.5, "desirable:\nalready right\n(saturated)")):
        a.text(x, y, text, ha="center", va="center", fontsize=FONT_PT, backgroundcolor="white")
    a.set(xlabel="z = beta (r - z_ref)", ylabel="value v", title="KTO's value (eq. 7) is flat at both ends")
    a.legend(loc="lower right")

    window(b)
    b.plot(z, sig["desirable"]["share"], color=COLORS["sigmoid"], label="KTO (sigmoid)")
    b.plot(z, numbers["logsigmoid"]["desirable"]["share"], color=COLORS["logsigmoid"], ls="--", label="KTO logsigmoid, desirable")
    b.plot(z, numbers["linear"]["desirable"]["share"], color=COLORS["linear"], ls=":", label="KTO linear")
    b.plot(z, numbers["dpo"]["share"], color=COLORS["DPO"], ls="-.", label="DPO (z = beta h)")
    b.axhline(0.1, color="gray", lw=1, ls=":")
    b.set(xlabel="z", ylabel="gradient weight / its largest", ylim=(0, 1.45),
          title="Prop. 4.1: where each loss stops learning")
    b.legend(loc="upper left", ncol=2)
    if run is not None:  # the run's examples, on top of the weight curves
        last = list(run["weights"])[-1]
        w = run["weights"][last]
        twin = b.twinx()
        for group in [g for g in ("desirable", "undesirable", "flipped") if g in w["group"]]:
            # beyond the axis, in the edge bins
            twin.hist(np.clip([x for x, g in zip(w["z"], w["group"]) if g == group], z.min(), z.max()), bins=60,
                      range=(z.min(), z.max()), color=COLORS[group], alpha=0.3, label=f"{group} examples, iteration {last}")
        twin.set_ylabel("training examples")
        twin.legend(loc="center right")

    c.plot(z, numbers["kahneman_tversky"], color=COLORS["KT"], label="Kahneman-Tversky: x^0.88, -2.25 (-x)^0.88")
    lam = np.where(z >= 0, numbers["lambda_d"], numbers["lambda_u"])
    c.plot(z, lam * (np.array(sig["desirable"]["value"]) - 0.5), color=COLORS["KTO"],
           label=f"KTO: lambda (sigmoid(z) - 1/2), lambda_D {numbers['lambda_d']:g}, lambda_U {numbers['lambda_u']:g}")
    c.plot(z, numbers["dpo"]["value"], color=COLORS["DPO"], ls="-.", label="DPO: log sigmoid(z) + log 2")
    c.axhline(0, color="black", lw=0.8)
    c.axvline(0, color="black", lw=0.8)
    c.set(xlabel="outcome against the reference point (z)", ylabel="value", ylim=(-8, 5),
          title="value functions: gains concave, losses steeper")
    c.legend(loc="upper left")

    nats = np.linspace(-100, 100, 801)
    for b_ in sorted({0.05, 0.1, 0.5, beta}):
        s = 1 / (1 + np.exp(-b_ * nats))
        d.plot(nats, 4 * s * (1 - s), lw=3 if b_ == beta else 2, label=f"beta {b_:g}: |r - z_ref| < {edge / b_:.1f} nats")
    d.axhline(0.1, color="gray", lw=1, ls=":")
    d.set(xlabel="r - z_ref (nats)", ylabel="KTO weight / its largest",
          title="the window in nats narrows as beta grows")
    d.legend(loc="upper left")
    save(directory, "value", fig)


def dpo(directory: str, results: dict, numbers: dict, log_ratios: dict) -> None:
    """The dpo lesson on the dev prompts over training (utility, length) and DPO's log-ratios, and the test bars."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = figure(plt, 2, 2, 1000)
    colors = {"SFT+SFT (control)": COLORS["control"], "SFT+DPO": COLORS["DPO"], "SFT+DPO+NLL": COLORS["DPO+NLL"], "SFT+KTO": COLORS["KTO"]}
    start = results["SFT"]
    for name, color in colors.items():
        for run, ls in ((name, "--"), (f"{name} [tuned]", "-")):
            if run not in results:
                continue
            for ax, key, scale in ((axes[0, 0], "utility", 100), (axes[0, 1], "length", 1)):
                its, values = dev_curve(start, results[run], key)
                ax.plot(its, scale * np.array(values), color=color, ls=ls, marker="o" if ls == "-" else None,
                        label=run.replace("SFT+", ""))
            if run in log_ratios:
                for key, alpha in (("reward_chosen", 1.0), ("reward_rejected", 0.45)):
                    axes[1, 0].plot(smooth(np.array(log_ratios[run][key])), color=color, ls=ls, alpha=alpha,
                                    label=f"{run.replace('SFT+', '')}: {key.split('_')[1]}")
    axes[0, 0].axhline(100 * dev_curve(start, start, "utility")[1][0], color=COLORS["SFT"], lw=1.5, ls="--", label="SFT start")
    axes[0, 0].set(xlabel="iteration", ylabel="dev utility, sampled (%)", ylim=(0, 100),
                   title="dev utility (dashed shared, solid tuned)")
    axes[0, 1].set(xlabel="iteration", ylabel="sampled length (tokens)", title="dev completion length")
    axes[1, 0].axhline(0, color="black", lw=1)
    axes[1, 0].set(xlabel="iteration", ylabel="log pi / pi_ref (nats)", title="DPO: chosen and rejected fall together")
    names = [n for n in numbers if n != "SFT"]
    bars(axes[1, 1], numbers, names, short={n: n.replace("SFT+", "").replace(" (control)", "") for n in names})
    sft_line(axes[1, 1], numbers)
    for ax in axes.flat:
        ax.legend(loc="best", fontsize=FONT_PT)
    save(directory, "dpo", fig)


def dev_curve(start: list[dict], runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Iterations and the mean over seeds of a sampled dev-utility `key`, from the SFT start (iteration 0)."""
    its = [0] + [row["iter"] for row in runs[0]["dev"]]
    return its, [np.mean([s["dev"][0]["sampled"][key] for s in start])] + \
        [np.mean([r["dev"][i]["sampled"][key] for r in runs]) for i in range(len(its) - 1)]


def saturation(directory: str, numbers: dict, results: dict, seeds: tuple[int, ...], groups: tuple[str, ...]) -> None:
    """Saturation by side over training, the weight's share of its peak, and every example's z at the end."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = figure(plt, 2, 2, 1000)
    (a, b), (c, d) = axes
    for group in groups:
        o = numbers["over_training"][group]
        its = np.arange(1, len(o["weight_share"]) + 1)
        a.plot(its, 100 * smooth(o["saturated_right"]), color=COLORS[group], label=f"{group}: already right")
        a.plot(its, 100 * smooth(o["saturated_wrong"]), color=COLORS[group], ls="--", label=f"{group}: wrong side")
        b.plot(its, smooth(o["weight_share"]), color=COLORS[group], label=group)
    a.set(xlabel="KTO iteration", ylabel="saturated (% of the batch's class)", title="saturated, by side")
    b.set(xlabel="KTO iteration", ylabel="mean weight / its peak", ylim=(0, 1.05), title="how much each class still teaches")
    stops = list(results["KTO"][0]["weights"])
    for ax, stop in ((c, stops[len(stops) // 2]), (d, stops[-1])):
        w = results["KTO"][0]["weights"][stop]
        for group in groups:
            ax.hist([x for x, g in zip(w["z"], w["group"]) if g == group], bins=50, range=(-15, 15), color=COLORS[group],
                    alpha=0.55, label=group)
        for edge in (-3.64, 3.64):
            ax.axvline(edge, color="gray", lw=1, ls=":")
        ax.set(xlabel="z = beta (r - z_ref)", ylabel="training examples", title=f"every example at iteration {stop}, seed {seeds[0]}")
    for ax in axes.flat:
        ax.legend(loc="best")
    save(directory, "saturation", fig)


def noise(directory: str, numbers: dict, levels: tuple[float, ...], betas: tuple[float, ...]) -> None:
    """Utility against the share of labels flipped, per beta (one panel each), and at 30% the flipped examples'
    weight share and wrong-side share against the clean ones'."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = figure(plt, 2, 2, 1000)
    u = numbers["utility"]
    for ax, beta in zip(axes[0], betas):
        for method, ls in (("KTO sigmoid", "-"), ("KTO logsigmoid", "--"), ("KTO linear", ":"), ("DPO", "-.")):
            runs = [u[f"{method} beta {beta} noise {lv}"]["sampled"] for lv in levels]
            intervals = [stats.interval([100 * v for v in r]) for r in runs]
            m = np.array([i[0] for i in intervals])
            ax.errorbar([100 * lv for lv in levels], m, yerr=[m - [i[1] for i in intervals], [i[2] for i in intervals] - m],
                        color=COLORS[method.split()[-1] if method != "DPO" else "DPO"], ls=ls, marker="o", capsize=4, label=method)
        sft_line(ax, u)
        ax.set(xlabel="labels flipped (%)", ylabel="test utility, sampled (%)", ylim=(0, 100), title=f"beta {beta:g}")
        ax.legend(loc="lower left")
    beta = betas[-1]
    for ax, key, ylabel in ((axes[1, 0], "weight_share", "mean weight / its peak"),
                            (axes[1, 1], "saturated_wrong", "saturated on the wrong side (%)")):
        scale = 100 if key == "saturated_wrong" else 1
        for method in ("KTO sigmoid", "KTO logsigmoid", "DPO"):
            w = numbers["weights"][f"{method} beta {beta} noise {levels[-1]}"][key]
            color = COLORS[method.split()[-1] if method != "DPO" else "DPO"]
            ax.plot(scale * smooth(w["clean"]), color=color, label=f"{method}, clean")
            ax.plot(scale * smooth(w["flipped"]), color=color, ls="--", label=f"{method}, flipped")
        ax.set(xlabel="iteration", ylabel=ylabel, title=f"{100 * levels[-1]:.0f}% flipped, beta {beta:g}")
        ax.legend(loc="best")
    save(directory, "noise", fig)


def no_sft(directory: str, numbers: dict, max_tokens: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = figure(plt, 1, 3, 560)
    short = {n: n.replace(" from scratch", "") for n in numbers}
    bars(axes[0, 0], numbers, list(numbers), short=short)
    bars(axes[0, 1], numbers, list(numbers), "length (tokens)", 1, f"sampled length (tokens, of {max_tokens})",
         color="#d9a38f", short=short)
    bars(axes[0, 2], numbers, list(numbers), "ends with EOT (%)", 100, "ending with EOT (%)", color="#b3d98f", short=short)
    save(directory, "no-sft", fig)


def beta(directory: str, numbers: dict, betas: tuple[float, ...]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = figure(plt, 1, 1, 720)
    ax = axes[0, 0]
    for b in betas:
        name = f"KTO beta={b}"
        ax.scatter([100 * s for s in numbers["saturated"][name]], [100 * u for u in numbers["utility"][name]["sampled"]],
                   s=80, label=f"beta {b:g}")
    sft_line(ax, numbers["utility"])
    ax.set(xlabel="saturated examples, mean over training (%)", ylabel="test utility, sampled (%)", ylim=(0, 103),
           title="more saturation, and what it does to utility")
    ax.legend(loc="lower right")
    save(directory, "beta", fig)


def contradict(directory: str, numbers: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = figure(plt, 1, 2, 600)
    names = [n for n in numbers if n != "SFT"]
    bars(axes[0, 0], numbers, names)
    sft_line(axes[0, 0], numbers)
    pair = ["KTO, 30% contradicted", "DPO, 30% contradicted"]
    for offset, key, color in ((-0.2, "contradicted_prompts", "#d9a38f"), (0.2, "other_prompts", "#8fb3d9")):
        bars(axes[0, 1], numbers, pair, key, ylabel="greedy utility, training prompts (%)", offset=offset, width=0.4,
             color=color, label=key.replace("_", " "))
    for ax in axes[0]:
        ax.legend(loc="upper right")
    save(directory, "contradict", fig)


def scores(directory: str, numbers: dict, weights: dict, levels: tuple[float, ...]) -> None:
    """Utility against the rater's noise per method, and the gradient weight of the examples the noise mislabelled
    over the others' (margin weights alone dashed): tuned runs where there are, else the shared setting."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = figure(plt, 1, 2, 560)
    tuned = " [tuned]" if f"KTO, noise {levels[0]} [tuned]" in numbers else ""
    for method, color in (("KTO", COLORS["KTO"]), ("KTO+margin", COLORS["KT"]), ("DPO", COLORS["DPO"])):
        intervals = [stats.interval([100 * v for v in numbers[f"{method}, noise {n}{tuned}"]["sampled"]]) for n in levels]
        m = np.array([i[0] for i in intervals])
        axes[0, 0].errorbar(levels, m, yerr=[m - [i[1] for i in intervals], [i[2] for i in intervals] - m], color=color,
                            marker="o", capsize=4, label=method)
        noisy = [n for n in levels if n]
        axes[0, 1].plot(noisy, [weights[f"{method}, noise {n}{tuned}"]["gradient_ratio"][0] for n in noisy], color=color,
                        marker="o", label=f"{method}, gradient weight")
        if method == "KTO+margin":
            axes[0, 1].plot(noisy, [np.mean(weights[f"{method}, noise {n}{tuned}"]["margin_ratio"]) for n in noisy],
                            color=color, ls="--", marker="s", label="KTO+margin, margin alone")
    sft_line(axes[0, 0], numbers)
    axes[0, 0].set(xlabel="rater noise (sd of the score)", ylabel="test utility, sampled (%)", ylim=(0, 100),
                   title="utility" + (" (tuned)" if tuned else " (shared setting)"))
    axes[0, 1].axhline(1, color=COLORS["SFT"], lw=1, ls=":")
    axes[0, 1].set(xlabel="rater noise (sd of the score)", ylabel="mislabelled / other examples", title="weight of mislabelled examples")
    for ax in axes[0]:
        ax.legend(loc="best")
    save(directory, "scores", fig)
