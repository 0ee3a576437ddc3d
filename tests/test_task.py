"""The built-in task and its judge."""
import pytest

import task


def test_judge_and_task():
    prompt = "Q: Ann had 3 apples, got 5 more. Total? A:"
    assert task.judge(prompt, " 8") == 1.0 and task.judge(prompt, "8 ") == 1.0
    assert task.judge(prompt, " 9") == 0.0 and task.judge(prompt, " 8 apples") == 0.0
    with pytest.raises(ValueError):
        task.judge("What is 3+5?", " 8")

    examples, heldout, dev = task.arithmetic_task(seed=3, p_correct=0.3, heldout_fraction=0.2, max_operand=9)
    again, _, _ = task.arithmetic_task(seed=3, p_correct=0.3, heldout_fraction=0.2, max_operand=9)
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
    pairs, heldout, _ = task.arithmetic_task(seed=3, demos=4)
    assert 0.75 * 1800 < len(pairs) < 0.95 * 1800  # 1 - 0.4^4 - 0.6^4 = 0.845 of the prompts have both kinds
    for p in pairs:
        words = p.prompt.split()
        total = int(words[3]) + int(words[6])
        assert int(p.chosen) == total and int(p.rejected) != total
    assert len({p.prompt for p in pairs}) == len(pairs) and not {p.prompt for p in pairs} & set(heldout)


def test_the_dev_split_is_disjoint_from_training_and_test_and_leaves_the_test_prompts_alone():
    examples, heldout, dev = task.arithmetic_task(seed=5, heldout_fraction=0.1, dev_fraction=0.15)
    _, heldout_without_dev, _ = task.arithmetic_task(seed=5, heldout_fraction=0.1)
    train_prompts = {e.prompt for e in examples}
    assert len(heldout) == 200 and len(dev) == 300 and len(train_prompts) == 1500  # of 10 * 8 * 5 * 5 prompts
    assert not train_prompts & set(dev) and not set(dev) & set(heldout) and not train_prompts & set(heldout)
    assert heldout == heldout_without_dev  # a dev split never changes what the final tables are scored on
