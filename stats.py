"""Intervals over seeds and the lessons' claims: Student's t (a handful of seeds is too few for a bootstrap).

A comparison of two methods is made per seed (runs of one seed share the SFT start and the data), so its
interval is that of the paired differences; a claim is "reproduced" only when that interval excludes 0.
"""
import math

# Student's t, the 0.95 quantile (a two-sided 90% interval) for 1 to 9 degrees of freedom: the lessons use
# 2 to 10 seeds. From the t table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833}


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 90% t interval of the mean; low = high = mean for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T95[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired(a: list[float], b: list[float]) -> dict:
    """a - b seed by seed: the mean difference, its 90% interval, on how many seeds a > b, and the verdict."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, low, high = interval(diffs)
    verdict = "reproduced" if low > 0 else "reversed" if high < 0 else "not shown"
    return {"diff": mean, "low": low, "high": high, "wins": sum(d > 0 for d in diffs), "n": len(diffs),
            "verdict": verdict if len(diffs) > 1 else "one seed"}


def fmt(values: list[float], scale: float = 100) -> str:
    """'mean [low, high]' (90% t interval) of scaled values; the bare mean for one."""
    mean, low, high = interval([scale * v for v in values])
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def fmt_paired(p: dict, scale: float = 100) -> str:
    """'+d [low, high], k/n seeds: verdict' (one seed: '+d, one seed')."""
    if p["n"] == 1:
        return f"{scale * p['diff']:+.1f}, one seed"
    return (f"{scale * p['diff']:+.1f} [{scale * p['low']:+.1f}, {scale * p['high']:+.1f}], "
            f"{p['wins']}/{p['n']} seeds: {p['verdict']}")


def claims(numbers: dict, comparisons: list[tuple[str, str]], keys: dict[str, float] | None = None) -> dict:
    """Print and return a - b seed by seed for each comparison, a claim that a beats b, and for its [tuned]
    runs where both ran; keys: the quantities compared, with their scale (default: sampled and greedy
    utility, in %). Runs of one seed share the SFT start, the split and the batch order."""
    keys = keys or {"sampled": 100, "greedy": 100}
    out = {}
    print("\nthe claim a > b, paired by seed: a - b, mean [90% t interval], seeds on which a is ahead, verdict")
    for a, b in comparisons + [(f"{a} [tuned]", f"{b} [tuned]" if f"{b} [tuned]" in numbers else b) for a, b in comparisons]:
        if a in numbers and b in numbers:
            out[f"{a} - {b}"] = {key: paired(numbers[a][key], numbers[b][key]) for key in keys}
            print(f"  {a} - {b}\n      " + "; ".join(f"{key} {fmt_paired(out[f'{a} - {b}'][key], scale)}"
                                                    for key, scale in keys.items()))
    return out
