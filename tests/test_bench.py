"""bench.py runs and prints its JSON line (what it measures is not asserted: timing belongs to the script)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_prints_its_json_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "bench.py", "--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8",
                             "--steps=2", "--warmup=1", "--profile=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert "aten::mm" in result.stdout.split("where 5 KTO steps spend their time")[1]  # the profile's table
    assert set(numbers) == {"sft_ms", "kto_ms", "kto_precomputed_ms", "ratio_kto", "ratio_kto_precomputed"}
    assert abs(numbers["ratio_kto"] - numbers["kto_ms"] / numbers["sft_ms"]) < 0.01
    for arg, said in (("--dtype=bfloat16", "error: dtype"), ("--steps=0", "error: --steps=0: expected at least 1"),
                      ("--batch_size=1", "error: --batch_size=1: expected at least 2"), ("--n_head=3", "error: --n_embd=128")):
        bad = subprocess.run([sys.executable, "bench.py", arg], cwd=ROOT, env=env, capture_output=True, text=True)
        assert bad.returncode != 0 and bad.stderr.startswith(said), bad.stderr
