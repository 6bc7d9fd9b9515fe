"""CPU seconds and resident memory of a process tree (a process and all its descendants), read from ``/proc``.

A server may be one process or a supervisor with children (an engine, frontends). The tree is
found by walking the ``ppid`` field of every ``/proc/<pid>/stat``. Its CPU time is, summed over
every live process in it, ``utime + stime`` (all threads) plus ``cutime + cstime``: the time of
children that process has already reaped. A child that ended during a measurement is therefore
still counted, in its parent's ``cutime``, and nothing is counted twice (a process leaves the live
set when it is reaped, which is when its time moves into the parent's). Differences of
``tree_cpu_seconds`` at two moments are the tree's CPU seconds in between.

``tree_cpu_seconds_by_role`` splits the same sum by a process's role (``process_role``): the
engine (the one process whose ``/proc/<pid>/maps`` lists libtensorflow, found once by
``find_engine``), the frontends (the root's other ``multiprocessing`` spawn children, the
resource tracker excepted) and other (the rest: the root when it is a supervisor, the tracker,
a stderr filter). In a one-process server the root is the engine and does the frontends' work
too. A child reaped during a measurement moves its time into its parent's role.

``tree_thread_ticks`` reads the same tree thread by thread, with each thread's name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

PROC = "/proc"
ROLES = ("engine", "frontends", "other")
# The argument ``multiprocessing``'s spawn start method gives every child it starts, and the
# module that marks its resource tracker (started the same way but no worker).
SPAWN_CHILD_ARG = "--multiprocessing-fork"
RESOURCE_TRACKER = "resource_tracker"
TENSORFLOW_LIBRARY = "libtensorflow"


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` used here; times in clock ticks."""

    pid: int
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        """This process's CPU time plus that of the children it has reaped."""
        return self.utime + self.stime + self.cutime + self.cstime


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed; None when the process is gone."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces or ")"; the fields follow the last ")".
    # After it (man 5 proc, 1-based): state 3, ppid 4, utime 14, stime 15, cutime 16, cstime 17.
    fields = raw.rsplit(b")", 1)[1].split()
    return ProcStat(pid, int(fields[1]), int(fields[11]), int(fields[12]), int(fields[13]), int(fields[14]))


def _all_stats() -> dict[int, ProcStat]:
    stats: dict[int, ProcStat] = {}
    for name in os.listdir(PROC):
        if name.isdigit() and (stat := read_stat(int(name))) is not None:
            stats[stat.pid] = stat
    return stats


def _tree(root: int, stats: dict[int, ProcStat]) -> list[ProcStat]:
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.append(stats[pid])
            todo.extend(children.get(pid, ()))
    return found


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant (root first); [] when ``root`` is gone."""
    return [s.pid for s in _tree(root, _all_stats())]


def tree_cpu_seconds(root: int) -> float | None:
    """CPU seconds used so far by ``root``, its live descendants and the children they reaped; None if gone."""
    tree = _tree(root, _all_stats())
    if not tree:
        return None
    return sum(s.ticks for s in tree) / os.sysconf("SC_CLK_TCK")


def read_cmdline(pid: int) -> list[str]:
    """The arguments of ``pid``; [] when it is gone or a zombie."""
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [arg.decode("utf-8", "replace") for arg in raw.split(b"\0")[:-1]]


def loads_tensorflow(pid: int) -> bool:
    """Whether ``pid`` has TensorFlow's shared library mapped (False when it is gone)."""
    try:
        with open(f"{PROC}/{pid}/maps", "rb") as f:
            return any(TENSORFLOW_LIBRARY.encode() in line for line in f)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def find_engine(root: int) -> int | None:
    """The first process in ``root``'s tree (root first) that loads TensorFlow; None if none does."""
    return next((pid for pid in tree_pids(root) if loads_tensorflow(pid)), None)


def process_role(pid: int, ppid: int, cmdline: Sequence[str], root: int, engine: int | None) -> str:
    """The role (one of ``ROLES``) of process ``pid`` with parent ``ppid`` in the tree of ``root``."""
    if pid == engine:
        return "engine"
    spawned = SPAWN_CHILD_ARG in cmdline and not any(RESOURCE_TRACKER in arg for arg in cmdline)
    return "frontends" if ppid == root and pid != root and spawned else "other"


def tree_cpu_seconds_by_role(root: int, engine: int | None) -> dict[str, float] | None:
    """``tree_cpu_seconds`` split by ``process_role``, every role present; None if ``root`` is gone."""
    tree = _tree(root, _all_stats())
    if not tree:
        return None
    ticks = dict.fromkeys(ROLES, 0)
    for s in tree:
        ticks[process_role(s.pid, s.ppid, read_cmdline(s.pid), root, engine)] += s.ticks
    return {role: t / os.sysconf("SC_CLK_TCK") for role, t in ticks.items()}


def _thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """Each live thread of ``pid``: ``tid -> (name, utime + stime ticks)``; the main thread is named ``main``."""
    threads: dict[int, tuple[str, int]] = {}
    try:
        tids = os.listdir(f"{PROC}/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return threads
    for tid in map(int, tids):
        try:
            with open(f"{PROC}/{pid}/task/{tid}/comm", "rb") as f:
                name = f.read().decode("utf-8", "replace").strip()
            with open(f"{PROC}/{pid}/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        threads[tid] = ("main" if tid == pid else name, int(fields[11]) + int(fields[12]))
    return threads


def tree_thread_ticks(root: int, engine: int | None) -> dict[tuple[str, int, int], tuple[str, int]]:
    """Every live thread of ``root``'s tree: ``(role, pid, tid) -> (thread name, CPU ticks)``.

    The name is what the OS shows (``/proc/<pid>/task/<tid>/comm``): the server names its own
    threads (``service/threads.py``), TensorFlow, ZeroMQ and gRPC name some of theirs, and the
    rest show the process's name. A thread's ticks are its own only (no reaped children), and a
    thread that ends takes its ticks out of every later reading.
    """
    out: dict[tuple[str, int, int], tuple[str, int]] = {}
    for s in _tree(root, _all_stats()):
        role = process_role(s.pid, s.ppid, read_cmdline(s.pid), root, engine)
        for tid, (name, ticks) in _thread_ticks(s.pid).items():
            out[(role, s.pid, tid)] = (name, ticks)
    return out


def rss_kb(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in KiB; None when the process is gone or has no memory (a zombie)."""
    try:
        with open(f"{PROC}/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None
