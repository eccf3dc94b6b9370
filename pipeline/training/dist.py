"""Process-group setup for every launcher, and the preemption signal contract.

Launchers: `deepspeed` and `torchrun` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; the Slurm scripts
export the same (falling back to SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID when they do not); a bare `python`
run is a world of one. CPU runs use gloo (DS_ACCELERATOR=cpu), CUDA runs nccl: the same code path otherwise.

Signals: SIGTERM (Slurm's pre-preemption warning) and SIGUSR1 only set a flag. The loop checks it after each
optimizer step with an all-reduce, so every rank agrees on the step at which to stop, all ranks join the save,
and the process exits with EXIT_PREEMPTED (99, "preempted, resumable").

DeepSpeed's `deepspeed` command (launcher/runner.py) does not forward SIGTERM on one node: it dies (143) while its
child launcher/launch.py and the ranks would train on as orphans. So a rank started by it watches that chain of
launcher processes (`watch_launcher`) and treats the end of any of them as a stop request: checkpoint, exit 99.
launch.py itself, when signalled, SIGTERMs every process under it (ranks and DataLoader workers; the workers
ignore it, pipeline.data.loader.ignore_stop_signals) and SIGKILLs them 30 s later.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

EXIT_PREEMPTED = 99


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only writer of shared files (not every node's local rank 0)."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_extension_build_dir() -> str:
    """Point torch's JIT-extension cache (TORCH_EXTENSIONS_DIR) at a directory of this Python installation's own,
    unless it is set already; returns the directory.

    DeepSpeed's CPU backend compiles its shared-memory comm op (deepspeed_shm_comm: ~30 s of C++ on a quiet 2-core
    machine, 120-200 s under load) at every init_distributed, into torch's default cache, one directory per Python
    version (~/.cache/torch_extensions/py311_cpu) shared by every venv of the user. Its ninja command names the
    venv's include paths, so two installations (a checkout and a CI clone beside it) rebuild it each time they
    alternate, and every rank of a run waits on the build's lock file before the process group forms. Measured
    (issue 27, the "ZeRO-2 image-free rank hang" of llama_adapter/iaa): both ranks 150+ s in
    torch.utils.file_baton.FileBaton.wait under deepspeed.comm.torch.build_shm_op, no collective entered, while
    the other venv compiled; the 180 s test limit ran out. Keyed by sys.prefix: one build per installation."""
    env = os.environ
    if not env.get("TORCH_EXTENSIONS_DIR"):
        from torch.utils.cpp_extension import get_default_build_root

        device = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        venv = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
        tag = f"py{sys.version_info.major}{sys.version_info.minor}_{device}_{venv}"
        env["TORCH_EXTENSIONS_DIR"] = str(Path(get_default_build_root()) / tag)
    return env["TORCH_EXTENSIONS_DIR"]


def init_distributed(local_rank_arg: int | None = None) -> DistContext:
    env = os.environ
    own_extension_build_dir()
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", str(local_rank_arg or 0))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if int(env["WORLD_SIZE"]) > 1:
            raise RuntimeError(
                "WORLD_SIZE > 1 but MASTER_PORT is not set: launch with deepspeed/torchrun, or export "
                "MASTER_ADDR and MASTER_PORT (the Slurm scripts do)"
            )
        env["MASTER_PORT"] = str(_free_port())
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        env.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in env:
            # Ranks on one host share its cores; oversubscribed intra-op threads make every rank slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_per_host(env)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        if device.type == "cpu":
            release_shm_names(rank, world)
    return DistContext(rank, world, local, device)


def release_shm_names(rank: int, world: int) -> None:
    """Unlink this rank's DeepSpeed shm-comm segment name once every rank has mapped every segment (the barrier):
    DeepSpeed never unlinks it, so each CPU run on one host left 66 MB per rank in /dev/shm (11 GB after 81 runs
    on the development box). The mappings stay valid; the memory goes with the last process that maps it."""
    if world < 2 or os.environ.get("LOCAL_SIZE") != str(world):  # the op maps shm only when every rank is local
        return
    dist.barrier()
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def ranks_per_host(env: dict | os._Environ = os.environ) -> int:
    return max(1, int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env.get("SLURM_NTASKS_PER_NODE", 1)))))


@contextlib.contextmanager
def host_cores(device: torch.device) -> Iterator[int]:
    """On CPU, give this rank every core its host's ranks share while the others wait in a collective (the
    end-of-run evaluation runs on rank 0 alone: with its training share, 1 of 2 cores, it took 324 s of the
    demo_smollm2 run's wall, with both 210 s). The training share comes back on exit. No-op on CUDA, and when the
    user fixed OMP_NUM_THREADS. Yields the thread count in effect."""
    before = torch.get_num_threads()
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        yield before
        return
    torch.set_num_threads(min(os.cpu_count() or 1, before * ranks_per_host()))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def all_agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; read (collectively) by the loop at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}

    def install(self) -> PreemptionFlag:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def watch_launcher(self, interval: float = 0.5) -> list[int]:
        """Set the flag (as SIGTERM) when a DeepSpeed launcher process above this rank ends; returns their pids."""
        chain = launcher_chain()
        if not chain:
            return []
        ppid = os.getppid()

        def poll() -> None:
            while self.signum is None:
                if os.getppid() != ppid or not all(_alive(pid, start) for pid, start in chain):
                    self.signum = signal.SIGTERM
                    return
                time.sleep(interval)

        threading.Thread(target=poll, name="launcher-watch", daemon=True).start()
        return [pid for pid, _ in chain]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process from /proc (None: gone, or no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X") and st[2] == start


def launcher_chain() -> list[tuple[int, int]]:
    """(pid, start time) of the DeepSpeed launcher processes above this one: launch.py and the `deepspeed` runner
    that started it; empty when the parent is not DeepSpeed's launch.py (srun, torchrun, a shell)."""
    chain = []
    pid = os.getppid()
    while pid > 1 and len(chain) < 2 and "deepspeed" in _cmdline(pid):
        st = _stat(pid)
        if st is None:
            break
        chain.append((pid, st[2]))
        pid = st[1]
    return chain if chain and "deepspeed.launcher.launch" in _cmdline(chain[0][0]) else []


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; main() turns it into exit code 99."""
