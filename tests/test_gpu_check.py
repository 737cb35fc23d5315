"""gpu_check.py (the one command for a GPU machine) checked where there is no GPU: the dry run
writes the whole summary; every command it plans parses with its own program's flags; a part is
stopped at its limit, its process group with it, and the next part keeps its own time; pytest's
output is read back. No timed assertions: the limits are seconds against commands that would
run a minute. bench.py's JSON is read back in tests/test_bench.py, a real (tiny) demo run in the
slow test at the end."""
import argparse
import json
import os
import sys
import time

import pytest

import demo
import gpu_check

PY = sys.executable


def test_dry_run_writes_the_summary(tmp_path):
    s = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(s))
    assert list(saved["parts"]) == list(gpu_check.LIMITS) and saved["dry_run"]
    for name, part in saved["parts"].items():
        assert part["status"] == "skipped" and part["reason"] == "dry run" and part["commands"], name
    m = saved["machine"]
    assert {"python", "torch", "transformers", "cuda_available", "commit", "cpus"} <= set(m)
    md = (tmp_path / "summary.md").read_text()
    assert all(f"| {name} | skipped |" in md for name in gpu_check.LIMITS) and m["commit"] in md
    assert sorted(os.listdir(tmp_path)) == ["logs", "summary.json", "summary.md"]


class Parsed(Exception):
    """Raised in place of running a program once its parser accepted the command line."""


def parsed(main, argv, monkeypatch):
    """What argparse makes of argv in `main` (a program's main() that builds its own parser)."""
    real = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))
    with monkeypatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)
        mp.setattr(sys, "argv", argv)
        with pytest.raises(Parsed) as e:
            main()
    return e.value.args[0]


def gone(pid):
    """Whether process pid has ended (or is a zombie): polled for up to 10 s."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_every_planned_command_parses(tmp_path, monkeypatch):
    """Each part's commands: the scripts exist and accept every flag given (an unknown flag or
    value would exit 2 here), torchrun's too; the checkpoint writer's code compiles."""
    import bench
    import evaluate
    import train
    from torch.distributed.run import get_args_parser
    args = gpu_check.parse_args([])
    lanes = gpu_check.plan(args, str(tmp_path), cuda=True)
    seen = set()
    for part in lanes.values():
        for argv in (c for commands in part.values() for c in commands):
            assert argv[0] == PY
            if argv[1:3] == ["-m", "torch.distributed.run"]:
                ns = get_args_parser().parse_args(argv[3:])
                assert ns.nproc_per_node == "1" and ns.training_script == "train.py"
                a = train.parse_args(ns.training_script_args)
                seen.add(f"train.py --stage {a.stage}")
            elif argv[1] == "evaluate.py":
                assert evaluate.parse_args(argv[2:]).device == "cuda"
                seen.add("evaluate.py")
            elif argv[1] == "bench.py":
                a = parsed(bench.main, argv[1:], monkeypatch)
                assert a.preset == "3b" and a.only == "train_step" and a.json
                seen.add(f"bench.py attention={a.attention} compile={a.compile}")
            elif argv[1:3] == ["-m", "pytest"]:
                files = [x for x in argv if x.endswith(".py")]
                assert files and all(os.path.exists(os.path.join(gpu_check.ROOT, f)) for f in files)
                seen.add("pytest " + " ".join(files))
            else:
                assert argv[1] == "-c" and "bench.write_checkpoint" in argv[2]
                compile(argv[2], "checkpoint", "exec")
                seen.add("checkpoint")
    assert seen == {"train.py --stage 1", "train.py --stage 2", "evaluate.py", "checkpoint",
                    "bench.py attention=blocks compile=False", "bench.py attention=flex compile=False",
                    "bench.py attention=blocks compile=True", "pytest tests/test_cuda.py",
                    "pytest tests/test_flex.py"}


def test_a_part_is_stopped_at_its_limit_with_its_children(tmp_path):
    """A lane past the limit is stopped, the process it started too; in a lane, a failed command
    ends it; pytest's counts, failures and skip reasons are read from its output."""
    pid_file = tmp_path / "child.pid"
    spawn = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    records = gpu_check.run_part({"slow": [[PY, "-c", spawn]]}, 3, os.environ)
    assert records["slow"][0]["rc"] is None and gpu_check.status(records) == "timeout"
    assert gone(int(pid_file.read_text()))
    (tmp_path / "test_x.py").write_text("import pytest\ndef test_a(): pass\ndef test_b(): assert 0\n"
                                        "@pytest.mark.skip(reason='no reason')\ndef test_c(): pass\n")
    pytest = [PY, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    lanes = {"tests": [pytest + [str(tmp_path / "test_x.py")], [PY, "-c", "print('never')"]]}
    records = gpu_check.run_part(lanes, 120, os.environ)
    assert [r["rc"] for r in records["tests"]] == [1] and gpu_check.status(records) == "failed"
    r = gpu_check.tests_result(records["tests"])
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 1, 1)
    assert [t.split("::")[-1] for t in r["failed_tests"]] == ["test_b"]
    assert any("no reason" in x for x in r["skip_reasons"])


def test_a_slow_part_leaves_the_next_its_time(tmp_path, monkeypatch):
    """The first part hangs past its limit, the next still runs; a part that ends early leaves
    its time to the one after (60 s of its own + most of the 20 s before); the demo needs CUDA
    and says so; with too little --budget left a part is not started."""
    monkeypatch.setattr(gpu_check, "machine", lambda args: {"cuda_available": True, "cpus": 1, "commit": "x"})
    fake = {"cuda_tests": {"tests: hang": [[PY, "-c", "import time; time.sleep(120)"]]},
            "step_blocks": {"step": [[PY, "-c", "print('{}')"]]}, "step_flex": {"step": [[PY, "-c", "pass"]]},
            "demo": {"demo": [[PY, "-c", "pass"]]}}
    monkeypatch.setattr(gpu_check, "plan", lambda args, tmp, cuda: fake)
    s = gpu_check.main(["--out", str(tmp_path), "--parts", "cuda_tests,step_blocks,step_flex",
                        "--limit", "cuda_tests=2", "--limit", "step_blocks=20", "--limit", "step_flex=60"])
    tests, step, flex = (s["parts"][k] for k in ("cuda_tests", "step_blocks", "step_flex"))
    assert tests["status"] == "timeout" and step["status"] == flex["status"] == "ok"
    assert "unreadable" in step["result"] and flex["limit_s"] > 70
    assert (tmp_path / "logs" / "cuda_tests.log").exists() and (tmp_path / "logs" / "step_blocks.log").exists()
    monkeypatch.setattr(gpu_check, "machine", lambda args: {"cuda_available": False, "cpus": 1, "commit": "x"})
    s = gpu_check.main(["--out", str(tmp_path), "--parts", "cuda_tests,demo", "--budget", "10"])
    tests = s["parts"]["cuda_tests"]
    assert tests["status"] == "skipped" and "left of --budget" in tests["reason"]
    assert s["parts"]["demo"]["reason"].startswith("needs a CUDA device")


@pytest.mark.slow
def test_demo_part_reads_a_real_run(tmp_path):
    """A tiny demo run (stage 1, stage 2, evaluate; on CPU, a few steps) read back as the demo
    part reads the GPU demo: seconds per command, each stage's last logged step, the accuracy."""
    base = demo.make_demo_base(str(tmp_path / "base"))
    paths = demo.make_synthetic(str(tmp_path / "data"), n_train=2, n_val=0, n_test=1, seed=3)
    run = str(tmp_path / "run")
    common = ["--model", base, "--data", str(paths["train"]), "--run-dir", run, "--global-batch", "4",
              "--latents", "4", "--epochs", "1", "--log-every", "1"]
    lane = [[PY, "train.py", "--stage", "1", *common], [PY, "train.py", "--stage", "2", *common],
            [PY, "evaluate.py", "--checkpoint", os.path.join(run, "stage2", "final"), "--data",
             str(paths["test"]), "--out", os.path.join(run, "eval"), "--attention-samples", "0"]]
    records = gpu_check.run_part({"demo": lane}, 600, os.environ)
    assert gpu_check.status(records) == "ok", records["demo"][-1]["stderr"][-2000:]
    r = gpu_check.demo_result(records["demo"], run)
    assert set(r["seconds"]) == {"stage1", "stage2", "evaluate"} and r["wall_s"] > 0
    assert r["progress"]["stage1"] == {"step": 2, "of": 2, "eta": "0m00s", "done": True}
    assert set(r["accuracy"]) == set(demo.SYNTHETIC_TASKS) == set(r["chance"])
    assert r["min_points_above_chance"] == min(r["accuracy"][t] - r["chance"][t] for t in r["accuracy"])
