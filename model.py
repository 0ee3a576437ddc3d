"""A GPT-2 style language model, after nanoGPT.

Parameter names follow GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, ...) so that GPT-2
checkpoints map onto it one to one (`GPT.from_pretrained`).
"""
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


GPT2_VOCAB = 50257  # the GPT-2 tokenizer's size (data.get_tokenizer): it cannot decode ids from here on


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, n_embd), after the last LayerNorm."""
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence of {T} tokens exceeds block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities of `targets` (B, T) at the `scored` positions; 0 elsewhere.

        Only the scored positions are projected onto the vocabulary: for short completions after
        long prompts the 50257-way projection is most of the cost, and prompt and padding are never
        scored. positions: the flat indices of the scored positions in (B * T), computed on the host
        (data.shard) so that the device never waits to learn how many there are; without it they are
        found here. log_softmax runs in fp32 even under bf16 autocast.
        """
        if positions is None:
            positions = scored.view(-1).nonzero().squeeze(1)
        h = self.hidden(idx)
        h = h.view(-1, h.size(-1)).index_select(0, positions)  # (N_scored, n_embd)
        logps = self.lm_head(h).float().log_softmax(dim=-1).gather(1, targets.view(-1)[positions].unsqueeze(1)).squeeze(1)
        return torch.zeros(targets.numel(), dtype=logps.dtype, device=logps.device).index_copy(0, positions, logps).view(targets.shape)

    @classmethod
    def from_pretrained(cls, path: str, dropout: float = 0.0) -> "GPT":
        """Our GPT from a local Hugging Face GPT-2 checkpoint (gpt2 to gpt2-xl shapes).

        path: a directory with config.json and model.safetensors, pytorch_model.bin or the .index.json of
        their shards (save_pretrained's layout for big models), or one such file. config.json beside it is
        read if present; what it leaves out comes from the tensors' shapes, n_head from GPT-2's 64-wide heads
        (with a note on stderr). Names with or without the "transformer." prefix (save_pretrained's layout
        and the hub's original one) are accepted; the attn.bias / attn.masked_bias buffers and a tied lm_head
        are skipped; Conv1D weights, stored (in, out), are transposed. Anything that does not fit raises
        ValueError naming the file and the first tensor or setting that does not match.
        """
        weights, config_path = path, os.path.join(os.path.dirname(path), "config.json")
        if os.path.isdir(path):
            config_path = os.path.join(path, "config.json")
            found = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin",
                                                     "model.safetensors.index.json", "pytorch_model.bin.index.json")
                     if os.path.exists(os.path.join(path, n))]
            if not found:
                raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin in this directory "
                                 f"(nor the .index.json of their shards)")
            weights = found[0]
        state = read_weights(weights)
        state = {name.removeprefix("transformer."): t for name, t in state.items()
                 if not name.endswith((".attn.bias", ".attn.masked_bias"))}
        head = state.pop("lm_head.weight", None)
        if "wte.weight" not in state or "wpe.weight" not in state:
            raise ValueError(f"{weights}: no 'wte.weight' and 'wpe.weight' tensors: not a GPT-2 checkpoint")
        if head is not None and not torch.equal(head, state["wte.weight"]):
            raise ValueError(f"{weights}: tensor 'lm_head.weight' differs from 'wte.weight'; expected GPT-2's tied head")
        vocab_size, n_embd = state["wte.weight"].shape
        shape = {"n_layer": 1 + max((int(n.split(".")[1]) for n in state if n.startswith("h.")), default=-1),
                 "n_head": max(1, n_embd // 64), "n_embd": n_embd, "block_size": state["wpe.weight"].shape[0],
                 "vocab_size": vocab_size}
        hf = read_json_object(config_path) if os.path.exists(config_path) else None
        source = weights if hf is None else config_path
        if hf is not None:
            for key in ("n_layer", "n_head", "n_embd", "n_positions", "n_ctx", "vocab_size"):
                if key in hf and (type(hf[key]) is not int or hf[key] < 1):
                    raise ValueError(f"{config_path}: {key}={hf[key]!r}; expected a positive integer")
            given = {"n_layer": hf.get("n_layer"), "n_head": hf.get("n_head"), "n_embd": hf.get("n_embd"),
                     "block_size": hf.get("n_positions", hf.get("n_ctx")), "vocab_size": hf.get("vocab_size")}
            shape.update({key: value for key, value in given.items() if value is not None})  # the rest: from the tensors
            # Settings our model does not implement: any other value gives silently different logits.
            for key, expected in (("activation_function", ("gelu_new", "gelu_pytorch_tanh")), ("layer_norm_epsilon", (1e-5,)),
                                  ("scale_attn_weights", (True,)), ("scale_attn_by_inverse_layer_idx", (False,))):
                if hf.get(key, expected[0]) not in expected:
                    raise ValueError(f"{config_path}: {key}={hf[key]!r}; expected {' or '.join(map(repr, expected))} as in GPT-2")
        if (hf is None or hf.get("n_head") is None) and os.environ.get("RANK", "0") == "0":  # once under torchrun
            where = f"no config.json beside {weights}" if hf is None else f"{config_path} has no n_head"
            print(f"note: {where}: assuming 64-wide heads (n_head={shape['n_head']})", file=sys.stderr)
        if shape["n_embd"] % shape["n_head"]:
            raise ValueError(f"{source}: n_embd={shape['n_embd']} is not divisible by n_head={shape['n_head']}")
        if shape["vocab_size"] < GPT2_VOCAB:  # token ids from the tokenizer would index past the embedding
            raise ValueError(f"{source}: vocab_size={shape['vocab_size']}; expected at least {GPT2_VOCAB}, the GPT-2 tokenizer's")
        model = cls(GPTConfig(**shape, dropout=dropout, bias=True))
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = {name.removeprefix("transformer."): p for name, p in model.state_dict().items() if name != "lm_head.weight"}
        for name in state:
            if name not in ours:
                raise ValueError(f"{weights}: unexpected tensor '{name}' for a GPT-2 of {shape['n_layer']} layers")
        with torch.no_grad():
            for name, param in ours.items():
                if name not in state:
                    raise ValueError(f"{weights}: tensor '{name}' is missing")
                t = state[name].t() if name.endswith(conv1d) else state[name]
                if t.shape != param.shape:
                    raise ValueError(f"{weights}: tensor '{name}' has shape {list(state[name].shape)}; expected "
                                     f"{list(param.shape)[::-1] if name.endswith(conv1d) else list(param.shape)} "
                                     f"for {shape['n_layer']} layers of width {shape['n_embd']}")
                param.copy_(t.float())
        return model

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings only, as in GPT-2 training."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)  # fused: one kernel, also on CPU

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, stop: int | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 decodes greedily. With `stop` (EOT),
        generation ends early once every row holds it, and fewer columns come back."""
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            if stop is not None and done.all():
                if temperature != 0:  # the skipped steps' draws: later calls on this generator sample the same
                    for _ in range(max_new_tokens - step):
                        torch.rand(idx.size(0), 1, device=idx.device, generator=generator)
                break
            context = idx[:, -self.config.block_size:]
            # Only ids the GPT-2 tokenizer can decode: a vocabulary padded past it (50304) or with an added
            # pad token has logits for ids that decode to nothing, and sample.py would fail on them.
            logits = self.lm_head(self.hidden(context)[:, -1, :])[:, :GPT2_VOCAB].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                if temperature != 1:  # x / 1 is x: a pass over (rows, 50257) logits saved
                    logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                # Inverse-CDF sampling: the same distribution as torch.multinomial, many times faster
                # on a CPU over a 50257-token vocabulary.
                cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)
                u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
                next_token = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.size(-1) - 1)
            idx = torch.cat((idx, next_token), dim=1)
            if stop is not None:
                done |= next_token[:, 0] == stop
        return idx


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or .bin file, or of all the shards a save_pretrained .index.json names."""
    folder = os.path.dirname(path)
    if path.endswith(".index.json"):
        files = [os.path.join(folder, shard) for shard in shard_files(path)]
    else:
        name = os.path.basename(path)  # save_pretrained names shards model-00001-of-00002.safetensors
        for index in (os.path.join(folder, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")):
            if "-of-" in name and os.path.exists(index) and name in shard_files(index):
                raise ValueError(f"{path}: one shard of several ({index} names them all); expected its directory")
        files = [path]
    state = {}
    for file in files:
        state.update(read_safetensors(file) if file.endswith(".safetensors") else read_torch_weights(file))
    return state


def shard_files(index: str) -> list[str]:
    """The shard files that a save_pretrained index, {"weight_map": {tensor name: shard file}}, names."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise ValueError(f"{index}: expected a \"weight_map\" of tensor names to shard files")
    return sorted(set(weight_map.values()))


def read_json_object(path: str) -> dict:
    """A JSON object from a file (config.json, a shard index); anything else raises ValueError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A .safetensors file: an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes."""
    try:
        with open(path, "rb") as f:
            n, size = int.from_bytes(f.read(8), "little"), os.fstat(f.fileno()).st_size
            if n > size - 8:  # checked first: reading a length taken from text or a cut file would exhaust memory
                raise ValueError(f"a header of {n} bytes in a file of {size} (a git-lfs pointer or a truncated download?)")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError(f"the header is a JSON {type(header).__name__}; expected an object")
            tensors = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                if not 0 <= start <= end <= size - 8 - n:
                    raise ValueError(f"tensor '{name}' lies outside the file (a truncated download?)")
                f.seek(8 + n + start)
                raw = bytearray(f.read(end - start))
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                tensors[name] = t.reshape(info["shape"])
            return tensors
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_torch_weights(path: str) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state dict, loaded without running pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a checkpoint (torch.load: {type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path}: not a checkpoint (not a state dict of tensors)")
    return state
