"""TickLeader's types, checked by ``mypy --strict`` (not run by pytest)."""

from __future__ import annotations

import contextlib
import datetime
import threading
from typing import assert_type

from safeshm import SafeEvent, TickLeader, TickLeaderStatistics


def construction() -> None:
    assert_type(TickLeader.open("jobs.cleanup", 60.0), TickLeader)
    assert_type(TickLeader.open("jobs.cleanup", 60, offset=15), TickLeader)
    assert_type(TickLeader.create(datetime.timedelta(minutes=5)), TickLeader)
    assert_type(TickLeader.attach("jobs.cleanup"), TickLeader)
    with TickLeader.create(1.0, name="x") as leader:
        assert_type(leader, TickLeader)
        assert_type(leader.every, float)
        assert_type(leader.offset, float)
        assert_type(leader.current_tick(), int)
        assert_type(leader.tick_time(leader.current_tick()), float)
        assert_type(leader.statistics(), TickLeaderStatistics)
        assert_type(leader.statistics().last_tick, int | None)


def leading(leader: TickLeader) -> None:
    with leader.lead() as leading:
        assert_type(leading, bool)
    with leader.lead(leader.current_tick()) as leading:
        assert_type(leading, bool)
    # What lead() returns is a standard context manager, sync and async.
    cm: contextlib.AbstractContextManager[bool] = leader.lead()
    acm: contextlib.AbstractAsyncContextManager[bool] = leader.lead()
    del cm, acm
    for tick in leader.iter_ticks(threading.Event()):
        assert_type(tick, int)
    for tick in leader.iter_ticks(SafeEvent.open("stop")):
        assert_type(tick, int)


async def leading_async(leader: TickLeader) -> None:
    async with leader.lead() as leading:
        assert_type(leading, bool)
    async with contextlib.aclosing(leader.aiter_ticks()) as ticks:
        async for tick in ticks:
            assert_type(tick, int)


def mistakes(leader: TickLeader) -> None:
    TickLeader.open("x", "60")  # type: ignore[arg-type]
    leader.lead(1.5)  # type: ignore[arg-type]
    leader.iter_ticks(stop=object())  # type: ignore[arg-type]
