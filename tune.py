"""`python experiments.py tune`: each method's own lr, beta and stopping iteration, chosen on the dev prompts.

For each method of the contest (KTO, DPO, DPO with an NLL term on the chosen completion, and the SFT control)
every setting of its grid is trained from the shared SFT start of each seed, with the dev prompts' utility every
utility_interval iterations; the setting and the iteration with the highest mean sampled dev utility over
the seeds win. The test (held-out) prompts are never used to choose (each run's result.json scores them, as
every lesson run does, for the lessons' tables). Runs are the lessons' runs (lab.py): kept
under a digest of their settings, so a second call reads them. The choice goes to out_dir/tune/tune.json,
where the comparison lessons find it.
"""
import json
import os

import numpy as np

import config
import task
from lab import Lab, digest, settings_of

LRS = (3e-4, 1e-3, 3e-3)
BETAS = (0.05, 0.1, 0.5, 2.0)
# method: (its overrides, whether it has a beta)
# KTO+margin: score-based feedback (data.rate), the task's rating labelled at the judge's 1/2 (the same labels as
# KTO's) and each example weighted by its margin: the `scores` lesson's method, which that lesson tunes itself.
METHODS = {"KTO": ({"loss": "kto"}, True), "DPO": ({"loss": "dpo"}, True),
           "DPO+NLL": ({"loss": "dpo", "nll_weight": 1.0}, True), "SFT+SFT (control)": ({"loss": "control"}, False),
           "KTO+margin": ({"loss": "kto", "score_threshold": task.DESIRABLE_SCORE, "score_weight": "margin"}, True)}
# What `tune` tunes: the contest, within the hour on a 2-core CPU (KTO+margin's grid would take it past that).
CONTEST = ("KTO", "DPO", "DPO+NLL", "SFT+SFT (control)")
# What a tuned setting depends on: every base setting but these, which the lessons or the tune set.
FREE_KEYS = ("out_dir", "seed", "lr", "beta", "max_iters", "resume", "control", "init_from")


def base_key(base: config.TrainConfig) -> str:
    """The digest of the settings a tune is valid for."""
    return digest({k: v for k, v in settings_of(base).items() if k not in FREE_KEYS})


def grid(method: str) -> list[dict]:
    """The overrides of every setting tried for a method."""
    overrides, has_beta = METHODS[method]
    return [{**overrides, "lr": lr, **({"beta": beta} if has_beta else {})} for lr in LRS for beta in (BETAS if has_beta else (None,))]


def choose(curves: dict[str, dict[int, list[float]]]) -> tuple[str, int, float]:
    """The (setting, iteration) with the highest mean over seeds; curves[setting][iteration] = one value per
    seed, a diverged setting absent. Ties go to the earlier setting, then the earlier iteration."""
    best = None
    for setting, by_iter in curves.items():
        for it, values in sorted(by_iter.items()):
            mean = round(float(np.mean(values)), 9)  # equal means tie whatever the order of their summands
            if best is None or mean > best[2]:
                best = (setting, it, mean)
    return best


def without_curves(chosen: dict[str, dict]) -> dict[str, dict]:
    """choose_settings' choices without their dev curves, for a lesson's JSON."""
    return {m: {k: v for k, v in c.items() if k != "curves"} for m, c in chosen.items()}


def label(overrides: dict) -> str:
    """'lr 0.001, beta 0.1' (no beta for SFT)."""
    return f"lr {overrides['lr']:g}" + (f", beta {overrides['beta']:g}" if "beta" in overrides else "")


def tune(lab: Lab) -> None:
    """Train the grid of every method of the contest from the SFT start, print each setting's best dev utility,
    save and print the choices."""
    chosen = choose_settings(lab, {m: grid(m) for m in CONTEST})
    lab.save({"base": base_key(lab.base), "seeds": list(lab.seeds), "chosen": chosen})


def choose_settings(lab: Lab, grids: dict[str, list[dict]]) -> dict[str, dict]:
    """Train every setting of each method's grid on lab's seeds; print, per method, each setting's best mean
    dev utility; return each method's choice: lr, beta, max_iters (the iteration), its dev utility, the curves."""
    for o in (o for settings in grids.values() for o in settings):
        iters, every = o.get("max_iters", lab.base.max_iters), o.get("utility_interval", lab.base.utility_interval)
        if not lab.base.task_dev or not 0 < every <= iters:
            raise SystemExit(f"error: {lab.lesson} chooses on the dev prompts' utility: it needs task_dev > 0 and "
                             f"utility_interval={every} in [1, max_iters={iters}]")
    results = lab.runs([(f"{m}, {label(o)}", o) for m, settings in grids.items() for o in settings], diverged_ok=True)
    chosen = {}
    for m, tries in grids.items():
        curves, settings, diverged = {}, {}, []  # curves[name][iteration]: dev utility per seed
        for overrides in tries:
            name = f"{m}, {label(overrides)}"
            lost = [r["diverged"] for r in results[name] if "diverged" in r]
            if lost:  # not a candidate; the lesson goes on
                diverged.append(f"{name}: {lost[0]}")
                continue
            devs = [r["dev"] for r in results[name]]
            curves[name] = {row["iter"]: [dev[i]["sampled"]["utility"] for dev in devs] for i, row in enumerate(devs[0])}
            settings[name] = overrides
        if not curves:
            raise SystemExit(f"error: {lab.lesson}: every setting of {m} diverged: {'; '.join(diverged)}")
        name, it, value = choose(curves)
        print(f"\n{m}: mean dev utility, sampled, over {len(lab.seeds)} seed(s), at its best iteration")
        for n, by_iter in curves.items():
            best_it = max(sorted(by_iter), key=lambda i: np.mean(by_iter[i]))
            print(f"  {n:<40}{100 * np.mean(by_iter[best_it]):>8.1f}% at iteration {best_it}" + ("  <- chosen" if n == name else ""))
        for line in diverged:
            print(f"  diverged, not a candidate: {line}")
        chosen[m] = {"lr": settings[name]["lr"], **({"beta": settings[name]["beta"]} if "beta" in settings[name] else {}),
                     "max_iters": it, "dev_sampled": value, "name": name,
                     "curves": {n: {str(i): v for i, v in c.items()} for n, c in curves.items()}, "diverged": diverged}
    print("\nchosen on the dev prompts (the test prompts not used):")
    for m, c in chosen.items():
        print(f"  {m:<20}{label(c):<22} stop at iteration {c['max_iters']}: dev {100 * c['dev_sampled']:.1f}%")
    return chosen


def method(overrides: dict) -> str | None:
    """The method of METHODS a lesson's run belongs to, or None (the SFT start itself, SFT from scratch)."""
    loss = overrides.get("loss")
    if loss == "dpo":
        return "DPO+NLL" if overrides.get("nll_weight") else "DPO"
    if loss == "kto" and overrides.get("score_weight") == "margin":
        return "KTO+margin"
    return {"kto": "KTO", "control": "SFT+SFT (control)"}.get(loss)


def overrides_of(choice: dict) -> dict:
    """The lr, beta (where the method has one) and max_iters of a choice."""
    return {k: choice[k] for k in ("lr", "beta", "max_iters") if k in choice}


def with_tuned(base: config.TrainConfig, plan: list[tuple[str, dict]], tuned_only: list[tuple[str, dict]] = (),
               own: dict[str, dict] | None = None) -> list[tuple[str, dict]]:
    """The plan, and beside each run of a tuned method the same run at that method's tuned lr, beta and
    stopping iteration, named "NAME [tuned]"; the lesson's own settings (noise, fractions) are kept.
    Runs in tuned_only have no shared setting worth a run: only their [tuned] run is made. own: the lesson's
    own choices (overrides_of), beside tune's."""
    chosen, note = tuned(base)
    print(note)
    own = own or {}
    chosen = {**(chosen or {}), **own}
    if not chosen:
        return plan
    for m, c in chosen.items():
        print(f"  [tuned] {m}: {label(c)}, {c['max_iters']} iterations" + (" (chosen by this lesson)" if m in own else ""))
    missing = sorted({method(o) for _, o in [*plan, *tuned_only] if method(o) and method(o) not in chosen})
    if missing:
        print(f"  not tuned yet (run tune again): {', '.join(missing)}, whose runs keep the shared setting only")
    out = []
    for name, overrides in plan:
        out.append((name, overrides))
        if method(overrides) in chosen:
            out.append((f"{name} [tuned]", {**overrides, **chosen[method(overrides)]}))
    return out + [(f"{name} [tuned]", {**overrides, **chosen[method(overrides)]}) for name, overrides in tuned_only
                  if method(overrides) in chosen]


def tuned(base: config.TrainConfig) -> tuple[dict[str, dict] | None, str]:
    """The tuned overrides per method for these base settings, or None, and a line saying which."""
    path = os.path.join(base.out_dir, "tune", "tune.json")
    if not os.path.exists(path):
        return None, "no tuned settings yet (python experiments.py tune)"
    with open(path) as f:
        saved = json.load(f)
    if saved["base"] != base_key(base):
        return None, f"{path} was tuned for other settings (run tune with these)"
    return ({m: overrides_of(c) for m, c in saved["chosen"].items()},
            f"tuned settings from {path} (seeds {', '.join(map(str, saved['seeds']))}, dev prompts)")
