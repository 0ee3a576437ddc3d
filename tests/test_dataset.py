"""Data files in every published shape, well-formed and malformed, and the token cache."""
import gzip
import json
import os
import re

import numpy as np
import pytest

import data
import dataset
from config import TrainConfig


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_jsonl_reads_labels_as_booleans(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "Q: 1+1?", "completion": " 2", "label": True}),
        "",
        json.dumps({"prompt": "Q: 1+1?", "completion": " 3", "label": False, "id": 7}),
    ])
    examples, dropped = dataset.read_jsonl(path)
    assert [(e.completion, e.desirable) for e in examples] == [(" 2", True), (" 3", False)] and not dropped
    assert examples[1].where == f"{path}:3"


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "a", "completion": "b", "label": tru', "malformed JSON"),
    ('{"prompt": "a", "label": true}', "field 'completion' is missing"),
    ('{"completion": "b", "label": true}', "field 'prompt' is missing"),
    ('{"prompt": "a", "completion": "b"}', "field 'label' is missing"),
    ('{"prompt": "a", "completion": "b", "label": 1}', "field 'label': expected a JSON boolean"),
    ('{"prompt": "a", "completion": "b", "label": "true"}', "field 'label': expected a JSON boolean"),
    ('{"prompt": "a", "completion": "b", "label": null}', "field 'label': expected a JSON boolean"),
    ('{"prompt": "a", "completion": "", "label": true}', "field 'completion': expected a non-empty string"),
    ('{"prompt": 5, "completion": "b", "label": true}', "field 'prompt': expected a non-empty string"),
    ('{"prompt": "a", "completion": " \\n ", "label": true}', "field 'completion': expected a non-empty string"),
    ('{"prompt": "  ", "completion": "b", "label": true}', "field 'prompt': expected a non-empty string"),
    ('["a", "b", true]', "expected a JSON object"),
    pytest.param('{"prompt": "a", "completion": "b", "label": true, "n": ' + "1" * 5000 + "}",
                 "malformed JSON (Exceeds the limit", id="a 5000-digit integer"),
    pytest.param("[" * 100000 + "]" * 100000, "malformed JSON (maximum recursion depth", id="deep nesting"),
    ('{"prompt": "a", "completion": "b", "label": true, "label": false}', "field 'label' given twice"),
    ('{"prompt": [{"role": "user", "role": "system", "content": "q"}], "completion": "b", "label": true}',
     "field 'role' given twice"),
    ('{"prompt": "a", "completion": "b \\ud800", "label": true}', "field 'completion': a lone surrogate \"\\ud800\" at character 2"),
])
def test_read_jsonl_rejects_bad_lines_naming_file_line_and_field(tmp_path, line, expected):
    good = json.dumps({"prompt": "a", "completion": "b", "label": True})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(data.DataError) as err:
        dataset.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_read_jsonl_rejects_invalid_utf8_and_empty_files(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b", "label": true}\n\xff\xfe\n')
    with pytest.raises(data.DataError, match=r"bin.jsonl:2: not valid UTF-8"):
        dataset.read_jsonl(str(path))
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(data.DataError, match="no examples"):
        dataset.read_jsonl(empty)
    with pytest.raises(data.DataError, match=r"missing.jsonl: cannot open"):
        dataset.read_jsonl(str(tmp_path / "missing.jsonl"))


def test_a_byte_order_mark_is_read_past(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Q", "completion": " A", "label": True}).encode() + b"\n")
    assert dataset.read_jsonl(str(path))[0] == [data.Example("Q", " A", True, f"{path}:1")]


def test_a_pipe_or_a_directory_is_refused_in_one_line(tmp_path):
    """--data=<(cat f.jsonl) is a pipe, which cannot be read twice (hashed for the cache, then parsed)."""
    os.mkfifo(tmp_path / "pipe.jsonl")  # no writer: opening it would block, so it must be refused unopened
    for path in (tmp_path / "pipe.jsonl", tmp_path):
        with pytest.raises(data.DataError) as err:
            dataset.load_file(str(path), block_size=16, progress=False)
        assert str(err.value) == f"{path}: not a regular file; expected a regular .jsonl or .jsonl.gz file"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"


def test_every_published_shape_reads_as_the_documented_pair(tmp_path):
    """Plain pairs, HH-RLHF transcripts (several turns), TRL's conversational shapes with an explicit or an
    implicit prompt, and an UltraFeedback-binarized row, against the template written out by hand."""
    chat = [{"role": "system", "content": "Be brief."}, user("Name a fruit.")]
    chat_prompt = "\n\nSystem: Be brief.\n\nHuman: Name a fruit.\n\nAssistant:"
    rows = [
        {"prompt": "Q: x? A:", "chosen": " yes", "rejected": " no"},
        {"prompt": "Q: y? A:", "chosen": " yes", "rejected": " no", "label": True},  # a stray label: still a pair
        {"chosen": HH_PROMPT + " An apple.", "rejected": HH_PROMPT + " A chair."},
        {"prompt": chat, "chosen": [assistant("Apple.")], "rejected": [assistant("Chair.")]},
        {"chosen": chat + [assistant("Apple.")], "rejected": chat + [assistant("Chair.")]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(r) for r in rows])
    pairs, dropped = dataset.read_jsonl(path)
    assert not dropped
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Q: x? A:", " yes", " no"),
        ("Q: y? A:", " yes", " no"),
        (HH_PROMPT, " An apple.", " A chair."),
        (chat_prompt, " Apple.", " Chair."),
        (chat_prompt, " Apple.", " Chair."),
    ]
    ultrafeedback = {"prompt": "Name a fruit.", "prompt_id": "abc", "chosen": [user("Name a fruit."), assistant("Apple.")],
                     "rejected": [user("Name a fruit."), assistant("Chair.")], "messages": [], "score_chosen": 8.0,
                     "score_rejected": 2.0}
    scored = write_jsonl(tmp_path / "uf.jsonl", [json.dumps(ultrafeedback)])
    assert dataset.read_jsonl(scored)[0] == [data.Pair("\n\nHuman: Name a fruit.\n\nAssistant:", " Apple.", " Chair.",
                                                       f"{scored}:1", 8.0, 2.0)]
    unpaired = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"prompt": chat, "completion": [assistant("Apple.")], "label": True})])
    assert dataset.read_jsonl(unpaired)[0] == [data.Example(chat_prompt, " Apple.", True, f"{unpaired}:1")]


def test_gzip_reads_like_plain_and_a_truncated_gzip_is_one_error(tmp_path):
    lines = [json.dumps({"chosen": HH_PROMPT + f" Fruit {i}.", "rejected": HH_PROMPT + " A chair."}) for i in range(400)]
    plain = write_jsonl(tmp_path / "hh.jsonl", lines)
    packed = tmp_path / "packed"
    packed.write_bytes(gzip.compress(open(plain, "rb").read()))
    expected = [(p.prompt, p.chosen) for p in dataset.read_jsonl(plain)[0]]
    for name in ("hh.jsonl.gz", "HH.JSONL.GZ", "hh-packed.jsonl"):  # gzip is known by its content, not its name
        (tmp_path / name).write_bytes(packed.read_bytes())
        assert [(p.prompt, p.chosen) for p in dataset.read_jsonl(str(tmp_path / name))[0]] == expected
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed.read_bytes()[:len(packed.read_bytes()) // 2])
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(cut))}: truncated or corrupt gzip file"):
        dataset.read_jsonl(str(cut))


@pytest.mark.parametrize("row, expected", [
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "field 'prompt', message 0: expected a role of system, user, assistant"),
    ({"prompt": [{"role": "user"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "field 'prompt', message 0: expected a string 'content'"),
    ({"prompt": [user("q")], "chosen": [assistant("a"), user("more")], "rejected": [assistant("b")]},
     "field 'chosen': expected one non-empty assistant reply"),
    ({"prompt": [user("q")], "chosen": "a", "rejected": [assistant("b")]}, "field 'chosen': expected a non-empty list"),
    ({"prompt": "q", "chosen": " ", "rejected": " b"}, "field 'chosen': expected a non-empty string"),
    ({"prompt": [user("q")], "chosen": [assistant(" \t")], "rejected": [assistant("b")]},
     "field 'chosen': expected one non-empty assistant reply"),
    ({"prompt": "   ", "chosen": [assistant("a")], "rejected": [assistant("b")]}, "field 'prompt': expected a non-empty list"),
    ({"prompt": [user("q\udc00")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "field 'content': a lone surrogate"),
    ({"chosen": "no turns here", "rejected": "none here"}, "field 'chosen': expected an HH-RLHF transcript"),
    ({"chosen": [assistant("a")], "rejected": [assistant("b")]}, "share no prompt turns"),
    ({"text": "hello"}, "expected fields prompt, completion, label (unpaired) or chosen, rejected"),
    ({"prompt": "q", "completion": " a", "label": True}, "an unpaired row in a file whose first row"),
])
def test_malformed_rows_are_one_error_naming_file_line_and_field(tmp_path, row, expected):
    good = json.dumps({"prompt": "q", "chosen": " a", "rejected": " b"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, json.dumps(row)])
    with pytest.raises(data.DataError) as err:
        dataset.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_rows_dropped_for_a_reason_are_counted_and_reported(tmp_path):
    rows = [{"prompt": "q", "chosen": " same", "rejected": " same"},
            {"chosen": HH_PROMPT + " An apple.", "rejected": "\n\nHuman: Other.\n\nAssistant: A chair."},
            {"chosen": HH_PROMPT + " An apple.", "rejected": HH_PROMPT},
            {"prompt": "q", "chosen": " one two three four five six seven eight nine ten", "rejected": " no"},
            {"prompt": "q", "chosen": " yes", "rejected": " no"},
            # 8 prompt tokens and 2 for " yes" + EOT: one more than block_size + 1, so the prompt loses one
            {"prompt": "one two three four five six seven eight", "chosen": " yes", "rejected": " no"}]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    units, report = dataset.load_file(path, block_size=8, progress=False)
    enc = data.get_tokenizer()
    assert units == [data.PairTokens(enc.encode_ordinary("q"), [3763, data.EOT], [645, data.EOT]),
                     data.PairTokens(enc.encode_ordinary(rows[-1]["prompt"]), [3763, data.EOT], [645, data.EOT])]
    assert report == [f"{path}: dropped 1 rows: HH-RLHF transcripts that differ before their last reply",
                      f"{path}: dropped 1 rows: a completion longer than block_size=8 tokens with EOT",
                      f"{path}: dropped 1 rows: an empty last reply",
                      f"{path}: dropped 1 rows: chosen identical to rejected",
                      f"{path}: 1 prompts cut from the left to fit block_size=8"]
    assert dataset.load_file(path, block_size=8, progress=False) == (units, report)  # the same from the cache


def test_repeated_rows_are_kept_and_counted(tmp_path):
    rows = [("Q1", " A", True), ("Q1", " A", True),  # a repeat
            ("Q1", " A", False),  # a repeat with the opposite label
            ("Q2", " A", True), ("Q1", " B", False), ("Q1", " A", True)]  # two new rows, a repeat
    path = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"prompt": p, "completion": c, "label": l}) for p, c, l in rows])
    units, report = dataset.load_file(path, block_size=16, progress=False)
    assert len(units) == 6
    assert report == [f"{path}: 3 rows repeat an earlier row's prompt and completion(s), 1 of them with the opposite label; kept"]
    pairs = [("q", " a", " b"), ("q", " b", " a"), ("q", " a", " b"), ("r", " a", " b")]
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in pairs])
    units, report = dataset.load_file(path, block_size=16, progress=False)
    assert len(units) == 4
    assert report == [f"{path}: 2 rows repeat an earlier row's prompt and completion(s), 1 of them with the opposite label; kept"]


def test_the_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    lines = [json.dumps({"prompt": f"Q{i}", "completion": f" A{i}", "label": i % 2 == 0}) for i in range(50)]
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    first, _ = dataset.load_file(path, block_size=16, progress=False)
    assert len(os.listdir(tmp_path / ".kto_cache")) == 1
    reads = []
    real = dataset.read_jsonl
    monkeypatch.setattr(dataset, "read_jsonl", lambda p, field: reads.append(p) or real(p, field))
    assert dataset.load_file(path, block_size=16, progress=False)[0] == first and reads == []  # from the cache
    dataset.load_file(path, block_size=12, progress=False)  # another block_size
    assert len(reads) == 1
    write_jsonl(tmp_path / "c.jsonl", lines[:-1] + [json.dumps({"prompt": "Q", "completion": " changed", "label": True})])
    changed, _ = dataset.load_file(path, block_size=16, progress=False)  # another content
    assert len(reads) == 2 and changed[-1].completion != first[-1].completion
    monkeypatch.setattr(data, "GPT2_PATTERN", data.GPT2_PATTERN + "|x")  # another tokenizer
    dataset.load_file(path, block_size=16, progress=False)
    assert len(reads) == 3
    monkeypatch.setattr(dataset, "CACHE_VERSION", dataset.CACHE_VERSION + 1)  # another parser or cache layout
    dataset.load_file(path, block_size=16, progress=False)
    assert len(reads) == 4


def corrupt(cache, kind: str) -> None:
    if kind == "garbage":
        cache.write_bytes(b"not a numpy archive\n" * 10)
    elif kind == "empty":
        cache.write_bytes(b"")
    elif kind == "truncated":
        cache.write_bytes(cache.read_bytes()[:len(cache.read_bytes()) // 2])
    else:  # arrays that load but disagree
        with np.load(cache) as z:
            arrays = dict(z)
        lengths = arrays["lengths"]
        if kind == "lengths count":  # the last two sequences as one: the same total, one length short
            arrays["lengths"] = np.append(lengths[:-2], lengths[-2] + lengths[-1])
        else:  # lengths that do not add up to the tokens
            arrays["lengths"] = lengths + 1
        np.savez(cache, **arrays)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "lengths count", "lengths sum"])
def test_a_broken_cache_is_a_miss_and_is_rewritten(tmp_path, monkeypatch, kind):
    rows = [(f"Q{i}", f" A{i}", i % 2 == 0) for i in range(6)]
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"prompt": p, "completion": c, "label": l}) for p, c, l in rows])
    enc = data.get_tokenizer()
    expected = [data.Tokens(enc.encode_ordinary(p), enc.encode_ordinary(c) + [data.EOT], l) for p, c, l in rows]
    dataset.load_file(path, block_size=16, progress=False)
    [cache] = (tmp_path / ".kto_cache").iterdir()
    corrupt(cache, kind)
    assert dataset.load_file(path, block_size=16, progress=False) == (
        expected, [f"{cache}: unreadable or inconsistent token cache; tokenized again"])
    monkeypatch.setattr(dataset, "read_jsonl", lambda p, field: pytest.fail("read again: the cache was not rewritten"))
    assert dataset.load_file(path, block_size=16, progress=False) == (expected, [])
    assert os.listdir(tmp_path / ".kto_cache") == [cache.name]


def test_a_failed_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"prompt": f"Q{i}", "completion": " A", "label": True}) for i in range(4)])

    def disk_full(f, **arrays):
        f.write(b"half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    units, _ = dataset.load_file(path, block_size=16, progress=False)
    assert len(units) == 4 and os.listdir(tmp_path / ".kto_cache") == []


def test_batch_checks_name_the_data_file_and_the_prompt(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", [json.dumps({"prompt": f"Q{i}", "completion": " A", "label": True})
                                                 for i in range(3)])
    with pytest.raises(data.DataError) as err:
        dataset.load(TrainConfig(data=path, batch_size=4, block_size=16))
    assert str(err.value).startswith(f"{path}: 3 training examples (or pairs), fewer than a batch of 4;")
    rows = [("Q: same? A:", f" A{i}") for i in range(3)] + [(f"Q{i}", " A") for i in range(3)]
    path = write_jsonl(tmp_path / "same.jsonl", [json.dumps({"prompt": p, "completion": c, "label": True}) for p, c in rows])
    with pytest.raises(data.DataError) as err:
        dataset.load(TrainConfig(data=path, batch_size=4, block_size=16))
    assert str(err.value).startswith(f'{path}: one prompt has 3 examples ("Q: same? A:"), and a KTO batch of 4')


def test_dpo_on_unpaired_data_skips_and_counts_pairs_of_one_completion(tmp_path):
    rows = [("Q1", " A", True), ("Q1", " A", False), ("Q2", " B", True), ("Q2", " C", False), ("Q3", " D", True),
            ("Q3", " E", False)]
    path = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"prompt": p, "completion": c, "label": l}) for p, c, l in rows])
    d = dataset.load(TrainConfig(data=path, batch_size=4, block_size=16, loss="dpo"))
    enc = data.get_tokenizer()
    assert [(enc.decode(p.prompt), enc.decode(p.chosen[:-1]), enc.decode(p.rejected[:-1])) for p in d.main] == [
        ("Q2", " B", " C"), ("Q3", " D", " E")]
    assert ("DPO: 2 pairs; 0 examples without a partner of the other label are not used; "
            "1 pairs skipped: chosen identical to rejected") in d.report
