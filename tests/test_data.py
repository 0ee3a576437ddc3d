"""The tokenizer, the paper's data settings, batches and the in-batch KL pairs."""
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


def test_a_completion_that_cannot_fit_is_dropped_and_counted():
    ex = data.Example("prompt", " one two three four five", True, "f.jsonl:4")  # 5 tokens and EOT
    pair = data.Pair("prompt", " one", " one two three four five", "f.jsonl:5")
    assert data.tokenize([ex, ex], block_size=5) == ([], 2, 0)
    assert data.tokenize([pair], block_size=5) == ([], 1, 0)  # one completion too long drops the pair
    units, dropped, cut = data.tokenize([ex], block_size=6)
    assert len(units[0].completion) == 6 and dropped == 0 and cut == 1  # "prompt" is 2 tokens: 8 > 6 + 1


def test_prompts_cut_from_the_left_are_counted():
    """A unit counts as cut exactly when collate drops prompt tokens: prompt + longest completion (with EOT)
    over block_size + 1 tokens."""
    enc = data.get_tokenizer()
    prompt, short, long = "one two three four", " yes", " five six seven"
    n = len(enc.encode_ordinary(prompt)) + len(enc.encode_ordinary(long)) + 1  # with EOT
    fits = n - 1  # the block_size at which all n tokens enter (inputs and the last target)
    pair = data.Pair(prompt, short, long, "f.jsonl:1")
    ex = data.Example(prompt, short, True, "f.jsonl:2")
    for block_size, expected in ((fits, 0), (fits - 1, 1)):
        units, dropped, cut = data.tokenize([pair], block_size)
        assert (dropped, cut) == (0, expected)
        idx, _, _ = data.collate([(units[0].prompt, units[0].rejected)], block_size)
        assert (idx[0, 0].item() != enc.encode_ordinary(prompt)[0]) == bool(expected)
    assert data.tokenize([ex], fits - 1)[2] == 0  # the short completion leaves the whole prompt


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


def test_the_kl_check_quotes_the_prompt_it_refuses():
    """Decoded, on one line, cut to 60 characters."""
    enc = data.get_tokenizer()
    long = "\n\nHuman: " + "tell me more " * 10 + "\n\nAssistant:"
    for prompt, quoted in (("Q: café? A:", '"Q: café? A:"'),
                           (long, '"\\n\\nHuman: ' + "tell me more " * 3 + 'tell me more"...')):
        examples = [data.Tokens(enc.encode_ordinary(prompt), [100 + i, data.EOT], True) for i in range(3)]
        examples += [data.Tokens([7 + i], [200 + i, data.EOT], False) for i in range(3)]
        with pytest.raises(data.DataError) as err:
            data.check_kl_pairs(examples, batch_size=4)
        assert str(err.value).startswith(f"one prompt has 3 examples ({quoted}), and a KTO batch of 4")
        assert "\n" not in str(err.value)


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
    again, unused, identical = data.pair_up(examples + [data.Tokens([7], [8, data.EOT], True)])
    assert again == pairs and unused == 1 and identical == 0
    # a prompt whose desirable and undesirable completion are the same gives no pair, and is counted
    same = [data.Tokens([9], [5, data.EOT], True), data.Tokens([9], [5, data.EOT], False)]
    assert data.pair_up(examples + same) == (pairs, 0, 1)
    batch = data.make_batch(pairs, block_size=8, with_kl=False)
    assert batch["targets"][batch["scored"]].tolist() == [2, data.EOT, 3, data.EOT, 5, data.EOT, 6, data.EOT]
    assert batch["tag"].tolist() == [0, 0, 1, 1]
