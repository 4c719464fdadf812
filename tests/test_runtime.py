"""Tests for actors.runtime: pooled actors, their pool, and the timer wheel."""

from __future__ import annotations

import functools
import gc
import logging
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest
from pykka._envelope import Envelope
from pykka.messages import _ActorStop

from actors.runtime import ActorPool, PooledActor, TimerHandle, TimerWheel
from actors.runtime._pool import MESSAGES_PER_SLICE
from actors.runtime._timers import COMPACT_MIN_CANCELLED

# Generous bound for anything that should happen "soon": only reached when a
# test is about to fail.
WAIT_S = 10.0


@pytest.fixture
def pool() -> Iterator[ActorPool]:
    pool = ActorPool(4, "herald-test-pool")
    yield pool
    pool.shutdown()


@pytest.fixture
def wheel() -> Iterator[TimerWheel]:
    wheel = TimerWheel("herald-test-timers")
    yield wheel
    wheel.stop()


def on_pool(pool: ActorPool, cls: type[PooledActor]) -> Any:
    """Return a subclass of `cls` that runs on `pool`."""
    return type(cls.__name__, (cls,), {"actor_pool": pool})


def os_thread_count() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line in /proc/self/status")


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


class Recorder(PooledActor):
    """Records what it sees, and which threads it ran on."""

    def __init__(self, log: list[Any] | None = None) -> None:
        super().__init__()
        self.log: list[Any] = [] if log is None else log
        self.threads: set[str] = set()
        self.stopped_on: str | None = None
        self.failure: type[BaseException] | None = None
        self.failed = threading.Event()
        # Taken without blocking on entry to each handler: failing to take
        # it means two threads run this actor at once.
        self._running = threading.Lock()
        self.overlaps = 0

    def on_start(self) -> None:
        self.log.append("start")
        self.threads.add(threading.current_thread().name)

    def on_receive(self, message: Any) -> Any:
        if not self._running.acquire(blocking=False):
            self.overlaps += 1
            return None
        try:
            self.threads.add(threading.current_thread().name)
            if message == "get":
                return list(self.log)
            if message == "boom":
                raise ValueError("boom")
            if isinstance(message, threading.Event):
                message.wait(WAIT_S)
                return None
            self.log.append(message)
            return message
        finally:
            self._running.release()

    def on_stop(self) -> None:
        self.stopped_on = threading.current_thread().name

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self.failure = exception_type
        self.failed.set()

    def add(self, a: int, b: int) -> int:
        return a + b


# --- messages and lifecycle -------------------------------------------------


def test_tell_ask_and_proxy(pool: ActorPool) -> None:
    ref = on_pool(pool, Recorder).start()
    ref.tell("a")
    assert ref.ask("b") == "b"
    assert ref.ask("get") == ["start", "a", "b"]

    proxy = ref.proxy()
    assert proxy.add(2, 3).get(timeout=WAIT_S) == 5
    proxy.overlaps = 7
    assert proxy.overlaps.get(timeout=WAIT_S) == 7
    assert ref.stop() is True


def test_on_start_runs_on_a_pool_thread_before_the_first_message(pool: ActorPool) -> None:
    class SlowStart(Recorder):
        def on_start(self) -> None:
            time.sleep(0.05)
            super().on_start()

    ref = on_pool(pool, SlowStart).start()
    ref.tell("first")
    assert ref.ask("get", timeout=WAIT_S) == ["start", "first"]
    threads = ref.proxy().threads.get(timeout=WAIT_S)
    assert threads and all(name.startswith("herald-test-pool-") for name in threads)
    ref.stop()


def test_messages_sent_from_init_wait_for_on_start(pool: ActorPool) -> None:
    class TellsItself(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.actor_ref.tell("from init")

    ref = on_pool(pool, TellsItself).start()
    assert ref.ask("get", timeout=WAIT_S) == ["start", "from init"]
    ref.stop()


def test_exception_from_ask_is_returned_to_the_caller(pool: ActorPool) -> None:
    ref = on_pool(pool, Recorder).start()
    with pytest.raises(ValueError, match="boom"):
        ref.ask("boom", timeout=WAIT_S)
    assert ref.is_alive()
    assert ref.ask("after", timeout=WAIT_S) == "after"
    ref.stop()


def test_unhandled_exception_in_tell_calls_on_failure_and_stops(pool: ActorPool) -> None:
    actor_class = on_pool(pool, Recorder)
    ref = actor_class.start()
    proxy = ref.proxy()
    failed = proxy.failed.get(timeout=WAIT_S)
    ref.tell("boom")
    assert failed.wait(WAIT_S)
    assert ref.actor_stopped.wait(WAIT_S)
    assert not ref.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("get", timeout=WAIT_S)
    assert ref.stop() is False


def test_failure_in_on_start_stops_the_actor(pool: ActorPool) -> None:
    class BadStart(PooledActor):
        def on_start(self) -> None:
            raise RuntimeError("no start")

    ref = on_pool(pool, BadStart).start()
    # Sent before or after the failure: either way it must get an answer.
    future = ref.ask("hello", block=False)
    with pytest.raises(pykka.ActorDeadError):
        future.get(timeout=WAIT_S)
    assert ref.actor_stopped.wait(WAIT_S)


def test_stop_handles_earlier_messages_and_fails_later_asks(pool: ActorPool) -> None:
    log: list[Any] = []
    ref = on_pool(pool, Recorder).start(log)
    gate = threading.Event()
    ref.tell(gate)
    ref.tell("before stop")
    stop_future = ref.stop(block=False)
    late = ref.ask("after stop", block=False)
    late_stop = ref.stop(block=False)
    gate.set()

    assert stop_future.get(timeout=WAIT_S) is True
    with pytest.raises(pykka.ActorDeadError):
        late.get(timeout=WAIT_S)
    # As in Pykka, a stop queued behind the one that stopped the actor
    # reports that the actor was being stopped.
    assert late_stop.get(timeout=WAIT_S) is True
    assert log == ["start", "before stop"]
    assert not ref.is_alive()
    assert ref.stop() is False


def test_on_stop_runs_on_a_pool_thread() -> None:
    stopped_on: list[str] = []

    class Stopper(PooledActor):
        def on_stop(self) -> None:
            stopped_on.append(threading.current_thread().name)

    one_thread = ActorPool(1, "herald-stop-pool")
    try:
        ref = on_pool(one_thread, Stopper).start()
        assert ref.stop(timeout=WAIT_S) is True
        assert stopped_on == ["herald-stop-pool-0"]
    finally:
        one_thread.shutdown()


def test_message_racing_with_the_actors_end_is_still_answered(pool: ActorPool) -> None:
    ref = on_pool(pool, Recorder).start()
    assert ref.stop() is True
    # What a sender that passed ActorRef's is_alive() check just before the
    # actor stopped ends up doing: putting into the finished inbox.
    future = pykka.ThreadingFuture[Any]()
    ref.actor_inbox.put(Envelope("late", reply_to=future))
    with pytest.raises(pykka.ActorDeadError):
        future.get(timeout=WAIT_S)
    stop_future = pykka.ThreadingFuture[Any]()
    ref.actor_inbox.put(Envelope(_ActorStop(), reply_to=stop_future))
    assert stop_future.get(timeout=WAIT_S) is None


def test_stopped_actor_is_released(pool: ActorPool) -> None:
    ref = on_pool(pool, Recorder).start()
    ref.stop()
    # The ref keeps only the inbox; the actor object itself can go.
    assert wait_until(lambda: gc.collect() >= 0 and ref._actor_weakref() is None)
    with pytest.raises(pykka.ActorDeadError):
        ref.proxy()


# --- ordering, exclusion and no lost messages ----------------------------------


def test_order_is_kept_under_concurrent_producers(pool: ActorPool) -> None:
    producers, per_producer = 8, 3_000
    ref = on_pool(pool, Recorder).start()
    barrier = threading.Barrier(producers)

    def produce(producer: int) -> None:
        barrier.wait()
        for seq in range(per_producer):
            ref.tell((producer, seq))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    log = ref.ask("get", timeout=WAIT_S)[1:]
    assert len(log) == producers * per_producer
    for producer in range(producers):
        seen = [seq for p, seq in log if p == producer]
        assert seen == list(range(per_producer))
    assert ref.proxy().overlaps.get(timeout=WAIT_S) == 0
    # Many slices ran, so the exclusion above was really exercised.
    assert len(ref.proxy().threads.get(timeout=WAIT_S)) > 1
    ref.stop()


def test_no_message_is_stranded_when_actors_keep_going_idle(pool: ActorPool) -> None:
    received = [0]
    received_lock = threading.Lock()
    overlaps = [0]

    class Counter(PooledActor):
        def __init__(self) -> None:
            super().__init__()
            self._running = threading.Lock()

        def on_receive(self, message: Any) -> None:
            if not self._running.acquire(blocking=False):
                overlaps[0] += 1
                return
            try:
                with received_lock:
                    received[0] += 1
            finally:
                self._running.release()

    actor_class = on_pool(pool, Counter)
    refs = [actor_class.start() for _ in range(4)]
    producers, per_producer = 16, 2_000
    barrier = threading.Barrier(producers)

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for i in range(per_producer):
            refs[rng.randrange(len(refs))].tell(i)
            if rng.random() < 0.3:
                # Give the actors a chance to drain their inboxes and go
                # idle, so the next tell races with that.
                time.sleep(0)

    old_interval = sys.getswitchinterval()
    # Switching threads very often makes the window between "inbox found
    # empty" and "actor marked idle" much more likely to be hit.
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=produce, args=(s,)) for s in range(producers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old_interval)

    # No further message is sent before checking: one would wake an actor
    # holding a stranded message and hide the loss.
    expected = producers * per_producer
    assert wait_until(lambda: received[0] == expected), f"{received[0]} of {expected}"
    assert overlaps[0] == 0
    for ref in refs:
        ref.stop()


class _QueueWithPause:
    """A SimpleQueue stand-in that runs a hook the first time it is found empty.

    Lets a test put a message at the worst moment: after the running slice
    saw an empty inbox and before it marked the actor idle.
    """

    def __init__(self, inner: queue.SimpleQueue[Any], hook: Callable[[], None]) -> None:
        self._inner = inner
        self._hook: Callable[[], None] | None = hook

    def put(self, item: Any) -> None:
        self._inner.put(item)

    def get_nowait(self) -> Any:
        try:
            return self._inner.get_nowait()
        except queue.Empty:
            hook, self._hook = self._hook, None
            if hook is not None:
                hook()
            raise

    def empty(self) -> bool:
        return self._inner.empty()

    def qsize(self) -> int:
        return self._inner.qsize()


def test_message_put_while_the_actor_goes_idle_is_not_stranded(pool: ActorPool) -> None:
    log: list[Any] = []
    ref = on_pool(pool, Recorder).start(log)
    ref.ask("get", timeout=WAIT_S)
    inbox = ref.actor_inbox
    assert wait_until(lambda: not inbox._token.locked())

    def sneak_in() -> None:
        sender = threading.Thread(target=ref.tell, args=("sneaked in",))
        sender.start()
        sender.join()

    inbox._queue = _QueueWithPause(inbox._queue, sneak_in)
    ref.tell("wake up")
    # Nothing else is sent: a later message would wake the actor and hide
    # a stranded one.
    assert wait_until(lambda: "sneaked in" in log), log
    assert log == ["start", "wake up", "sneaked in"]
    ref.stop()


class _QueueThatLooksFull(_QueueWithPause):
    """`_QueueWithPause`, whose first `empty()` after the pause runs a second hook
    before it answers (the answer, taken first, says a message is there)."""

    def __init__(self, inner: queue.SimpleQueue[Any], hook: Callable[[], None],
                 before_answer: Callable[[], None]) -> None:
        super().__init__(inner, hook)
        self._before_answer: Callable[[], None] | None = before_answer

    def empty(self) -> bool:
        answer = self._inner.empty()
        if self._hook is None and not answer:
            hook, self._before_answer = self._before_answer, None
            if hook is not None:
                hook()
        return answer


def test_a_message_another_slice_took_meanwhile_does_not_crash_the_actor(
    pool: ActorPool,
) -> None:
    log: list[Any] = []
    ref = on_pool(pool, Recorder).start(log)
    ref.ask("get", timeout=WAIT_S)
    inbox = ref.actor_inbox
    assert wait_until(lambda: not inbox._token.locked())

    def send(message: str) -> None:
        sender = threading.Thread(target=ref.tell, args=(message,))
        sender.start()
        sender.join()

    meanwhile_done = threading.Event()

    def another_slice_runs_meanwhile() -> None:
        # The slice going idle has released its token and seen this message. Before
        # it takes the token back, a second slice (queued by this send, which finds
        # the token free) handles everything and goes idle in turn.
        send("second")
        wait_until(lambda: log[-1:] == ["second"] and not inbox._token.locked())
        meanwhile_done.set()

    inbox._queue = _QueueThatLooksFull(inbox._queue, lambda: send("sneaked in"),
                                       another_slice_runs_meanwhile)
    ref.tell("wake up")
    # Nothing is sent until the first slice has gone on: a message would take the token.
    assert meanwhile_done.wait(WAIT_S)
    assert log == ["start", "wake up", "sneaked in", "second"]
    # The first slice found the inbox empty after all and went idle: the actor lives.
    assert wait_until(lambda: not inbox._token.locked())
    assert ref.ask("get", timeout=WAIT_S) == ["start", "wake up", "sneaked in", "second"]
    ref.stop()


def test_ten_thousand_actors_on_four_threads(pool: ActorPool) -> None:
    threads_before = threading.active_count()
    os_threads_before = os_thread_count()

    class Echo(PooledActor):
        def on_receive(self, message: Any) -> Any:
            return message * 2

    actor_class = on_pool(pool, Echo)
    refs = [actor_class.start() for _ in range(10_000)]
    futures = [ref.ask(i, block=False) for i, ref in enumerate(refs)]
    assert [future.get(timeout=WAIT_S) for future in futures] == [i * 2 for i in range(10_000)]
    # The pool's four threads already existed: no thread per actor.
    assert threading.active_count() == threads_before
    assert os_thread_count() <= os_threads_before
    assert pool.size == 4

    stops = [ref.stop(block=False) for ref in refs]
    assert all(stop.get(timeout=WAIT_S) for stop in stops)


def test_a_flooded_actor_does_not_starve_another(pool: ActorPool) -> None:
    one_thread = ActorPool(1, "herald-fair-pool")
    try:
        log: list[Any] = []
        actor_class = on_pool(one_thread, Recorder)
        blocker = actor_class.start([])
        gate = threading.Event()
        blocker.tell(gate)
        # The only pool thread is now busy (or about to be) with the gate,
        # so the run queue fills up in a known order: flooded, then other.
        flooded = actor_class.start(log)
        other = actor_class.start(log)
        floods = 10 * MESSAGES_PER_SLICE
        for i in range(floods):
            flooded.tell(("flood", i))
        other.tell("other")
        gate.set()

        assert other.ask("get", timeout=WAIT_S)
        flooded.ask("get", timeout=WAIT_S)
        position = log.index("other")
        floods_before_other = sum(1 for entry in log[:position] if entry != "start")
        # The flooded actor had one slice before the other actor's turn.
        assert floods_before_other <= MESSAGES_PER_SLICE
        assert len(log) == floods + 1 + 2
        for ref in (blocker, flooded, other):
            ref.stop()
    finally:
        one_thread.shutdown()


def test_queued_counts_actors_waiting_for_a_thread() -> None:
    one_thread = ActorPool(1, "herald-queued-pool")
    try:
        actor_class = on_pool(one_thread, Recorder)
        blocker = actor_class.start()
        gate = threading.Event()
        blocker.tell(gate)
        assert wait_until(lambda: one_thread.queued == 0)
        # The blocker is running (not queued); five new actors queue up.
        refs = [actor_class.start() for _ in range(5)]
        assert one_thread.queued == 5
        gate.set()
        for ref in refs:
            ref.ask("get", timeout=WAIT_S)
        assert one_thread.queued == 0
        for ref in [blocker, *refs]:
            ref.stop()
    finally:
        one_thread.shutdown()


# --- the pool -------------------------------------------------------------------


def test_pool_threads_are_named_daemons_and_shut_down() -> None:
    pool = ActorPool(3, "herald-named-pool")
    names = {t.name: t for t in threading.enumerate() if t.name.startswith("herald-named-pool-")}
    assert sorted(names) == ["herald-named-pool-0", "herald-named-pool-1", "herald-named-pool-2"]
    assert all(t.daemon for t in names.values())
    assert pool.size == 3

    pool.shutdown()
    assert pool.is_shut_down
    assert not any(t.is_alive() for t in names.values())
    with pytest.raises(RuntimeError):
        on_pool(pool, Recorder).start()
    pool.shutdown()


def test_default_pool_is_shared_and_used_when_none_is_set() -> None:
    class OnDefault(PooledActor):
        def on_receive(self, message: Any) -> str:
            return threading.current_thread().name

    assert PooledActor.actor_pool is None
    assert ActorPool.default() is ActorPool.default()
    assert ActorPool.default().size == 8
    ref = OnDefault.start()
    assert str(ref.ask("where", timeout=WAIT_S)).startswith("herald-actor-pool-")
    ref.stop()


def test_registry_is_off_by_default_and_can_be_turned_on(pool: ActorPool) -> None:
    plain = on_pool(pool, Recorder).start()
    assert pykka.ActorRegistry.get_by_urn(plain.actor_urn) is None

    class Registered(Recorder):
        register_in_registry = True
        actor_pool = pool

    registered = Registered.start()
    assert pykka.ActorRegistry.get_by_urn(registered.actor_urn) is registered
    assert registered.stop() is True
    assert pykka.ActorRegistry.get_by_urn(registered.actor_urn) is None
    plain.stop()


# --- timers ---------------------------------------------------------------------


def test_timers_fire_in_deadline_order(wheel: TimerWheel) -> None:
    fired: list[float] = []
    done = threading.Event()
    base = time.monotonic() + 0.05
    deadlines = [base + i * 0.001 for i in range(50)]
    shuffled = deadlines[:]
    random.Random(1).shuffle(shuffled)

    def record(when: float) -> None:
        fired.append(when)
        if len(fired) == len(deadlines):
            done.set()

    for when in shuffled:
        wheel.call_at(when, functools.partial(record, when))
    assert done.wait(WAIT_S)
    assert fired == deadlines
    assert len(wheel) == 0


def test_equal_deadlines_fire_in_arming_order(wheel: TimerWheel) -> None:
    fired: list[int] = []
    done = threading.Event()
    when = time.monotonic() + 0.02
    for i in range(20):
        wheel.call_at(when, functools.partial(fired.append, i))
    wheel.call_at(when + 0.001, done.set)
    assert done.wait(WAIT_S)
    assert fired == list(range(20))


def test_a_new_earlier_timer_wakes_the_wheel(wheel: TimerWheel) -> None:
    order: list[str] = []
    done = threading.Event()
    wheel.call_later(3600, lambda: order.append("late"))

    def soon() -> None:
        order.append("soon")
        done.set()

    wheel.call_later(0.01, soon)
    assert done.wait(WAIT_S)
    assert order == ["soon"]
    assert len(wheel) == 1


def test_cancel(wheel: TimerWheel) -> None:
    fired: list[int] = []
    done = threading.Event()
    base = time.monotonic() + 0.05
    handles: list[TimerHandle] = [
        wheel.call_at(base + i * 0.001, functools.partial(fired.append, i)) for i in range(20)
    ]
    for handle in handles[::2]:
        assert handle.cancel() is True
        assert handle.cancel() is False
        assert handle.cancelled
    assert len(wheel) == 10
    wheel.call_at(base + 0.1, done.set)
    assert done.wait(WAIT_S)
    assert fired == list(range(1, 20, 2))
    assert handles[1].cancel() is False
    assert not handles[1].cancelled
    assert not handles[1].pending


def test_a_raising_callback_does_not_kill_the_wheel(
    wheel: TimerWheel, caplog: pytest.LogCaptureFixture
) -> None:
    done = threading.Event()

    def explode() -> None:
        raise RuntimeError("kaboom")

    with caplog.at_level(logging.ERROR, logger="actors.runtime._timers"):
        wheel.call_later(0.0, explode)
        wheel.call_later(0.01, done.set)
        assert done.wait(WAIT_S)
    assert any("kaboom" in (r.exc_text or "") for r in caplog.records)
    assert wheel._thread.is_alive()


def test_cancelled_timers_do_not_pile_up(wheel: TimerWheel) -> None:
    count = 4 * COMPACT_MIN_CANCELLED
    handles = [wheel.call_later(3600, lambda: None) for _ in range(count)]
    for handle in handles[: count - 100]:
        handle.cancel()
    assert len(wheel) == 100
    # Peeks at the heap: the point is its size, not just the public count.
    assert len(wheel._heap) < count // 2
    assert all(h._callback is None for h in handles[: count - 100])


def test_a_hundred_thousand_pending_timers(wheel: TimerWheel) -> None:
    handles = [wheel.call_later(3600 + i * 1e-3, lambda: None) for i in range(100_000)]
    assert len(wheel) == 100_000
    done = threading.Event()
    wheel.call_later(0.01, done.set)
    assert done.wait(WAIT_S)
    for handle in handles:
        handle.cancel()
    assert len(wheel) == 0
    assert len(wheel._heap) < COMPACT_MIN_CANCELLED


def test_timer_tells_an_actor(pool: ActorPool, wheel: TimerWheel) -> None:
    ref = on_pool(pool, Recorder).start()
    wheel.call_later(0.01, lambda: ref.tell("tick"))
    assert wait_until(lambda: ref.ask("get", timeout=WAIT_S) == ["start", "tick"])
    ref.stop()


def test_stopped_wheel_refuses_timers_and_drops_pending() -> None:
    wheel = TimerWheel("herald-stop-timers")
    fired: list[int] = []
    handle = wheel.call_later(0.05, lambda: fired.append(1))
    wheel.stop()
    assert not wheel._thread.is_alive()
    assert not handle.pending
    assert len(wheel) == 0
    with pytest.raises(RuntimeError):
        wheel.call_later(0, lambda: None)
    time.sleep(0.1)
    assert fired == []


def test_default_wheel_is_shared() -> None:
    assert TimerWheel.default() is TimerWheel.default()
    done = threading.Event()
    TimerWheel.default().call_later(0, done.set)
    assert done.wait(WAIT_S)


# --- the benchmark, in miniature ------------------------------------------------


def test_benchmark_measurement_runs() -> None:
    from bench.actors_scale import measure_pooled

    figures = measure_pooled(500, pool_threads=2)
    assert figures["actors"] == 500
    assert figures["threads_os"] < 50
