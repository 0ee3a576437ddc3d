"""Data files in every published shape, well-formed and malformed, and the token cache."""
import gzip
import json
import os
import re

import pytest

import data
import dataset


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
    ('["a", "b", true]', "expected a JSON object"),
])
def test_read_jsonl_rejects_bad_lines_naming_file_line_and_field(tmp_path, line, expected):
    good = json.dumps({"prompt": "a", "completion": "b", "label": True})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(data.DataError) as err:
        dataset.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert expected in str(err.value)


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
        {"chosen": HH_PROMPT + " An apple.", "rejected": HH_PROMPT + " A chair."},
        {"prompt": chat, "chosen": [assistant("Apple.")], "rejected": [assistant("Chair.")]},
        {"chosen": chat + [assistant("Apple.")], "rejected": chat + [assistant("Chair.")]},
        {"prompt": "Name a fruit.", "prompt_id": "abc", "chosen": [user("Name a fruit."), assistant("Apple.")],
         "rejected": [user("Name a fruit."), assistant("Chair.")], "messages": [], "score_chosen": 8.0, "score_rejected": 2.0},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(r) for r in rows])
    pairs, dropped = dataset.read_jsonl(path)
    assert not dropped
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Q: x? A:", " yes", " no"),
        (HH_PROMPT, " An apple.", " A chair."),
        (chat_prompt, " Apple.", " Chair."),
        (chat_prompt, " Apple.", " Chair."),
        ("\n\nHuman: Name a fruit.\n\nAssistant:", " Apple.", " Chair."),
    ]
    unpaired = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"prompt": chat, "completion": [assistant("Apple.")], "label": True})])
    assert dataset.read_jsonl(unpaired)[0] == [data.Example(chat_prompt, " Apple.", True, f"{unpaired}:1")]


def test_gzip_reads_like_plain_and_a_truncated_gzip_is_one_error(tmp_path):
    lines = [json.dumps({"chosen": HH_PROMPT + f" Fruit {i}.", "rejected": HH_PROMPT + " A chair."}) for i in range(400)]
    plain = write_jsonl(tmp_path / "hh.jsonl", lines)
    packed = tmp_path / "hh.jsonl.gz"
    packed.write_bytes(gzip.compress(open(plain, "rb").read()))
    assert [(p.prompt, p.chosen) for p in dataset.read_jsonl(str(packed))[0]] == [(p.prompt, p.chosen) for p in dataset.read_jsonl(plain)[0]]
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
            {"prompt": "q", "chosen": " yes", "rejected": " no"}]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    units, report = dataset.load_file(path, block_size=8, progress=False)
    assert units == [data.PairTokens(data.get_tokenizer().encode_ordinary("q"), [3763, data.EOT], [645, data.EOT])]
    assert report == [f"{path}: dropped 1 rows: HH-RLHF transcripts that differ before their last reply",
                      f"{path}: dropped 1 rows: a completion longer than block_size=8 tokens with EOT",
                      f"{path}: dropped 1 rows: an empty last reply",
                      f"{path}: dropped 1 rows: chosen identical to rejected"]


def test_the_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    lines = [json.dumps({"prompt": f"Q{i}", "completion": f" A{i}", "label": i % 2 == 0}) for i in range(50)]
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    first, _ = dataset.load_file(path, block_size=16, progress=False)
    assert len(os.listdir(tmp_path / ".kto_cache")) == 1
    reads = []
    real = dataset.read_jsonl
    monkeypatch.setattr(dataset, "read_jsonl", lambda p: reads.append(p) or real(p))
    assert dataset.load_file(path, block_size=16, progress=False)[0] == first and reads == []  # from the cache
    dataset.load_file(path, block_size=12, progress=False)  # another block_size
    assert len(reads) == 1
    write_jsonl(tmp_path / "c.jsonl", lines[:-1] + [json.dumps({"prompt": "Q", "completion": " changed", "label": True})])
    changed, _ = dataset.load_file(path, block_size=16, progress=False)  # another content
    assert len(reads) == 2 and changed[-1].completion != first[-1].completion
    monkeypatch.setattr(data, "GPT2_PATTERN", data.GPT2_PATTERN + "|x")  # another tokenizer
    dataset.load_file(path, block_size=16, progress=False)
    assert len(reads) == 3
