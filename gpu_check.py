"""
One command that checks a GPU machine end to end, within --budget seconds (530 by default, so
it ends within 9 minutes on one H100/H200), and writes one summary:

    python gpu_check.py                   # everything; results in $OUT if set, else runs/gpu_check/
    python gpu_check.py --dry-run         # the plan and the summary, nothing run (any machine)
    python gpu_check.py --parts demo --limit demo=480     # one part, with the time to finish

The parts, in this order, each run as subprocesses with a time limit of its own (--limit),
which later parts' limits are reserved from: a slow or hung part cannot eat the others, and a
part that ends early leaves its time to the next. Each logs to OUT/logs/PART.log.
  cuda_tests    pytest -q -rfEs tests/test_cuda.py tests/test_flex.py, as three processes side by
                side (the torchrun tests, the other CUDA tests, the flex tests)
  step_blocks   bench.py --preset 3b --json --only train_step: one optimizer step of the paper's
                global batch of 8, ours next to transformers (MFU, speedup, peak memory, the
                step's top ops), on today's per-sample attention
  step_flex     the same with --attention flex (attention.py): the measurement that picks the GPU default
  step_compile  the same with --compile
  demo          torchrun --nproc_per_node 1 train.py --stage 1, then --stage 2, then evaluate.py
                --device cuda: wall time and per-task accuracy; cut short, how far each stage got
                and its own ETA (the demo took about 6 minutes at the last measurement, so within
                the default budget it is measured, not finished)
The 3B's random checkpoint is written once (bench.write_checkpoint), beside the CUDA tests, in a
temporary directory that is removed at the end -- nothing large goes under OUT.
OUT gets summary.json, summary.md (machine: device, torch, CUDA, transformers, Python, commit;
each part's status, time and result) and the logs, no more. Without CUDA every part but the
tests is skipped with the reason, and the summary is still written (tests/test_gpu_check.py).
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
BUDGET = 530                    # seconds for the whole check
MIN_START = 30                  # a part left less time than this (and than its limit) is skipped
LIMITS = {"cuda_tests": 180, "step_blocks": 90, "step_flex": 80, "step_compile": 120, "demo": 60}
NEEDS_CUDA = {"step_blocks", "step_flex", "step_compile", "demo"}
# what the machine runs on, read in a subprocess so that this one never holds a CUDA context
PROBE = """import importlib.metadata, json, platform, torch
d = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
         transformers=importlib.metadata.version("transformers"),
         cuda_available=torch.cuda.is_available())
if d["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    d.update(device=p.name, gpus=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
             gpu_memory_gb=round(p.total_memory / 2**30, 1))
print(json.dumps(d))"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", help="summary.json, summary.md and logs/ (default: $OUT, else runs/gpu_check)")
    p.add_argument("--parts", default=",".join(LIMITS), help="comma-separated parts (default: %(default)s)")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                   help=f"a part's own time limit (defaults: {LIMITS})")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds for everything (default: %(default)s)")
    p.add_argument("--preset", default="3b", choices=["3b", "4b"], help="bench.py's shapes for the step parts")
    p.add_argument("--commit", help="the commit checked, where the tree has no .git (a copied working tree)")
    p.add_argument("--dry-run", action="store_true", help="run nothing: the plan and the summary only")
    a = p.parse_args(argv)
    a.parts = [x for x in a.parts.split(",") if x]
    a.limits = dict(LIMITS)
    for spec in a.limit:
        name, _, sec = spec.partition("=")
        if name not in LIMITS or not re.fullmatch(r"\d+(\.\d*)?", sec):
            p.error(f"--limit {spec!r}: expected PART=SECONDS with PART one of {list(LIMITS)}")
        a.limits[name] = float(sec)
    if set(a.parts) - set(LIMITS):
        p.error(f"--parts: unknown {sorted(set(a.parts) - set(LIMITS))}; choose from {list(LIMITS)}")
    a.parts = [x for x in LIMITS if x in a.parts]            # always in the order above
    return a


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------
# The plan: each part's lanes (run side by side), each lane's commands (run one after another)

def plan(args, tmp, cuda):
    """{part: {lane: [argv, ...]}}; the 3B checkpoint is written beside the tests only on a GPU."""
    pytest = [PY, "-m", "pytest", "-q", "-rfEs"]      # -r: failures, errors and skips, with reasons
    ckpt = os.path.join(tmp, f"checkpoint-{args.preset}")
    step = [PY, "bench.py", "--preset", args.preset, "--json", "--only", "train_step", "--checkpoint", ckpt]
    run = os.path.join(tmp, "demo")
    evaluate = [PY, "evaluate.py", "--checkpoint", os.path.join(run, "stage2", "final"), "--data",
                os.path.join(run, "data", "test.jsonl"), "--out", os.path.join(run, "eval"), "--device", "cuda"]
    torchrun = lambda *a: [PY, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "--master_port", free_port(), "train.py", *a]
    steps = {"step_blocks", "step_flex", "step_compile"}
    write = (f"import os, torch, bench; os.replace(bench.write_checkpoint({args.preset!r}, "
             f"{ckpt + '.part'!r}, torch.bfloat16), {ckpt!r})")     # bench.py's dtype on a GPU
    return {
        "cuda_tests": {"tests: torchrun": [pytest + ["tests/test_cuda.py", "-k", "torchrun"]],
                       "tests: other CUDA": [pytest + ["tests/test_cuda.py", "-k", "not torchrun"]],
                       "tests: flex": [pytest + ["tests/test_flex.py"]],
                       # not a test: the step parts' checkpoint, written while the tests run
                       "checkpoint": [[PY, "-c", write]] if cuda and set(args.parts) & steps else []},
        "step_blocks": {"step": [step]},
        "step_flex": {"step": [step + ["--attention", "flex"]]},
        "step_compile": {"step": [step + ["--compile"]]},
        "demo": {"demo": [torchrun("--stage", "1", "--run-dir", run),
                          torchrun("--stage", "2", "--run-dir", run), evaluate]},
    }


# ----------------------------------------------------------------------------------------------
# Running: subprocesses in their own process groups, stopped whole at the deadline

def run_command(argv, timeout, env):
    """argv from the repository root, stopped (its whole process group) after `timeout` s.
    Returns {argv, rc (None: timed out), seconds, stdout, stderr}."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             start_new_session=True, text=True)
        try:
            rc = p.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            rc = None
            stop(p)
        seconds = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        return dict(argv=argv, rc=rc, seconds=round(seconds, 1), stdout=out.read(), stderr=err.read())


def stop(p):
    """End the process group this check started for p (torchrun's workers, bench's workers)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(lanes, limit, env):
    """The lanes side by side, all within `limit` seconds; in a lane, a command that fails or
    times out ends the lane. Returns {lane: [command records]}."""
    deadline = time.monotonic() + limit
    records = {name: [] for name in lanes}

    def lane(name):
        for argv in lanes[name]:
            rec = run_command(argv, deadline - time.monotonic(), env)
            records[name].append(rec)
            if rec["rc"] != 0:
                break
    threads = [threading.Thread(target=lane, args=(name,)) for name in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def status(records, lanes=None):
    """ok, failed or timeout over the records of the given lanes (default: all)."""
    recs = [r for name, rs in records.items() if lanes is None or name in lanes for r in rs]
    if any(r["rc"] is None for r in recs):
        return "timeout"
    return "ok" if recs and all(r["rc"] == 0 for r in recs) else "failed"


def write_log(path, records):
    with open(path, "w") as f:
        for name, recs in records.items():
            for r in recs:
                rc = "timed out" if r["rc"] is None else f"exit {r['rc']}"
                f.write(f"===== [{name}] $ {shlex.join(r['argv'])}\n===== {rc} after {r['seconds']} s\n")
                f.write(r["stdout"] + ("\n----- stderr\n" + r["stderr"] if r["stderr"] else "") + "\n")


# ----------------------------------------------------------------------------------------------
# Reading the results out of each part's output

def tests_result(records):
    """pytest's counts, the failed tests and the skip reasons, over every pytest process."""
    counts, failed, skipped = {}, [], []
    for r in records:
        text = r["stdout"] + r["stderr"]
        final = [line for line in text.splitlines()      # "3 passed, 1 skipped in 9.1s"
                 if re.search(r"\d+ (passed|failed|skipped|errors?)\b.* in ", line)]
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", (final or [""])[-1]):
            what = "errors" if what.startswith("error") else what
            counts[what] = counts.get(what, 0) + int(n)
        failed += re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
        skipped += re.findall(r"^SKIPPED \[\d+\] (.*)$", text, re.M)
    return {**counts, "failed_tests": failed, "skip_reasons": sorted(set(skipped))}


def step_result(r):
    """What the summary keeps of bench.py's JSON (--only train_step)."""
    ts = r["train_step"]
    o, h = ts["ours"], ts["hf"]
    return {"mfu": r.get("train_step_mfu"), "mfu_transformers": r.get("train_step_mfu_hf"),
            "speedup": r["train_step_speedup"], "gemm_fraction": r["train_step_gemm_fraction"],
            "attention_fraction": o["attention_fraction"], "step_s": o["step_s"],
            "step_s_transformers": h["step_s"], "samples_per_s": o["samples_per_s"],
            "peak_mb": o["peak_mb"], "step_mb": o["step_mb"], "peak_mb_transformers": h["peak_mb"],
            "step_mb_transformers": h["step_mb"], "loss_no_dropout": o["loss_no_dropout"],
            "loss_no_dropout_transformers": h["loss_no_dropout"],
            "micro_batches_per_step": o["micro_batches"] / o["samples"] * r["global_batch"],
            "flops_per_step": ts.get("flops_per_step"), "top_ops": o["top_ops"], "machine": r["machine"],
            "attention": r.get("attention", "blocks"), "compiled": r.get("compiled")}


def demo_result(records, run_dir):
    """Wall time of each command; per stage, the last step it logged and its ETA; the per-task
    accuracy from evaluate.py's results.json when it got that far."""
    out = {"seconds": {}, "progress": {}}
    for name, r in zip(("stage1", "stage2", "evaluate"), records):
        out["seconds"][name] = r["seconds"]
        steps = re.findall(r"^step (\d+)/(\d+) \|.*\| ETA (\S+)$", r["stdout"], re.M)
        if steps:
            step, total, eta = steps[-1]
            out["progress"][name] = {"step": int(step), "of": int(total), "eta": eta, "done": r["rc"] == 0}
    out["wall_s"] = round(sum(out["seconds"].values()), 1)
    results = os.path.join(run_dir, "eval", "results.json")
    if os.path.exists(results):
        with open(results) as f:
            last = json.load(f)["checkpoints"][-1]
        acc, chance = last["accuracy"], last["chance"]
        out.update(accuracy=acc, chance=chance, mean=last["mean"], chance_mean=last["chance_mean"],
                   min_points_above_chance=min(a - chance[t] for t, a in acc.items()))
    return out


def result(name, records, tmp):
    """The part's result from its records: what it measured, and where a command failed, the
    end of its error output; output that cannot be read says why."""
    bad = [r for rs in records.values() for r in rs if r["rc"] != 0]       # failed or timed out
    tail = {"error_tail": (bad[0]["stderr"] or bad[0]["stdout"]).strip().splitlines()[-3:]} if bad else {}
    try:
        if name == "cuda_tests":
            tests = tests_result([r for lane, rs in records.items() if lane.startswith("tests") for r in rs])
            ck = records.get("checkpoint") or []
            return {**tests, "checkpoint": status({"checkpoint": ck}) if ck else "not needed"}
        if name == "demo":
            return {**demo_result(records["demo"], os.path.join(tmp, "demo")), **tail}
        (rec,) = records["step"]
        return step_result(json.loads(rec["stdout"])) if rec["rc"] == 0 else tail
    except (KeyError, ValueError, IndexError, TypeError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}", **tail}


# ----------------------------------------------------------------------------------------------
# The machine, the summary, and the loop over the parts

def machine(args):
    """Python, torch, CUDA, transformers, the GPU (a subprocess reads them: this process never
    holds a CUDA context), the CPU count, nvidia-smi's line, the commit."""
    try:
        probe = subprocess.run([PY, "-c", PROBE], capture_output=True, text=True, timeout=120)
        info = json.loads(probe.stdout)
    except (ValueError, subprocess.TimeoutExpired) as e:
        info = {"probe_failed": f"{e}"}
    info.update(cpus=os.cpu_count(), host=os.uname().nodename, commit=args.commit or git_commit())
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip()
    return info


def git_commit():
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")      # tracked files changed
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here: pass --commit)"


def brief(name, part):
    """A part's result in one line of the markdown table."""
    r = part.get("result") or {}
    if part["status"] == "skipped":
        return part["reason"]
    line = ("" if "unreadable" in r or not r else tests_line(r) if name == "cuda_tests" else
            demo_line(r) if name == "demo" else step_line(r) if "step_s" in r else "")
    line += f"; output not readable: {r['unreadable']}" if "unreadable" in r else ""
    line += "; error: " + " / ".join(r["error_tail"]) if r.get("error_tail") else ""
    return line.strip("; ").replace("|", "\\|")


def tests_line(r):
    counts = ", ".join(f"{r[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if r.get(k))
    return counts + "".join(f"; FAILED {t}" for t in r["failed_tests"]) + f"; 3B checkpoint: {r['checkpoint']}"


def demo_line(r):
    ran = ", ".join(f"{k} {v} s" for k, v in r["seconds"].items())
    cut = "; ".join(f"{k} at step {p['step']}/{p['of']}, ETA {p['eta']}"
                    for k, p in r["progress"].items() if not p["done"])
    line = f"wall {r['wall_s']} s ({ran})" + (f"; cut short: {cut}" if cut else "")
    if "mean" in r:
        line += (f"; mean accuracy {r['mean']:.1f}% (chance {r['chance_mean']:.1f}%): "
                 + ", ".join(f"{t} {a:.1f}%" for t, a in r["accuracy"].items())
                 + f"; every task >= {r['min_points_above_chance']:.1f} points above chance")
    return line


def step_line(r):
    gb = lambda mb: f"{mb / 1024:.1f} GB"
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%} (transformers {r['mfu_transformers']:.1%})"
    return (f"MFU {mfu}; {r['speedup']:.2f}x transformers; step {r['step_s']:.2f} s vs "
            f"{r['step_s_transformers']:.2f} s; peak {gb(r['peak_mb'])} (step +{gb(r['step_mb'])}) vs "
            f"{gb(r['peak_mb_transformers'])}; matmul {r['gemm_fraction']:.0%}, attention "
            f"{r['attention_fraction']:.0%}; top: " + ", ".join(f"{k} {x:.0%}" for k, x, _ in r["top_ops"][:4]))


def write_summary(s, out):
    """OUT/summary.json (everything) and OUT/summary.md (the machine, a table of the parts, and
    the step variants against step_blocks: what picks --attention's GPU default)."""
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    m = s["machine"]
    lines = [f"# GPU check: {m.get('device', 'no CUDA device')}, commit {m['commit']}", "",
             f"{s['started']}; torch {m.get('torch')} (CUDA {m.get('cuda')}), transformers "
             f"{m.get('transformers')}, Python {m.get('python')}; {m.get('gpus', 0)} GPU(s), {m['cpus']} CPUs; "
             f"{m.get('nvidia_smi', '')}", "",
             f"budget {s['budget_s']:.0f} s, took {s.get('wall_s', 0):.0f} s"
             + (" (dry run: nothing ran)" if s["dry_run"] else ""), "",
             "| part | status | seconds | limit | result |", "|---|---|---:|---:|---|"]
    lines += [f"| {name} | {p['status']} | {p.get('seconds', '')} | {p.get('limit_s', '')} | {brief(name, p)} |"
              for name, p in s["parts"].items()]
    steps = {n: p["result"] for n, p in s["parts"].items() if "step_s" in (p.get("result") or {})}
    for name in ("step_flex", "step_compile"):
        if name in steps and "step_blocks" in steps:
            a, b = steps[name]["step_s"], steps["step_blocks"]["step_s"]
            lines.append(f"\n{name} against step_blocks: {b / a:.2f}x the speed "
                         f"({a:.3f} s vs {b:.3f} s a step)")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    s = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "budget_s": args.budget,
         "dry_run": args.dry_run, "machine": machine(args), "parts": {}}
    tmp = tempfile.mkdtemp(prefix="gpu_check.")
    try:
        run_parts(args, s, out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(out, "summary.md")) as f:
        print(f.read())
    return s


def run_parts(args, s, out, tmp):
    """The parts in order. Part i must end by the sum of its own and the earlier parts' limits
    (capped at --budget): time a part leaves goes to the next, a slow one cannot take the later
    parts' time. A part that cannot run is skipped with the reason and reserves nothing."""
    t0 = time.monotonic()
    cuda = s["machine"].get("cuda_available", False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lanes, end = plan(args, tmp, cuda or args.dry_run), 0.0
    for name in args.parts:
        part = s["parts"][name] = {"commands": [shlex.join(c) for cs in lanes[name].values() for c in cs],
                                   "limit_s": args.limits[name]}
        why = ("dry run" if args.dry_run else
               "needs a CUDA device; this machine has none" if name in NEEDS_CUDA and not cuda else None)
        if why is None:
            end = min(end + args.limits[name], args.budget)
            limit = round(end - (time.monotonic() - t0), 1)
            short = limit < min(MIN_START, args.limits[name])      # less than it needs to start
            why = f"only {max(limit, 0):.0f} s left of --budget" if short else None
        if why:
            part.update(status="skipped", reason=why)
        else:
            started = time.monotonic()
            records = run_part(lanes[name], limit, env)
            write_log(os.path.join(out, "logs", f"{name}.log"), records)
            part.update(status=status(records, [n for n in records if n != "checkpoint"]), limit_s=limit,
                        seconds=round(time.monotonic() - started, 1), log=f"logs/{name}.log",
                        result=result(name, records, tmp))
        s["wall_s"] = round(time.monotonic() - t0, 1)
        write_summary(s, out)            # after every part: a killed check keeps what it measured


if __name__ == "__main__":
    main()
