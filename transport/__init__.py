"""The message bus: typed channels over ZeroMQ (``tcp://``, ``ipc://``) or the in-process
twin (``mem://``), chosen by the address scheme so stage code never names the backend.

    pull = transport.pull("tcp://127.0.0.1:5555", bind=True, sender="reward/0")
    push = transport.push("mem://rollouts", bind=False, sender="rollout/0")
"""

from __future__ import annotations

from typing import Any

from transport.base import Channel, Receiver, Sender, SocketStats  # noqa: F401
from transport.codec import Codec, DecodeError  # noqa: F401

MEM_SCHEME = "mem://"


def _is_mem(address: str) -> bool:
    return address.startswith(MEM_SCHEME)


def push(address: str, *, bind: bool, sender: str, **kw: Any) -> Sender:
    if _is_mem(address):
        from transport.inproc import InprocPush
        return InprocPush(address, sender=sender, **kw)
    from transport.zmq_sockets import PushChannel
    return PushChannel(address, bind=bind, sender=sender, **kw)


def pull(address: str, *, bind: bool, sender: str, **kw: Any) -> Receiver:
    if _is_mem(address):
        from transport.inproc import InprocPull
        return InprocPull(address, sender=sender, **kw)
    from transport.zmq_sockets import PullChannel
    return PullChannel(address, bind=bind, sender=sender, **kw)


def pub(address: str, sync_address: str, *, sender: str, **kw: Any) -> Sender:
    """Broadcast end; must be created inside a running event loop."""
    if _is_mem(address):
        from transport.inproc import InprocPub
        return InprocPub(address, sync_address, sender=sender, **kw)
    from transport.zmq_sockets import PubChannel
    return PubChannel(address, sync_address, sender=sender, **kw)


def sub(address: str, sync_address: str, *, sender: str, **kw: Any) -> Receiver:
    """Broadcast receiver; ``await ch.ready()`` before relying on it."""
    if _is_mem(address):
        from transport.inproc import InprocSub
        return InprocSub(address, sync_address, sender=sender, **kw)
    from transport.zmq_sockets import SubChannel
    return SubChannel(address, sync_address, sender=sender, **kw)


def run(main: Any) -> Any:
    """Run a coroutine on uvloop where available, else asyncio's default loop."""
    try:
        import uvloop
        return uvloop.run(main)
    except ImportError:
        import asyncio
        return asyncio.run(main)
