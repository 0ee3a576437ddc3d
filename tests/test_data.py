"""Tokenizer, JSONL reading, the built-in task and batching."""
import gzip
import json
import os
import re
import socket
from collections import Counter

import pytest
import torch

import data


def test_tokenizer_works_offline(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: nothing downloaded before helps
    data.get_tokenizer.cache_clear()
    enc = data.get_tokenizer()
    # Token ids published with GPT-2: "Hello world" -> 15496, 995; <|endoftext|> is 50256.
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and data.EOT == enc.eot_token == 50256
    assert enc.decode(enc.encode_ordinary("KTO: déjà vu 123")) == "KTO: déjà vu 123"


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_jsonl_reads_labels_as_booleans(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "Q: 1+1?", "completion": " 2", "label": True}),
        "",
        json.dumps({"prompt": "Q: 1+1?", "completion": " 3", "label": False, "id": 7}),
    ])
    examples, dropped = data.read_jsonl(path)
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
        data.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert expected in str(err.value)


def test_read_jsonl_rejects_invalid_utf8_and_empty_files(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b", "label": true}\n\xff\xfe\n')
    with pytest.raises(data.DataError, match=r"bin.jsonl:2: not valid UTF-8"):
        data.read_jsonl(str(path))
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(data.DataError, match="no examples"):
        data.read_jsonl(empty)
    with pytest.raises(data.DataError, match=r"missing.jsonl: cannot open"):
        data.read_jsonl(str(tmp_path / "missing.jsonl"))


def test_a_completion_that_cannot_fit_is_dropped_and_counted():
    ex = data.Example("prompt", " one two three four five", True, "f.jsonl:4")  # 5 tokens and EOT
    pair = data.Pair("prompt", " one", " one two three four five", "f.jsonl:5")
    assert data.tokenize([ex, ex], block_size=5) == ([], 2)
    assert data.tokenize([pair], block_size=5) == ([], 1)  # one completion too long drops the pair
    units, dropped = data.tokenize([ex], block_size=6)
    assert len(units[0].completion) == 6 and dropped == 0


def test_judge_and_task():
    prompt = "Q: Ann had 3 apples, got 5 more. Total? A:"
    assert data.judge(prompt, " 8") == 1.0 and data.judge(prompt, "8 ") == 1.0
    assert data.judge(prompt, " 9") == 0.0 and data.judge(prompt, " 8 apples") == 0.0
    with pytest.raises(ValueError):
        data.judge("What is 3+5?", " 8")

    examples, heldout = data.arithmetic_task(seed=3, p_correct=0.3, heldout_fraction=0.2, max_operand=9)
    again, _ = data.arithmetic_task(seed=3, p_correct=0.3, heldout_fraction=0.2, max_operand=9)
    assert examples == again
    train_prompts = {e.prompt for e in examples}
    assert len(heldout) == 1600 and len(train_prompts) == len(examples) == 6400
    assert not train_prompts & set(heldout)
    for e in examples:  # labels checked against the sum computed here, not by the judge
        words = e.prompt.split()
        total = int(words[3]) + int(words[6])
        assert e.desirable == (int(e.completion) == total)
        assert abs(int(e.completion) - total) <= 2
    assert 0.27 < sum(e.desirable for e in examples) / len(examples) < 0.33


def test_collate_masks_completion_and_eot_and_truncates_prompt_left():
    prompt, completion = [1, 2, 3, 4, 5], [6, 7, data.EOT]
    idx, targets, scored = data.collate([(prompt, completion), ([9], [8, data.EOT])], block_size=16)
    assert idx[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert targets[0][scored[0]].tolist() == [6, 7, data.EOT]
    assert targets[1][scored[1]].tolist() == [8, data.EOT] and scored[1].sum() == 2
    assert idx[1, :2].tolist() == [9, 8]
    # block_size 5: prompt + completion = 8 tokens, 6 may enter (5 inputs + 1 target): keep prompt [3, 4, 5]
    idx, targets, scored = data.collate([(prompt, completion)], block_size=5)
    assert idx[0].tolist() == [3, 4, 5, 6, 7] and targets[0][scored[0]].tolist() == [6, 7, data.EOT]


@pytest.mark.parametrize("size", [2, 3, 7, 8])
def test_kl_pairs_are_mismatched_and_use_exactly_the_batch_completions(size):
    examples = [data.Tokens([100 + i], [200 + i, data.EOT], i % 3 == 0) for i in range(size)]
    pairs = data.kl_pairs(examples)
    for i, (prompt, completion) in enumerate(pairs):
        assert prompt == examples[i].prompt
        assert completion != examples[i].completion
    assert Counter(tuple(c) for _, c in pairs) == Counter(tuple(e.completion) for e in examples)


def test_kl_pairs_refuse_a_batch_of_one():
    with pytest.raises(data.DataError, match="at most half the batch"):
        data.kl_pairs([data.Tokens([1], [2, data.EOT], True)])


def test_batches_are_seeded_epochs_and_shards_split_the_global_batch():
    n, bs = 12, 4
    stream = [i for b in range(6) for i in data.batch_indices(n, bs, b, seed=0)]  # two epochs exactly
    assert sorted(stream[:12]) == list(range(12)) and sorted(stream[12:]) == list(range(12))
    assert stream[:12] != stream[12:]  # reshuffled each epoch
    assert data.batch_indices(n, bs, 4, seed=0) == stream[16:20]
    examples = [data.Tokens([i, i], [50 + i, data.EOT], i % 2 == 0) for i in range(4)]
    batch = data.make_batch(examples, block_size=8, with_kl=True)
    halves = [data.shard(batch, r, 2) for r in range(2)]
    for key, value in batch.items():
        assert torch.equal(torch.cat([h[key] for h in halves]), value)
    # rank 1's KL rows pair its prompts with completions drawn from the global batch (example 0 for row 3)
    assert halves[1]["kl_targets"][1][halves[1]["kl_scored"][1]].tolist() == [50, data.EOT]


@pytest.mark.parametrize("n, bs", [(10, 4), (5, 4), (7, 7), (30, 8)])
def test_no_batch_repeats_an_example_and_no_kl_pair_is_matched(n, bs):
    """Across epoch boundaries too: an epoch that does not divide into batches leaves different examples over."""
    examples = [data.Tokens([100 + i], [200 + i, data.EOT], i % 2 == 0) for i in range(n)]
    seen = set()
    for b in range(200):
        indices = data.batch_indices(n, bs, b, seed=3)
        assert len(set(indices)) == bs
        seen.update(indices)
        batch = [examples[i] for i in indices]
        for ex, (prompt, completion) in zip(batch, data.kl_pairs(batch)):
            assert prompt == ex.prompt and completion != ex.completion
    assert seen == set(range(n))  # nothing is left out for good


def test_fewer_examples_than_a_batch_is_an_error():
    with pytest.raises(data.DataError, match="3 training examples .*fewer than a batch of 4"):
        data.batch_indices(3, 4, 0, seed=0)


def test_kl_pairs_never_pair_a_prompt_with_its_own_completions():
    """Split preference pairs and contradicting twins put one prompt in several rows: the KL completion of
    every row still comes from another prompt, and the KL completions are the batch's completions."""
    rows = [([1], [10]), ([2], [20]), ([1], [11]), ([3], [30]), ([1], [12]), ([2], [21]), ([4], [40]), ([5], [50])]
    examples = [data.Tokens(p, c + [data.EOT], i % 2 == 0) for i, (p, c) in enumerate(rows)]
    pairs = data.kl_pairs(examples)
    written_for = {tuple(ex.completion): tuple(ex.prompt) for ex in examples}
    for ex, (prompt, completion) in zip(examples, pairs):
        assert prompt == ex.prompt and written_for[tuple(completion)] != tuple(prompt)
    assert Counter(tuple(c) for _, c in pairs) == Counter(tuple(e.completion) for e in examples)
    with pytest.raises(data.DataError, match="holds 5 examples of one prompt"):
        data.kl_pairs(examples[:4] + [examples[0]] * 3)
    data.check_kl_pairs(examples, batch_size=6)  # at most 3 of one prompt: fine
    with pytest.raises(data.DataError, match="expected batch_size of at least 6"):
        data.check_kl_pairs(examples, batch_size=4)


def tokens(desirable: list[bool]) -> list[data.Tokens]:
    return [data.Tokens([i % 7], [100 + i, data.EOT], d) for i, d in enumerate(desirable)]


def test_label_noise_flips_exactly_the_fraction_seeded_and_tags_them():
    examples = tokens([i % 3 == 0 for i in range(200)])
    noisy = data.flip_labels(examples, 0.15, seed=5)
    flipped = [i for i, (a, b) in enumerate(zip(examples, noisy)) if a.desirable != b.desirable]
    assert len(flipped) == 30
    assert [i for i, ex in enumerate(noisy) if ex.tag == "flipped"] == flipped
    assert all(a.completion == b.completion and a.prompt == b.prompt for a, b in zip(examples, noisy))
    assert data.flip_labels(examples, 0.15, seed=5) == noisy and data.flip_labels(examples, 0.15, seed=6) != noisy
    pairs = [data.PairTokens([i], [10 + i], [20 + i]) for i in range(10)]
    swapped = data.flip_labels(pairs, 0.3, seed=0)
    moved = [(p, s) for p, s in zip(pairs, swapped) if p != s]
    assert len(moved) == 3 and all(s.chosen == p.rejected and s.rejected == p.chosen and s.tag == "flipped"
                                   for p, s in moved)


def test_desirable_fraction_keeps_that_share_of_desirable_and_every_undesirable():
    examples = tokens([i % 2 == 0 for i in range(100)])
    kept = data.keep_desirable(examples, 0.1, seed=1)
    assert sum(ex.desirable for ex in kept) == 5 and sum(not ex.desirable for ex in kept) == 50
    assert all(ex in examples for ex in kept) and len({ex.completion[0] for ex in kept}) == len(kept)
    assert data.keep_desirable(examples, 0.1, seed=1) == kept and data.keep_desirable(examples, 0.1, seed=2) != kept


def test_one_y_per_x_keeps_one_example_of_each_prompt():
    examples = tokens([i % 2 == 0 for i in range(50)])  # 7 prompts, 7 or 8 examples each
    kept = data.one_per_prompt(examples, seed=0)
    assert sorted(ex.prompt[0] for ex in kept) == list(range(7))
    assert all(ex in examples for ex in kept)
    assert data.one_per_prompt(examples, seed=0) == kept and data.one_per_prompt(examples, seed=1) != kept


def test_contradict_gives_twins_with_the_opposite_label_and_split_keeps_them():
    pairs = [data.PairTokens([i], [10 + i, data.EOT], [20 + i, data.EOT]) for i in range(20)]
    out = data.add_contradictions(pairs, 0.25, seed=0)
    assert len(out) == 25 and sum(p.tag == "contradicted" for p in out) == 10
    examples = data.split_pairs(out)
    by_xy = {}
    for ex in examples:
        by_xy.setdefault((tuple(ex.prompt), tuple(ex.completion)), []).append(ex)
    contradicted = [v for v in by_xy.values() if len(v) == 2]
    assert len(contradicted) == 10 and all({e.desirable for e in v} == {True, False} for v in contradicted)
    assert all(e.tag == "contradicted" for v in contradicted for e in v)
    assert sum(ex.desirable for ex in examples) == 25


def test_pairs_split_and_pair_up():
    pairs = [data.PairTokens([1], [2, data.EOT], [3, data.EOT]), data.PairTokens([4], [5, data.EOT], [6, data.EOT], "flipped")]
    examples = data.split_pairs(pairs)
    assert examples == [data.Tokens([1], [2, data.EOT], True), data.Tokens([1], [3, data.EOT], False),
                        data.Tokens([4], [5, data.EOT], True, "flipped"), data.Tokens([4], [6, data.EOT], False, "flipped")]
    again, unused = data.pair_up(examples + [data.Tokens([7], [8, data.EOT], True)])
    assert again == pairs and unused == 1
    batch = data.make_batch(pairs, block_size=8, with_kl=False)
    assert batch["targets"][batch["scored"]].tolist() == [2, data.EOT, 3, data.EOT, 5, data.EOT, 6, data.EOT]
    assert batch["tag"].tolist() == [0, 0, 1, 1]


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
    pairs, dropped = data.read_jsonl(path)
    assert not dropped
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Q: x? A:", " yes", " no"),
        (HH_PROMPT, " An apple.", " A chair."),
        (chat_prompt, " Apple.", " Chair."),
        (chat_prompt, " Apple.", " Chair."),
        ("\n\nHuman: Name a fruit.\n\nAssistant:", " Apple.", " Chair."),
    ]
    unpaired = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"prompt": chat, "completion": [assistant("Apple.")], "label": True})])
    assert data.read_jsonl(unpaired)[0] == [data.Example(chat_prompt, " Apple.", True, f"{unpaired}:1")]


def test_gzip_reads_like_plain_and_a_truncated_gzip_is_one_error(tmp_path):
    lines = [json.dumps({"chosen": HH_PROMPT + f" Fruit {i}.", "rejected": HH_PROMPT + " A chair."}) for i in range(400)]
    plain = write_jsonl(tmp_path / "hh.jsonl", lines)
    packed = tmp_path / "hh.jsonl.gz"
    packed.write_bytes(gzip.compress(open(plain, "rb").read()))
    assert [(p.prompt, p.chosen) for p in data.read_jsonl(str(packed))[0]] == [(p.prompt, p.chosen) for p in data.read_jsonl(plain)[0]]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed.read_bytes()[:len(packed.read_bytes()) // 2])
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(cut))}: truncated or corrupt gzip file"):
        data.read_jsonl(str(cut))


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
        data.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_rows_dropped_for_a_reason_are_counted_and_reported(tmp_path):
    rows = [{"prompt": "q", "chosen": " same", "rejected": " same"},
            {"chosen": HH_PROMPT + " An apple.", "rejected": "\n\nHuman: Other.\n\nAssistant: A chair."},
            {"chosen": HH_PROMPT + " An apple.", "rejected": HH_PROMPT},
            {"prompt": "q", "chosen": " one two three four five six seven eight nine ten", "rejected": " no"},
            {"prompt": "q", "chosen": " yes", "rejected": " no"}]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    units, report = data.load_file(path, block_size=8, progress=False)
    assert units == [data.PairTokens(data.get_tokenizer().encode_ordinary("q"), [3763, data.EOT], [645, data.EOT])]
    assert report == [f"{path}: dropped 1 rows: HH-RLHF transcripts that differ before their last reply",
                      f"{path}: dropped 1 rows: a completion longer than block_size=8 tokens with EOT",
                      f"{path}: dropped 1 rows: an empty last reply",
                      f"{path}: dropped 1 rows: chosen identical to rejected"]


def test_the_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    lines = [json.dumps({"prompt": f"Q{i}", "completion": f" A{i}", "label": i % 2 == 0}) for i in range(50)]
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    first, _ = data.load_file(path, block_size=16, progress=False)
    assert len(os.listdir(tmp_path / ".kto_cache")) == 1
    reads = []
    real = data.read_jsonl
    monkeypatch.setattr(data, "read_jsonl", lambda p: reads.append(p) or real(p))
    assert data.load_file(path, block_size=16, progress=False)[0] == first and reads == []  # from the cache
    data.load_file(path, block_size=12, progress=False)  # another block_size
    assert len(reads) == 1
    write_jsonl(tmp_path / "c.jsonl", lines[:-1] + [json.dumps({"prompt": "Q", "completion": " changed", "label": True})])
    changed, _ = data.load_file(path, block_size=16, progress=False)  # another content
    assert len(reads) == 2 and changed[-1].completion != first[-1].completion
    monkeypatch.setattr(data, "GPT2_PATTERN", data.GPT2_PATTERN + "|x")  # another tokenizer
    data.load_file(path, block_size=16, progress=False)
    assert len(reads) == 3


def test_task_with_several_answers_gives_correct_and_wrong_pairs():
    pairs, heldout = data.arithmetic_task(seed=3, demos=4)
    assert 0.75 * 1800 < len(pairs) < 0.95 * 1800  # 1 - 0.4^4 - 0.6^4 = 0.845 of the prompts have both kinds
    for p in pairs:
        words = p.prompt.split()
        total = int(words[3]) + int(words[6])
        assert int(p.chosen) == total and int(p.rejected) != total
    assert len({p.prompt for p in pairs}) == len(pairs) and not {p.prompt for p in pairs} & set(heldout)
