"""The model's log-probs and sampling against slow, obvious routes; Hugging Face checkpoints."""
import json

import pytest
import torch

import data
import kto
from model import GPT, GPT2_VOCAB, GPTConfig


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


def test_generation_stopped_at_eot_is_the_same_and_leaves_the_generator_where_the_full_one_does():
    """stop=EOT ends once every row holds EOT: the tokens up to there are those of the full generation, and the
    generator's next draws are the same, so later prompts sample the same either way."""
    model = tiny_gpt()
    with torch.no_grad():  # every position's hidden state is the LayerNorm's bias: P(EOT) = 0.8 at each step
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[data.EOT] = torch.log(torch.tensor(0.8 / 0.2 * (GPT2_VOCAB - 1))) / 32
    idx = torch.tensor([[10, 20, 30]]).repeat(4, 1)
    outs, nexts = [], []
    for stop in (data.EOT, None):
        gen = torch.Generator().manual_seed(3)
        outs.append(model.generate(idx, max_new_tokens=12, generator=gen, stop=stop))
        nexts.append(torch.rand(5, generator=gen))
    stopped, full = outs
    assert stopped.size(1) < full.size(1) == 15 and torch.equal(stopped, full[:, :stopped.size(1)])
    assert all(data.EOT in row[3:].tolist() for row in stopped) and torch.equal(nexts[0], nexts[1])
    greedy = model.generate(idx, max_new_tokens=12, temperature=0, stop=data.EOT)
    assert greedy.size(1) == 4 and (greedy[:, 3] == data.EOT).all()


# ----------------------------------------------------------------------------- Hugging Face GPT-2 checkpoints

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state(model: GPT, prefix: str, buffers: bool, head: bool) -> dict[str, torch.Tensor]:
    """Our weights as Hugging Face stores GPT-2: Conv1D weights (in, out), optional prefix, buffers and head."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        name = name.removeprefix("transformer.")
        out[prefix + name] = t.t().contiguous() if name.endswith(CONV1D) else t.clone()
    if buffers:
        n = model.config.block_size
        for i in range(model.config.n_layer):
            out[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            out[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if head:
        out["lm_head.weight"] = model.lm_head.weight.detach().clone()
    return out


def write_safetensors(path, tensors: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    """The format written out by hand: header length (u64 little-endian), JSON header, raw bytes."""
    names = {torch.float32: "F32", torch.float16: "F16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.to(dtype).contiguous().numpy().tobytes()
        header[name] = {"dtype": names[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def hf_config(model: GPT) -> dict:
    c = model.config
    return {"model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
            "n_ctx": c.block_size, "vocab_size": c.vocab_size, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-05, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


def logps_of(model: GPT) -> torch.Tensor:
    enc = data.get_tokenizer()
    pairs = [(enc.encode_ordinary("Q: Ann had 3 apples, got 5 more. Total? A:"), enc.encode_ordinary(" 8") + [data.EOT]),
             (enc.encode_ordinary("\n\nHuman: Hi\n\nAssistant:"), enc.encode_ordinary(" Hello there!") + [data.EOT])]
    idx, targets, scored = data.collate(pairs, block_size=32)
    with torch.no_grad():
        return kto.sequence_logps(model.eval()(idx, targets, scored), scored)


def gpt2_like(seed: int = 3) -> GPT:
    torch.manual_seed(seed)  # 64-wide heads, as in every GPT-2
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=128)).eval()


@pytest.mark.parametrize("layout", ["save_pretrained safetensors", "hub bin", "save_pretrained bin with head",
                                    "hub safetensors file without config", "fp16 safetensors"])
def test_hugging_face_checkpoints_load_to_the_same_log_probs(tmp_path, capsys, layout):
    model = gpt2_like()
    expected = logps_of(model)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    if layout == "save_pretrained safetensors":
        write_safetensors(tmp_path / "model.safetensors", hf_state(model, "transformer.", buffers=False, head=False))
        path = str(tmp_path)
    elif layout == "hub bin":
        torch.save(hf_state(model, "", buffers=True, head=False), tmp_path / "pytorch_model.bin")
        path = str(tmp_path / "pytorch_model.bin")
    elif layout == "save_pretrained bin with head":
        torch.save(hf_state(model, "transformer.", buffers=False, head=True), tmp_path / "pytorch_model.bin")
        path = str(tmp_path)
    elif layout == "hub safetensors file without config":
        (tmp_path / "config.json").unlink()
        write_safetensors(tmp_path / "gpt2.safetensors", hf_state(model, "", buffers=True, head=False))
        path = str(tmp_path / "gpt2.safetensors")
    else:
        write_safetensors(tmp_path / "model.safetensors", hf_state(model, "", buffers=False, head=False), torch.float16)
        path = str(tmp_path)
    loaded = GPT.from_pretrained(path)
    assert loaded.config == model.config
    tolerance = 2e-2 if "fp16" in layout else 1e-5
    assert torch.allclose(logps_of(loaded), expected, atol=tolerance)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    note = f"note: no config.json beside {path}: assuming 64-wide heads (n_head=2)\n"
    assert capsys.readouterr().err == (note if "without config" in layout else "")


def write_shards(folder, state: dict[str, torch.Tensor], fmt: str) -> None:
    """What save_pretrained writes for a big model: shard files and an index naming each tensor's shard."""
    names, weight_map = list(state), {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        shard = {name: state[name] for name in part}
        if fmt == "safetensors":
            file = f"model-{i + 1:05d}-of-00002.safetensors"
            write_safetensors(folder / file, shard)
        else:
            file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save(shard, folder / file)
        weight_map.update({name: file for name in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_sharded_checkpoint_loads_to_the_same_log_probs(tmp_path, fmt):
    model = gpt2_like()
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    write_shards(tmp_path, hf_state(model, "transformer.", buffers=False, head=True), fmt)
    loaded = GPT.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    assert torch.allclose(logps_of(loaded), logps_of(model), atol=1e-5)
    shard = next(tmp_path.glob(f"*-00002-of-00002.{fmt}"))
    with pytest.raises(ValueError, match=rf"{shard.name}: one shard of several \(.*index.json names them all\)"):
        GPT.from_pretrained(str(shard))


@pytest.mark.parametrize("config, message", [
    ({"scale_attn_weights": False}, r"config.json: scale_attn_weights=False; expected True as in GPT-2"),
    ({"scale_attn_by_inverse_layer_idx": True}, r"config.json: scale_attn_by_inverse_layer_idx=True; expected False"),
    ({"n_head": 3}, r"config.json: n_embd=128 is not divisible by n_head=3"),
    ("{not json", r"config.json: not readable JSON \(JSONDecodeError"),
    ("[1, 2]", r"config.json: expected a JSON object, found list"),
    ({"n_head": "2"}, r"config.json: n_head='2'; expected a positive integer"),
], ids=["scale_attn_weights", "scale_attn_by_inverse_layer_idx", "n_head", "corrupt JSON", "not an object", "a string"])
def test_a_config_that_does_not_fit_names_the_file_in_one_line(tmp_path, config, message):
    model = gpt2_like()
    write_safetensors(tmp_path / "model.safetensors", hf_state(model, "", buffers=False, head=False))
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps({**hf_config(model), **config}))
    with pytest.raises(ValueError, match=str(tmp_path / "config.json").replace(".", r"\.")) as e:
        GPT.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value) and e.match(message)


def test_a_config_without_n_positions_takes_the_context_from_the_tensors(tmp_path):
    model = gpt2_like()
    config = {k: v for k, v in hf_config(model).items() if k not in ("n_positions", "n_ctx")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(tmp_path / "model.safetensors", hf_state(model, "", buffers=False, head=False))
    loaded = GPT.from_pretrained(str(tmp_path))
    assert loaded.config.block_size == model.config.block_size == 32
    assert torch.allclose(logps_of(loaded), logps_of(model), atol=1e-5)


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    assert GPT2_VOCAB == data.get_tokenizer().n_vocab
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=1000, n_layer=1, n_head=2, n_embd=128))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    write_safetensors(tmp_path / "model.safetensors", hf_state(model, "", buffers=False, head=False))
    with pytest.raises(ValueError, match=r"config.json: vocab_size=1000; expected at least 50257, the GPT-2 tokenizer's"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"model.safetensors: vocab_size=1000; expected at least 50257"):
        GPT.from_pretrained(str(tmp_path))


def test_generation_never_draws_ids_past_the_tokenizer():
    """A vocabulary padded to 50304 whose padded ids would win every draw: only the tokenizer's are drawn."""
    model = tiny_gpt(vocab_size=50304)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every hidden state is all ones...
        model.lm_head.weight[GPT2_VOCAB:] = 1.0  # ...so the padded ids' logits are 32; the others about 0.1
    logits = model.lm_head.weight.sum(dim=1)  # the logits at every position
    prompt = torch.tensor([[10, 20, 30]]).repeat(100, 1)
    greedy = model.generate(prompt, max_new_tokens=4, temperature=0)[:, 3:]
    assert (greedy == logits[:GPT2_VOCAB].argmax()).all() and logits.argmax() >= GPT2_VOCAB
    drawn = model.generate(prompt, max_new_tokens=4, generator=torch.Generator().manual_seed(0))[:, 3:]
    assert drawn.max() < GPT2_VOCAB and drawn.unique().numel() > 100  # spread over the real vocabulary


def test_a_checkpoint_that_does_not_fit_names_the_file_and_tensor(tmp_path):
    model = gpt2_like()
    state = hf_state(model, "", buffers=False, head=False)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    bad = dict(state, **{"h.1.mlp.c_fc.weight": torch.zeros(128, 100)})
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'h.1.mlp.c_fc.weight' has shape \[128, 100\]; expected \[128, 512\]"):
        GPT.from_pretrained(str(tmp_path))
    write_safetensors(tmp_path / "model.safetensors", {k: v for k, v in state.items() if k != "h.0.ln_2.bias"})
    with pytest.raises(ValueError, match=r"tensor 'h.0.ln_2.bias' is missing"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**hf_config(model), "n_layer": 1}))
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(ValueError, match=r"unexpected tensor 'h.1.ln_1.weight' for a GPT-2 of 1 layers"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        GPT.from_pretrained(str(tmp_path))
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:248dfc39\nsize 548105171\n"
    for content in (lfs, b"<!DOCTYPE html><html>404</html>"):
        (tmp_path / "model.safetensors").write_bytes(content)
        with pytest.raises(ValueError, match=r"model.safetensors: .* \(a git-lfs pointer or a truncated download\?\)"):
            GPT.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x06\x00\x00\x00\x00\x00\x00\x00[1, 2]")
    with pytest.raises(ValueError, match=r"model.safetensors: .*the header is a JSON list; expected an object"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"no model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else "")
