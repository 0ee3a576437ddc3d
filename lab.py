"""The lessons' runs: each a train.py stage from a shared SFT model, evaluated on the built-in task, and kept
under a digest of its settings so that any lesson finds it again (experiments.py holds the lessons)."""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys

import torch
from tqdm import tqdm

import checkpoint
import config
import data
import dataset
import metrics
import task
import train

SEEDS = (1337, 1, 2, 3, 4, 5, 6, 7, 8, 9)
# What the SFT stage depends on: runs that agree on these share it.
SFT_KEYS = ("data", "task_p_correct", "task_heldout", "task_dev", "task_max_operand", "task_demos", "eval_fraction", "seed", "n_layer",
            "n_head", "n_embd", "block_size", "dropout", "bias", "sft_init", "sft_iters", "sft_lr", "batch_size",
            "grad_accum", "weight_decay", "beta1", "beta2", "grad_clip", "warmup_iters", "device")


# Settings added after the lessons' runs were first kept: left out of a run's settings while at their
# default, so that the runs kept before them stay found.
LATER_KEYS = ("value", "score_field", "score_threshold", "score_noise", "score_weight")


def settings_of(cfg: config.TrainConfig) -> dict:
    """cfg's settings as a run is keyed by: all but out_dir (and LATER_KEYS at their defaults)."""
    defaults = config.TrainConfig()
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k != "out_dir" and not (k in LATER_KEYS and v == getattr(defaults, k))}


def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def content_sha256(path: str) -> str:
    """What a file, or a directory's files (a Hugging Face checkpoint), hold, whatever their name."""
    if not os.path.isdir(path):
        return dataset.file_sha256(path)
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    return digest({f: dataset.file_sha256(os.path.join(path, f)) for f in files})


def contents(cfg: config.TrainConfig, keys: tuple[str, ...]) -> dict:
    """The content digests of the files cfg's `keys` name (a data file, a start checkpoint): a file replaced
    at the same path makes new runs."""
    return {f"{key}_sha256": content_sha256(getattr(cfg, key)) for key in keys
            if getattr(cfg, key) not in (*task.TASKS, "scratch", "sft")}


def strict(obj):
    """obj with NaN (a group absent at an iteration, say) as None: strict JSON has no NaN nor infinity."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_json(path: str, obj) -> None:
    """As strict JSON, through a temporary file: a kill mid-write never leaves half a file."""
    checkpoint.write_atomic(path, lambda f: f.write(json.dumps(strict(obj), indent=1, allow_nan=False).encode()))


@contextlib.contextmanager
def claimed(out_dir: str, wait: bool = True):
    """Hold the lock of a run's (or SFT stage's) folder: lessons started side by side on one out_dir (or one
    lesson's --jobs) train each shared run once. Yields True once held; with wait=False, False at once if
    another process holds it. The lock files live in out_dir/locks/ (a weighed run's folder may be removed);
    the operating system releases the lock of a process that dies."""
    parent, name = os.path.split(out_dir)
    locks = os.path.join(os.path.dirname(parent), "locks")
    os.makedirs(locks, exist_ok=True)
    with open(os.path.join(locks, f"{os.path.basename(parent)}-{name}.lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        yield held


class Lab:
    """One lesson's runs: each a train.py stage from the shared SFT model of its seed, then evaluated.

    Runs live in out_dir/runs/, named by a digest of all their settings: a run is trained once, whichever
    lesson asks for it first, and a changed setting makes a new run."""

    def __init__(self, lesson: str, base: config.TrainConfig, seeds: int, device: torch.device, run_file: str | None = None,
                 parent: int | None = None):
        self.lesson, self.base, self.seeds, self.device = lesson, base, SEEDS[:seeds], device
        # A --jobs helper's parent process: the helper trains the lesson's runs and ends at save(), leaving the
        # tables and figures to its parent; it ends too if the parent is gone.
        self.parent = parent
        self.run_file = run_file  # a weighed run's result.json, for the value lesson to draw
        self.dir = os.path.join(base.out_dir, lesson)  # the lesson's table and figure
        self.dirs: dict[tuple[str, int], str] = {}  # (run name, seed) -> its folder in out_dir/runs
        os.makedirs(self.dir, exist_ok=True)

    def sft(self, cfg: config.TrainConfig, wait: bool = True) -> str | None:
        """The path of the SFT checkpoint for cfg's data and seed, trained on first use; None if wait is False
        and another process is training it."""
        key = {k: getattr(cfg, k) for k in SFT_KEYS}
        out_dir = os.path.join(self.base.out_dir, "sft", f"{digest({**key, **contents(cfg, ('data', 'sft_init'))})}-seed{cfg.seed}")
        os.makedirs(out_dir, exist_ok=True)
        sft_cfg = config.TrainConfig(**key, out_dir=out_dir, resume=True, loss="sft", init_from="scratch")
        with claimed(out_dir, wait) as held:  # a second process waits, then resumes the finished stage: nothing to train
            if not held:
                return None
            _, d = train.prepare(sft_cfg)
            init = None if cfg.sft_init == "scratch" else cfg.sft_init
            train.train_stage(sft_cfg, "sft", "sft", init, cfg.sft_iters, "sft_lr", d.sft, 0, 1, self.device, progress=False)
        return os.path.join(out_dir, "sft.pt")

    def run(self, name: str, seed: int, weigh: bool = False, wait: bool = True, **overrides) -> dict | None:
        """Train one run (loss and settings from overrides) and evaluate it; cached in its result.json. With
        wait=False, None at once if another process holds the run or its SFT stage.

        loss="none" evaluates the SFT start itself; loss="control" trains train.py's control (SFT continued
        from the SFT start on the main loss's completions). weigh: also record z, weight and `saturated` of every
        training example at the start, the middle and the end (the saturation lesson)."""
        start_only, control = overrides.get("loss") == "none", overrides.get("loss") == "control"
        cfg = dataclasses.replace(self.base, seed=seed, resume=True, control=False,
                                  **{k: v for k, v in overrides.items() if not (k == "loss" and (start_only or control))})
        settings = settings_of(cfg)
        settings.update(contents(cfg, ("data", "sft_init", "init_from")))  # the files' content, not only their names
        key = digest({**settings, "start_only": start_only, "weigh": weigh, **({"control": True} if control else {})})
        out_dir = os.path.join(self.base.out_dir, "runs", f"{key}-seed{seed}")
        self.dirs[name, seed] = out_dir
        with claimed(out_dir, wait) as held:
            return self.train_run(name, seed, cfg, settings, out_dir, start_only, control, weigh, wait) if held else None

    def train_run(self, name: str, seed: int, cfg: config.TrainConfig, settings: dict, out_dir: str, start_only: bool,
                  control: bool, weigh: bool, wait: bool) -> dict | None:
        """Lab.run's work, under the run's lock: its kept result (or divergence), or train_new's."""
        path = os.path.join(out_dir, "result.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    return json.load(f)
            except ValueError:  # cut short by an older version's kill mid-write: the run is finished again
                print(f"note: {path} is unreadable; its run is resumed and evaluated again", file=sys.stderr)
        try:
            return self.train_new(name, seed, cfg, settings, out_dir, start_only, control, weigh, wait)
        except train.Diverged as e:  # kept like a result: the same settings diverge again, and are not retrained
            result = {"name": name, "seed": seed, "settings": settings, "diverged": e.code}
            os.makedirs(out_dir, exist_ok=True)
            write_json(path, result)
            return result

    def train_new(self, name: str, seed: int, cfg: config.TrainConfig, settings: dict, out_dir: str, start_only: bool,
                  control: bool, weigh: bool, wait: bool) -> dict | None:
        """A run trained and evaluated, its result.json written (None if wait is False and another process is
        training its SFT stage)."""
        path = os.path.join(out_dir, "result.json")
        cfg = dataclasses.replace(cfg, out_dir=out_dir)
        config.check_config(cfg)
        init = None if cfg.init_from == "scratch" else self.sft(cfg, wait)
        if init is None and cfg.init_from != "scratch":
            return None  # another process is training the SFT stage: this run comes later
        if weigh and os.path.isdir(out_dir):  # unfinished: a checkpoint past a stop would be weighed in its place
            shutil.rmtree(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        cfg, d = train.prepare(cfg)
        result = {"name": name, "seed": seed, "settings": settings, "start_only": start_only, "control": control, "report": d.report,
                  "lambda_d": cfg.lambda_d, "lambda_u": cfg.lambda_u, "n_main": len(d.main),
                  "n_flipped": sum(u.tag == "flipped" for u in d.main)}
        if start_only:
            model = checkpoint.build_model(cfg, init, self.device)
            dev = [{"iter": 0, **task.utility(model, d.dev, cfg.eval_samples, seed, self.device, cfg.eval_tokens)}] if d.dev else []
        else:
            # Training stops at each point to weigh the examples, then resumes (resume=True), as if never stopped.
            stops = (0, cfg.max_iters // 2, cfg.max_iters) if weigh else (cfg.max_iters,)
            stage, loss, units = ("control", "sft", d.control) if control else (cfg.loss, cfg.loss, d.main)
            for stop in stops:
                model = train.train_stage(cfg, stage, loss, init, stop, "lr", units, 0, 1, self.device, progress=False, dev=d.dev)
                if weigh:
                    result.setdefault("weights", {})[str(stop)] = weigh_examples(model, cfg, d.main, init, self.device)
            dev = [{"iter": r["iter"], **r["dev"]} for r in read_rows(out_dir) if "dev" in r]
        # the test prompts' utility, and the dev curve (utility_interval) that settings are chosen by
        result.update(task.utility(model, d.heldout, cfg.eval_samples, seed, self.device, cfg.eval_tokens), dev=dev)
        if cfg.score_weight == "margin":  # the weight the margins give examples the rater mislabelled, against the others
            result["margin_weight"] = {tag: sum(u.weight for u in d.main if u.tag == tag) / n for tag in ("clean", "flipped")
                                       if (n := sum(u.tag == tag for u in d.main))}
        if cfg.contradict:  # what became of the contradicted prompts, against the others of training
            tagged = {}
            for u in d.main:
                tagged.setdefault(data.get_tokenizer().decode(u.prompt), set()).add(u.tag)
            for group in ("contradicted", "clean"):
                prompts = [p for p, tags in tagged.items() if tags == {group}]
                result[f"greedy_{group}_prompts"] = task.evaluate(model, prompts, 1, 0.0, seed, self.device, cfg.eval_tokens)
        write_json(path, result)
        return result

    def runs(self, plan: list[tuple[str, dict]], weigh: bool = False, diverged_ok: bool = False) -> dict[str, list[dict]]:
        """Every (name, overrides) of the plan for every seed, under one progress bar. diverged_ok: a run whose
        training stopped being finite gives {"diverged": its error line} instead of ending the lesson with it."""
        done: dict[tuple[str, int], dict] = {}
        bar = tqdm(total=len(plan) * len(self.seeds), desc=self.lesson, unit="run", dynamic_ncols=True)

        def attempt(name: str, seed: int, overrides: dict, wait: bool) -> None:
            if self.parent is not None and os.getppid() != self.parent:
                raise SystemExit(1)  # a helper whose parent is gone: nobody will read its runs' tables
            bar.set_postfix_str(f"{name} seed {seed}")
            result = self.run(name, seed, weigh, wait, **overrides)
            if result is not None:
                if "diverged" in result and not diverged_ok:
                    raise train.Diverged(result["diverged"])
                done[name, seed] = result
                bar.update(1)

        # Sweeps over the runs not done yet, passing over those another process holds (a lesson side by side, or
        # --jobs); a sweep that finds every one held waits for the first, so no process idles behind another.
        pending = [(name, seed, overrides) for seed in self.seeds for name, overrides in plan]
        while pending:
            for name, seed, overrides in pending:
                attempt(name, seed, overrides, wait=False)
            left = [(name, seed, overrides) for name, seed, overrides in pending if (name, seed) not in done]
            if left and len(left) == len(pending):
                attempt(*left[0], wait=True)
            pending = [(name, seed, overrides) for name, seed, overrides in left if (name, seed) not in done]
        bar.close()
        return {name: [done[name, seed] for seed in self.seeds] for name, _ in plan}

    def rows(self, name: str, seed: int) -> list[dict]:
        """The training rows of one run, one per iteration."""
        return [row for row in read_rows(self.dirs[name, seed]) if "loss" in row]

    def save(self, numbers: dict) -> None:
        """The lesson's numbers to out_dir/LESSON/LESSON.json; a --jobs helper ends here instead (every lesson
        saves once its runs are done)."""
        if self.parent is not None:
            raise SystemExit(0)
        path = os.path.join(self.dir, f"{self.lesson}.json")
        write_json(path, numbers)
        print(f"numbers: {path}")


def read_weighed(path: str) -> dict:
    """A run's result.json with its examples weighed (the saturation lesson's runs); else one error line."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --run={path}: {e}") from None
    if not isinstance(result, dict) or "weights" not in result:
        raise SystemExit(f"error: --run={path}: expected the result.json of a weighed run (the saturation lesson prints one)")
    return result


def read_rows(out_dir: str) -> list[dict]:
    """Every row of a run's metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@torch.no_grad()
def weigh_examples(model: torch.nn.Module, cfg: config.TrainConfig, units: list[data.Tokens], init: str | None,
                   device: torch.device) -> dict[str, list]:
    """z, the Prop. 4.1 weight, its share of the peak, `saturated` and `right` (kto.side_stats) of the training
    examples under `model` (KTO), in whole batches taken in order, and each one's group."""
    reference = checkpoint.build_model(cfg, init, device).eval()
    model.eval()
    out: dict[str, list] = {key: [] for key in (*metrics.EXAMPLE_KEYS, "group")}
    for number, indices in enumerate(data.eval_batches(len(units), cfg.batch_size)):
        batch = train.load_batch(units, indices, number, cfg, "kto", 0, 1, device, None)
        _, stats = train.compute_loss(model, reference, batch, cfg, "kto")
        for key in metrics.EXAMPLE_KEYS:
            out[key] += stats[key].tolist()
        out["group"] += [metrics.group_of(data.TAGS.index(units[i].tag), units[i].desirable) for i in indices]
    model.train()
    return out
