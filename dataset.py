"""The run's data set: a data file in the shapes preference data is published in, or the built-in task,
tokenized (through a cache), split for evaluation and shaped by the paper's data settings.
"""
import collections
import functools
import gzip
import hashlib
import json
import math
import os
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

import data
import task
from config import TrainConfig, per_batch
from data import DataError, Example, Pair, PairTokens, Tokens

# A .jsonl file, gzipped or not, one JSON object per line, in any of these shapes, recognised row by row:
#   unpaired        {"prompt": str, "completion": str, "label": bool}
#   scored          {"prompt": str, "completion": str, "score": number}; "response" for "completion" and
#                   score_field naming the score read HelpSteer's {"prompt", "response", "helpfulness", ...}
#   paired          {"prompt": str, "chosen": str, "rejected": str}, with or without "score_chosen" and
#                   "score_rejected" (UltraFeedback-binarized)
#   HH-RLHF         {"chosen": str, "rejected": str}: whole transcripts "\n\nHuman: ...\n\nAssistant: ..."; the
#                   prompt is the shared transcript up to and including the last "\n\nAssistant:"
#   conversational  the fields above as lists of {"role", "content"} messages (TRL's shapes); chosen and
#                   rejected may repeat the prompt's turns (UltraFeedback-binarized) or, without a prompt,
#                   share them (the prompt is their common start)
# Messages are rendered as HH-RLHF writes them, "\n\nHuman: ..." (system: "System", user: "Human",
# assistant: "Assistant"); the prompt ends with "\n\nAssistant:" and the completion is " " + the reply.
# The first row decides between examples (unpaired) and pairs, labelled or scored; every row must then give the
# same. A row with chosen and rejected and no completion is paired, whatever else it holds (a "label" among its
# other fields). A score_threshold turns scores into labels (data.rate).

LABEL_EXPECTED = "a JSON boolean (true = desirable, false = undesirable)"
SCORE_EXPECTED = "a finite JSON number"
ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
ASSISTANT = "\n\nAssistant:"


def _text(obj: dict, field: str, where: str) -> str:
    if field not in obj:
        raise DataError(f"{where}: field '{field}' is missing; expected a non-empty string or a list of messages")
    if not isinstance(obj[field], str) or not obj[field].strip():
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
    if len(messages) != 1 or messages[0]["role"] != "assistant" or not messages[0]["content"].strip():
        raise DataError(f"{where}: field '{field}': expected one non-empty assistant reply after the prompt's messages, "
                        f"got {json.dumps(messages)[:80]}")
    return " " + messages[0]["content"]


def _prompt(value, where: str) -> list[dict]:
    """A conversational prompt: a list of messages, or a string taken as one user message."""
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    return _messages(value, "prompt", where)


def _score(obj: dict, field: str, where: str) -> float:
    value = obj[field]
    try:  # json reads NaN and Infinity, and integers too large for a float
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        ok = False
    if not ok:
        raise DataError(f"{where}: field '{field}': expected {SCORE_EXPECTED}, got {json.dumps(value)[:80]}")
    return float(value)


def parse_row(obj, where: str, score_field: str = "score") -> Example | Pair | str:
    """One row as an Example or a Pair, or the reason it is dropped (a str); DataError if malformed."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    paired_fields = "chosen" in obj and "rejected" in obj
    if "completion" in obj or "response" in obj or ("label" in obj or score_field in obj) and not paired_fields:
        if "label" in obj and score_field in obj:
            raise DataError(f"{where}: fields 'label' and '{score_field}' both given; expected one, a label or a score")
        if score_field in obj:
            label, score = None, _score(obj, score_field, where)
        elif "label" not in obj:
            raise DataError(f"{where}: field 'label' is missing; expected {LABEL_EXPECTED}, or a score in field '{score_field}'")
        # An identity test against True would silently treat labels written as 1 or "true" as undesirable.
        elif not isinstance(obj["label"], bool):
            raise DataError(f"{where}: field 'label': expected {LABEL_EXPECTED}, got {json.dumps(obj['label'])}")
        else:
            label, score = obj["label"], None
        if "completion" in obj and "response" in obj:
            raise DataError(f"{where}: fields 'completion' and 'response' both given; expected one")
        field = "response" if "response" in obj else "completion"
        if isinstance(obj.get(field), list) or isinstance(obj.get("prompt"), list):
            prompt = _prompt(obj.get("prompt"), where)
            completion = _reply(_messages(obj.get(field), field, where), prompt, field, where)
            return Example(render(prompt) + ASSISTANT, completion, label, where, score)
        return Example(_text(obj, "prompt", where), _text(obj, field, where), label, where, score)
    if ("score_chosen" in obj) != ("score_rejected" in obj):
        raise DataError(f"{where}: field '{'score_rejected' if 'score_chosen' in obj else 'score_chosen'}' is missing; "
                        f"expected both score_chosen and score_rejected ({SCORE_EXPECTED} each) or neither")
    scores = [_score(obj, f, where) for f in ("score_chosen", "score_rejected") if f in obj] or [None, None]
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
    pair.score_chosen, pair.score_rejected = scores
    return "chosen identical to rejected" if pair.chosen == pair.rejected else pair


def shape(unit: Example | Pair) -> str:
    """'unpaired' or 'paired', and 'scored' when it carries scores: every row of a file has the first row's."""
    scored = (unit.score if isinstance(unit, Example) else unit.score_chosen) is not None
    return ("scored " if scored else "") + ("unpaired" if isinstance(unit, Example) else "paired")


def _fields(pairs: list[tuple[str, object]], where: str) -> dict:
    """json.loads' object_pairs_hook: the object, refusing what json lets through silently: a field given
    twice (json keeps the last) and a lone surrogate escape such as "\\ud800" (the tokenizer would replace it)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DataError(f"{where}: field {key!r} given twice; expected each field once")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: field {key!r}: a lone surrogate {json.dumps(value[e.start])} at character "
                                f"{e.start}; expected valid Unicode text") from None
        obj[key] = value
    return obj


def read_jsonl(path: str, score_field: str = "score") -> tuple[list[Example] | list[Pair], collections.Counter]:
    """Read a .jsonl file, gzipped or not (shapes above). Returns the examples or pairs and the rows dropped,
    by reason. Blank lines are skipped; anything malformed raises DataError naming file, line and field."""
    units, dropped = [], collections.Counter()
    try:
        with open(path, "rb") as f:  # gzip is known by its magic bytes, whatever the file's name
            gzipped = f.read(2) == b"\x1f\x8b"
        f = gzip.open(path, "rb") if gzipped else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    try:
        with f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte order mark may start the file
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line, object_pairs_hook=functools.partial(_fields, where=where))
                except DataError:  # from _fields: already names the line and the field
                    raise
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, nesting too deep
                    raise DataError(f"{where}: malformed JSON ({e})") from None
                unit = parse_row(obj, where, score_field)
                if isinstance(unit, str):
                    dropped[unit] += 1
                    continue
                if units and shape(unit) != shape(units[0]):
                    first, this = shape(units[0]), shape(unit)
                    raise DataError(f"{where}: {'an' if this == 'unpaired' else 'a'} {this} row in a file whose first row "
                                    f"({units[0].where}) is {first}; expected every row {first}")
                units.append(unit)
    except (OSError, EOFError, zlib.error) as e:  # gzip: a truncated or corrupt file
        raise DataError(f"{path}: truncated or corrupt gzip file ({e})") from None
    if not units:
        reasons = "; ".join(f"{n} rows: {reason}" for reason, n in sorted(dropped.items()))
        raise DataError(f"{path}: no examples" + (f" (dropped {reasons})" if dropped else ""))
    return units, dropped


CACHE_VERSION = 3  # raise when the cache's layout or the parsing changes


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes: what a data file is, whatever its name."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    return digest.hexdigest()


def load_file(path: str, block_size: int, progress: bool = True, score_field: str = "score"
              ) -> tuple[list[Tokens] | list[PairTokens], list[str]]:
    """Read and tokenize a data file, through a cache of numpy arrays beside it (nanoGPT's habit) that
    a changed file, tokenizer or block_size invalidates. Returns the units and the report of what was dropped,
    cut and repeated."""
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe (--data=<(...)) could not be read twice
        raise DataError(f"{path}: not a regular file; expected a regular .jsonl or .jsonl.gz file")
    key = f"{file_sha256(path)} {data.VOCAB_SHA256} {data.GPT2_PATTERN} {block_size} {score_field} {CACHE_VERSION}"
    cache = os.path.join(os.path.dirname(os.path.abspath(path)), ".kto_cache",
                         f"{os.path.basename(path)}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
    report, units = [], None
    if os.path.exists(cache):
        try:
            units, dropped, cut = _read_cache(cache)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a cache written wrong is a miss
            report.append(f"{cache}: unreadable or inconsistent token cache; tokenized again")
    if units is None:
        rows, dropped = read_jsonl(path, score_field)
        units, too_long, cut = data.tokenize(rows, block_size, progress)
        if too_long:
            dropped[f"a completion longer than block_size={block_size} tokens with EOT"] = too_long
        if not units:
            raise DataError(f"{path}: no example fits block_size={block_size}")
        _write_cache(cache, units, dropped, cut)
    report += [f"{path}: dropped {n} rows: {reason}" for reason, n in sorted(dropped.items())]
    if cut:
        report.append(f"{path}: {cut} prompts cut from the left to fit block_size={block_size}")
    repeats, opposite = _repeats(units)
    if repeats:
        report.append(f"{path}: {repeats} rows repeat an earlier row's prompt and completion(s), {opposite} of them "
                      f"with the opposite label; kept")
    return units, report


def _repeats(units: list[Tokens] | list[PairTokens]) -> tuple[int, int]:
    """How many units repeat an earlier one's prompt and completion(s), and how many of those repeat one with
    the opposite label (a pair: chosen and rejected swapped)."""
    def key(u: Tokens | PairTokens) -> tuple:
        return tuple(tuple(x) if isinstance(x, list) else x for x in u)

    seen, repeats, opposite = set(), 0, 0
    for u in units:
        same, flipped = key(u), key(data.opposite(u, u.tag))
        repeats += same in seen or flipped in seen
        opposite += same not in seen and flipped in seen
        seen.add(same)
    return repeats, opposite


def _write_cache(path: str, units: list[Tokens] | list[PairTokens], dropped: collections.Counter, cut: int) -> None:
    """Sequences concatenated in one int32 array with their lengths; written to a temporary file, then
    renamed. A directory we cannot write to only costs the cache."""
    paired = isinstance(units[0], PairTokens)
    seqs = [s for u in units for s in (u[:3] if paired else u[:2])]
    arrays = {"tokens": np.fromiter((t for s in seqs for t in s), dtype=np.int32),
              "lengths": np.array([len(s) for s in seqs], dtype=np.int64),
              "desirable": np.array([False if paired else bool(u.desirable) for u in units]),
              "scores": np.array([[u.score_chosen, u.score_rejected] if paired else [u.score, None] for u in units],
                                 dtype=np.float64),  # NaN: none
              "paired": np.array(paired), "dropped": np.array(json.dumps(dropped)), "cut": np.array(cut)}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):  # a full disk leaves half a file
            os.remove(tmp)


def _read_cache(path: str) -> tuple[list[Tokens] | list[PairTokens], collections.Counter, int]:
    """The units, drops and cut prompts a cache holds; ValueError if its arrays disagree."""
    with np.load(path) as z:
        paired, tokens, lengths, desirable, scores = bool(z["paired"]), z["tokens"], z["lengths"], z["desirable"], z["scores"]
        dropped, cut = collections.Counter(json.loads(str(z["dropped"]))), int(z["cut"])
    width = 3 if paired else 2
    if not len(desirable) or len(lengths) != width * len(desirable) or lengths.sum() != len(tokens) or \
            scores.shape != (len(desirable), 2):
        raise ValueError(f"{path}: {len(lengths)} lengths summing to {lengths.sum()} for {len(desirable)} units "
                         f"of {width} sequences and {len(tokens)} tokens")
    seqs = [s.tolist() for s in np.split(tokens, np.cumsum(lengths)[:-1])]
    scores = [[None if math.isnan(s) else float(s) for s in row] for row in scores]
    if paired:
        units = [PairTokens(*seqs[i:i + 3], score_chosen=a, score_rejected=b) for i, (a, b) in zip(range(0, len(seqs), 3), scores)]
    else:
        units = [Tokens(seqs[i], seqs[i + 1], None if a is not None else bool(d), score=a)
                 for i, d, (a, _) in zip(range(0, len(seqs), 2), desirable, scores)]
    return units, dropped, cut


# ----------------------------------------------------------------------------- the run's data

class Data(NamedTuple):
    sft: list[data.Tokens]  # the SFT stage's: every completion as given, labels ignored
    main: data.Units  # the main loss's, after the data settings (pairs for DPO)
    control: list[data.Tokens]  # the control's: the main loss's completions
    eval: data.Units  # held-out prompts' examples (pairs for DPO), for the eval loss
    heldout: list[str] | None  # the built-in task's evaluation (test) prompts
    dev: list[str] | None  # the built-in task's dev prompts, for choosing settings
    report: list[str]  # what reading and the data settings did, for the start of the run


def load(cfg: TrainConfig, progress: bool = False) -> Data:
    """Read and tokenize the data, hold out eval prompts, apply the data settings in their config order, and
    check the result against the batch: every stage draws whole batches of distinct examples, and KTO's KL
    pairs need every prompt in at most half a batch."""
    if cfg.data in task.TASKS:
        units, heldout, dev = task.make_task(cfg.data, cfg.seed, cfg.task_p_correct, cfg.task_heldout, cfg.task_max_operand,
                                             cfg.task_demos, cfg.task_dev)
        n_prompts = len(task.task_prompts(cfg.data, cfg.task_max_operand)) - len(heldout) - len(dev)
        if not units or not heldout:
            raise DataError(f"built-in task: task_heldout={cfg.task_heldout} and task_max_operand={cfg.task_max_operand} "
                                 f"leave {len(units)} training examples and {len(heldout)} held-out prompts; "
                                 f"expected at least one of each")
        report = [f"built-in task: {n_prompts} training prompts, {len(heldout)} held out"
                  + (f", {len(dev)} dev" if dev else "")]
        if cfg.task_demos > 1:
            report.append(f"built-in task: {cfg.task_demos} answers per prompt; {len(units)} prompts got a desirable and an "
                          f"undesirable one (a pair each), {n_prompts - len(units)} got only one kind (no pair)")
        units, too_long, cut = data.tokenize(units, cfg.block_size)
        if too_long:
            report.append(f"built-in task: dropped {too_long} examples longer than block_size={cfg.block_size}")
        if cut:
            report.append(f"built-in task: {cut} prompts cut from the left to fit block_size={cfg.block_size}")
        if not units:
            raise DataError(f"built-in task: no example fits block_size={cfg.block_size}")
    else:
        (units, report), heldout, dev = load_file(cfg.data, cfg.block_size, progress, cfg.score_field), None, None
    source = "built-in task" if cfg.data in task.TASKS else cfg.data
    threshold, as_read = None, units
    if cfg.score_threshold is not None:
        if not data.is_scored(units):
            raise DataError(f"{source}: score_threshold={cfg.score_threshold} but the rows carry labels, not scores "
                            f"(field '{cfg.score_field}', or score_chosen and score_rejected); expected score_threshold=none")
        units, threshold, lines = data.rate(units, cfg.score_threshold, cfg.score_noise, cfg.seed, cfg.loss == "dpo")
        report += lines
        if not units:
            raise DataError(f"{source}: every pair's scores tie; DPO needs pairs ordered by score")
    elif cfg.data not in task.TASKS and data.is_scored(units):  # the built-in tasks keep their judge's labels
        raise DataError(f"{source}: the rows carry scores; expected score_threshold=NUMBER, median or mean to label them")
    paired = isinstance(units[0], data.PairTokens)
    report.append(f"data: {data.describe(units)}")
    units, held = data.split_by_prompt(units, cfg.eval_fraction, cfg.seed)
    if held:
        report.append(f"eval_fraction={cfg.eval_fraction}: {data.describe(held)} held out, by prompt")
    # The SFT stage imitates every completion as read, in the order read, whatever the scores make of them.
    sft = data.split_by_prompt(as_read, cfg.eval_fraction, cfg.seed)[0]
    sft = data.split_pairs(sft) if isinstance(sft[0], data.PairTokens) else sft

    def setting(name: str, new: data.Units) -> data.Units:
        report.append(f"{name}: {data.describe(new)}")
        return new

    if cfg.contradict:
        units = setting(f"contradict={cfg.contradict}", data.add_contradictions(units, cfg.contradict, cfg.seed))
    if cfg.label_noise:
        units = setting(f"label_noise={cfg.label_noise}", data.flip_labels(units, cfg.label_noise, cfg.seed))
    if cfg.loss == "dpo" and not paired:
        units, unused, identical = data.pair_up(units)
        held, held_unused, held_identical = data.pair_up(held)
        setting("DPO", units)
        report[-1] += f"; {unused} examples without a partner of the other label are not used"
        if identical:
            report[-1] += f"; {identical} pairs skipped: chosen identical to rejected"
        if held_unused or held_identical:
            report.append(f"eval, DPO: {held_unused} held-out examples without a partner of the other label and "
                          f"{held_identical} pairs whose chosen is identical to rejected are not used")
        if not units:
            raise DataError(f"{cfg.data}: no prompt has both a desirable and an undesirable example; DPO needs pairs")
    elif cfg.loss != "dpo" and paired:
        units, held = setting("pairs split", data.split_pairs(units)), data.split_pairs(held)
    if cfg.one_y_per_x:
        units = setting("one_y_per_x", data.one_per_prompt(units, cfg.seed))
    if cfg.desirable_fraction < 1:
        units = setting(f"desirable_fraction={cfg.desirable_fraction}",
                        data.keep_desirable(units, cfg.desirable_fraction, cfg.seed))
    if cfg.score_weight == "margin":
        units, held = data.margin_weights(units, threshold), held and data.margin_weights(held, threshold)
        report.append("score_weight=margin: " + ", ".join(
            f"{name} weights from {min(w):.3g} to {max(w):.3g} (mean 1)" for name, label in (("desirable", True), ("undesirable", False))
            if (w := [ex.weight for ex in units if ex.desirable == label])))
    control = data.split_pairs(units) if cfg.loss == "dpo" else units
    size = per_batch(cfg, cfg.loss)
    try:  # the checks see only tokens; the error names the data they came from
        for stage_units, n in ((sft, cfg.batch_size), (control, cfg.batch_size), (units, size)):
            data.batch_indices(len(stage_units), n, 0, cfg.seed)  # raises if fewer examples than a batch
        if held and len(held) < size:
            raise DataError(f"eval_fraction={cfg.eval_fraction} holds out {len(held)} examples (or pairs), fewer than "
                            f"one batch of {size}; expected a larger eval_fraction or a smaller batch_size")
        if cfg.loss == "kto":
            for checked in (units, held):
                if checked:
                    data.check_kl_pairs(checked, cfg.batch_size)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    if held:
        report.append(f"eval: {len(held) // size} batches of {size} every {cfg.eval_interval} iterations"
                      + (f" ({len(held) % size} left over)" if len(held) % size else ""))
    return Data(sft, units, control, held, heldout, dev, report)
