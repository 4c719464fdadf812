"""The push engine's consumer-thread side: each user's line, and group planning."""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Callable
from typing import Any

import peewee as pw
import pykka
import pytest

from actors._push_engine import PushEngine, PushWork
from actors._push_planner import GroupPlanner
from actors._user_order import UserOrder
from delivery.outcomes import TransientDeliveryError
from events import parse_event
from settings import load_settings
from tests.conftest import message_event
from tests.harness import wait_until


def direct_call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class GatedPlan:
    """A plan function whose first call waits for `open()`; records each call's events."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.gate = threading.Event()

    def __call__(self, events: list[Any]) -> list[Any]:
        self.calls.append(list(events))
        if len(self.calls) == 1:
            assert self.gate.wait(10)
        if "bad" in events:
            raise ValueError("a bad event")
        if "away" in events:
            raise pw.OperationalError("server closed the connection")
        return [f"plan:{event}" for event in events]


def ask_in_threads(planner: GroupPlanner, requests: list[list[Any]]
                   ) -> tuple[list[threading.Thread], dict[int, Any]]:
    answers: dict[int, Any] = {}

    def ask(i: int, events: list[Any]) -> None:
        try:
            answers[i] = planner(events)
        except BaseException as exc:
            answers[i] = exc

    threads = [threading.Thread(target=ask, args=(i, events), daemon=True)
               for i, events in enumerate(requests)]
    threads[0].start()
    return threads, answers


def start_the_rest(planner: GroupPlanner, threads: list[threading.Thread]) -> None:
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: len(planner._waiting) == len(threads) - 1,
               what="the other threads to wait behind the leader")


def asked_behind_a_leader(requests: list[list[Any]]
                          ) -> tuple[GatedPlan, GroupPlanner, dict[int, Any]]:
    """The first request leads; the others ask while its plan is out."""
    plan = GatedPlan()
    planner = GroupPlanner(plan, direct_call)
    threads, answers = ask_in_threads(planner, requests)
    wait_until(lambda: plan.calls, what="the first thread to lead")
    start_the_rest(planner, threads)
    plan.gate.set()
    for thread in threads:
        thread.join(10)
    return plan, planner, answers


def test_threads_that_ask_while_a_group_is_out_go_together_in_the_next() -> None:
    plan, planner, answers = asked_behind_a_leader([["a"], ["b", "c"], ["d"], ["e"]])
    # The leader's call alone, then everyone who asked meanwhile in one call.
    assert plan.calls[0] == ["a"]
    assert sorted(plan.calls[1]) == ["b", "c", "d", "e"] and len(plan.calls) == 2
    assert answers == {0: ["plan:a"], 1: ["plan:b", "plan:c"], 2: ["plan:d"], 3: ["plan:e"]}
    assert planner(["f"]) == ["plan:f"]  # and the lead is free again


def test_a_bad_event_fails_alone() -> None:
    _, _, answers = asked_behind_a_leader([["a"], ["b"], ["bad"], ["c"]])
    assert isinstance(answers[2], ValueError)
    assert answers[0] == ["plan:a"] and answers[1] == ["plan:b"] and answers[3] == ["plan:c"]


def test_a_database_out_of_reach_fails_the_whole_group_at_once() -> None:
    plan, _, answers = asked_behind_a_leader([["a"], ["b"], ["away"], ["c"]])
    assert answers[0] == ["plan:a"]
    assert all(isinstance(answers[i], pw.OperationalError) for i in (1, 2, 3))
    assert len(plan.calls) == 2  # not tried again one by one


class Interrupted(BaseException):
    """What Dramatiq raises into a worker thread past its time limit, say."""


def test_an_interrupted_leader_answers_the_others_and_passes_the_lead_on() -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[list[Any]] = []

    def plan(events: list[Any]) -> list[Any]:
        calls.append(list(events))
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
            raise Interrupted()
        return [f"plan:{event}" for event in events]

    planner = GroupPlanner(plan, direct_call)
    threads, answers = ask_in_threads(planner, [["a"], ["b"]])
    assert entered.wait(10)
    start_the_rest(planner, threads)
    # "b" asked while "a" led: it is planned in the next group, led by its own thread.
    release.set()
    for thread in threads:
        thread.join(10)
    assert isinstance(answers[0], Interrupted)
    assert answers[1] == ["plan:b"]
    assert planner(["c"]) == ["plan:c"]


def _raise_in(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Raise `exc_type` into `thread` as Dramatiq raises a time limit into a worker: it
    goes off when the thread next runs Python code."""
    assert thread.ident is not None
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                     ctypes.py_object(exc_type))
    assert hit == 1


def test_an_asker_interrupted_while_it_waits_in_line_holds_up_nobody() -> None:
    plan = GatedPlan()
    planner = GroupPlanner(plan, direct_call)
    threads, answers = ask_in_threads(planner, [["a"], ["b"], ["c"]])
    wait_until(lambda: plan.calls, what="the first thread to lead")
    # "b" asks first behind the leader, so the lead is handed to it next; "c" after it.
    threads[1].start()
    wait_until(lambda: len(planner._waiting) == 1, what="b to wait behind the leader")
    threads[2].start()
    wait_until(lambda: len(planner._waiting) == 2, what="c to wait behind b")
    _raise_in(threads[1], Interrupted)
    plan.gate.set()
    for thread in threads:
        thread.join(10)
    assert answers[0] == ["plan:a"]
    assert isinstance(answers[1], Interrupted)
    assert answers[2] == ["plan:c"]  # the lead went on to "c" rather than dying with "b"
    assert planner(["d"]) == ["plan:d"] and not planner._waiting


def test_an_interrupt_fails_the_group_it_hit_as_transient() -> None:
    entered, release = threading.Event(), threading.Event()

    def plan(events: list[Any]) -> list[Any]:
        if "a" in events and "b" in events:
            entered.set()
            assert release.wait(10)
            raise Interrupted()
        if events == ["x"]:
            entered_x.set()
            assert release_x.wait(10)
        return [f"plan:{event}" for event in events]

    entered_x, release_x = threading.Event(), threading.Event()
    planner = GroupPlanner(plan, direct_call)
    threads, answers = ask_in_threads(planner, [["x"], ["a"], ["b"]])
    assert entered_x.wait(10)
    start_the_rest(planner, threads)
    release_x.set()  # "a" leads the next group, with "b" in it
    assert entered.wait(10)
    release.set()
    for thread in threads:
        thread.join(10)
    assert answers[0] == ["plan:x"]
    assert isinstance(answers[1], Interrupted)
    assert isinstance(answers[2], TransientDeliveryError)


def test_a_users_line_is_served_in_joining_order_and_other_users_do_not_wait() -> None:
    order = UserOrder()
    first, second, third = (order.join(("user", 1)) for _ in range(3))
    other = order.join(("user", 2))
    assert first.first and not second.first and not third.first and other.first

    async def scenario() -> list[str]:
        order.attach(asyncio.get_running_loop())
        served: list[str] = []

        async def serve(name: str, place: Any) -> None:
            await order.turn(place)
            served.append(name)

        tasks = [asyncio.create_task(serve(n, p)) for n, p in
                 (("third", third), ("second", second), ("other", other))]
        await asyncio.sleep(0.05)
        assert served == ["other"]  # user 1's line waits for its first place
        # The first place leaves from another thread (a consumer whose work failed).
        await asyncio.to_thread(order.leave, first)
        await asyncio.sleep(0.05)
        assert served == ["other", "second"]
        order.leave(second)
        await asyncio.gather(*tasks)
        order.leave(third)
        order.leave(other)
        return served

    assert asyncio.run(scenario()) == ["other", "second", "third"]
    assert len(order) == 0  # empty lines are forgotten


def test_a_place_that_leaves_from_the_middle_does_not_hold_up_the_line() -> None:
    order = UserOrder()
    head, middle, last = (order.join("k") for _ in range(3))

    async def scenario() -> None:
        order.attach(asyncio.get_running_loop())
        waiting = asyncio.create_task(order.turn(last))
        order.leave(middle)  # never reached the loop
        await asyncio.sleep(0.02)
        assert not waiting.done()
        order.leave(head)
        await asyncio.wait_for(waiting, 5)
        order.leave(last)

    asyncio.run(scenario())
    assert len(order) == 0


@pytest.mark.parametrize("events", [[], ["a"] * 3])
def test_a_lone_asker_is_planned_at_once(events: list[Any]) -> None:
    calls: list[list[Any]] = []

    def plan(batch: list[Any]) -> list[Any]:
        calls.append(batch)
        return [None] * len(batch)

    assert GroupPlanner(plan, direct_call)(events) == [None] * len(events)
    assert calls == [events]


def test_an_exception_raised_into_the_consumer_thread_leaves_no_place_behind() -> None:
    """Otherwise the user's line would wait for that place for good."""
    engine = PushEngine(load_settings({}), 0)

    def interrupted(events: list[Any]) -> list[Any]:
        raise Interrupted()

    engine._planner = GroupPlanner(interrupted, direct_call)  # type: ignore[assignment]
    works = [PushWork(parse_event(message_event(7, message_id=m, channels=("push",))), None,
                      pykka.ThreadingFuture()) for m in (1, 2)]
    with pytest.raises(Interrupted):
        engine.admit(works)
    assert len(engine.order) == 0
    assert engine.order.join(("user", 7)).first
