"""Tokenizer, JSONL reading, the built-in task and batching."""
import json
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
    examples = data.read_jsonl(path)
    assert [(e.completion, e.desirable) for e in examples] == [(" 2", True), (" 3", False)]
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


def test_completion_that_cannot_fit_is_an_error():
    ex = data.Example("prompt", " one two three four five", True, "f.jsonl:4")
    with pytest.raises(data.DataError, match=r"f.jsonl:4: field 'completion': 6 tokens"):
        data.tokenize([ex], block_size=5)
    assert len(data.tokenize([ex], block_size=6)[0].completion) == 6


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
    with pytest.raises(data.DataError, match="at least 2"):
        data.kl_pairs([data.Tokens([1], [2, data.EOT], True)])


def test_batches_are_seeded_epochs_and_shards_split_the_global_batch():
    n, bs = 10, 4
    stream = [i for b in range(5) for i in data.batch_indices(n, bs, b, seed=0)]  # two epochs exactly
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # reshuffled each epoch
    assert data.batch_indices(n, bs, 3, seed=0) == stream[12:16]
    examples = [data.Tokens([i, i], [50 + i, data.EOT], i % 2 == 0) for i in range(4)]
    batch = data.make_batch(examples, block_size=8, with_kl=True)
    halves = [data.shard(batch, r, 2) for r in range(2)]
    for key, value in batch.items():
        assert torch.equal(torch.cat([h[key] for h in halves]), value)
    # rank 1's KL rows pair its prompts with completions drawn from the global batch (example 0 for row 3)
    assert halves[1]["kl_targets"][1][halves[1]["kl_scored"][1]].tolist() == [50, data.EOT]
