"""
How a run ends when something goes wrong: one named line from the process that saw the fault,
a preemption that finishes the step and saves, and nothing raw on the terminal.

  - Signals: SIGTERM (a cluster's preemption, torchrun passing one on) and SIGINT (Ctrl-C) never
    interrupt a step. During set-up they stop the run at once (nothing to save yet); in the loop
    they are noted, and at the next step every rank learns that one of them got a signal
    (StepGate): all finish the step they are in, `last` is saved once, one line says how to
    resume, and every rank exits with 128 + the signal's number -- 143 for SIGTERM, 130 for
    SIGINT -- so `&&` chains and schedulers see an unfinished stage. (torchrun gives its ranks
    30 s after passing a signal on before it kills them; a save must fit in that.) More signals
    change nothing; SIGKILL or SIGQUIT stop at once.
  - The launcher's death: a rank started by torchrun watches its parent; when the launcher dies
    (even by kill -9), the rank sends itself SIGTERM, so it saves and ends as above instead of
    running on unowned (and colliding with a --resume started meanwhile).
  - Faults seen by one rank (an image missing or truncated, a DataLoader worker killed) are
    agreed on at the next step (StepGate): that rank names it, the others stop quietly.
  - report() turns an exception into the one line and the exit code: the error's own message
    (every rank's, but a rank other than 0 stays silent when rank 0 says the same, compared
    through torchrun's store), a line for a collective that timed out (train.py's
    --collective-timeout), silence for a collective that failed because another process
    ended (that one says why), and None for a bug (its traceback is worth more).
  - safe_output(): control characters (escape sequences, carriage returns, bidi overrides) in
    paths, task names or records reach the terminal escaped, never raw.
"""
import os
import re
import signal
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A signal stopped the run (a BaseException, as KeyboardInterrupt: no `except Exception`
    on the way may swallow it). .code: the exit code, 128 + the signal's number."""

    def __init__(self, signum, message, agreed=False):
        super().__init__(message)
        self.code, self.agreed = 128 + signum, agreed    # agreed: every rank stops, rank 0 says why


class Quiet(Exception):
    """This process stops because another one failed, and that one says why."""


# ----------------------------------------------------------------------------------------------
# Signals and the launcher's death

class _State:
    received = 0             # the signal number noted, 0 = none
    deferred = False         # in the loop: note it for the step's end; else stop at once
    why = ""                 # what sent it, when we know better than its number
    launcher = 0             # the pid of the launcher whose death sent it, 0 = not that


STATE = _State()


def _handler(signum, frame):
    if STATE.deferred:
        STATE.received = STATE.received or signum
        return
    raise Stopped(signum, f"stopped by {signal_name(signum)}{STATE.why} during set-up, before "
                  "any step of this run: nothing to save")


def signal_name(signum):
    return signal.Signals(signum).name


class signals:
    """`with signals():` SIGTERM and SIGINT as the module docstring says (main thread only),
    the previous handlers back on leaving; under torchrun, the launcher watched."""

    def __enter__(self):
        STATE.received, STATE.deferred, STATE.why, STATE.launcher = 0, False, "", 0
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, _handler) for s in SIGNALS}
        if "TORCHELASTIC_RUN_ID" in os.environ:
            watch_parent()
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        STATE.deferred = False


def watch_parent(every=1.0):
    """A daemon thread that sends this process SIGTERM when its parent (the launcher) dies:
    the parent pid changes when the process is re-parented. (Polling rather than
    PR_SET_PDEATHSIG, which fires when the *thread* that started us ends, and is Linux only.)"""
    parent = os.getppid()

    def watch():
        stop = threading.Event()
        while not stop.wait(every):
            if os.getppid() != parent:
                STATE.why, STATE.launcher = launcher_died(parent), parent
                os.kill(os.getpid(), signal.SIGTERM)
                return
    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def signal_follows(wait=1.0):
    """Whether a SIGTERM/SIGINT arrives within `wait` s: a scheduler signals every process of a
    job, and a DataLoader worker may end on its (batching.py) before this process notes its own."""
    deadline = time.monotonic() + wait
    while not STATE.received and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(STATE.received)


def launcher_died(pid):
    return f" (the launcher, pid {pid}, died)"


# ----------------------------------------------------------------------------------------------
# The step's agreement

class StepGate:
    """Once per step, before the step's own collectives: every rank says whether fetching its
    share failed, whether it got a signal and whether its launcher's death sent it (one
    all-reduce of 3 x world numbers: any rank can say why another one stopped). A fault:
    the rank that saw it raises it, the others raise Quiet. A signal: `save()` (once: not if
    this step is saved already), then Stopped on every rank. Creating the gate puts signals in
    the loop's mode (noted, not raised)."""

    def __init__(self, rank, world, where):
        self.rank, self.world, self.where = rank, world, where
        STATE.deferred = True

    def next(self, batches, step, save, saved_step):
        """The step's batch from `batches` (an iterator), once every rank agrees to go on.
        `saved_step()`: the step `last` holds now (save() is skipped when it is `step`)."""
        fault, batch = None, None
        try:                             # after a signal, no batch: its workers may be gone
            batch = None if STATE.received else next(batches)
        except Exception as e:           # a decode error, a DataLoader worker killed
            fault = e
            if "DataLoader worker" in str(e) and signal_follows():
                fault = None             # the signal that ended the worker is this process's too
        flags = [0.0] * (3 * self.world)
        flags[self.rank] = float(fault is not None)
        flags[self.world + self.rank] = float(STATE.received)
        flags[2 * self.world + self.rank] = float(STATE.launcher)
        if dist.is_initialized():
            from distributed import all_sum
            flags = all_sum(*flags)
        if any(flags[:self.world]):
            raise fault or Quiet("another process failed")
        signals_seen = [(r, int(s)) for r, s in enumerate(flags[self.world:2 * self.world]) if s]
        if signals_seen:
            rank, signum = signals_seen[0]
            if saved_step() != step:
                save()
            held = saved_step()
            kept = (f"saved {self.where} (step {step})" if held == step else
                    f"{self.where} holds step {held}" if held is not None else "no checkpoint to resume")
            who = f" on rank {rank}" if self.world > 1 else ""
            launcher = int(flags[2 * self.world + rank])
            why = launcher_died(launcher) if launcher else ""
            raise Stopped(signum, f"stopped by {signal_name(signum)}{who}{why} "
                          f"after step {step}: {kept}; continue with --resume (same flags)", agreed=True)
        return batch


class Fault:
    """What a DataLoader worker returns in place of a batch that failed: the message travels
    whole (an exception raised in a worker comes back wrapped in its traceback), and the main
    process raises it as `kind` (a data.DataError: batching.Batches does), so the step's
    agreement sees it as this rank's fault."""

    def __init__(self, message, kind):
        self.message, self.kind = message, kind

    def error(self):
        return self.kind([], 0, "", self.message)


# ----------------------------------------------------------------------------------------------
# The one line

PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "communicator was aborted", "ProcessGroupNCCL is aborted", "Socket closed")


def report(e, rank, world, named, timeout_s=None):
    """Print the one line for exception `e` (see the module docstring) and return the exit
    code; None when `e` is a bug to re-raise. `named`: the exception types whose message is the
    line (RunError, DataError, CheckpointError, OSError...); `timeout_s`: the collective timeout
    the run set (--collective-timeout), named when a collective timed out."""
    if isinstance(e, Stopped):
        if not e.agreed:                 # this rank's own signal, during set-up
            announce(str(e), rank, world)
        elif rank == 0:
            print(str(e), file=sys.stderr, flush=True)
        return e.code
    if isinstance(e, Quiet):
        return announce("", rank, world)
    if isinstance(e, named):
        return announce(f"error: {e}", rank, world)
    text = str(e)
    if isinstance(e, RuntimeError) and "DataLoader worker" in text:
        return announce(f"error: {worker_death(text)}", rank, world)
    if isinstance(e, RuntimeError) and world > 1:
        if re.search(r"[Tt]imed? ?out|[Tt]imeout", text):
            return announce(f"error: rank {rank}: no answer from another process for "
                            f"{timeout_s or 'the collective timeout of'} s (one stalled, or "
                            "stopped): stopping. Raise --collective-timeout if a step or a save "
                            "legitimately takes longer", rank, world, compare=False)
        if any(p in text for p in PEER_GONE):
            return announce("", rank, world)
    return None


def worker_death(text):
    """torch's message for a DataLoader worker that died, as one line that says what to do."""
    first = text.strip().splitlines()[0]
    return (f"{first.rstrip('.')}: a process decoding images died (out of memory? killed?); "
            "lower --workers, or free memory, then --resume")


def announce(line, rank, world, compare=True, wait=3.0):
    """Print `line` (empty: nothing) on stderr and return 2. A rank other than 0 prints only when
    rank 0's line differs (both post theirs in torchrun's store; it waits `wait` s for rank
    0's), so an error every rank meets is printed once; its line says which rank it is."""
    store = _store()
    if store is not None:
        try:
            store.set(f"livr/fault/{rank}", line)
        except Exception:
            store = None
    if line and rank and world > 1 and compare and store is not None:
        try:
            store.wait(["livr/fault/0"], timedelta(seconds=wait))
            if store.get("livr/fault/0").decode("utf-8", "replace") == line:
                return 2
        except Exception:           # rank 0 said nothing (yet): this line is news
            pass
    if line:
        if rank and world > 1 and f"rank {rank}:" not in line:
            line = (line.replace("error: ", f"error: rank {rank}: ", 1) if line.startswith("error: ")
                    else f"rank {rank}: {line}")
        print(line, file=sys.stderr, flush=True)
    return 2


def _store():
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# The terminal

# C0/C1 controls but newline and tab, bidi overrides, and lone surrogates (an undecodable file
# name comes in as one; a UTF-8 stream would refuse to write it)
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def escape(text, at_start_ok="\r"):
    """`text` with control characters written as \\xNN / \\uNNNN (newlines and tabs kept; a
    carriage return only as the first character, where a progress line redraws itself)."""
    head = text[0] if text[:1] == at_start_ok else ""
    return head + CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text[len(head):])


class SafeStream:
    """A text stream that writes through escape(); everything else is the stream's own."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(escape(text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def safe_output():
    """Make sys.stdout and sys.stderr escape control characters (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SafeStream):
            setattr(sys, name, SafeStream(stream))
