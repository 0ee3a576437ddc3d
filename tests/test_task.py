"""The built-in tasks and their judge."""
import pytest

import task


def test_judge_and_task():
    prompt = "Q: Ann had 3 apples, got 5 more. Total? A:"
    assert task.judge(prompt, " 8") == 1.0 and task.judge(prompt, "8 ") == 1.0
    assert task.judge(prompt, " 9") == 0.0 and task.judge(prompt, " 8 apples") == 0.0
    with pytest.raises(ValueError):
        task.judge("What is 3+5?", " 8")

    examples, heldout, dev = task.make_task("arithmetic", seed=3, p_correct=0.3, heldout_fraction=0.2, max_operand=9)
    again, _, _ = task.make_task("arithmetic", seed=3, p_correct=0.3, heldout_fraction=0.2, max_operand=9)
    assert dev == []
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


def test_task_with_several_answers_gives_correct_and_wrong_pairs():
    pairs, heldout, _ = task.make_task("arithmetic", seed=3, demos=4)
    assert 0.75 * 1800 < len(pairs) < 0.95 * 1800  # 1 - 0.4^4 - 0.6^4 = 0.845 of the prompts have both kinds
    for p in pairs:
        words = p.prompt.split()
        total = int(words[3]) + int(words[6])
        assert int(p.chosen) == total and int(p.rejected) != total
    assert len({p.prompt for p in pairs}) == len(pairs) and not {p.prompt for p in pairs} & set(heldout)


def test_the_dev_split_is_disjoint_from_training_and_test_and_leaves_the_test_prompts_alone():
    examples, heldout, dev = task.make_task("arithmetic", seed=5, heldout_fraction=0.1, dev_fraction=0.15)
    _, heldout_without_dev, _ = task.make_task("arithmetic", seed=5, heldout_fraction=0.1)
    train_prompts = {e.prompt for e in examples}
    assert len(heldout) == 200 and len(dev) == 300 and len(train_prompts) == 1500  # of 10 * 8 * 5 * 5 prompts
    assert not train_prompts & set(dev) and not set(dev) & set(heldout) and not train_prompts & set(heldout)
    assert heldout == heldout_without_dev  # a dev split never changes what the final tables are scored on


def test_lists_judge_gives_full_partial_and_no_credit():
    prompt = "Q: Ann wants 3 different numbers for her cards. A:"
    assert task.judge(prompt, " 13 7 101") == 1.0
    assert task.judge(prompt, "13,7 , 101 ") == 1.0  # spaces or commas part the numbers
    assert task.judge(prompt, " 13 13 101") == pytest.approx(2 / 3)  # a repeat counts once
    assert task.judge(prompt, " 13 7") == pytest.approx(2 / 3)  # one too few
    assert task.judge(prompt, " 13 7 101 5") == pytest.approx(3 / 4)  # one too many
    assert task.judge(prompt, " 13 seven 101") == pytest.approx(2 / 3)  # not a number
    assert task.judge(prompt, " 9 9 9") == pytest.approx(1 / 3)
    assert task.judge(prompt, "") == 0.0 and task.judge(prompt, " 07 -3 x") == 0.0


def test_lists_task_has_long_completions_labelled_by_score():
    import data
    examples, heldout, dev = task.make_task("lists", seed=3, p_correct=0.4, heldout_fraction=0.1, dev_fraction=0.1)
    prompts = task.task_prompts("lists")
    assert len(prompts) == len(set(prompts)) == 880 and len(heldout) == len(dev) == 88 and len(examples) == 704
    enc = data.get_tokenizer()
    lengths = [len(enc.encode_ordinary(e.completion)) for e in examples]
    assert min(lengths) == 8 and max(lengths) == 19  # 8 to 18 numbers (and one too many), a token each
    too_many, habit = 0, 0
    for e in examples:  # scores and labels recomputed here from the prompt's words, not by the judge
        count = int(e.prompt.split()[3])
        numbers = [int(n) for n in e.completion.split()]
        assert all(1 <= n <= 199 for n in numbers) and len(numbers) in (count, count + 1)
        too_many += len(numbers) == count + 1
        habit += len(set(numbers)) < len(numbers) / 2
        assert e.desirable == (min(len(set(numbers)), count) / len(numbers) >= 0.5)
    assert 0.1 < too_many / len(examples) < 0.25  # one too many 1 time in 6
    assert 0.5 < habit / len(examples) < 0.7  # the habit, 60% of the time
    assert 0.3 < sum(e.desirable for e in examples) / len(examples) < 0.5
    pairs, _, _ = task.make_task("lists", seed=3, demos=4)
    assert all(task.judge(p.prompt, p.chosen) >= 0.5 > task.judge(p.prompt, p.rejected) for p in pairs)


def test_the_reward_is_bounded_by_the_references_surprise_on_a_real_model():
    """r = log pi_theta(y|x) - log pi_ref(y|x) <= -log pi_ref(y|x), since log pi_theta <= 0: checked on GPT models,
    the policy a perturbed copy of the reference, for lists completions (whose -log pi_ref is far above 36.4)."""
    import torch
    import data
    import kto
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    reference = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    policy.load_state_dict({k: v + 0.5 * torch.randn_like(v) for k, v in reference.state_dict().items()})
    examples, _, _ = task.make_task("lists", seed=1, demos=1)
    units, _, _ = data.tokenize(examples[:16], 64)
    batch = data.shard(data.make_batch(units, 64, with_kl=False), 0, 1)
    with torch.no_grad():
        logps = [kto.sequence_logps(m(batch["idx"], batch["targets"], batch["scored"], batch["positions"]), batch["scored"])
                 for m in (policy, reference)]
    r = kto.implied_reward(*logps)
    assert (logps[0] < 0).all() and (r <= -logps[1]).all() and (-logps[1] > 36.4).all()
