"""The PLC servers' asyncio loop thread: what it leaves behind when it stops."""

from __future__ import annotations

import asyncio
import gc
import logging

from mrkd.runtime.plc.aio import _cancel_remaining


def test_a_task_started_while_another_unwinds_is_cancelled_too(caplog):
    """A single pass cancelled only the tasks of the moment: one that a cancelled task started as it
    unwound (a publish racing the stop) was destroyed pending, and asyncio logged an ERROR at exit."""
    loop = asyncio.new_event_loop()
    started = []

    async def child():
        await asyncio.sleep(100)

    async def parent():
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            started.append(loop.create_task(child()))
            raise

    loop.create_task(parent())
    loop.run_until_complete(asyncio.sleep(0.01))
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _cancel_remaining(loop, wait_s=2.0)
        assert started and started[0].cancelled()
        assert not [task for task in asyncio.all_tasks(loop) if not task.done()]
        loop.close()
        gc.collect()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


def test_a_task_that_will_not_end_is_left_at_the_deadline():
    """Bounded: a task that swallows every cancel does not hold the stopping thread past ``wait_s``."""
    import time
    loop = asyncio.new_event_loop()

    async def stubborn():
        while True:
            try:
                await asyncio.sleep(100)
            except asyncio.CancelledError:
                pass

    task = loop.create_task(stubborn())
    loop.run_until_complete(asyncio.sleep(0.01))
    began = time.monotonic()
    _cancel_remaining(loop, wait_s=0.3)
    assert time.monotonic() - began < 1.0 and not task.done()
