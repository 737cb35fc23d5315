"""bench.py runs end to end on toy sizes and reports every key the issue asks for. No timing is
asserted: on a toy model and a shared CPU the numbers mean nothing, only that they exist."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["train_speedup", "train_mem_ratio", "vision_speedup", "decode_speedup", "decode_speedup_tiny",
        "packing_efficiency", "train_gemm_fraction", "decode_roofline_fraction", "train_step_speedup"]


def test_bench_quick_reports_every_key():
    cmd = [sys.executable, "bench.py", "--preset", "tiny", "--quick", "--json", "--threads", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    for k in KEYS:
        assert math.isfinite(out[k]) and out[k] > 0, (k, out[k])
    assert out["packing_efficiency"] <= 1 and out["train_gemm_fraction"] <= 1
    assert out["threads"] == 1 and out["torch"] and out["machine"]
    # both sides computed the same first loss: the comparison is like with like
    assert math.isclose(out["train"]["ours"]["loss0"], out["train"]["hf"]["loss0"], rel_tol=1e-4)
    assert out["train"]["ours"]["trainable"] == out["train"]["hf"]["trainable"]
    # the global-batch step: ours packed into fewer micro-batches, the same loss (dropout off)
    step = out["train_step"]
    assert step["ours"]["micro_batches"] < step["hf"]["micro_batches"] == out["global_batch"]
    assert math.isclose(step["ours"]["loss_no_dropout"], step["hf"]["loss_no_dropout"], rel_tol=1e-4)
    assert "train_step_mfu" not in out                    # GPU only
    import gpu_check                                      # what the one GPU command keeps of it
    kept = gpu_check.step_result(out)
    assert kept["speedup"] == out["train_step_speedup"] and kept["top_ops"] and kept["mfu"] is None
    assert out["decode"]["1"]["tokens_agree"] >= 0.5      # same greedy tokens (up to near-ties)
    # the table went to stderr
    assert "| train_speedup |" in r.stderr
