"""sample.py: our checkpoints and Hugging Face GPT-2 side by side, the same text under the same seed."""
import dataclasses
import json
import os
import subprocess
import sys

import torch

import data
import sample as sample_py
from test_model import gpt2_like, hf_config, hf_state, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "sample.py"] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sample_is_deterministic_under_a_seed_and_puts_checkpoints_side_by_side(tmp_path):
    ours, theirs = gpt2_like(seed=1), gpt2_like(seed=2)
    torch.save({"model": ours.state_dict(), "optimizer": {}, "iter": 0, "model_args": dataclasses.asdict(ours.config),
                "config": {}, "settings": {}, "data": "", "start": ""}, tmp_path / "ours.pt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(theirs)))
    write_safetensors(tmp_path / "hf" / "model.safetensors", hf_state(theirs, "transformer.", buffers=False, head=False))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q: Ann had 3 apples, got 4 more. Total? A:\n\\n\\nHuman: Hi\\n\\nAssistant:\n")
    args = [str(tmp_path / "ours.pt"), str(tmp_path / "hf"), f"--prompts={prompts}", "--prompt=Hello", "--num_samples=2",
            "--max_new_tokens=6", "--top_k=50"]
    first, again, other = sample(args), sample(args), sample(args + ["--seed=7"])
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and first.stdout != other.stdout
    lines = first.stdout.splitlines()
    assert lines.count("=" * 80) == 3 and "\n\nHuman: Hi\n\nAssistant:" in first.stdout and "Hello" in lines
    assert sum(line.startswith(str(tmp_path / "ours.pt")) for line in lines) == 3  # one block per prompt
    assert sum(line.startswith(str(tmp_path / "hf")) for line in lines) == 3
    assert len([line for line in lines if " | " in line]) == 3 * 2 * 2  # prompts x checkpoints x samples
    bad = sample([str(tmp_path / "prompts.txt"), "--prompt=x"])
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error:")


def test_an_empty_prompt_starts_from_end_of_text():
    model = gpt2_like(seed=1)
    cfg = sample_py.SampleConfig(num_samples=1, max_new_tokens=5, temperature=0)
    ids = [data.EOT]
    for _ in range(5):  # greedy decoding, one token at a time
        with torch.no_grad():
            ids.append(model.lm_head(model.hidden(torch.tensor([ids])))[0, -1].argmax().item())
    completion = ids[1:ids.index(data.EOT, 1)] if data.EOT in ids[1:] else ids[1:]
    assert sample_py.sample(model, "", cfg, torch.device("cpu")) == [data.get_tokenizer().decode(completion)]
