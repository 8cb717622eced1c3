"""A stage whose event loop is held gets every thread's stack in its log (faulthandler's C
timer), and a loop that keeps ticking gets none."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    from pipeline.runtime import dump_stacks_on_loop_stall

    async def main(hold):
        watch = asyncio.get_running_loop().create_task(dump_stacks_on_loop_stall(after=0.5, tick=0.1))
        await asyncio.sleep(0.3)
        if hold:
            time.sleep(1.5)  # the loop is held: no tick re-arms the timer
        else:
            await asyncio.sleep(1.5)
        watch.cancel()
        await asyncio.sleep(0.7)  # cancelled: the timer is disarmed, nothing more is written

    asyncio.run(main(sys.argv[1] == "hold"))
""")


def run(mode: str) -> str:
    p = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stderr


def test_a_held_loop_dumps_every_thread_once():
    err = run("hold")
    assert err.count("Timeout (0:00:00.500000)!") == 1, err
    assert "in main" in err and "most recent call first" in err, err


def test_a_ticking_loop_dumps_nothing():
    assert "most recent call first" not in run("tick")
