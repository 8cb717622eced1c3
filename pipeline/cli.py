"""``pipeline``: the command line.

    pipeline up FILE [--max-steps N] [--run-dir DIR]   run a stack (live view; exit 0 after N steps)
    pipeline check FILE                                 validate a stack file (exit 2 naming the field)
    pipeline status [--run-dir DIR]                     one status table from a running stack
    pipeline scale STAGE N [--run-dir DIR]              change the replicas of a running stack
    pipeline replay FILE --into STAGE [--stack FILE]    run one stage alone on a recording

Exit codes: 0 success, 1 the stack failed (reason printed), 2 bad input (stack file,
arguments, no running stack or no answer from it). ``up`` prints the live view
(``pipeline.view``) to stdout; the supervisor's own log goes to ``<run>/logs/``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.console import Console

import transport
from pipeline import endpoints as ep
from pipeline.view import status_view, summary_line
from schemas.messages import ScaleRequest, StatusReply, StatusRequest
from schemas.stack import Stack, StackError, load_stack

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console()
STATUS_TIMEOUT_S = 5.0
"""A live supervisor answers a status request at once; silence this long means none runs."""
SCALE_TIMEOUT_S = 60.0
"""Scaling down waits (bounded, ``supervisor.SCALE_REPLY_WAIT_S``) for drained replicas to exit."""


def _load(path: Path) -> Stack:
    """The stack file, decoded and checked: its own rules, then the learner's (``LearnerConfig``,
    as the learner will build it), so that a bad learner field stops ``check`` and ``up`` here
    instead of crash-looping the learner's process. Exits 2 naming the file and the field."""
    try:
        stack = load_stack(path)
    except StackError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    from stages.learner.config import LearnerConfig  # imports torch: only once the file decoded

    try:
        LearnerConfig.for_stack(stack, stack.run.dir).validate()
    except ValueError as e:
        console.print(f"[red]error:[/red] {path}: {e}", highlight=False)
        raise typer.Exit(2)
    return stack


@app.command()
def check(file: Path) -> None:
    """Validate a stack file: exit 0 with a summary, or exit 2 naming the field."""
    s = _load(file)
    console.print(f"{file}: ok — run {s.run.name!r}, model {s.model.name}, task {s.task.name}, "
                  f"rollout×{s.rollout.replicas} ({s.rollout.engine}), reward×{s.reward.replicas}, "
                  f"logprob×{s.logprob.replicas}, learner×{s.learner.world_size}, max_staleness {s.run.max_staleness}")


def _parse_stage_impls(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        kind, sep, target = item.partition("=")
        if not sep or ":" not in target:
            console.print(f"[red]error:[/red] --stage-impl {item!r}: expected KIND=module:function")
            raise typer.Exit(2)
        out[kind] = target
    return out


@app.command()
def up(file: Path, max_steps: int = typer.Option(None, help="stop cleanly after this many learner steps"),
       run_dir: Path = typer.Option(None, help="run directory (default: the stack's run.dir)"),
       shutdown_timeout: float = typer.Option(None, help="seconds a stop may take: drain (the learner's final "
                                                         "checkpoint), then kill (default: run.shutdown_timeout_s)"),
       stage_impl: list[str] = typer.Option([], hidden=True,
                                            help="KIND=module:function runs that coroutine for a stage (tests)")) -> None:
    """Run a stack until interrupted (or --max-steps), with a live view."""
    from pipeline.plot import write_reward_plot
    from pipeline.supervisor import Supervisor
    from pipeline.view import watch
    from stages.tasks import chance_reward, resolve_task

    stack = _load(file)
    targets = _parse_stage_impls(stage_impl)
    if run_dir is not None:
        stack.run.dir = str(run_dir)
    rd = Path(stack.run.dir)
    try:
        from stages.model import model_config

        chance = chance_reward(resolve_task(stack.task.name), vocab_size=model_config(stack.model.name).vocab_size,
                               max_new_tokens=stack.rollout.max_tokens)
        console.print(f"task {stack.task.name!r}: chance reward {chance:.3f} (uniform random policy)")
    except Exception as e:  # a user task may not support it; not fatal
        console.print(f"task {stack.task.name!r}: chance reward unknown ({e})")
    console.print(f"run dir {rd}  (logs, metrics.jsonl, checkpoints, reward.png)")
    sup = Supervisor(stack, rd, targets, max_steps=max_steps,
                     shutdown_timeout=stack.run.shutdown_timeout_s if shutdown_timeout is None else shutdown_timeout)
    code = transport.run(sup.run(on_tick=lambda sup: watch(sup.status, stack.run.name, console)))
    console.print(f"stopped: {summary_line(sup.status())}")
    plot = write_reward_plot(rd)
    if plot:
        console.print(f"wrote {plot}")
    if sup.failure:
        console.print(f"[red]stack failed:[/red] {sup.failure}")
    raise typer.Exit(code)


def _ask(run_dir: Path, msg, timeout_s: float = STATUS_TIMEOUT_S) -> StatusReply:
    try:
        address = ep.load(run_dir)["supervisor"]
    except FileNotFoundError:
        console.print(f"[red]error:[/red] no {ep.ENDPOINTS_FILE} in {run_dir}: is a stack running there?")
        raise typer.Exit(2)
    from transport.zmq_sockets import DealerChannel

    async def ask() -> StatusReply:
        with DealerChannel(address, sender="cli") as d:
            await d.send(msg)
            return await asyncio.wait_for(d.recv(), timeout_s)

    try:
        return transport.run(ask())
    except (asyncio.TimeoutError, TimeoutError):
        console.print(f"[red]error:[/red] no answer from the supervisor at {address}")
        raise typer.Exit(2)


@app.command()
def status(run_dir: Path = typer.Option(Path("runs/default"), help="run directory of the running stack")) -> None:
    """Print the status table of a running stack once."""
    console.print(status_view(_ask(run_dir, StatusRequest()), str(run_dir)))


@app.command()
def scale(stage: str, replicas: int,
          run_dir: Path = typer.Option(Path("runs/default"), help="run directory of the running stack")) -> None:
    """Change the replica count of a stage (scaling down drains first)."""
    reply = _ask(run_dir, ScaleRequest(stage, replicas), SCALE_TIMEOUT_S)
    console.print(reply.detail)
    raise typer.Exit(0 if reply.ok else 2)


@app.command()
def replay(file: Path, into: str = typer.Option(..., help="stage to feed: rollout, reward, logprob or learner"),
           stack_file: Path = typer.Option(Path("ops/stack.toml"), "--stack", help="stack file for the stage's settings"),
           out: Path = typer.Option(None, help="write the stage's output stream here"),
           quiet_s: float = typer.Option(5.0, help="stop after this long without output once input is fed")) -> None:
    """Run one stage alone on a recording and report what it produced."""
    from pipeline.replay import replay_into_stage

    stack = _load(stack_file)
    try:
        counts = transport.run(replay_into_stage(stack, file, into, out, quiet_s))
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    except RuntimeError as e:
        console.print(f"[red]replay failed:[/red] {e}")
        raise typer.Exit(1)
    for tag, n in sorted(counts.items()):
        console.print(f"{tag}: {n}")


if __name__ == "__main__":
    app()
