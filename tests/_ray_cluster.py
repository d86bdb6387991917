"""The local Ray instance of a test module that needs Ray (num_cpus=2, as CI has), started as
`engine.run --ray local` starts it (`engine.cluster.ray_local.start_local_ray`: loopback only, token auth);
the listening sockets of a process tree; a two-node cluster on the loopback (run as a script).

Started by the module's fixture and shut down when the module ends: an idle instance (GCS, raylet,
agents, Ray Data's and Serve's actors, idle workers) costs ~0.1 CPU/s for as long as it lives, more
than a start (~12 CPU-s) costs once the xdist worker still has minutes of other files to run. A
module that finds Ray already running (started by someone else) uses it and leaves it running.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Idle workers are kept (up to this many processes) instead of being killed a second after their
# task: a read task's worker has imported torch and engine (~5 CPU-s), and the next Ray run of the
# same module reuses it. Ray's default keeps only `num_cpus` worker processes, and the model actor
# and Ray Data's own actors already count against that, so every run started fresh read workers.
SYSTEM_CONFIG = {"num_workers_soft_limit": 8}


@contextlib.contextmanager
def local_ray() -> Iterator:
    """The `ray` module, connected to a local Ray instance (2 CPUs) for the `with` block; the
    instance is shut down at its end if this call started it.

    Skips the calling test when ray is not installed (the `serve` extra).
    """
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[serve]'")
    started = not ray.is_initialized()
    if started:
        from engine.cluster.ray_local import start_local_ray

        start_local_ray(2, log_to_driver=False, system_config=SYSTEM_CONFIG)
    try:
        yield ray
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


# ------------------------------------------------------------------------------------------------
# Listening sockets of a process tree, read from /proc (Linux; psutil is not a dependency)


def process_tree(roots) -> list[int]:
    """`roots` and every live descendant of theirs (pids, from /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out = list(roots)
    for pid in out:
        out += [c for c in children.get(pid, ()) if c not in out]
    return out


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket (IPv4 and IPv6) of this network namespace."""
    found = {}
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[fields[9]] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return found


def listening_sockets(pids) -> set[tuple[int, str, str, int]]:
    """`(pid, command line, address, port)` of every listening TCP socket the processes `pids` hold."""
    inodes = _listening_inodes()
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
        except OSError:
            continue  # gone, or not ours
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                out.add((pid, cmd, *inodes[target[8:-1]]))
    return out


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (`::ffff:127.0.0.1`, a dual-stack socket's)."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process started with ({} if it is gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def marked_processes(marker: str) -> list[int]:
    """Pids of the processes whose environment holds `PSP_TEST_RAY_MARK=<marker>` (every process a
    test's cluster starts inherits it)."""
    want = f"{MARK_ENV}={marker}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if want in f.read().split(b"\0"):
                        pids.append(int(name))
            except OSError:
                continue
    return pids


def kill_marked(marker: str, grace_s: float = 10.0) -> None:
    """SIGTERM, then after `grace_s` SIGKILL, each process `marked_processes(marker)` finds (by pid)."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        pids = marked_processes(marker)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = marked_processes(marker)
        if not pids:
            return


MARK_ENV = "PSP_TEST_RAY_MARK"


# ------------------------------------------------------------------------------------------------
# A two-node cluster on the loopback: `python tests/_ray_cluster.py two-nodes`


def two_nodes_main() -> None:
    """Start a head and a second node, both with node address 127.0.0.1 (1 CPU each, no dashboard,
    Ray's temp root `$RAY_TMPDIR/ray`), print the GCS address, and keep them until stdin closes.

    `ray.cluster_utils.Cluster` starts each node as `ray start` does, without the translation of
    127.0.0.1 into the host's address that `ray start --node-ip-address 127.0.0.1` applies. Token
    authentication comes from the environment (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`).
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 1,
                                                            "include_dashboard": False})
    cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1)
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()


if __name__ == "__main__":
    if sys.argv[1:] != ["two-nodes"]:
        sys.exit("usage: python tests/_ray_cluster.py two-nodes")
    two_nodes_main()
