"""The run's data set: a data file in the shapes preference data is published in, or the built-in task,
tokenized (through a cache), split for evaluation and shaped by the paper's data settings.
"""
import collections
import functools
import gzip
import hashlib
import json
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
#   paired          {"prompt": str, "chosen": str, "rejected": str}
#   HH-RLHF         {"chosen": str, "rejected": str}: whole transcripts "\n\nHuman: ...\n\nAssistant: ..."; the
#                   prompt is the shared transcript up to and including the last "\n\nAssistant:"
#   conversational  the fields above as lists of {"role", "content"} messages (TRL's shapes); chosen and
#                   rejected may repeat the prompt's turns (UltraFeedback-binarized) or, without a prompt,
#                   share them (the prompt is their common start)
# Messages are rendered as HH-RLHF writes them, "\n\nHuman: ..." (system: "System", user: "Human",
# assistant: "Assistant"); the prompt ends with "\n\nAssistant:" and the completion is " " + the reply.
# The first row decides between examples (unpaired) and pairs; every row must then give the same. A row with
# chosen and rejected and no completion is paired, whatever else it holds (a "label" among its other fields).

LABEL_EXPECTED = "a JSON boolean (true = desirable, false = undesirable)"
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


def parse_row(obj, where: str) -> Example | Pair | str:
    """One row as an Example or a Pair, or the reason it is dropped (a str); DataError if malformed."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "completion" in obj or ("label" in obj and not ("chosen" in obj and "rejected" in obj)):
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


def read_jsonl(path: str) -> tuple[list[Example] | list[Pair], collections.Counter]:
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
        reasons = "; ".join(f"{n} rows: {reason}" for reason, n in sorted(dropped.items()))
        raise DataError(f"{path}: no examples" + (f" (dropped {reasons})" if dropped else ""))
    return units, dropped


CACHE_VERSION = 2  # raise when the cache's layout or the parsing changes


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


def load_file(path: str, block_size: int, progress: bool = True) -> tuple[list[Tokens] | list[PairTokens], list[str]]:
    """Read and tokenize a data file, through a cache of numpy arrays beside it (nanoGPT's habit) that
    a changed file, tokenizer or block_size invalidates. Returns the units and the report of what was dropped,
    cut and repeated."""
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe (--data=<(...)) could not be read twice
        raise DataError(f"{path}: not a regular file; expected a regular .jsonl or .jsonl.gz file")
    key = f"{file_sha256(path)} {data.VOCAB_SHA256} {data.GPT2_PATTERN} {block_size} {CACHE_VERSION}"
    cache = os.path.join(os.path.dirname(os.path.abspath(path)), ".kto_cache",
                         f"{os.path.basename(path)}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
    report, units = [], None
    if os.path.exists(cache):
        try:
            units, dropped, cut = _read_cache(cache)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a cache written wrong is a miss
            report.append(f"{cache}: unreadable or inconsistent token cache; tokenized again")
    if units is None:
        rows, dropped = read_jsonl(path)
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
              "desirable": np.array([False if paired else u.desirable for u in units]),
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
        paired, tokens, lengths, desirable = bool(z["paired"]), z["tokens"], z["lengths"], z["desirable"]
        dropped, cut = collections.Counter(json.loads(str(z["dropped"]))), int(z["cut"])
    width = 3 if paired else 2
    if not len(desirable) or len(lengths) != width * len(desirable) or lengths.sum() != len(tokens):
        raise ValueError(f"{path}: {len(lengths)} lengths summing to {lengths.sum()} for {len(desirable)} units "
                         f"of {width} sequences and {len(tokens)} tokens")
    seqs = [s.tolist() for s in np.split(tokens, np.cumsum(lengths)[:-1])]
    if paired:
        units = [PairTokens(*seqs[i:i + 3]) for i in range(0, len(seqs), 3)]
    else:
        units = [Tokens(seqs[i], seqs[i + 1], bool(d)) for i, d in zip(range(0, len(seqs), 2), desirable)]
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
        (units, report), heldout, dev = load_file(cfg.data, cfg.block_size, progress), None, None
    paired = isinstance(units[0], data.PairTokens)
    report.append(f"data: {data.describe(units)}")
    units, held = data.split_by_prompt(units, cfg.eval_fraction, cfg.seed)
    if held:
        report.append(f"eval_fraction={cfg.eval_fraction}: {data.describe(held)} held out, by prompt")
    sft = data.split_pairs(units) if paired else units

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
        raise DataError(f"{'built-in task' if cfg.data in task.TASKS else cfg.data}: {e}") from None
    if held:
        report.append(f"eval: {len(held) // size} batches of {size} every {cfg.eval_interval} iterations"
                      + (f" ({len(held) % size} left over)" if len(held) % size else ""))
    return Data(sft, units, control, held, heldout, dev, report)
