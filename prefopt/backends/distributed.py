"""torch.distributed set-up between Ray actors (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import os
import socket
from datetime import timedelta


def node_ip() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((node_ip(), 0))
        return s.getsockname()[1]


def make_store(host: str, port: int, rank: int, world_size: int, *, timeout_s: float):
    """The rendezvous store of a process group; rank 0 serves it on ``host:port``.

    torch's TCPStore server listens on every interface; on a loopback ``host`` (the embedded local
    cluster) rank 0 binds the socket to loopback itself and hands it over, so the store listens on
    127.0.0.1 only.
    """
    import ipaddress

    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return dist.TCPStore(host, port, world_size, True, timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    store = dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=sock.detach(), use_libuv=True)
    return store


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int,
                       *, timeout_s: float) -> str:
    """Join the learners' process group. Returns the backend name."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if not dist.is_initialized():
        store = make_store(master_addr, master_port, rank, world_size, timeout_s=timeout_s)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return backend


def node_id() -> str | None:
    """The Ray node of the calling actor (two nodes on one host share an IP, not a node id)."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def placement_group_id() -> str | None:
    """The placement group of the calling Ray actor (None outside one)."""
    try:
        import ray
        pg = ray.get_runtime_context().get_placement_group_id()
        return str(pg) if pg else None
    except Exception:
        return None
