"""Several nodes, one recipe: two torchrun "nodes" of one process each, joined by one c10d
rendezvous on this machine, train as one node of two processes; HSDP over 4 processes
(--shard-size: shard within a node, replicate across nodes, on a 2-D device mesh) trains as
plain FSDP, through a save and a --resume. gloo on CPU, the tiny demo base, 3 steps of 8."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import tiny
import train
from demo import make_demo_base, make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    base = make_demo_base(str(root / "base"))
    splits = make_synthetic(str(root / "data"), n_train=6, n_val=1, n_test=1, seed=3)
    return dict(base=base, train=str(splits["train"]))


def common(demo, run_dir, *extra):
    """No --val: validation would only add passes and saves to what is compared (the losses)."""
    return ["--model", demo["base"], "--data", demo["train"], "--run-dir", str(run_dir),
            "--stage", "1", "--train", "full", "--latents", "4", "--epochs", "1", "--global-batch", "8",
            "--log-every", "100", *extra]


def metrics(run_dir):
    with open(os.path.join(run_dir, "stage1", "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def launch(commands, logs, timeout=300):
    """Start every command at once (the nodes of one job), wait for all; a failure or a hang
    raises with the end of each one's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    files = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT) for c, f in zip(commands, files)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    tails = "\n".join(f"--- {log}:\n{open(log).read()[-3000:]}" for log in logs)
    assert codes == [0] * len(procs), f"exit codes {codes}\n{tails}"


def node(n, port, argv):
    """One node of a 2-node job: torchrun with a c10d rendezvous at localhost:port. Node 0 hosts
    the rendezvous store (is_host: both nodes are this machine, so the hostname cannot say)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
            "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
            "--rdzv-id", "livr-test", "--rdzv-conf", f"is_host={int(n == 0)},join_timeout=120",
            os.path.join(ROOT, "train.py"), *argv]


@pytest.fixture(scope="module")
def one_node(demo, tmp_path_factory):
    """The reference: plain FSDP, one node of two processes, 3 steps (shared by both tests:
    FSDP's losses do not depend on the number of processes, test_train.py checks 2 against 1)."""
    run = tmp_path_factory.mktemp("one-node")
    out = tiny.torchrun(2, os.path.join(ROOT, "train.py"), *common(demo, run), timeout=300)
    assert "mesh shard 2" in out
    return run


def same_run(a, b):
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)


def test_two_nodes_equal_one_node_of_two(demo, one_node, tmp_path):
    port = tiny.free_port()
    argv = common(demo, tmp_path / "nodes")
    launch([node(0, port, argv), node(1, port, argv)], [tmp_path / "node0.log", tmp_path / "node1.log"])
    assert "mesh shard 2" in (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    same_run(metrics(one_node), metrics(tmp_path / "nodes"))


def test_hsdp_equals_fsdp_through_save_and_resume(demo, one_node, tmp_path):
    """HSDP over 4 processes (--shard-size 2: 2 replicas of 2 shards) against plain FSDP, stopped
    after step 2 (a save gathered from the 2-D mesh) and resumed (weights and AdamW state set back
    into it): the same losses, gradient norms and final weights."""
    script = os.path.join(ROOT, "train.py")
    out = tiny.torchrun(4, script, *common(demo, tmp_path, "--shard-size", "2", "--max-steps", "2"), timeout=300)
    assert "mesh replicate 2 x shard 2" in out and len(metrics(tmp_path)) == 2
    out = tiny.torchrun(4, script, *common(demo, tmp_path, "--shard-size", "2", "--resume"), timeout=300)
    assert "mesh replicate 2 x shard 2" in out and "resumed" in out
    same_run(metrics(one_node), metrics(tmp_path))
    # step 3's update used the restored AdamW moments: the final weights agree too
    fsdp, _ = checkpoint.load_livr(str(one_node / "stage1" / "final"))
    hsdp, _ = checkpoint.load_livr(str(tmp_path / "stage1" / "final"))
    want, got = checkpoint.trainable_state(fsdp), checkpoint.trainable_state(hsdp)
    assert want.keys() == got.keys() and len(want) > 10
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), k


def test_shard_size_must_divide_the_processes(demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(common(demo, tmp_path, "--shard-size", "3"))
    assert e.value.code == 2
    assert "--shard-size 3 does not divide the 1 processes" in capsys.readouterr().err
