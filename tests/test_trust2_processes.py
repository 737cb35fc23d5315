"""Trust, round 2 (issue 23), the cases about processes and signals: SIGINT/SIGTERM end a run
after its step with one save and one line (exit 128 + the signal), a killed DataLoader worker is
one line in training and costs evaluation nothing, and through torchrun with real signals: a
SIGTERM on one rank stops every rank, the launcher's death ends the ranks after a save, a
stalled rank times out with a message, and an image missing on rank 1 only is named by rank 1.
The fixtures and helpers are test_trust2.py's."""
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import batching
import checkpoint
import data
import evaluate
import rundir
import tiny
import train
from test_trust2 import ROOT, demo, fails_with, metric_steps, run_args, stage1, trainer_step  # noqa: F401,F811 (fixtures)

OUR_FRAMES = re.compile(r'File ".*/(train|rundir|faults|batching|checkpoint|checks|data|images|distributed)\.py"')

# --- 8. signals: one save, one line, the documented exit code -----------------------------------

def test_sigint_finishes_the_step_saves_once_and_says_how_to_resume(demo, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"

    def interrupt(r, rec):
        if rec.get("step") == 2:
            os.kill(os.getpid(), signal.SIGINT)       # Ctrl-C in the middle of the run
    with pytest.raises(SystemExit) as e:
        train.main(run_args(demo, run, "--epochs", "10", "--save-every", "50"),
                   train.Hooks(on_step=[interrupt]))
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    last = run / "stage1" / "last"
    assert err.strip() == f"stopped by SIGINT after step 2: saved {last} (step 2); continue with --resume (same flags)"
    assert trainer_step(last) == 2 and metric_steps(run) == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # a scheduler's SIGTERM reaches every process, DataLoader workers too (sent by another
    # process, not their parent): the same ending, exit 143
    earlier = {p.pid for p in multiprocessing.active_children()}     # other tests' processes

    def preempt(r, rec):
        if rec.get("step") == 3:
            pids = [p.pid for p in multiprocessing.active_children() if p.pid not in earlier]
            assert pids, "no DataLoader worker"
            subprocess.run(["kill", "-TERM", *map(str, pids), str(os.getpid())], check=True)
    with pytest.raises(SystemExit) as e:
        train.main(run_args(demo, run, "--epochs", "10", "--resume", "--workers", "1"),
                   train.Hooks(on_step=[preempt]))
    err = capsys.readouterr().err
    assert e.value.code == 143 and err.strip() == (f"stopped by SIGTERM after step 3: saved {last} (step 3); "
                                                   "continue with --resume (same flags)")
    assert trainer_step(last) == 3 and metric_steps(run) == [1, 2, 3]
    # during set-up (a long data check, say) it stops at once: nothing to save yet
    real = train.read_data

    def slow_setup(*a):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)
    monkeypatch.setattr(train, "read_data", slow_setup)
    fails_with(run_args(demo, tmp_path / "r2"), capsys, "stopped by SIGTERM during set-up", code=143)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --- 9. faults of worker processes: one named line, no lost results ------------------------------

def kill_workers():
    for p in multiprocessing.active_children():
        os.kill(p.pid, signal.SIGKILL)
        p.join()


def test_a_killed_dataloader_worker_is_one_line_in_training(demo, tmp_path, capsys):
    def kill(r, rec):
        if rec.get("step") == 1:
            kill_workers()
    with pytest.raises(SystemExit) as e:
        train.main(run_args(demo, tmp_path / "r", "--workers", "1", "--epochs", "4"), train.Hooks(on_step=[kill]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert re.fullmatch(r"error: DataLoader worker \(pid.*\) (exited unexpectedly|is killed by signal: Killed)"
                        r": a process decoding images died \(out of memory\? killed\?\); lower --workers, "
                        r"or free memory, then --resume\n", err), err


def test_a_killed_dataloader_worker_costs_evaluation_nothing(demo, stage1, tmp_path, monkeypatch, capsys):
    lines = open(demo["test"]).read().splitlines() * 6
    f = tmp_path / "d" / "test.jsonl"
    shutil.copytree(os.path.dirname(demo["test"]), tmp_path / "d")
    f.write_text("\n".join(lines) + "\n")
    real, calls = evaluate.generate_batch, [0]

    def generate(*a, **k):
        calls[0] += 1
        if calls[0] == 1:
            kill_workers()
        return real(*a, **k)
    monkeypatch.setattr(evaluate, "generate_batch", generate)
    out = evaluate.main(["--checkpoint", str(stage1 / "stage1" / "last"), "--data", str(f), "--workers", "1",
                         "--batch-size", "1", "--max-new-tokens", "2", "--attention-samples", "0",
                         "--out", str(tmp_path / "e")])
    samples = out["checkpoints"][0]["samples"]
    assert len(samples) == len(lines) and all(s["error"] is None for s in samples)
    assert "making the remaining batches in this process" in capsys.readouterr().err



# --- 7, 8, 9, 11 through torchrun: real processes, real signals ----------------------------------

def launch(argv, script=os.path.join(ROOT, "train.py")):
    """torchrun with 2 processes in a process group of its own (the test ends it by its id)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", tiny.free_port(), script, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rank_pids(launcher, timeout=300):
    """{rank: pid} of the launcher's worker processes, once both exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read()
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == launcher.pid:
                rank = [e[5:] for e in env if e.startswith(b"RANK=")]
                if rank:
                    found[int(rank[0])] = int(pid)
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("the ranks never started")


def wait_for(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def logged_steps(run):
    try:
        return metric_steps(run)
    except (OSError, ValueError, KeyError):
        return []


def finish(launcher, timeout=300):
    """The launcher's whole output once every process of its group has ended; whatever is
    left of the group is killed, by the group's id."""
    try:
        out, _ = launcher.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return out


def no_traceback_of_ours(out):
    assert not OUR_FRAMES.search(out), out[-5000:]


@pytest.fixture()
def long_run(demo, tmp_path):
    """The argv of a 2-process stage-1 run that lasts far longer than any test waits."""
    return run_args(demo, tmp_path / "run", "--epochs", "1000", "--save-every", "1000")


def test_sigterm_on_one_rank_stops_every_rank_after_its_step(long_run, tmp_path):
    run = tmp_path / "run"
    launcher = launch(long_run)
    try:
        ranks = rank_pids(launcher)
        wait_for(lambda: len(logged_steps(run)) >= 1, "a step")
        os.kill(ranks[1], signal.SIGTERM)
    finally:
        out = finish(launcher)
    stopped = re.findall(r"stopped by SIGTERM on rank 1 after step (\d+): saved (\S+) \(step \d+\); "
                         r"continue with --resume", out)
    assert len(stopped) == 1, out[-5000:]
    step = int(stopped[0][0])
    assert stopped[0][1] == str(run / "stage1" / "last") and trainer_step(run / "stage1" / "last") == step
    assert logged_steps(run) == list(range(1, step + 1))
    assert "exitcode  : 143" in out or "exitcode: 143" in out.replace("  ", " ")
    no_traceback_of_ours(out)


def test_the_launchers_death_ends_the_ranks_after_a_save(long_run, tmp_path):
    run = tmp_path / "run"
    launcher = launch(long_run)
    try:
        ranks = rank_pids(launcher)
        wait_for(lambda: len(logged_steps(run)) >= 1, "a step")
        os.kill(launcher.pid, signal.SIGKILL)             # the launcher alone, as an OOM killer would
        wait_for(lambda: not any(alive(p) for p in ranks.values()), "the ranks to end", timeout=120)
    finally:
        out = finish(launcher)
    assert re.search(rf"stopped by SIGTERM on rank \d \(the launcher, pid {launcher.pid}, died\) after "
                     r"step \d+: saved", out), out[-5000:]
    assert checkpoint.is_complete(str(run / "stage1" / "last"))
    rundir.lock(str(run / "stage1" / ".lock"))            # free: a --resume may start now
    no_traceback_of_ours(out)


def test_rank_zero_names_the_launchers_death_another_rank_saw_first(monkeypatch):
    """The ranks watch their launcher each on its own clock: when rank 1 notices its death
    first, rank 0's one line still says why (the gate's all-reduce carries the launcher's pid)."""
    import distributed
    import faults
    monkeypatch.setattr(faults.dist, "is_initialized", lambda: True)
    # what the all-reduce of 2 ranks gives: no fault, a SIGTERM on rank 1 only, rank 1's launcher
    monkeypatch.setattr(distributed, "all_sum", lambda *xs: [0.0, 0.0, 0.0, 15.0, 0.0, 4321.0])
    with faults.signals():
        gate = faults.StepGate(0, 2, "RUN/stage1/last")
        with pytest.raises(faults.Stopped) as e:
            gate.next(iter([]), 7, lambda: None, lambda: 7)
    assert e.value.code == 143 and str(e.value) == ("stopped by SIGTERM on rank 1 (the launcher, pid 4321, "
                                                    "died) after step 7: saved RUN/stage1/last (step 7); "
                                                    "continue with --resume (same flags)")


def test_a_worker_ended_by_the_jobs_signal_first_is_the_signal_not_a_fault():
    """A scheduler signals every process of the job: a DataLoader worker may end (quietly, on its
    SIGTERM) before this process notes its own -- the step then stops as a signal does, with a
    save; a worker that dies with no signal behind it is still the fault it is."""
    import threading

    import faults

    def dead_worker():
        raise RuntimeError("DataLoader worker (pid(s) 4321) exited unexpectedly")
        yield

    saves = []
    with faults.signals():
        gate = faults.StepGate(0, 1, "RUN/stage1/last")
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(faults.Stopped) as e:
            gate.next(dead_worker(), 5, lambda: saves.append(5), lambda: saves[-1] if saves else 4)
    assert e.value.code == 143 and saves == [5] and "after step 5: saved RUN/stage1/last (step 5)" in str(e.value)
    with faults.signals():
        gate = faults.StepGate(0, 1, "RUN/stage1/last")
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            gate.next(dead_worker(), 5, lambda: None, lambda: 4)


def test_a_stalled_rank_times_out_with_a_message(long_run, tmp_path):
    run = tmp_path / "run"
    launcher = launch(long_run + ["--collective-timeout", "5"])
    try:
        ranks = rank_pids(launcher)
        wait_for(lambda: len(logged_steps(run)) >= 1, "a step")
        os.kill(ranks[1], signal.SIGSTOP)                 # hung, as a stuck file system would
        wait_for(lambda: not alive(ranks[0]), "rank 0 to give up", timeout=120)
        os.kill(ranks[1], signal.SIGCONT)
    finally:
        out = finish(launcher)
    assert out.count("error: rank 0: no answer from another process for 5.0 s") == 1, out[-5000:]
    no_traceback_of_ours(out)


RANK1_IMAGE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import train
victim = sys.argv[2]

def remove(run, rec):        # after step 1 on rank 0: rank 1 reads the image at step 3
    if run.rank == 0 and rec.get("step") == 1:
        os.remove(victim)
train.main(sys.argv[3:], train.Hooks(on_step=[remove]))
"""


def test_an_image_missing_on_rank_1_only_is_named_by_rank_1(demo, tmp_path):
    shutil.copytree(os.path.dirname(demo["train"]), tmp_path / "d")
    train_file = str(tmp_path / "d" / "train.jsonl")
    records = data.load_dataset(train_file)
    steps = {r: list(batching.StepSampler(len(records), 4, r, 2, 42, 0, 3)) for r in (0, 1)}
    seen_before = set(steps[0][1] + steps[0][2] + steps[1][1])
    victim = next(i for i in steps[1][2] if i not in seen_before)
    script = tmp_path / "wrap.py"
    script.write_text(RANK1_IMAGE)
    args = run_args(demo, tmp_path / "run", "--epochs", "3")
    args[args.index("--data") + 1] = train_file
    launcher = launch([ROOT, records[victim].images[0], *args], script=str(script))
    out = finish(launcher)
    assert out.count("error: ") == 1, out[-5000:]
    assert f"error: rank 1: {records[victim].where}: image {records[victim].images[0]}: file not found" in out
    assert "Connection reset" not in out and "Connection closed" not in out
    no_traceback_of_ours(out)
