"""Tokenization, datasets, the paper's data settings, batching and the in-batch KL pairs.

An example is (prompt, completion, label), label True for desirable and False for undesirable. KTO
needs no pairs; a preference pair (x, y_w, y_l) is simply two examples. DPO needs the pairs.
"""
import collections
import functools
import gzip
import hashlib
import json
import os
import random
import re
import zlib
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
    desirable: bool
    where: str  # "file.jsonl:7", for error messages


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    where: str


# Examples a data setting changed are followed apart from the rest in the logs: "flipped" by label_noise,
# "contradicted" by contradict.
TAGS = ("clean", "flipped", "contradicted")


class Tokens(NamedTuple):
    prompt: list[int]
    completion: list[int]  # ends with EOT
    desirable: bool
    tag: str = "clean"


class PairTokens(NamedTuple):
    prompt: list[int]
    chosen: list[int]  # ends with EOT
    rejected: list[int]  # ends with EOT
    tag: str = "clean"


# ----------------------------------------------------------------------------- data files
# A .jsonl or .jsonl.gz file, one JSON object per line, in any of these shapes, recognised row by row:
#   unpaired        {"prompt": str, "completion": str, "label": bool}
#   paired          {"prompt": str, "chosen": str, "rejected": str}
#   HH-RLHF         {"chosen": str, "rejected": str}: whole transcripts "\n\nHuman: ...\n\nAssistant: ..."; the
#                   prompt is the shared transcript up to and including the last "\n\nAssistant:"
#   conversational  the fields above as lists of {"role", "content"} messages (TRL's shapes); chosen and
#                   rejected may repeat the prompt's turns (UltraFeedback-binarized) or, without a prompt,
#                   share them (the prompt is their common start)
# Messages are rendered as HH-RLHF writes them, "\n\nHuman: ..." (system: "System", user: "Human",
# assistant: "Assistant"); the prompt ends with "\n\nAssistant:" and the completion is " " + the reply.
# The first row decides between examples (unpaired) and pairs; every row must then give the same.

LABEL_EXPECTED = "a JSON boolean (true = desirable, false = undesirable)"
ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
ASSISTANT = "\n\nAssistant:"


def _text(obj: dict, field: str, where: str) -> str:
    if field not in obj:
        raise DataError(f"{where}: field '{field}' is missing; expected a non-empty string or a list of messages")
    if not isinstance(obj[field], str) or not obj[field]:
        raise DataError(f"{where}: field '{field}': expected a non-empty string, got {json.dumps(obj[field])[:80]}")
    return obj[field]


def _messages(value, field: str, where: str) -> list[dict]:
    """A list of {"role": system|user|assistant, "content": str} messages, checked."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}': expected a non-empty list of messages, got {json.dumps(value)[:80]}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: field '{field}', message {i}: expected a role of {', '.join(ROLES)}, "
                            f"got {json.dumps(m.get('role') if isinstance(m, dict) else m)[:80]}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{field}', message {i}: expected a string 'content', "
                            f"got {json.dumps(m.get('content'))[:80]}")
    return value


def render(messages: list[dict]) -> str:
    """The plain-text chat template: each message as "\n\n{Role}: {content}"."""
    return "".join(f"\n\n{ROLES[m['role']]}: {m['content']}" for m in messages)


def _reply(messages: list[dict], prompt: list[dict], field: str, where: str) -> str:
    """The completion of a conversational field: one assistant message, after the prompt's turns if repeated."""
    if messages[:len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if len(messages) != 1 or messages[0]["role"] != "assistant" or not messages[0]["content"]:
        raise DataError(f"{where}: field '{field}': expected one non-empty assistant reply after the prompt's messages, "
                        f"got {json.dumps(messages)[:80]}")
    return " " + messages[0]["content"]


def _prompt(value, where: str) -> list[dict]:
    """A conversational prompt: a list of messages, or a string taken as one user message."""
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    return _messages(value, "prompt", where)


def parse_row(obj, where: str) -> Example | Pair | str:
    """One row as an Example or a Pair, or the reason it is dropped (a str); DataError if malformed."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "completion" in obj or "label" in obj:
        if "label" not in obj:
            raise DataError(f"{where}: field 'label' is missing; expected {LABEL_EXPECTED}")
        # An identity test against True would silently treat labels written as 1 or "true" as undesirable.
        if not isinstance(obj["label"], bool):
            raise DataError(f"{where}: field 'label': expected {LABEL_EXPECTED}, got {json.dumps(obj['label'])}")
        if isinstance(obj.get("completion"), list) or isinstance(obj.get("prompt"), list):
            prompt = _prompt(obj.get("prompt"), where)
            completion = _reply(_messages(obj.get("completion"), "completion", where), prompt, "completion", where)
            return Example(render(prompt) + ASSISTANT, completion, obj["label"], where)
        return Example(_text(obj, "prompt", where), _text(obj, "completion", where), obj["label"], where)
    if "chosen" not in obj and "rejected" not in obj:
        raise DataError(f"{where}: expected fields prompt, completion, label (unpaired) or chosen, rejected "
                        f"(paired, with or without prompt); got {', '.join(obj) or 'none'}")
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
        chosen, rejected = (_messages(obj.get(f), f, where) for f in ("chosen", "rejected"))
        if "prompt" in obj:
            prompt = _prompt(obj["prompt"], where)
        else:  # the implicit prompt: the turns chosen and rejected share before their replies
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt = chosen[:n]
            if not prompt:
                raise DataError(f"{where}: fields 'chosen' and 'rejected' share no prompt turns and there is no 'prompt'")
        pair = Pair(render(prompt) + ASSISTANT, _reply(chosen, prompt, "chosen", where),
                    _reply(rejected, prompt, "rejected", where), where)
    elif "prompt" in obj:
        pair = Pair(_text(obj, "prompt", where), _text(obj, "chosen", where), _text(obj, "rejected", where), where)
    else:  # HH-RLHF: two transcripts that differ in their last reply
        chosen, rejected = _text(obj, "chosen", where), _text(obj, "rejected", where)
        i, j = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
        if i < 0 or j < 0:
            raise DataError(f"{where}: field '{'chosen' if i < 0 else 'rejected'}': expected an HH-RLHF transcript "
                            f"with '\\n\\nAssistant:' turns")
        prompt = chosen[:i + len(ASSISTANT)]
        if rejected[:j + len(ASSISTANT)] != prompt:
            return "HH-RLHF transcripts that differ before their last reply"
        pair = Pair(prompt, chosen[i + len(ASSISTANT):], rejected[j + len(ASSISTANT):], where)
        if not pair.chosen.strip() or not pair.rejected.strip():
            return "an empty last reply"
    return "chosen identical to rejected" if pair.chosen == pair.rejected else pair


def read_jsonl(path: str) -> tuple[list[Example] | list[Pair], collections.Counter]:
    """Read a .jsonl or .jsonl.gz file (shapes above). Returns the examples or pairs and the rows
    dropped, by reason. Blank lines are skipped; anything malformed raises DataError naming file, line and field."""
    units, dropped = [], collections.Counter()
    try:
        f = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    try:
        with f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                unit = parse_row(obj, where)
                if isinstance(unit, str):
                    dropped[unit] += 1
                    continue
                if units and type(unit) is not type(units[0]):
                    first, this = ("unpaired", "paired") if isinstance(units[0], Example) else ("paired", "unpaired")
                    raise DataError(f"{where}: {'an' if this == 'unpaired' else 'a'} {this} row in a file whose first row "
                                    f"({units[0].where}) is {first}; expected every row {first}")
                units.append(unit)
    except (OSError, EOFError, zlib.error) as e:  # gzip: a truncated or corrupt file
        raise DataError(f"{path}: truncated or corrupt gzip file ({e})") from None
    if not units:
        raise DataError(f"{path}: no examples" + (f" ({sum(dropped.values())} rows dropped)" if dropped else ""))
    return units, dropped


def tokenize(units: list[Example] | list[Pair], block_size: int, progress: bool = False
             ) -> tuple[list[Tokens] | list[PairTokens], int]:
    """BPE-encode examples or pairs; EOT ends each completion. Returns the tokenized units and how many were
    dropped because a completion with its EOT cannot fit block_size even after the prompt loses tokens
    from the left (at least one prompt token must precede it to predict its first token)."""
    enc = get_tokenizer()
    paired = bool(units) and isinstance(units[0], Pair)
    fields = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion")
    out, dropped, chunk = [], 0, 4096
    bar = tqdm(total=len(units), desc="tokenizing", unit="rows", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(units), chunk):
        part = units[start:start + chunk]
        bar.update(len(part))
        ids = {f: enc.encode_ordinary_batch([getattr(u, f) for u in part]) for f in fields}
        for i, u in enumerate(part):
            completions = [ids[f][i] + [EOT] for f in fields[1:]]
            if max(len(c) for c in completions) > block_size:
                dropped += 1
            elif paired:
                out.append(PairTokens(ids["prompt"][i], *completions))
            else:
                out.append(Tokens(ids["prompt"][i], completions[0], u.desirable))
    bar.close()
    return out, dropped


CACHE_VERSION = 1  # raise when the cache's layout changes


def load_file(path: str, block_size: int, progress: bool = True) -> tuple[list[Tokens] | list[PairTokens], list[str]]:
    """Read and tokenize a data file, through a cache of numpy arrays beside it (nanoGPT's habit) that
    a changed file, tokenizer or block_size invalidates. Returns the units and the report of what was dropped."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    digest.update(f"{VOCAB_SHA256} {GPT2_PATTERN} {block_size} {CACHE_VERSION}".encode())
    cache = os.path.join(os.path.dirname(os.path.abspath(path)), ".kto_cache",
                         f"{os.path.basename(path)}.{digest.hexdigest()[:16]}.npz")
    if os.path.exists(cache):
        units, dropped = _read_cache(cache)
    else:
        rows, dropped = read_jsonl(path)
        units, too_long = tokenize(rows, block_size, progress)
        if too_long:
            dropped[f"a completion longer than block_size={block_size} tokens with EOT"] = too_long
        if not units:
            raise DataError(f"{path}: no example fits block_size={block_size}")
        _write_cache(cache, units, dropped)
    report = [f"{path}: dropped {n} rows: {reason}" for reason, n in sorted(dropped.items())]
    return units, report


def _write_cache(path: str, units: list[Tokens] | list[PairTokens], dropped: collections.Counter) -> None:
    """Sequences concatenated in one int32 array with their lengths; written to a temporary file, then
    renamed. A directory we cannot write to only costs the cache."""
    paired = isinstance(units[0], PairTokens)
    seqs = [s for u in units for s in (u[:3] if paired else u[:2])]
    arrays = {"tokens": np.fromiter((t for s in seqs for t in s), dtype=np.int32),
              "lengths": np.array([len(s) for s in seqs], dtype=np.int64),
              "desirable": np.array([False if paired else u.desirable for u in units]),
              "paired": np.array(paired), "dropped": np.array(json.dumps(dropped))}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass


def _read_cache(path: str) -> tuple[list[Tokens] | list[PairTokens], collections.Counter]:
    with np.load(path) as z:
        paired, width = bool(z["paired"]), 3 if bool(z["paired"]) else 2
        seqs = np.split(z["tokens"], np.cumsum(z["lengths"])[:-1])
        seqs = [s.tolist() for s in seqs]
        if paired:
            units = [PairTokens(*seqs[i:i + 3]) for i in range(0, len(seqs), 3)]
        else:
            units = [Tokens(seqs[i], seqs[i + 1], bool(d)) for i, d in zip(range(0, len(seqs), width), z["desirable"])]
        return units, collections.Counter(json.loads(str(z["dropped"])))


# ----------------------------------------------------------------------------- the built-in task
# Word problems "Q: Ann had 3 apples, got 4 more. Total? A:" answered by a noisy demonstrator who is
# right with probability p_correct and otherwise usually one too many. The judge labels each answer.
# The true utility (the share of correct answers) is what alignment should raise.

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
                    demos: int = 1) -> tuple[list[Example] | list[Pair], list[str]]:
    """The built-in task: judged demonstrations on training prompts, and held-out prompts.

    A seeded fraction of the prompts is held out for evaluation. demos=1: one answer per training
    prompt, one Example each. demos=k>1: the demonstrator answers each prompt k times, and a prompt
    with a correct and a wrong answer gives one Pair (the correct answer, the first wrong one); the
    same pairs serve DPO, KTO (split) and SFT (labels ignored). Other prompts give no pair.
    """
    rng = random.Random(seed)
    prompts = task_prompts(max_operand)
    rng.shuffle(prompts)
    n_heldout = int(len(prompts) * heldout_fraction)
    heldout, train = prompts[:n_heldout], prompts[n_heldout:]
    units = []
    for i, prompt in enumerate(train):
        a, b = map(int, PROBLEM.search(prompt).groups())
        answers = [demonstrate(a + b, p_correct, rng) for _ in range(demos)]
        where = f"arithmetic task prompt {i}"
        if demos == 1:
            completion = f" {answers[0]}"
            units.append(Example(prompt, completion, judge(prompt, completion) == 1.0, where))
            continue
        judged = {answer: judge(prompt, f" {answer}") == 1.0 for answer in answers}
        right = [answer for answer in answers if judged[answer]]
        wrong = [answer for answer in answers if not judged[answer]]
        if right and wrong:
            units.append(Pair(prompt, f" {right[0]}", f" {wrong[0]}", where))
    return units, heldout


# ----------------------------------------------------------------------------- the paper's data settings
# Each takes tokenized examples or pairs and returns a new list; each draws from its own seeded stream,
# so one setting does not change what another picks. What a setting changes keeps a tag for the logs.

Units = list[Tokens] | list[PairTokens]


def _rng(seed: int, setting: str) -> random.Random:
    return random.Random(f"{seed}:{setting}")


def _picked(n: int, fraction: float, rng: random.Random) -> set[int]:
    """round(fraction * n) distinct indices, drawn uniformly."""
    return set(rng.sample(range(n), round(fraction * n)))


def _opposite(u: Tokens | PairTokens, tag: str) -> Tokens | PairTokens:
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
        out += [u._replace(tag="contradicted"), _opposite(u, "contradicted")] if i in twins else [u]
    return out


def flip_labels(units: Units, fraction: float, seed: int) -> Units:
    """label_noise: reverse the label of a seeded `fraction` of the examples (or pairs), tagged "flipped"."""
    flip = _picked(len(units), fraction, _rng(seed, "label_noise"))
    return [_opposite(u, "flipped") if i in flip else u for i, u in enumerate(units)]


def split_pairs(pairs: list[PairTokens]) -> list[Tokens]:
    """A pair (x, y_w, y_l) becomes (x, y_w, desirable) and (x, y_l, undesirable), as in the paper.
    Batches draw examples in a seeded shuffle, so batches mix labels."""
    return [Tokens(p.prompt, completion, desirable, p.tag)
            for p in pairs for completion, desirable in ((p.chosen, True), (p.rejected, False))]


def pair_up(examples: list[Tokens]) -> tuple[list[PairTokens], int]:
    """DPO on unpaired data: each prompt's desirable examples are paired, in order, with its undesirable
    ones. Returns the pairs and the number of examples left without a partner."""
    by_prompt: dict[tuple[int, ...], tuple[list[Tokens], list[Tokens]]] = {}
    for ex in examples:
        by_prompt.setdefault(tuple(ex.prompt), ([], []))[0 if ex.desirable else 1].append(ex)
    pairs = [PairTokens(d.prompt, d.completion, u.completion, max(d.tag, u.tag, key=TAGS.index))
             for good, bad in by_prompt.values() for d, u in zip(good, bad)]
    return pairs, len(examples) - 2 * len(pairs)


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
        assert len(completion) <= block_size, "tokenize() rejects completions that cannot fit"
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
        raise DataError(f"one prompt has {m} examples, and a KTO batch of {batch_size} could hold more than half "
                        f"its rows from it, leaving no mismatched completion for KL pairs; expected batch_size "
                        f"of at least {2 * m}")


def make_batch(units: list[Tokens] | list[PairTokens], block_size: int, with_kl: bool) -> dict[str, torch.Tensor]:
    """Tensors for one global batch, built before sharding (so KL pairs are drawn from the global batch).

    Examples give one row each (and KL rows when with_kl). Pairs give two rows each, chosen then
    rejected, so a contiguous shard holds whole pairs.
    """
    tags = torch.tensor([TAGS.index(u.tag) for u in units])
    if isinstance(units[0], PairTokens):
        rows = [(p.prompt, completion) for p in units for completion in (p.chosen, p.rejected)]
        idx, targets, scored = collate(rows, block_size)
        return {"idx": idx, "targets": targets, "scored": scored, "tag": tags.repeat_interleave(2)}
    idx, targets, scored = collate([(ex.prompt, ex.completion) for ex in units], block_size)
    batch = {"idx": idx, "targets": targets, "scored": scored, "tag": tags,
             "desirable": torch.tensor([ex.desirable for ex in units])}
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
