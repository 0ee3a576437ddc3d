"""Time a KTO step against an SFT step on the same model and batch, in one run.

    python bench.py                                   # the main job's model and batch, on the CPU
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --batch_size=32 --prompt_tokens=384 \\
        --completion_tokens=128 --device=cuda --dtype=bfloat16 --compile=true      # GPT-2 124M on a GPU

Three steps, each train.py's own (train.train_step: forward, backward, gradient clipping, fused AdamW):
  sft              the SFT loss: the policy forward and backward                             3 units
  kto              KTO with a live reference: + the policy on the KL pairs, the reference on both    6 units
  kto_precomputed  KTO with the reference's log-probs computed beforehand                    4 units
(a forward counts 1, a backward 2), so the floors are ratio_kto = 2 and ratio_kto_precomputed = 4/3.
Each is warmed up, then timed over many steps (median). The last line is one JSON object.
"""
import dataclasses
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import config
import data
import train
from model import GPT, GPTConfig

# Dense bf16 peak of the card, for MFU (tensor cores, no sparsity), from the vendor's data sheets.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class BenchConfig:
    n_layer: int = 2  # the main job's model
    n_head: int = 4
    n_embd: int = 128
    batch_size: int = 32
    prompt_tokens: int = 15  # the built-in task's prompts are 15 tokens, its completions 2 (EOT included)
    completion_tokens: int = 2
    device: str = "cpu"
    dtype: str = "float32"  # "float32" or "bfloat16" (CUDA: autocast)
    compile: bool = False
    warmup: int = 10
    steps: int = 50
    seed: int = 0
    profile: bool = False  # then profile a few KTO steps and print the operators that take the most time


def parse(args: list[str]) -> BenchConfig:
    cfg = BenchConfig()
    for arg in args:
        key, eq, value = arg.removeprefix("--").partition("=")
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n\noptions: " + " ".join(f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
            raise SystemExit(0)
        if not arg.startswith("--") or not eq or key not in BenchConfig.__dataclass_fields__:
            raise SystemExit(f"error: argument '{arg}': expected --key=value with a key of {', '.join(dataclasses.asdict(cfg))}")
        kind = type(getattr(cfg, key))
        try:
            setattr(cfg, key, {"true": True, "false": False}[value.lower()] if kind is bool else kind(value))
        except (KeyError, ValueError):
            raise SystemExit(f"error: --{key}={value}: expected {kind.__name__}") from None
    least = {"n_layer": 1, "n_head": 1, "n_embd": 1, "prompt_tokens": 1, "completion_tokens": 1, "steps": 1, "warmup": 0,
             "batch_size": 2}  # a KL pair needs another row; completion_tokens counts the EOT
    for key, low in least.items():
        if getattr(cfg, key) < low:
            raise SystemExit(f"error: --{key}={getattr(cfg, key)}: expected at least {low}")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"error: --n_embd={cfg.n_embd}: expected a multiple of n_head={cfg.n_head}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={cfg.device}: no CUDA device here")
    if cfg.dtype not in ("float32", "bfloat16") or (cfg.dtype == "bfloat16") != (cfg.device.startswith("cuda")):
        raise SystemExit("error: dtype: expected float32 on the CPU, bfloat16 on CUDA (autocast)")
    return cfg


def forward_flops(model: GPT, rows: int, tokens: int, scored: int) -> float:
    """FLOPs of one forward over `rows` sequences of `tokens`, `scored` of them projected onto the vocabulary:
    2 per multiply-add of every matrix in the blocks, the attention scores and their sum over values
    (2 x 2 x T x n_embd per token and layer, counted without the causal half, as in PaLM's MFU), and the
    vocabulary projection at the scored positions. Embedding lookups, norms and softmax are not counted."""
    c = model.config
    block_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    per_token = 2 * block_params + 2 * 2 * c.n_layer * tokens * c.n_embd
    return rows * (tokens * per_token + scored * 2 * c.n_embd * c.vocab_size)


def main() -> None:
    b = parse(sys.argv[1:])
    device = torch.device(b.device)
    cfg = config.TrainConfig(n_layer=b.n_layer, n_head=b.n_head, n_embd=b.n_embd, batch_size=b.batch_size,
                            block_size=b.prompt_tokens + b.completion_tokens, seed=b.seed, lambda_d=1.0, lambda_u=1.0,
                            compile=b.compile, device="cuda" if device.type == "cuda" else "cpu")
    train.setup_distributed(cfg)  # TF32 on CUDA, as in training
    g = torch.Generator().manual_seed(b.seed)
    tokens = torch.randint(0, data.EOT, (b.batch_size, b.prompt_tokens + b.completion_tokens), generator=g).tolist()
    examples = [data.Tokens(t[:b.prompt_tokens], t[b.prompt_tokens:-1] + [data.EOT], i % 2 == 0) for i, t in enumerate(tokens)]
    batch = data.make_batch(examples, cfg.block_size, with_kl=True)

    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=b.n_layer, n_head=b.n_head, n_embd=b.n_embd)).to(device)
    reference = GPT(GPTConfig(**dataclasses.asdict(model.config))).to(device).eval().requires_grad_(False)
    reference.load_state_dict(model.state_dict())
    # The precomputed log-probs come from the reference itself, in train.py's own inference batches.
    rows = [(ex.prompt, ex.completion) for ex in examples]
    precomputed = {"reference_logps": train.reference_logps(reference, rows, cfg, device),
                   "reference_kl_logps": train.reference_logps(reference, data.kl_pairs(examples), cfg, device)}
    on_device = train.to_device(data.shard({**batch, **precomputed}, 0, 1), device)
    optimizer = model.configure_optimizer(cfg.weight_decay, 1e-5, (cfg.beta1, cfg.beta2))  # small steps: the batch stays informative
    policy = torch.compile(model) if b.compile else model
    frozen = torch.compile(reference) if b.compile else reference

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    n_tokens = b.batch_size * (b.prompt_tokens + b.completion_tokens)
    f = forward_flops(model, b.batch_size, cfg.block_size - 1, b.completion_tokens)
    steps = {"sft": ("sft", frozen, 3 * f), "kto_precomputed": ("kto", None, 3 * f + f),
             "kto": ("kto", frozen, 3 * f + 3 * f)}
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{b.n_layer} layers x {b.n_embd}, batch {b.batch_size} of {b.prompt_tokens}+{b.completion_tokens} tokens, "
          f"{b.dtype}, compile {b.compile}")
    results = {}
    for name, (loss_name, ref, flops) in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(b.warmup + b.steps):
            sync()
            t0 = time.perf_counter()
            train.train_step(policy, model, ref, optimizer, [on_device], cfg, loss_name, 1)
            sync()
            if i >= b.warmup:
                times.append(time.perf_counter() - t0)
        ms = 1000 * statistics.median(times)
        memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
        line = (f"{name:<16} {ms:9.2f} ms  {n_tokens / ms * 1000:12,.0f} tokens/s  "
                f"{'peak allocated' if device.type == 'cuda' else 'peak RSS so far'} {memory:6.2f} GiB")
        if device.type == "cuda":
            line += f"  {flops / ms * 1000 / 1e12:7.1f} TFLOP/s" + (f"  MFU {100 * flops / ms * 1000 / peak:5.1f}%" if peak else "")
        print(line)
        results[f"{name}_ms"] = round(ms, 3)
    if b.profile:
        kind = "device" if device.type == "cuda" else "cpu"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if kind == "device" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                train.train_step(policy, model, frozen, optimizer, [on_device], cfg, "kto", 1)
            sync()
        print(f"where 5 KTO steps spend their time ({kind} time, by operator):")
        print(prof.key_averages().table(sort_by=f"self_{kind}_time_total", row_limit=20))
    results["ratio_kto"] = round(results["kto_ms"] / results["sft_ms"], 3)
    results["ratio_kto_precomputed"] = round(results["kto_precomputed_ms"] / results["sft_ms"], 3)
    print(f"ratio_kto {results['ratio_kto']:.2f} (floor 2), ratio_kto_precomputed {results['ratio_kto_precomputed']:.2f} (floor 1.33)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
