"""The built-in tasks: prompts, a noisy demonstrator, a judge, and a model's utility on held-out prompts.

"arithmetic": word problems "Q: Ann had 3 apples, got 4 more. Total? A:" answered " 7" by a demonstrator
who is right with probability p_correct and otherwise usually one too many. Completions are two tokens
(a number and EOT): the reference finds them likely, so the reward r <= -log pi_ref(y|x) has little room.

"lists": "Q: Ann wants 8 different numbers for her cards. A:" answered " 97 13 150 2 66 41 180 31" (8 to 18
numbers from 1 to 199, a token each, then EOT). The demonstrator keeps the rule with probability p_correct;
else it follows its habit and writes one number over and over. A number in ten slips to the other kind,
and one number too many comes now and then. Right answers are many, so each is unlikely (-log pi_ref(y|x)
runs to tens of nats, about 5 a number): room for the reward on both sides of z_ref. The judge gives
partial credit.

Both: the judge's score is in [0, 1]; a completion is desirable when it scores at least 1/2. The
utility (the judge's mean score on held-out prompts) is what alignment should raise; with p_correct
below 1/2 the demonstrator's most common answer is wrong, which SFT alone cannot undo. For score-based
feedback each demonstration also carries a rating in [0, 1] (`rating`) that gives the same labels at 1/2.
"""
import math
import random
import re

import torch

import data
from model import GPT

TASKS = ("arithmetic", "lists")
NAMES = ["Ann", "Bob", "Eve", "Tom", "Sam", "Max", "Kim", "Leo", "Mia", "Zoe"]
SHE = ("Ann", "Eve", "Kim", "Mia", "Zoe")
ITEMS = ["apples", "cats", "books", "coins", "eggs", "pens", "cards", "shells"]
PROBLEM = re.compile(r"Q: \w+ had (\d+) \w+, got (\d+) more\. Total\? A:$")
LIST = re.compile(r"Q: \w+ wants (\d+) different numbers for \w+ \w+\. A:$")
NUMBERS, COUNTS = range(1, 200), range(8, 19)  # " 1" to " 199" are one GPT-2 token each
DESIRABLE_SCORE = 0.5  # a completion scoring at least this is labelled desirable


def judge(prompt: str, completion: str) -> float:
    """The score of a completion for a prompt of either task, in [0, 1].

    arithmetic: 1 for the correct total, else 0. lists: the different numbers, at most the count asked
    for, over that count or the count written, whichever is larger (one too many costs about as much as
    one repeat): " 13 58 13" for 3 different numbers scores 2/3. Numbers may be parted by spaces or commas."""
    if match := PROBLEM.search(prompt):
        return float(completion.strip() == str(int(match[1]) + int(match[2])))
    if match := LIST.search(prompt):
        count = int(match[1])
        items = [item for item in re.split(r"[\s,]+", completion) if item]
        kept = {int(item) for item in items if re.fullmatch(r"[1-9]\d*", item)}
        return min(len(kept), count) / max(count, len(items))
    raise ValueError(f"not a prompt of a built-in task: {prompt!r}")


def rating(prompt: str, completion: str) -> float:
    """A graded score in [0, 1] that labels as the judge does at DESIRABLE_SCORE: the lists judge's partial
    credit; arithmetic, exp(-|answer - total|) (1 right, 0.37 one off, 0.14 two off; 0 for no number)."""
    if match := PROBLEM.search(prompt):
        answer = completion.strip()
        return math.exp(-abs(int(answer) - int(match[1]) - int(match[2]))) if re.fullmatch(r"\d{1,6}", answer) else 0.0
    return judge(prompt, completion)


def task_prompts(name: str, max_operand: int = 4) -> list[str]:
    """Every prompt of a built-in task: arithmetic, each name, item and pair of operands from 0 to
    max_operand once; lists, each name, count and item once (880)."""
    if name == "arithmetic":
        return [f"Q: {who} had {a} {item}, got {b} more. Total? A:"
                for who in NAMES for item in ITEMS for a in range(max_operand + 1) for b in range(max_operand + 1)]
    return [f"Q: {who} wants {count} different numbers for {'her' if who in SHE else 'his'} {item}. A:"
            for who in NAMES for count in COUNTS for item in ITEMS]


def demonstrate(total: int, p_correct: float, rng: random.Random) -> int:
    """The arithmetic demonstrator's answer: right with probability p_correct, else its habitual slip, one too
    many (5 times in 6; so with p_correct below 1/2 its most common answer is wrong), or off by -1 or +2."""
    if rng.random() < p_correct:
        return total
    return total + (1 if rng.random() < 5 / 6 else rng.choice([d for d in (-1, 2) if total + d >= 0]))


def demonstrate_list(count: int, p_correct: float, rng: random.Random) -> list[int]:
    """The lists demonstrator's numbers: with probability p_correct different ones, else its habit, one number
    over and over; each number slips to the other kind 1 time in 10 (a repeat of the last, a new one), and
    one number too many comes 1 time in 6."""
    keeps, out = rng.random() < p_correct, []
    for _ in range(count + (rng.random() < 1 / 6)):
        new = keeps != (rng.random() < 0.1)
        out.append(rng.choice([n for n in NUMBERS if n not in out]) if new or not out else out[-1])
    return out


def make_task(name: str, seed: int, p_correct: float = 0.4, heldout_fraction: float = 0.1, max_operand: int = 4,
              demos: int = 1, dev_fraction: float = 0.0) -> tuple[list[data.Example] | list[data.Pair], list[str], list[str]]:
    """A built-in task: judged and rated demonstrations on training prompts, held-out (test) and dev prompts.

    Seeded fractions of the prompts are held out for the final evaluation and kept as a dev split for
    choosing settings; the three sets are disjoint, and the held-out prompts do not depend on
    dev_fraction. demos=1: one completion per training prompt, one Example each. demos=k>1: the
    demonstrator answers each prompt k times, and a prompt with a desirable and an undesirable answer gives
    one Pair (the first of each); the same pairs serve DPO, KTO (split) and SFT (labels ignored). Other
    prompts give no pair.
    """
    rng = random.Random(seed)
    prompts = task_prompts(name, max_operand)
    rng.shuffle(prompts)
    n_heldout, n_dev = int(len(prompts) * heldout_fraction), int(len(prompts) * dev_fraction)
    heldout, dev, train = prompts[:n_heldout], prompts[n_heldout:n_heldout + n_dev], prompts[n_heldout + n_dev:]
    units = []
    for i, prompt in enumerate(train):
        if name == "arithmetic":
            a, b = map(int, PROBLEM.search(prompt).groups())
            completions = [f" {demonstrate(a + b, p_correct, rng)}" for _ in range(demos)]
        else:
            count = int(LIST.search(prompt)[1])
            completions = ["".join(f" {n}" for n in demonstrate_list(count, p_correct, rng)) for _ in range(demos)]
        desirable = [judge(prompt, c) >= DESIRABLE_SCORE for c in completions]
        where = f"{name} task prompt {i}"
        if demos == 1:
            units.append(data.Example(prompt, completions[0], desirable[0], where, rating(prompt, completions[0])))
        elif any(desirable) and not all(desirable):
            chosen, rejected = completions[desirable.index(True)], completions[desirable.index(False)]
            units.append(data.Pair(prompt, chosen, rejected, where, rating(prompt, chosen), rating(prompt, rejected)))
    return units, heldout, dev


# ----------------------------------------------------------------------------- utility

@torch.no_grad()
def evaluate(model: GPT, prompts: list[str], samples: int, temperature: float, seed: int, device: torch.device,
             max_new_tokens: int = 8) -> dict[str, float]:
    """Sample `samples` completions per prompt (temperature 0: greedy) and report the judge's mean score
    ("utility"), the mean completion length in tokens before EOT ("length"), and the share of completions
    that end with EOT within max_new_tokens ("eot")."""
    enc = data.get_tokenizer()
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    by_length: dict[int, list[tuple[str, list[int]]]] = {}
    for p in prompts:  # prompts of one length share a batch, so no padding is needed
        ids = enc.encode_ordinary(p)
        by_length.setdefault(len(ids), []).append((p, ids))
    scores, lengths, ended = [], [], []
    for group in by_length.values():
        for i in range(0, len(group), 64):  # 64 prompts at a time bound the (rows, 50257) logits in memory
            chunk = group[i:i + 64]
            idx = torch.tensor([ids for _, ids in chunk], device=device).repeat_interleave(samples, dim=0)
            out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator, stop=data.EOT)
            for row, completion in enumerate(out[:, idx.size(1):].tolist()):
                ended.append(data.EOT in completion)
                completion = completion[:completion.index(data.EOT)] if ended[-1] else completion
                lengths.append(len(completion))
                scores.append(judge(chunk[row // samples][0], enc.decode(completion)))
    n = len(scores)
    return {"utility": sum(scores) / n, "length": sum(lengths) / n, "eot": sum(ended) / n}


def utility(model: GPT, prompts: list[str], samples: int, seed: int, device: torch.device,
            max_new_tokens: int = 8) -> dict[str, dict[str, float]]:
    """`evaluate` sampled at temperature 1 (`samples` per prompt) and greedy: {"sampled": ..., "greedy": ...}."""
    return {"sampled": evaluate(model, prompts, samples, 1.0, seed, device, max_new_tokens),
            "greedy": evaluate(model, prompts, 1, 0.0, seed, device, max_new_tokens)}
