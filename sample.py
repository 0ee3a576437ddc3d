"""Sample completions from one or more checkpoints, side by side.

    python sample.py out/sft.pt out/kto.pt --prompt="Q: Ann had 3 apples, got 4 more. Total? A:"
    python sample.py gpt2 out-gpt2-hh/kto.pt --prompts=prompts.txt --num_samples=2 --temperature=0.8 --top_k=200

Checkpoints are ours (*.pt) or Hugging Face GPT-2 (a directory, .safetensors or .bin). Prompts come from
--prompt (repeatable) or --prompts=FILE (one per line; "\\n" in a line stands for a newline). Every
checkpoint draws from the same seeded generator for each prompt, so the same seed gives the same text.
"""
import sys
from dataclasses import dataclass, field

import torch

import checkpoint
import config
import data
import train


@dataclass
class SampleConfig:
    checkpoints: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    num_samples: int = 1  # completions per prompt and checkpoint
    max_new_tokens: int = 64  # at most; a completion ends at EOT
    temperature: float = 1.0  # 0 decodes greedily
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 1337
    device: str = "auto"  # "auto", "cpu", "cuda"


def parse_args(args: list[str]) -> SampleConfig:
    cfg = SampleConfig()
    for arg in args:
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n\noptions: --prompt=TEXT --prompts=FILE " +
                  " ".join(f"--{k}={v}" for k, v in vars(SampleConfig()).items() if not isinstance(v, list)))
            raise SystemExit(0)
        if not arg.startswith("--"):
            cfg.checkpoints.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            raise SystemExit(f"error: argument '{arg}': expected --key=value")
        if key == "prompt":
            cfg.prompts.append(value)
        elif key == "prompts":
            try:
                with open(value, encoding="utf-8") as f:
                    cfg.prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
            except OSError as e:
                raise SystemExit(f"error: {value}: cannot open ({e.strerror})") from None
        elif key in ("num_samples", "max_new_tokens", "top_k", "seed"):
            try:
                setattr(cfg, key, int(value))
            except ValueError:
                raise SystemExit(f"error: --{key}={value}: expected an integer") from None
        elif key == "temperature":
            try:
                cfg.temperature = float(value)
            except ValueError:
                raise SystemExit(f"error: --{key}={value}: expected a number") from None
        elif key == "device":
            cfg.device = value
        else:
            raise SystemExit(f"error: unknown option --{key}; see --help")
    if not cfg.checkpoints or not cfg.prompts:
        raise SystemExit("error: expected at least one checkpoint and one --prompt or --prompts=FILE; see --help")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1 or cfg.top_k < 0 or cfg.temperature < 0:
        raise SystemExit("error: expected num_samples and max_new_tokens of at least 1, top_k and temperature of at least 0")
    return cfg


@torch.no_grad()
def sample(model: torch.nn.Module, prompt: str, cfg: SampleConfig, device: torch.device) -> list[str]:
    """num_samples completions of one prompt, cut at EOT; the generator is seeded per prompt."""
    enc = data.get_tokenizer()
    ids = enc.encode_ordinary(prompt)[-(model.config.block_size - 1):]  # the prompt loses tokens from the left
    ids = ids or [data.EOT]  # an empty prompt starts from <|endoftext|>, as in transformers
    idx = torch.tensor([ids] * cfg.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, generator)
    texts = []
    for row in out[:, len(ids):].tolist():
        texts.append(enc.decode(row[:row.index(data.EOT)] if data.EOT in row else row))
    return texts


def main() -> None:
    cfg = parse_args(sys.argv[1:])
    run = config.TrainConfig(device=cfg.device, block_size=1)  # build_model needs only the device and dropout 0
    config.check_config(run)
    _, _, device = train.setup_distributed(run)
    models = {path: checkpoint.build_model(run, path, device).eval() for path in cfg.checkpoints}
    width = max(len(path) for path in models)
    for prompt in cfg.prompts:
        print("=" * 80)
        print(prompt)
        for path, model in models.items():
            for i, text in enumerate(sample(model, prompt, cfg, device)):
                print(f"{path if i == 0 else '':<{width}} | {text!r}")


if __name__ == "__main__":
    main()
