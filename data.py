"""Tokenization, datasets, the paper's data settings, batching and the in-batch KL pairs.

An example is (prompt, completion, label), label True for desirable and False for undesirable. KTO
needs no pairs; a preference pair (x, y_w, y_l) is simply two examples. DPO needs the pairs. Score-based
feedback (a rating per completion) becomes labels, or DPO's pairs, by a threshold (`rate`).
"""
import collections
import functools
import json
import math
import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from tqdm import tqdm

# GPT-2's BPE ranks, shipped in the repo (byte-identical to tiktoken's r50k_base) so nothing is
# downloaded at run time.
VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpt2.tiktoken")
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenization pattern (the one tiktoken uses for r50k_base).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = 50256  # <|endoftext|>: ends every completion and is scored with it


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 BPE tokenizer, built offline from assets/gpt2.tiktoken."""
    ranks = load_tiktoken_bpe(VOCAB_FILE, expected_hash=VOCAB_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


@dataclass
class Example:
    prompt: str
    completion: str
    desirable: bool | None  # None: a scored example, labelled later by its score (`rate`)
    where: str  # "file.jsonl:7", for error messages
    score: float | None = None


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    where: str
    score_chosen: float | None = None  # both or neither
    score_rejected: float | None = None


# Examples a data setting changed are followed apart from the rest in the logs: "flipped" by label_noise,
# "contradicted" by contradict.
TAGS = ("clean", "flipped", "contradicted")


class Tokens(NamedTuple):
    prompt: list[int]
    completion: list[int]  # ends with EOT
    desirable: bool | None
    tag: str = "clean"
    score: float | None = None
    weight: float = 1.0  # its factor on eq. (7): 1, or its margin weight (`margin_weights`)


class PairTokens(NamedTuple):
    prompt: list[int]
    chosen: list[int]  # ends with EOT
    rejected: list[int]  # ends with EOT
    tag: str = "clean"
    score_chosen: float | None = None
    score_rejected: float | None = None


def tokenize(units: list[Example] | list[Pair], block_size: int, progress: bool = False
             ) -> tuple[list[Tokens] | list[PairTokens], int, int]:
    """BPE-encode examples or pairs; EOT ends each completion. Returns the tokenized units, how many were
    dropped because a completion with its EOT cannot fit block_size even after the prompt loses tokens
    from the left (at least one prompt token must precede it to predict its first token), and how many
    kept units have a prompt that loses tokens from the left (collate cuts it)."""
    enc = get_tokenizer()
    paired = bool(units) and isinstance(units[0], Pair)
    fields = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion")
    out, dropped, cut, chunk = [], 0, 0, 4096
    bar = tqdm(total=len(units), desc="tokenizing", unit="rows", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(units), chunk):
        part = units[start:start + chunk]
        bar.update(len(part))
        ids = {f: enc.encode_ordinary_batch([getattr(u, f) for u in part]) for f in fields}
        for i, u in enumerate(part):
            completions = [ids[f][i] + [EOT] for f in fields[1:]]
            longest = max(len(c) for c in completions)
            if longest > block_size:
                dropped += 1
                continue
            cut += len(ids["prompt"][i]) + longest > block_size + 1  # a sequence of block_size + 1 fits (see collate)
            if paired:
                out.append(PairTokens(ids["prompt"][i], *completions, score_chosen=u.score_chosen,
                                      score_rejected=u.score_rejected))
            else:
                out.append(Tokens(ids["prompt"][i], completions[0], u.desirable, score=u.score))
    bar.close()
    return out, dropped, cut


# ----------------------------------------------------------------------------- the paper's data settings
# Each takes tokenized examples or pairs and returns a new list; each draws from its own seeded stream,
# so one setting does not change what another picks. What a setting changes keeps a tag for the logs.

Units = list[Tokens] | list[PairTokens]


def _rng(seed: int, setting: str) -> random.Random:
    return random.Random(f"{seed}:{setting}")


def _picked(n: int, fraction: float, rng: random.Random) -> set[int]:
    """round(fraction * n) distinct indices, drawn uniformly."""
    return set(rng.sample(range(n), round(fraction * n)))


def opposite(u: Tokens | PairTokens, tag: str) -> Tokens | PairTokens:
    """The same completion(s) with the label reversed: a pair swaps chosen and rejected."""
    if isinstance(u, PairTokens):
        return u._replace(chosen=u.rejected, rejected=u.chosen, tag=tag)
    return u._replace(desirable=not u.desirable, tag=tag)


def add_contradictions(units: Units, fraction: float, seed: int) -> Units:
    """contradict: a seeded `fraction` of the examples (or pairs) also comes from a second annotator who
    gives the opposite label (Theorem 4.3); the original and its twin are both tagged "contradicted"."""
    twins = _picked(len(units), fraction, _rng(seed, "contradict"))
    out = []
    for i, u in enumerate(units):
        out += [u._replace(tag="contradicted"), opposite(u, "contradicted")] if i in twins else [u]
    return out


def flip_labels(units: Units, fraction: float, seed: int) -> Units:
    """label_noise: reverse the label of a seeded `fraction` of the examples (or pairs), tagged "flipped"."""
    flip = _picked(len(units), fraction, _rng(seed, "label_noise"))
    return [opposite(u, "flipped") if i in flip else u for i, u in enumerate(units)]


def split_pairs(pairs: list[PairTokens]) -> list[Tokens]:
    """A pair (x, y_w, y_l) becomes (x, y_w, desirable) and (x, y_l, undesirable), as in the paper.
    Batches draw examples in a seeded shuffle, so batches mix labels."""
    return [Tokens(p.prompt, completion, desirable, p.tag)
            for p in pairs for completion, desirable in ((p.chosen, True), (p.rejected, False))]


def pair_up(examples: list[Tokens]) -> tuple[list[PairTokens], int, int]:
    """DPO on unpaired data: each prompt's desirable examples are paired, in order, with its undesirable
    ones. Returns the pairs, the number of examples left without a partner, and the number of pairs skipped
    because chosen is identical to rejected (as a paired file's are dropped: they carry no preference)."""
    by_prompt: dict[tuple[int, ...], tuple[list[Tokens], list[Tokens]]] = {}
    for ex in examples:
        by_prompt.setdefault(tuple(ex.prompt), ([], []))[0 if ex.desirable else 1].append(ex)
    matched = [(d, u) for good, bad in by_prompt.values() for d, u in zip(good, bad)]
    pairs = [PairTokens(d.prompt, d.completion, u.completion, max(d.tag, u.tag, key=TAGS.index))
             for d, u in matched if d.completion != u.completion]
    return pairs, len(examples) - 2 * len(matched), len(matched) - len(pairs)


def one_per_prompt(examples: list[Tokens], seed: int) -> list[Tokens]:
    """one_y_per_x: keep one example per prompt, drawn uniformly (the paper's one-y-per-x setting)."""
    rng = _rng(seed, "one_y_per_x")
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, ex in enumerate(examples):
        by_prompt.setdefault(tuple(ex.prompt), []).append(i)
    keep = {rng.choice(indices) for indices in by_prompt.values()}
    return [ex for i, ex in enumerate(examples) if i in keep]


def keep_desirable(examples: list[Tokens], fraction: float, seed: int) -> list[Tokens]:
    """desirable_fraction: keep a seeded `fraction` of the desirable examples and every undesirable one
    (the paper's 1:10 run drops 90% of the desirable examples)."""
    desirable = [i for i, ex in enumerate(examples) if ex.desirable]
    keep = {desirable[i] for i in _picked(len(desirable), fraction, _rng(seed, "desirable_fraction"))}
    return [ex for i, ex in enumerate(examples) if not ex.desirable or i in keep]


# ----------------------------------------------------------------------------- score-based feedback
# A rating per completion (stars, UltraFeedback's 1-10, the built-in tasks' judge) in place of a label: the
# "score-based HALOs" the paper leaves to future work. A threshold turns scores into labels; margin weights
# keep some of the magnitude that labels throw away.

THRESHOLDS = ("median", "mean")  # of the data's scores; or a number


def is_scored(units: Units) -> bool:
    """Whether the units carry scores (a file's rows all do, or none: dataset.read_jsonl)."""
    return (units[0].score_chosen if isinstance(units[0], PairTokens) else units[0].score) is not None


def rate(units: Units, threshold: float | str, noise: float, seed: int, dpo: bool) -> tuple[Units, float, list[str]]:
    """Scored examples (or pairs) to labelled examples, or to DPO's pairs ordered by score.

    A noisy rater first (score_noise): seeded Gaussian noise of standard deviation `noise` on every score.
    The threshold is a number, or the median or mean of the (noisy) scores. An example scoring at least the
    threshold is desirable (the built-in tasks' rule), below it undesirable; the report counts those exactly
    at it. Pairs, for DPO: ordered by score, the higher chosen; a tie carries no preference and is dropped
    (counted). Pairs otherwise: each completion becomes an example labelled by its own score. An example
    whose label (a pair whose order) the noise-free score would not give is tagged "flipped".
    Returns the units, keeping their noisy scores, the threshold and the report's lines."""
    rng = _rng(seed, "score_noise")
    rater = (lambda s: s + rng.gauss(0.0, noise)) if noise else (lambda s: s)
    paired = isinstance(units[0], PairTokens)
    rated = [(u, rater(u.score_chosen), rater(u.score_rejected)) if paired else (u, rater(u.score)) for u in units]
    scores = np.array([s for r in rated for s in r[1:]])
    t = float(np.median(scores) if threshold == "median" else np.mean(scores) if threshold == "mean" else threshold)
    how = "as set" if threshold not in THRESHOLDS else f"the {threshold} of the scores" + (" after the noise" if noise else "")
    report = [f"score_threshold={threshold}: threshold {t:.4g} ({how}); of {len(scores)} scores {(scores > t).sum()} above, "
              f"{(scores == t).sum()} at it (desirable: at least the threshold), {(scores < t).sum()} below"]
    out, ties, swapped = [], 0, 0
    for u, *noisy in rated:
        clean = [u.score_chosen, u.score_rejected] if paired else [u.score]
        if paired and dpo:
            a, b = noisy
            if a == b:
                ties += 1
                continue
            swapped += a < b
            flipped = u.score_chosen == u.score_rejected or (a > b) != (u.score_chosen > u.score_rejected)
            hi, lo = (u.chosen, u.rejected) if a > b else (u.rejected, u.chosen)
            out.append(PairTokens(u.prompt, hi, lo, "flipped" if flipped else u.tag, max(a, b), min(a, b)))
            continue
        completions = [u.chosen, u.rejected] if paired else [u.completion]
        for completion, s, c in zip(completions, noisy, clean):
            out.append(Tokens(u.prompt, completion, s >= t, "flipped" if (s >= t) != (c >= t) else u.tag, s))
    if paired and dpo:
        report.append(f"DPO: {len(out)} pairs ordered by score ({swapped} with the rejected completion scored higher, "
                      f"swapped); {ties} ties dropped (no preference)")
    if noise:
        flipped = sum(u.tag == "flipped" for u in out)
        report.append(f"score_noise={noise}: {flipped} {'orders' if paired and dpo else 'labels'} differ from those of "
                      f"the noise-free scores (tagged flipped)")
    return out, t, report


def margin_weights(examples: list[Tokens], threshold: float) -> list[Tokens]:
    """score_weight=margin: each example's factor on eq. (7), |score - threshold| over the mean of its class's,
    so that each class's mean weight is 1 and lambda_D n_D / (lambda_U n_U) keeps its meaning. An example the
    rater scored far from the threshold counts for more; one at the threshold, for nothing."""
    margins = [abs(ex.score - threshold) for ex in examples]
    means = {}
    for label in (True, False):
        mine = [m for m, ex in zip(margins, examples) if ex.desirable == label]
        if mine and not any(mine):
            raise DataError(f"every {'desirable' if label else 'undesirable'} example scores exactly the threshold "
                            f"{threshold:g}: its margin weights would all be 0; expected score_weight=none or another threshold")
        means[label] = sum(mine) / len(mine) if mine else 1.0
    return [ex._replace(weight=m / means[ex.desirable]) for m, ex in zip(margins, examples)]


def split_by_prompt(units: Units, fraction: float, seed: int) -> tuple[Units, Units]:
    """eval_fraction: hold out a seeded `fraction` of the prompts with all their examples (or pairs).
    Returns (kept, held out)."""
    prompts = sorted({tuple(u.prompt) for u in units})
    held = {prompts[i] for i in _picked(len(prompts), fraction, _rng(seed, "eval_fraction"))}
    return [u for u in units if tuple(u.prompt) not in held], [u for u in units if tuple(u.prompt) in held]


def describe(units: Units) -> str:
    """Counts for the start-of-run report: '1800 examples: 717 desirable, 1083 undesirable (180 flipped)'."""
    tags = collections.Counter(u.tag for u in units)
    changed = ", ".join(f"{tags[t]} {t}" for t in TAGS[1:] if tags[t])
    if units and isinstance(units[0], PairTokens):
        text = f"{len(units)} pairs"
    else:
        n_d = sum(ex.desirable for ex in units)
        text = f"{len(units)} examples: {n_d} desirable, {len(units) - n_d} undesirable"
    return text + (f" ({changed})" if changed else "")


# ----------------------------------------------------------------------------- batches

def batch_indices(n: int, batch_size: int, batch: int, seed: int) -> list[int]:
    """Example indices of global batch number `batch`: batch_size distinct examples.

    The data is a stream of epochs, each a permutation seeded by (seed, epoch), so every rank draws
    the same global batch, and batch k is known from k alone (resume needs no sampler state). Each
    epoch holds n // batch_size whole batches: a batch never crosses into the next epoch, so it never
    holds an example twice, and the n % batch_size examples an epoch leaves over differ each epoch.
    """
    if n < batch_size:
        raise DataError(f"{n} training examples (or pairs), fewer than a batch of {batch_size}; expected at "
                        f"least batch_size distinct ones, so that no batch repeats one (lower batch_size)")
    epoch, k = divmod(batch, n // batch_size)
    return _permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size].tolist()


def eval_batches(n: int, batch_size: int) -> list[list[int]]:
    """Held-out examples in whole batches, in order (the n % batch_size last ones left over)."""
    return [list(range(i, i + batch_size)) for i in range(0, n - batch_size + 1, batch_size)]


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def collate(pairs: list[tuple[list[int], list[int]]], block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, completion) token lists -> inputs, targets and the completion mask, each (B, T).

    Right padding; the prompt loses tokens from the left when prompt + completion exceed the
    context. scored[b, t] is True where targets[b, t] is a completion token (EOT included).
    """
    rows = []
    for prompt, completion in pairs:
        assert prompt and len(completion) <= block_size, "empty prompts are refused on reading, completions that cannot fit by tokenize()"
        prompt = prompt[max(0, len(prompt) + len(completion) - block_size - 1):]
        rows.append((prompt + completion, len(prompt)))
    T = max(len(seq) for seq, _ in rows) - 1
    idx = torch.full((len(rows), T), EOT, dtype=torch.long)
    targets = torch.full((len(rows), T), EOT, dtype=torch.long)
    scored = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, (seq, n_prompt) in enumerate(rows):
        n = len(seq) - 1
        idx[b, :n] = torch.tensor(seq[:-1])
        targets[b, :n] = torch.tensor(seq[1:])
        scored[b, n_prompt - 1:n] = True  # target positions n_prompt-1 .. n-1 are the completion
    return idx, targets, scored


def kl_pairs(examples: list[Tokens]) -> list[tuple[list[int], list[int]]]:
    """Mismatched pairs for the reference point: each prompt with a completion written for another prompt.

    The rows are put in prompt order and each prompt takes the completion m places further on
    (cyclically), m being the most rows any one prompt has: rows that share a prompt are adjacent in
    that order, so m places on is always another prompt. With distinct prompts (m = 1) this is the
    paper's shift by one. The KL completions are exactly the batch's completions; labels play no part.
    """
    counts = collections.Counter(tuple(ex.prompt) for ex in examples)
    m = max(counts.values())
    if 2 * m > len(examples):
        raise DataError(f"a KTO batch of {len(examples)} holds {m} examples of one prompt; mismatched KL pairs need "
                        f"every prompt in at most half the batch (raise batch_size)")
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt)
    partner = {order[p]: order[(p + m) % len(order)] for p in range(len(order))}
    return [(ex.prompt, examples[partner[i]].completion) for i, ex in enumerate(examples)]


def check_kl_pairs(examples: list[Tokens], batch_size: int) -> None:
    """Refuse, before training, data whose batches could hold one prompt in more than half their rows."""
    prompt, m = collections.Counter(tuple(ex.prompt) for ex in examples).most_common(1)[0]
    if 2 * min(m, batch_size) > batch_size:
        text = get_tokenizer().decode(list(prompt))
        quoted = json.dumps(text[:60], ensure_ascii=False) + ("..." if len(text) > 60 else "")  # newlines kept on one line
        raise DataError(f"one prompt has {m} examples ({quoted}), and a KTO batch of {batch_size} could hold more than half "
                        f"its rows from it, leaving no mismatched completion for KL pairs; expected batch_size "
                        f"of at least {2 * m}")


def rows(units: Units) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) rows: one per example, two per pair (chosen, then rejected)."""
    if units and isinstance(units[0], PairTokens):
        return [(p.prompt, completion) for p in units for completion in (p.chosen, p.rejected)]
    return [(ex.prompt, ex.completion) for ex in units]


def make_batch(units: list[Tokens] | list[PairTokens], block_size: int, with_kl: bool) -> dict[str, torch.Tensor]:
    """Tensors for one global batch, built before sharding (so KL pairs are drawn from the global batch).

    Examples give one row each (and KL rows when with_kl). Pairs give two rows each, chosen then
    rejected, so a contiguous shard holds whole pairs.
    """
    tags = torch.tensor([TAGS.index(u.tag) for u in units])
    idx, targets, scored = collate(rows(units), block_size)
    if isinstance(units[0], PairTokens):
        return {"idx": idx, "targets": targets, "scored": scored, "tag": tags.repeat_interleave(2)}
    batch = {"idx": idx, "targets": targets, "scored": scored, "tag": tags,
             "desirable": torch.tensor([bool(ex.desirable) for ex in units]),  # None: unrated, for SFT, which reads no label
             "weight": torch.tensor([ex.weight for ex in units], dtype=torch.float32)}
    if with_kl:
        batch["kl_idx"], batch["kl_targets"], batch["kl_scored"] = collate(kl_pairs(units), block_size)
    return batch


def shard(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of rows of a global batch, with the flat indices of its scored
    positions ("positions", "kl_positions": see GPT.forward), found here on the host."""
    n = len(batch["idx"]) // world_size
    out = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    for prefix in ("", "kl_"):
        if prefix + "scored" in out:
            out[prefix + "positions"] = out[prefix + "scored"].reshape(-1).nonzero().squeeze(1)
    return out
