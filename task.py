"""The built-in task: word problems, a noisy demonstrator, a judge, and a model's utility on held-out prompts.

Word problems "Q: Ann had 3 apples, got 4 more. Total? A:" answered by a noisy demonstrator who is
right with probability p_correct and otherwise usually one too many. The judge labels each answer.
The true utility (the share of correct answers) is what alignment should raise.
"""
import random
import re

import torch

import data
from model import GPT

NAMES = ["Ann", "Bob", "Eve", "Tom", "Sam", "Max", "Kim", "Leo", "Mia", "Zoe"]
ITEMS = ["apples", "cats", "books", "coins", "eggs", "pens", "cards", "shells"]
PROBLEM = re.compile(r"Q: \w+ had (\d+) \w+, got (\d+) more\. Total\? A:$")


def judge(prompt: str, completion: str) -> float:
    """1.0 if the completion is the correct total for the prompt's word problem, else 0.0."""
    match = PROBLEM.search(prompt)
    if match is None:
        raise ValueError(f"not a problem of the built-in task: {prompt!r}")
    return float(completion.strip() == str(int(match[1]) + int(match[2])))


def task_prompts(max_operand: int) -> list[str]:
    """Every prompt of the built-in task: each name, item and pair of operands once."""
    return [f"Q: {name} had {a} {item}, got {b} more. Total? A:"
            for name in NAMES for item in ITEMS for a in range(max_operand + 1) for b in range(max_operand + 1)]


def demonstrate(total: int, p_correct: float, rng: random.Random) -> int:
    """The demonstrator's answer: right with probability p_correct, else its habitual slip, one too
    many (5 times in 6; so with p_correct below 1/2 its most common answer is wrong), or off by -1 or +2."""
    if rng.random() < p_correct:
        return total
    return total + (1 if rng.random() < 5 / 6 else rng.choice([d for d in (-1, 2) if total + d >= 0]))


def arithmetic_task(seed: int, p_correct: float = 0.4, heldout_fraction: float = 0.1, max_operand: int = 4,
                    demos: int = 1, dev_fraction: float = 0.0) -> tuple[list[data.Example] | list[data.Pair], list[str], list[str]]:
    """The built-in task: judged demonstrations on training prompts, held-out (test) prompts and dev prompts.

    Seeded fractions of the prompts are held out for the final evaluation and kept as a dev split for
    choosing settings; the three sets are disjoint, and the held-out prompts do not depend on
    dev_fraction. demos=1: one answer per training
    prompt, one Example each. demos=k>1: the demonstrator answers each prompt k times, and a prompt
    with a correct and a wrong answer gives one Pair (the correct answer, the first wrong one); the
    same pairs serve DPO, KTO (split) and SFT (labels ignored). Other prompts give no pair.
    """
    rng = random.Random(seed)
    prompts = task_prompts(max_operand)
    rng.shuffle(prompts)
    n_heldout, n_dev = int(len(prompts) * heldout_fraction), int(len(prompts) * dev_fraction)
    heldout, dev, train = prompts[:n_heldout], prompts[n_heldout:n_heldout + n_dev], prompts[n_heldout + n_dev:]
    units = []
    for i, prompt in enumerate(train):
        a, b = map(int, PROBLEM.search(prompt).groups())
        answers = [demonstrate(a + b, p_correct, rng) for _ in range(demos)]
        where = f"arithmetic task prompt {i}"
        if demos == 1:
            completion = f" {answers[0]}"
            units.append(data.Example(prompt, completion, judge(prompt, completion) == 1.0, where))
            continue
        judged = {answer: judge(prompt, f" {answer}") == 1.0 for answer in answers}
        right = [answer for answer in answers if judged[answer]]
        wrong = [answer for answer in answers if not judged[answer]]
        if right and wrong:
            units.append(data.Pair(prompt, f" {right[0]}", f" {wrong[0]}", where))
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
            out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
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
