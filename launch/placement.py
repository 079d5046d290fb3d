"""Where the three processes run on a CPU host: the CPU lists of the --*-cpus flags and the layout
of `--pin auto` (launch/preflight.py checks the flags with it; launch/cli.py applies it).

`--pin auto`, when this server spawns both workers on CPU: the target on cores of its own, the
draft on the next ones, each on physical cores of its own where the host has enough (never two
workers on the SMT siblings of one core), and on cores of different last-level caches where the
host has two with room (an EPYC's core complexes, a second socket): each target forward streams
all its weights through its last-level cache, evicting the draft's. On the team's box (one 32 MiB
L3 for both cores; the demo target's weights are 48 MiB) the demo draft's output layer, its
largest matrix (4 MiB), took 0.41 ms for a step of four branches while cached, 0.94 ms right after
one of the draft's own steps, 1.2 ms once 16 MiB had gone through the cache: a draft step's
largest cost (not measured yet on a host with two caches).

The coordinator (one busy thread: 16-18% of a core at one client on the team's box, most of it
right after each verdict, and every block waits on it) gets a core of its own when the host has
one to spare, never an SMT sibling of the target's; else it shares the draft's cores, where the
draft runs at nice 10 (`worker_nice`) so the coordinator runs as soon as it wakes. On two cores
that sharing doubles a served draft step (one branch: 0.5 ms alone, 1.2 served), and the
coordinator pinned with the target instead made the whole run at 0.85x: a spare core is the
layout without either cost (not measured yet: the team's box has two cores).
"""

from __future__ import annotations

import os
from pathlib import Path

from specpipe.config import parse_cpus
from specpipe.launch.errors import UsageError

# Where the kernel lists the CPUs a process may be pinned to: the cgroup's cpuset (a container's
# share of the host), else every online CPU.
CPU_SOURCES = ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/devices/system/cpu/online")
# A CPU's SMT siblings (itself included), as the kernel lists them.
SIBLINGS = "/sys/devices/system/cpu/cpu{}/topology/thread_siblings_list"
# A CPU's caches, one folder each (level, type, and the CPUs sharing it).
CACHES = "/sys/devices/system/cpu/cpu{}/cache"
# The niceness a worker that shares the coordinator's CPUs runs at (worker_nice).
SHARED_CPU_NICE = 10


def host_cpus() -> set[int]:
    """The CPUs this host lets a process be pinned to (whatever this process's own affinity)."""
    for source in CPU_SOURCES:
        try:
            text = Path(source).read_text().strip()
        except OSError:
            continue
        if text:
            return parse_cpus(text)
    return set(range(os.cpu_count() or 1))


def cpu_list(cpus) -> str:
    """{0, 1, 2, 5} -> "0-2,5" (what taskset and the --*-cpus flags take)."""
    ordered, parts = sorted(cpus), []
    start = prev = ordered[0]
    for cpu in ordered[1:] + [None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def check_cpu_lists(lists: dict[str, str]) -> None:
    """{flag: CPU list}: each parses and names CPUs this host has."""
    cpus_here = None
    for flag, spec in lists.items():
        if not spec:
            continue
        try:
            cpus = parse_cpus(spec)
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None
        cpus_here = cpus_here or host_cpus()
        missing = sorted(cpus - cpus_here)
        if missing:
            raise UsageError(
                f"{flag} {spec}: this host has no CPU {missing[0]} (its CPUs: {cpu_list(cpus_here)}); "
                f"name CPUs from that list"
            )


def core_siblings(cpu: int) -> set[int]:
    """The CPUs sharing `cpu`'s physical core (SMT threads), itself included; {cpu} where the
    kernel does not say."""
    try:
        return parse_cpus(Path(SIBLINGS.format(cpu)).read_text().strip()) | {cpu}
    except (OSError, ValueError):
        return {cpu}


def cache_sharers(cpu: int) -> set[int] | None:
    """The CPUs sharing `cpu`'s last-level cache (itself included); None where the kernel does not
    say."""
    levels = []
    try:
        for index in Path(CACHES.format(cpu)).glob("index*"):
            if (index / "type").read_text().strip() != "Instruction":
                levels.append((int((index / "level").read_text()), (index / "shared_cpu_list").read_text().strip()))
        return parse_cpus(max(levels)[1]) | {cpu} if levels else None
    except (OSError, ValueError):
        return None


def auto_pins(
    threads: int, devices: list[str], usable: set[int] | None = None, siblings=core_siblings, caches=cache_sharers
) -> tuple[dict[str, str], str]:
    """The layout `--pin auto` gives the three processes when this server spawns both workers:
    ({"target": list, "draft": list, "coordinator": list}, why): `threads` cores for each worker
    (`worker_cores`: last-level caches and physical cores apart), and for the coordinator a spare
    core if any (the module's docstring says why).
    Empty (and why) when a worker runs on a GPU or the cores do not suffice. `siblings(cpu)`: its
    SMT siblings; `caches(cpu)`: the CPUs sharing its last-level cache (both read from the kernel
    by default)."""
    if any(device not in ("cpu", "") for device in devices):
        return {}, "a worker runs on an accelerator: CPU placement left to the OS"
    if usable is None and not hasattr(os, "sched_getaffinity"):
        return {}, "no CPU affinity on this OS: not pinned"
    cores = sorted(usable if usable is not None else os.sched_getaffinity(0))
    if len(cores) < 2 * threads:
        return {}, f"{len(cores)} usable core(s), fewer than 2 x --threads {threads}: not pinned"
    target, draft = worker_cores(cores, threads, siblings, caches)
    spare = [cpu for cpu in cores if cpu not in target + draft]
    pins = {"target": cpu_list(target), "draft": cpu_list(draft)}
    beside = {
        role: set().union(*(siblings(cpu) for cpu in cpus)) for role, cpus in (("target", target), ("draft", draft))
    }
    # A core on a physical core of its own, else an SMT sibling of the draft's: never the target's.
    free = [cpu for cpu in spare if not siblings(cpu) & (beside["target"] | beside["draft"])]
    own = free or [cpu for cpu in spare if not siblings(cpu) & beside["target"]]
    if own:
        return {**pins, "coordinator": str(own[0])}, "--pin auto: the coordinator on a core of its own"
    return {**pins, "coordinator": pins["draft"]}, "--pin auto: the coordinator beside the draft"


def grouped(cpus: list[int], sharers) -> list[list[int]]:
    """`cpus` grouped by what they share (`sharers(cpu)`: a physical core, a cache; None: unknown,
    so shared with every other), each group in `cpus`' order, groups by their first CPU."""
    within, groups = set(cpus), {}
    for cpu in cpus:
        groups.setdefault(min((sharers(cpu) or within) & within | {cpu}), []).append(cpu)
    return list(groups.values())


def worker_cores(cores: list[int], threads: int, siblings, caches) -> tuple[list[int], list[int]]:
    """(the target's cores, the draft's): `threads` each, from two different last-level caches
    where two of them have room for a worker's threads on physical cores of their own (the target
    in the first such, by CPU number, the draft in the next); else from `cores` in `worker_order`.
    A CPU whose cache the kernel does not name counts as sharing every other's."""
    roomy = [
        worker_order(domain, siblings, threads)
        for domain in grouped(cores, caches)
        if len(grouped(domain, siblings)) >= threads
    ]
    if len(roomy) >= 2:
        return roomy[0][:threads], roomy[1][:threads]
    order = worker_order(cores, siblings, 2 * threads)
    return order[:threads], order[threads : 2 * threads]


def worker_order(cores: list[int], siblings, wanted: int) -> list[int]:
    """`cores` in the order the workers' threads take them (`wanted` of them in all): where the
    host has a physical core for each, one CPU of each physical core first (two threads on SMT
    siblings share one core's units: the target and the draft would slow each other); else whole
    physical cores in turn, so each worker's threads keep to cores of their own as far as they go.
    Without SMT: `cores` as they are."""
    physical = grouped(cores, siblings)
    if len(physical) >= wanted:
        firsts = [group[0] for group in physical]
        return firsts + [cpu for group in physical for cpu in group[1:]]
    return [cpu for group in physical for cpu in group]


def worker_nice(pins: dict[str, str]) -> dict[str, int]:
    """role -> the niceness added to a spawned worker that runs on exactly the coordinator's CPUs
    (`--pin auto` puts the draft there when no core is spare). The coordinator sleeps on its sockets
    and wakes for each verdict and draft step, and the next block waits on it; at equal priority it
    also waits for the draft's time slice, while the draft, drafting ahead, gives up nothing it
    needs by yielding. Measured on the demo pair, one client, interleaved: greedy specbranch 1.09x,
    pipelined 0.99-1.06x, sequential 1.05x, temperature 1 specbranch 1.06x; at 8 clients 1.00x."""
    coordinator = pins.get("coordinator")
    return {role: SHARED_CPU_NICE for role in ("target", "draft") if coordinator and pins.get(role) == coordinator}


def choose_pins(args, spawns_both: bool) -> tuple[dict[str, str], str]:
    """Any --*-cpus flag: exactly what they say. Else --pin auto: auto_pins when this server
    starts both workers (the layout measured; a remote worker's host is not ours to lay out)."""
    explicit = {"target": args.target_cpus, "draft": args.draft_cpus, "coordinator": args.coordinator_cpus}
    if any(explicit.values()):
        return explicit, "as the --*-cpus flags say"
    if args.pin == "none":
        return {}, "--pin none: placement left to the OS"
    if not spawns_both:
        return {}, "--pin auto pins only a server that starts both workers: not pinned"
    return auto_pins(args.threads, [device_kind(args.target_device), device_kind(args.draft_device)])


def device_kind(name: str) -> str:
    """ "cpu", "cuda", ...: what a (checked) device name runs on; "auto" asks torch."""
    if name in ("cpu", ""):
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type
