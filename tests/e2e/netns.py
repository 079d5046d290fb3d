"""A second "host" on this machine for the multi-host tests: a network namespace of the test's own,
joined to the host by a veth pair, each end with its own address. No netem: only reachability
matters here (launch/bench/link.py's NetnsLink adds delay, and starts its draft worker without the
flags these tests need). Everything it creates it deletes in `close()`; it touches no other
namespace or link."""

from __future__ import annotations

import os
import shutil
import subprocess

# Private range for the test's veth pair (the benchmark's link uses 10.213): 10.214.<n>.1 and .2.
SUBNET = "10.214"


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=30)


def netns_problem() -> str | None:
    """Why a network namespace cannot be made here; None when it can."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if not shutil.which("ip"):
        return "the ip command (iproute2) is not installed"
    probe = f"sptest-probe-{os.getpid()}"
    added = _run("ip", "netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class Netns:
    """`host_addr` is the host's end of the veth pair, `ns_addr` the namespace's; `prefix` runs a
    command inside (`ip netns exec NAME`)."""

    def __init__(self):
        tag = os.getpid() % 100_000
        self.name, self.host_dev, ns_dev = f"sptest-{tag}", f"spth{tag}", f"sptn{tag}"
        subnet = f"{SUBNET}.{tag % 250 + 1}"
        self.host_addr, self.ns_addr = f"{subnet}.1", f"{subnet}.2"
        self.prefix = ("ip", "netns", "exec", self.name)
        try:
            _run("ip", "netns", "add", self.name)
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", ns_dev)
            _run("ip", "link", "set", ns_dev, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            _run(*self.prefix, "ip", "addr", "add", f"{self.ns_addr}/30", "dev", ns_dev)
            _run(*self.prefix, "ip", "link", "set", ns_dev, "up")
            _run(*self.prefix, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete the namespace (its veth end, and so the pair, go with it)."""
        _run("ip", "netns", "del", self.name, check=False)
        _run("ip", "link", "del", self.host_dev, check=False)
