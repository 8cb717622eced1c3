"""Endpoint assignment: every socket gets its own port, outside the kernel's ephemeral range."""

import socket
from pathlib import Path

from pipeline import endpoints as ep
from schemas.stack import load_stack
ROOT = Path(__file__).resolve().parents[2]


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    low = ep._ephemeral_low()
    assigned = ep.assign(load_stack(ROOT / "ops" / "stack.toml"))
    ports = [int(addr.rsplit(":", 1)[1]) for addr in assigned.values()]
    assert set(assigned) == set(ep.names()) and len(set(ports)) == len(ports)
    assert all(low - ep.PORT_SPAN <= p < low for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_taken_port_is_never_handed_out_again():
    taken: set[int] = set()
    got = [ep.free_port("127.0.0.1", taken) for _ in range(50)]
    assert len(set(got)) == 50 and taken == set(got)
