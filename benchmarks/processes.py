"""CPU time and peak memory of local processes, read from /proc (Linux).

A server started here is a process family: the serving process and, once something is written, its write process
(`flight_server/transport/offload.py`), a child that runs puts, deletes, compactions and online refresh planning.
What a server costs is what the whole family costs, so the figures here count every member.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple


class Process(NamedTuple):
    parent: int
    cpu_s: float  # user + system time of the process and of its children that it reaped


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state, parent, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def processes() -> dict[int, Process]:
    """Every process now running (zombies too), with its parent and CPU seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):  # ended meanwhile
                fields = _stat(entry)
                found[int(entry)] = Process(int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return found


def family(pid: int, table: dict[int, Process] | None = None) -> list[int]:
    """`pid` and its descendants (first `pid`), from `table` or from the processes running now."""
    table = processes() if table is None else table
    children: dict[int, list[int]] = {}
    for child, process in table.items():
        children.setdefault(process.parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += sorted(children.get(found[-1], []), reverse=True)
    return found


def family_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of `pid` and its descendants. A descendant that ended counts once its parent
    reaped it (the kernel adds it to the parent's children's times, which count here too); one that ended and was
    not reaped yet counts as it stands."""
    table = processes()
    return sum(table[p].cpu_s for p in family(pid, table) if p in table)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of the process `pid` alone (not its children)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process's user + system CPU seconds (its threads', not its children's)."""
    times = os.times()
    return times.user + times.system


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident memory so far (VmHWM), or None when it is gone or /proc does not say."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None
