"""The model's log-probs and sampling against slow, obvious routes."""
import pytest
import torch

import data
import kto
from model import GPT, GPTConfig


def tiny_gpt(vocab_size: int = 50257, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()


def test_sequence_logps_match_a_token_by_token_loop():
    model = tiny_gpt()
    enc = data.get_tokenizer()
    examples = [("Q: Ann had 3 apples, got 5 more. Total? A:", " 8"),
                ("Hi", " there, how are you?"),
                ("A longer prompt about prospect theory and losses", " loss aversion")]
    pairs = [(enc.encode_ordinary(p), enc.encode_ordinary(c) + [data.EOT]) for p, c in examples]
    idx, targets, scored = data.collate(pairs, block_size=32)
    with torch.no_grad():
        fast = kto.sequence_logps(model(idx, targets, scored), scored)
        for b, (prompt, completion) in enumerate(pairs):
            slow = 0.0
            for j, token in enumerate(completion):  # full-vocabulary softmax at each completion token
                context = torch.tensor([prompt + completion[:j]])
                logits = model.lm_head(model.hidden(context))[0, -1]
                slow += torch.log_softmax(logits.double(), dim=-1)[token].item()
            assert fast[b].item() == pytest.approx(slow, abs=1e-4)


def test_unscored_positions_neither_count_nor_matter():
    """Padding after the completion and targets outside the mask leave the scored log-probs unchanged."""
    model = tiny_gpt()
    idx = torch.tensor([[5, 6, 7, 8, 50256, 50256]])
    targets = torch.tensor([[6, 7, 8, 50256, 50256, 50256]])
    scored = torch.tensor([[False, False, True, True, False, False]])
    out = model(idx, targets, scored)
    other_idx, other_targets = idx.clone(), targets.clone()
    other_idx[0, 4:] = torch.tensor([123, 4567])  # different padding tokens
    other_targets[0, :2] = torch.tensor([999, 1000])  # different targets at prompt positions
    other = model(other_idx, other_targets, scored)
    assert torch.allclose(out[scored], other[scored], rtol=0, atol=1e-6)
    assert out[~scored].abs().sum() == 0 and (out[scored] < 0).all()


def test_greedy_generation_follows_argmax():
    model = tiny_gpt()
    idx = torch.tensor([[10, 20, 30]])
    out = model.generate(idx, max_new_tokens=3, temperature=0)
    expected = idx
    for _ in range(3):
        with torch.no_grad():
            nxt = model.lm_head(model.hidden(expected))[0, -1].argmax()
        expected = torch.cat([expected, nxt.view(1, 1)], dim=1)
    assert torch.equal(out, expected)


def test_sampling_matches_the_model_distribution():
    model = tiny_gpt(vocab_size=6, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # an unequal distribution over 6 tokens (about 0.08 to 0.47)
        probs = torch.softmax(model.lm_head(model.hidden(torch.tensor([[1, 2]])))[0, -1], dim=-1)
    n = 20000
    gen = torch.Generator().manual_seed(0)
    tokens = model.generate(torch.tensor([[1, 2]]).repeat(n, 1), max_new_tokens=1, generator=gen)[:, -1]
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert (freq - probs.double()).abs().max().item() < 4 * (0.25 / n) ** 0.5  # four standard errors at worst
    assert probs.max() - probs.min() > 0.3  # the test is not vacuous
