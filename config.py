"""The settings of a run: TrainConfig, read from JSON preset files and --key=value overrides, and checked.

Every setting is a field of TrainConfig with its default; `python train.py --help` lists them with the
comments written here.
"""
import dataclasses
import json
import math
import types
from dataclasses import dataclass

import torch

import data
import kto
import task


@dataclass
class TrainConfig:
    # data
    data: str = "arithmetic"  # a built-in task, "arithmetic" or "lists" (task.py), or a .jsonl / .jsonl.gz file (dataset.py)
    eval_fraction: float = 0.0  # of a file's prompts, held out (with all their examples) for the eval loss
    task_p_correct: float = 0.4  # built-in task: how often its demonstrator answers correctly (lists: keeps the rule)
    task_heldout: float = 0.1  # built-in task: fraction of prompts kept for evaluation (the test prompts)
    task_dev: float = 0.0  # built-in task: fraction of prompts kept as a dev split, for choosing settings (tune)
    task_max_operand: int = 4  # arithmetic task: operands run from 0 to this
    task_demos: int = 1  # built-in task: answers per prompt; above 1, one (correct, wrong) pair per prompt with both
    seed: int = 1337
    # the paper's data settings, seeded, applied in this order to the data of the main loss and the control
    # (the SFT stage imitates the data as given)
    contradict: float = 0.0  # fraction of examples (pairs) also given the opposite label by a second annotator
    label_noise: float = 0.0  # fraction of labels flipped (pairs: chosen and rejected swapped)
    one_y_per_x: bool = False  # keep one completion per prompt
    desirable_fraction: float = 1.0  # keep this fraction of the desirable examples (the paper's 1:10 run: 0.1)
    # score-based feedback (data.rate): a score per completion, labelled by a threshold; applied before the settings above
    score_field: str = "score"  # a file's unpaired scored rows: the field holding the score (HelpSteer: "helpfulness")
    score_threshold: float | str | None = None  # a number, "median" or "mean" of the scores: at least it is desirable; none: labels (a scored file needs one; the built-in tasks then use their judge's labels)
    score_noise: float = 0.0  # a noisy rater: standard deviation of Gaussian noise on each score before the threshold
    score_weight: str = "none"  # "none" (labels only) or "margin": each KTO example's eq. (7) term times |score - threshold|, mean 1 per class
    # model (ignored when starting from a checkpoint, which carries its own shape; dropout as set here)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0  # SFT stages only: KTO and DPO run without it (it would bias r and z_ref)
    bias: bool = True
    # stages
    loss: str = "kto"  # the main loss: "kto", "dpo" (on pairs, beside it) or "sft"
    init_from: str = "sft"  # "sft" (train the SFT stage first), "scratch", or a checkpoint (ours or Hugging Face GPT-2)
    sft_init: str = "scratch"  # where the SFT stage starts: "scratch" or a checkpoint (ours or Hugging Face GPT-2)
    sft_iters: int = 1500
    sft_lr: float = 3e-3  # learning rate of the SFT stage
    max_iters: int = 400  # iterations of the main loss (and of the control)
    lr: float = 1e-3  # learning rate of the main loss (and of the control)
    control: bool = True  # also continue SFT from the same start (with loss kto or dpo)
    # KTO, eq. (7); beta outside the log-ratio (see kto.py)
    beta: float = 0.1
    lambda_d: float | None = None  # None: from the data by the paper's advice (kto.advised_lambdas), or 1 if lambda_u is set
    lambda_u: float | None = None  # None: from the data by the paper's advice, or 1 if lambda_d is set
    value: str = "sigmoid"  # KTO's value function: "sigmoid" (eq. 7), or the ablations "logsigmoid" and "linear" (kto.py)
    nll_weight: float = 0.0  # DPO: + nll_weight * NLL of the chosen completion, summed over its tokens (after RPO)
    # optimization
    batch_size: int = 32  # completions per micro-step, over all processes together (DPO: batch_size/2 pairs)
    grad_accum: int = 1  # micro-steps per optimizer step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    warmup_iters: int = 50
    # evaluation on the built-in task
    eval_samples: int = 8  # samples per held-out prompt at temperature 1
    eval_tokens: int = 8  # tokens generated per sample, at most
    utility_interval: int = 0  # iterations between dev utilities (needs task_dev > 0; 0: none), a metrics.jsonl row each
    # i/o
    out_dir: str = "out"
    resume: bool = False  # continue each stage from its checkpoint in out_dir
    log_interval: int = 50
    eval_interval: int = 200  # iterations between eval losses (with eval_fraction > 0)
    ckpt_interval: int = 200
    device: str = "auto"  # "auto", "cpu", "cuda"
    reference: str = "live"  # "live": the frozen reference runs every step; "precomputed": its log-probs first, then freed
    compile: bool = False  # torch.compile the policy and the reference


def settings_help() -> str:
    """For --help: every setting with its default and its comment in this file."""
    comments = {}
    with open(__file__) as f:
        for line in f:
            name, colon, rest = line.strip().partition(":")
            if colon and name in TrainConfig.__dataclass_fields__ and "#" in rest and name not in comments:
                comments[name] = rest.split("#", 1)[1].strip()
    lines = ["settings (--key=value, or keys of a JSON preset file):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name}={f.default}" + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def parse_config(args: list[str]) -> TrainConfig:
    """Defaults, then each argument in the order given: a JSON preset file or a --key=value override."""
    cfg = TrainConfig()
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}

    def set_value(key: str, value, source: str) -> None:
        if key not in fields:
            if key == "task":  # one way to choose: data names a built-in task or a file
                raise SystemExit(f"error: {source}: unknown config key 'task'; a built-in task is chosen with "
                                 f"--data={' or --data='.join(task.TASKS)}")
            raise SystemExit(f"error: {source}: unknown config key '{key}'; known keys: {', '.join(fields)}")
        kind = fields[key]
        if isinstance(kind, types.UnionType):  # float | None: "none" (or JSON null) asks for the default rule
            if value is None or isinstance(value, str) and value.lower() == "none":
                setattr(cfg, key, None)
                return
            kind = float
            if str in fields[key].__args__ and isinstance(value, str):  # float | str | None: a word, or a number
                try:
                    value = float(value)
                except ValueError:
                    setattr(cfg, key, value)
                    return
        if isinstance(value, str) and kind is not str:  # from the command line
            words = {"true": True, "false": False} if kind is bool else {}
            try:
                value = words[value.lower()] if kind is bool else kind(value)
            except (KeyError, ValueError):
                pass
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool)) or \
            kind is float and isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise SystemExit(f"error: {source}: '{key}' expects {kind.__name__}, got {value!r}")
        setattr(cfg, key, kind(value))

    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"error: argument '{arg}': expected --key=value")
            set_value(key, value, "command line")
        else:
            try:
                with open(arg) as f:
                    preset = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"error: preset file {arg}: {e}") from None
            if not isinstance(preset, dict):
                raise SystemExit(f"error: preset file {arg}: expected a JSON object of config keys")
            for key, value in preset.items():
                set_value(key, value, f"preset file {arg}")

    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot run, with one line naming the key."""
    def require(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise SystemExit(f"error: {key}={getattr(cfg, key)!r}: expected {expected}")

    for key in ("n_layer", "n_head", "n_embd", "block_size", "sft_iters", "max_iters", "batch_size",
                "grad_accum", "eval_samples", "eval_tokens", "log_interval", "eval_interval", "ckpt_interval", "task_demos"):
        require(getattr(cfg, key) >= 1, key, "an integer of at least 1")
    for key in ("seed", "warmup_iters", "task_max_operand", "utility_interval"):
        require(getattr(cfg, key) >= 0, key, "a non-negative integer")
    for key in ("sft_lr", "lr", "beta"):
        require(0 < getattr(cfg, key) < math.inf, key, "a positive finite number")
    for key in ("lambda_d", "lambda_u"):
        require(getattr(cfg, key) is None or 0 < getattr(cfg, key) < math.inf, key, "a positive finite number or none")
    for key in ("weight_decay", "grad_clip", "nll_weight"):
        require(0 <= getattr(cfg, key) < math.inf, key, "a non-negative finite number")
    for key in ("beta1", "beta2", "dropout"):
        require(0 <= getattr(cfg, key) < 1, key, "a number in [0, 1)")
    require(0 <= cfg.task_p_correct <= 1, "task_p_correct", "a probability in [0, 1]")
    for key in ("contradict", "label_noise"):
        require(0 <= getattr(cfg, key) < 1, key, "a fraction in [0, 1)")
    require(0 < cfg.desirable_fraction <= 1, "desirable_fraction", "a fraction in (0, 1]")
    require(0 <= cfg.eval_fraction < 1, "eval_fraction", "a fraction in [0, 1)")
    require(cfg.eval_fraction == 0 or cfg.data not in task.TASKS, "eval_fraction",
            "0 with the built-in task, which holds out its own prompts (task_heldout)")
    require(bool(cfg.out_dir), "out_dir", "a directory path")
    require(bool(cfg.data), "data", "'arithmetic', 'lists' or the path of a .jsonl or .jsonl.gz file")
    require(cfg.data != "lists" or cfg.eval_tokens >= 24, "eval_tokens",
            "at least 24 with data='lists', whose completions run to 19 tokens before EOT (and a rambling one further)")
    require(bool(cfg.init_from), "init_from", "'sft', 'scratch' or a checkpoint path")
    require(bool(cfg.sft_init), "sft_init", "'scratch' or a checkpoint path")
    require(0 < cfg.task_heldout < 1, "task_heldout", "a fraction strictly between 0 and 1")
    require(0 <= cfg.task_dev < 1 - cfg.task_heldout, "task_dev", f"a fraction in [0, {1 - cfg.task_heldout:g}) (1 - task_heldout)")
    require(cfg.utility_interval == 0 or cfg.task_dev > 0 and cfg.data in task.TASKS, "utility_interval",
            "0 unless the built-in task keeps dev prompts (task_dev > 0)")
    require(cfg.nll_weight == 0 or cfg.loss == "dpo", "nll_weight", "0 unless loss='dpo'")
    require(isinstance(cfg.score_threshold, float) and math.isfinite(cfg.score_threshold) or cfg.score_threshold is None
            or cfg.score_threshold in data.THRESHOLDS, "score_threshold", "a finite number, 'median', 'mean' or none")
    require(0 <= cfg.score_noise < math.inf, "score_noise", "a non-negative finite number")
    require(cfg.score_noise == 0 or cfg.score_threshold is not None, "score_noise", "0 unless score_threshold is set")
    require(cfg.score_weight in ("none", "margin"), "score_weight", "'none' or 'margin'")
    require(cfg.score_weight == "none" or cfg.loss == "kto" and cfg.score_threshold is not None, "score_weight",
            "'none' unless loss='kto' and score_threshold is set")
    require(bool(cfg.score_field), "score_field", "a field name")
    require(cfg.value in kto.VALUES, "value", f"one of {', '.join(kto.VALUES)}")
    require(cfg.value == "sigmoid" or cfg.loss == "kto", "value", "'sigmoid' unless loss='kto'")
    require(cfg.n_embd % cfg.n_head == 0, "n_embd", f"a multiple of n_head={cfg.n_head}")
    require(cfg.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'")
    require(cfg.device != "cuda" or torch.cuda.is_available(), "device", "a machine with CUDA")
    require(cfg.loss in ("kto", "dpo", "sft"), "loss", "'kto', 'dpo' or 'sft'")
    require(cfg.reference in ("live", "precomputed"), "reference", "'live' or 'precomputed'")
    require(cfg.loss != "dpo" or cfg.desirable_fraction == 1, "desirable_fraction",
            "1 with loss='dpo': dropping desirable examples breaks DPO's pairs")
    require(cfg.loss != "dpo" or not cfg.one_y_per_x, "one_y_per_x", "false with loss='dpo': a pair has two completions")
    require(cfg.loss != "dpo" or cfg.batch_size % 2 == 0, "batch_size", "an even number with loss='dpo' (two completions a pair)")
    require(not (cfg.loss == "sft" and cfg.init_from == "sft"), "init_from",
            "'scratch' or a checkpoint with loss='sft' (the SFT stage followed by more SFT is the control)")
    require(cfg.loss != "kto" or cfg.batch_size >= 2, "batch_size",
            "at least 2 for KTO, to pair prompts with other completions for z_ref (8-16 or more is advised)")


def per_batch(cfg: TrainConfig, loss_name: str) -> int:
    """Units of one global micro-batch: batch_size examples, or batch_size / 2 pairs for DPO."""
    return cfg.batch_size // 2 if loss_name == "dpo" else cfg.batch_size
