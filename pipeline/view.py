"""What ``pipeline up`` shows while a stack runs, and what ``pipeline status`` prints once.

One renderer for both: ``status_view(StatusReply)`` (learner figures above a per-stage
table). In a terminal, ``watch`` redraws it in place ``REFRESH_PER_S`` times a second;
when stdout is not a terminal (CI, ``| tee``, nohup) it prints one plain line every
``PLAIN_EVERY_S`` seconds instead, since escape codes would garble a log. The view only
reads the supervisor's state. It runs as ``Supervisor.run``'s observer, so an exception in
it stops the stack (cleanly, with the exception shown) rather than leaving it unwatched.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from schemas.messages import StatusReply

REFRESH_PER_S = 2.0
"""Redraws per second: smooth enough to watch steps go by, cheap on a shared core."""
PLAIN_EVERY_S = 5.0
"""Without a terminal, one line every 5 s: a readable log of a long run."""


def summary_line(st: StatusReply) -> str:
    return (f"step {st.step}  reward {st.reward_mean:.3f}  samples/s {st.samples_per_s:.1f}  "
            f"weights v{st.weight_version}  staleness {st.staleness_mean:.2f}")


def stage_table(st: StatusReply, title: str = "") -> Table:
    t = Table(title=title or None, expand=False)
    t.add_column("stage")
    for col in ("alive/desired", "starting", "restarts", "queue", "processed"):
        t.add_column(col, justify="right")
    for s in st.stages:
        alive = f"{s.alive}/{s.replicas}"
        t.add_row(s.stage, alive if s.alive == s.replicas else f"[yellow]{alive}[/yellow]",
                  str(s.starting) if not s.starting else f"[yellow]{s.starting}[/yellow]",
                  str(s.restarts) if not s.restarts else f"[yellow]{s.restarts}[/yellow]",
                  str(s.queue_depth), str(s.processed))
    return t


def status_view(st: StatusReply, title: str = "") -> Group:
    """The learner's figures over the per-stage table (``queue``: items waiting in the
    broker of the stage's input stream)."""
    head = Table.grid(padding=(0, 2))
    for _ in range(5):
        head.add_column(justify="right")
    head.add_row("learner step", "reward mean", "samples/s", "weight version", "staleness")
    head.add_row(f"[bold]{st.step}[/bold]", f"[bold]{st.reward_mean:.3f}[/bold]", f"{st.samples_per_s:.1f}",
                 f"v{st.weight_version}", f"{st.staleness_mean:.2f}")
    parts = [head, stage_table(st)]
    if title:
        parts.insert(0, f"[bold]{title}[/bold]")
    if st.detail:
        parts.append(st.detail)
    return Group(*parts)


def plain_line(st: StatusReply, elapsed_s: float) -> str:
    alive = " ".join(f"{s.stage}={s.alive}/{s.replicas}" + (f"(starting {s.starting})" if s.starting else "")
                     + (f"(r{s.restarts})" if s.restarts else "")
                     + (f"[q{s.queue_depth}]" if s.queue_depth else "") for s in st.stages)
    return (f"[{elapsed_s:6.0f}s] step {st.step} reward {st.reward_mean:.3f} samples/s {st.samples_per_s:.1f} "
            f"weights v{st.weight_version} staleness {st.staleness_mean:.2f} | {alive}")


async def watch(status: Callable[[], StatusReply], title: str, console: Console | None = None,
                tty: bool | None = None) -> None:
    """Show ``status()`` until cancelled: a live table on a terminal, plain lines otherwise."""
    console = console or Console()
    tty = sys.stdout.isatty() if tty is None else tty
    t0 = time.monotonic()
    if tty:
        with Live(status_view(status(), title), console=console, refresh_per_second=REFRESH_PER_S,
                  transient=False) as live:
            while True:
                await asyncio.sleep(1.0 / REFRESH_PER_S)
                live.update(status_view(status(), f"{title} — {time.monotonic() - t0:.0f}s"))
    else:
        while True:
            await asyncio.sleep(PLAIN_EVERY_S)
            print(plain_line(status(), time.monotonic() - t0), flush=True)
