"""Tokenization, datasets, batching and the in-batch KL pairs.

An example is (prompt, completion, label), label True for desirable and False for undesirable. KTO
needs no pairs; a preference pair (x, y_w, y_l) is simply two examples.
"""
import functools
import json
import os
import random
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

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


class Tokens(NamedTuple):
    prompt: list[int]
    completion: list[int]  # ends with EOT
    desirable: bool


# ----------------------------------------------------------------------------- JSONL files

LABEL_EXPECTED = "a JSON boolean (true = desirable, false = undesirable)"


def read_jsonl(path: str) -> list[Example]:
    """Read one {"prompt": str, "completion": str, "label": bool} object per line.

    Blank lines are skipped; anything else that is not such an object raises DataError.
    """
    examples = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
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
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with fields prompt, completion, label; got {type(obj).__name__}")
            for field in ("prompt", "completion"):
                if field not in obj:
                    raise DataError(f"{where}: field '{field}' is missing; expected a non-empty string")
                if not isinstance(obj[field], str) or not obj[field]:
                    raise DataError(f"{where}: field '{field}': expected a non-empty string, got {json.dumps(obj[field])}")
            if "label" not in obj:
                raise DataError(f"{where}: field 'label' is missing; expected {LABEL_EXPECTED}")
            # An identity test against True would silently treat labels written as 1 or "true" as undesirable.
            if not isinstance(obj["label"], bool):
                raise DataError(f"{where}: field 'label': expected {LABEL_EXPECTED}, got {json.dumps(obj['label'])}")
            examples.append(Example(obj["prompt"], obj["completion"], obj["label"], where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def tokenize(examples: list[Example], block_size: int) -> list[Tokens]:
    """BPE-encode examples; EOT ends each completion. A completion that cannot fit is an error."""
    enc = get_tokenizer()
    out = []
    for ex in examples:
        prompt = enc.encode_ordinary(ex.prompt)
        completion = enc.encode_ordinary(ex.completion) + [EOT]
        # At least one prompt token must precede the completion to predict its first token.
        if len(completion) > block_size:
            raise DataError(f"{ex.where}: field 'completion': {len(completion)} tokens with EOT do not fit "
                            f"block_size {block_size} after at least one prompt token; expected at most {block_size}")
        out.append(Tokens(prompt, completion, ex.desirable))
    return out


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


def arithmetic_task(seed: int, p_correct: float = 0.4, heldout_fraction: float = 0.1,
                    max_operand: int = 4) -> tuple[list[Example], list[str]]:
    """The built-in task: labelled demonstrations on training prompts, and held-out prompts.

    Every (name, numbers, item) prompt appears once; a seeded fraction is held out for evaluation.
    Each training prompt gets one demonstrator answer, labelled by the judge.
    """
    rng = random.Random(seed)
    prompts = [f"Q: {name} had {a} {item}, got {b} more. Total? A:"
               for name in NAMES for item in ITEMS for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(prompts)
    n_heldout = int(len(prompts) * heldout_fraction)
    heldout, train = prompts[:n_heldout], prompts[n_heldout:]
    examples = []
    for i, prompt in enumerate(train):
        a, b = map(int, PROBLEM.search(prompt).groups())
        answer = a + b
        if rng.random() >= p_correct:
            # The demonstrator's habitual slip is one too many (so with p_correct below 1/2 its most
            # common answer is wrong); now and then it is off the other way.
            answer += 1 if rng.random() < 5 / 6 else rng.choice([d for d in (-1, 2) if answer + d >= 0])
        completion = f" {answer}"
        examples.append(Example(prompt, completion, judge(prompt, completion) == 1.0, f"arithmetic task example {i}"))
    return examples, heldout


# ----------------------------------------------------------------------------- batches

def batch_indices(n: int, batch_size: int, batch: int, seed: int) -> list[int]:
    """Example indices of global batch number `batch`.

    The data is a stream of epochs, each a permutation seeded by (seed, epoch), so every rank draws
    the same global batch, and batch k is known from k alone (resume needs no sampler state).
    Batches run across epoch boundaries: no example is dropped.
    """
    start = batch * batch_size
    return [int(_permutation(n, seed, p // n)[p % n]) for p in range(start, start + batch_size)]


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
    """Mismatched pairs for the reference point: prompt i with the completion of example i+1 (mod B).

    A cyclic shift never pairs an example with itself (a reversal would, for the middle of an odd
    batch), and the KL completions are exactly the batch's completions. Labels play no part.
    """
    if len(examples) < 2:
        raise DataError("a KTO batch needs at least 2 examples to build mismatched KL pairs; got 1 (raise batch_size)")
    return [(ex.prompt, examples[(i + 1) % len(examples)].completion) for i, ex in enumerate(examples)]


def make_batch(examples: list[Tokens], block_size: int, with_kl: bool) -> dict[str, torch.Tensor]:
    """Tensors for one global batch; KL pairs are built here, on the global batch, before sharding."""
    idx, targets, scored = collate([(ex.prompt, ex.completion) for ex in examples], block_size)
    batch = {"idx": idx, "targets": targets, "scored": scored,
             "desirable": torch.tensor([ex.desirable for ex in examples])}
    if with_kl:
        batch["kl_idx"], batch["kl_targets"], batch["kl_scored"] = collate(kl_pairs(examples), block_size)
    return batch


def shard(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of rows of a global batch."""
    n = len(batch["idx"]) // world_size
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
