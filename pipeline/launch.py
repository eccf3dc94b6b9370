"""`deepspeed` with the preemption contract: a stop signal ends in a checkpoint and exit 99 (requeue).

    python -m pipeline.launch [deepspeed's arguments] pipeline/train.py [train.py's arguments]
    python -m pipeline.launch --num_gpus 2 --master_port 29501 pipeline/train.py --config demo
    pill-launch ...    (the same, as installed by pip)

The arguments are DeepSpeed's own (`deepspeed --help`); this runs its launcher (`deepspeed.launcher.runner`, what
the `deepspeed` command is) and returns its exit code. Why not `deepspeed` itself: on one node its runner does not
catch SIGTERM (it dies with 143 at once, whatever its ranks do next), and its child `launcher/launch.py` answers
SIGTERM by terminating the ranks and exiting 1 (DeepSpeed 0.19). So whichever way SIGTERM reaches a `deepspeed`
job (`kill PID`, `kill -- -PGID`, `timeout`, a batch system), its caller sees 143 or 1, never the ranks' 99, and a
requeue-on-99 script cannot tell a preemption from a crash.

Here the runner and everything under it run in a process group of their own, so a signal sent to this process
or to its process group (`kill`, `kill -- -PGID`, `timeout`) reaches only this process. SIGTERM and SIGUSR1 are
forwarded to the ranks alone (the children of launch.py), each once it has installed its handler (pipeline/train.py
does so first thing); the ranks finish their step, write the checkpoint together and exit 99; launch.py passes the
first non-zero exit code on, the runner passes launch.py's, and this process returns it: 99. SIGINT and SIGHUP go
to the whole group, as a terminal would send them (Ctrl-C stops the run at once, without a checkpoint). If this
process is killed outright (SIGKILL), the runner gets SIGTERM (PR_SET_PDEATHSIG) and dies; the ranks notice the
end of their launcher (PreemptionFlag.watch_launcher) and stop with a checkpoint as well.

One node only: a multi-node `--launcher pdsh|openmpi|...` run has no local ranks, so the signal goes to the runner
itself after FIND_RANKS_S (DeepSpeed's own handling, no exit 99); multi-node jobs start their ranks with srun
(slurm/), where each rank's 99 is the step's exit code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)  # to the ranks: checkpoint, exit 99
TO_GROUP = (signal.SIGINT, signal.SIGHUP)  # to every process of the run, as from a terminal
FIND_RANKS_S = 30.0  # no local rank this long after a signal: not a one-node run; the runner gets the signal
NO_HANDLER_S = 30.0  # a rank that has not caught the signal after this long is not pipeline/train.py: send anyway
PR_SET_PDEATHSIG = 1


def _in_own_group() -> None:
    """Runs in the runner's process between fork and exec: its own process group, and SIGTERM when we die."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: only the SIGKILL-of-this-process case loses its clean-up


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def local_ranks(runner_pid: int) -> tuple[list[psutil.Process], bool]:
    """(the rank processes under the runner: children of deepspeed.launcher.launch, whether a launch.py exists)."""
    try:
        below = psutil.Process(runner_pid).children(recursive=True)
    except psutil.Error:
        return [], False
    launchers = set()
    for p in below:
        try:
            if "deepspeed.launcher.launch" in " ".join(p.cmdline()):
                launchers.add(p.pid)
        except psutil.Error:
            continue
    ranks = []
    for p in below:
        try:
            if p.ppid() in launchers:
                ranks.append(p)
        except psutil.Error:
            continue
    return ranks, bool(launchers)


class Forwarder:
    """Signals received, and the ranks they have been passed to (a rank gets each stop request once)."""

    def __init__(self, runner_pid: int) -> None:
        self.runner_pid = runner_pid
        self.pending: int | None = None  # the first stop signal; later ones add nothing (the ranks are flagged)
        self.since = 0.0
        self.done: set[int] = set()
        self.to_group: list[int] = []

    def on_signal(self, signum: int, frame: object) -> None:
        if signum in TO_GROUP:
            self.to_group.append(signum)
        elif self.pending is None:
            self.pending, self.since = signum, time.monotonic()

    def step(self) -> None:
        while self.to_group:
            try:
                os.killpg(self.runner_pid, self.to_group.pop(0))
            except ProcessLookupError:
                pass
        if self.pending is None:
            return
        ranks, has_launcher = local_ranks(self.runner_pid)
        waited = time.monotonic() - self.since
        if not has_launcher and waited > FIND_RANKS_S and self.runner_pid not in self.done:
            self._send(self.runner_pid, "the runner (no local ranks)")
            return
        for p in ranks:
            if p.pid in self.done:
                continue
            try:
                # Between fork and exec a rank still has launch.py's handlers (a signal then would be lost).
                started = "deepspeed.launcher.launch" not in " ".join(p.cmdline())
                ready = started and (catches(p.pid, self.pending) or time.time() - p.create_time() > NO_HANDLER_S)
            except psutil.Error:
                continue
            if ready:
                self._send(p.pid, "rank")

    def _send(self, pid: int, what: str) -> None:
        self.done.add(pid)
        try:
            os.kill(pid, self.pending)
        except ProcessLookupError:
            return
        name = signal.Signals(self.pending).name
        print(f"pipeline.launch: {name} -> {what} {pid} (checkpoint, then exit 99)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    early: list[int] = []
    for s in FORWARDED + TO_GROUP:  # before the runner exists: kept and passed on once it does
        signal.signal(s, lambda signum, frame: early.append(signum))
    runner = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", *argv], preexec_fn=_in_own_group)
    fwd = Forwarder(runner.pid)
    for s in FORWARDED + TO_GROUP:
        signal.signal(s, fwd.on_signal)
    for s in early:
        fwd.on_signal(s, None)
    while True:
        try:
            rc = runner.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            fwd.step()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
