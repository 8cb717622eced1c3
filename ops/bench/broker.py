"""Work-broker benchmark: items through one ``WorkBroker`` (the supervisor's per-stream queue).

    python ops/bench/broker.py [--quick] [--items N]

Three processes, as in a stack: a producer PUSHes small PromptGroups into the broker's
front, the broker (this process, on its own event loop) hands them to one worker
(``WorkPuller``, credit 2, like a stage) that granted credit. Reported: items/s at the worker
(first to last item), the broker process's CPU time per item (its event loop plus
ZeroMQ's IO thread: ``time.process_time``), which is what every stage-to-stage hop costs the
supervisor, and the worker process's CPU time per item over the same span (receive, decode,
credit grants): what each item costs the stage that consumes it. Last line:

    bench broker: items_per_s=N broker_cpu_us_per_item=X worker_cpu_us_per_item=W items=M
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

import transport
from stages.testing import make_prompt_group
from transport.workqueue import WorkBroker, WorkPuller

LINGER_S = 1.0
"""The producer keeps its socket this long after its last send, so nothing queued is dropped."""


def _produce(address: str, n: int) -> None:
    async def main() -> None:
        ch = transport.push(address, bind=False, sender="bench/producer")
        msg = make_prompt_group("g", n_samples=1)
        for _ in range(n):
            await ch.send(msg)
        await asyncio.sleep(LINGER_S)
        ch.close()

    transport.run(main())


def _work(address: str, n: int, out) -> None:
    async def main() -> None:
        w = WorkPuller(address, sender="bench/worker", name="prompts", credit=2)
        await w.recv()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(n - 1):
            await w.recv()
        out.put(((n - 1) / (time.perf_counter() - t0), (time.process_time() - cpu0) / (n - 1) * 1e6))
        w.close()

    transport.run(main())


async def measure(n: int) -> tuple[float, float, float]:
    """(items/s at the worker, broker CPU µs per item, worker CPU µs per item)."""
    broker = WorkBroker("prompts", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    broker.start()
    ctx = mp.get_context("spawn")
    rates = ctx.Queue()
    worker = ctx.Process(target=_work, args=(broker.back_address, n, rates))
    producer = ctx.Process(target=_produce, args=(broker.front_address, n))
    worker.start()
    producer.start()
    cpu0 = time.process_time()
    while broker.forwarded < n:
        await asyncio.sleep(0.01)
    cpu = time.process_time() - cpu0
    rate, worker_us = await asyncio.to_thread(rates.get, True, 60)
    worker.join(30)
    producer.join(30)
    broker.close()
    return rate, cpu / n * 1e6, worker_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5,000 items")
    ap.add_argument("--items", type=int, default=None, help="items to forward (default 20,000)")
    a = ap.parse_args()
    n = a.items or (5000 if a.quick else 20000)
    rate, us, worker_us = transport.run(measure(n))
    print(f"bench broker: items_per_s={rate:.0f} broker_cpu_us_per_item={us:.1f} "
          f"worker_cpu_us_per_item={worker_us:.1f} items={n}")


if __name__ == "__main__":
    main()
