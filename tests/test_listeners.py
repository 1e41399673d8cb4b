"""Nothing exposed: while pdcli's workers run, no socket of theirs or the coordinator's listens on a
wildcard address (the workers' rendezvous store is bound to the loopback address)."""
import os

from pdcli.coordinator.central import CentralScheduler
from pdcli.workers.layout import parse_layout


def process_tree(root: int) -> set[int]:
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def socket_inodes(pids: set[int]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(link[8:-1])
    return out


def listeners(inodes: set[str]) -> list[tuple[str, int]]:
    """(local address in hex, port) of each listening TCP socket among inodes, from the OS's socket table."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # state 0A: LISTEN
                    addr, port = cols[1].split(":")
                    out.append((addr, int(port, 16)))
    return out


def test_no_listener_of_ours_on_a_wildcard_address():
    with CentralScheduler("dummy:tiny-llama", parse_layout("", "cpu", "cpu"), num_kv_blocks=64) as cs:
        found = listeners(socket_inodes(process_tree(os.getpid())))
        assert any(addr == "0100007F" for addr, _ in found), found  # the store, on 127.0.0.1
        wildcard = [(a, p) for a, p in found if set(a) == {"0"}]
        assert not wildcard, f"listening on every interface: ports {[p for _, p in wildcard]}"
        assert cs.generate([[1, 2, 3]], __import__("pdcli").SamplingParams(max_tokens=2), mode="disaggregated",
                           timeout=60)[0].error is None
