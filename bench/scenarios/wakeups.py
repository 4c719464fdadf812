"""`wakeups`: what waking another thread or process costs on this machine, on one CPU
and across two.

herald hands each event between threads (the Dramatiq consumer, a worker thread, the
PushActor, the engine's loop) and processes (RabbitMQ, PostgreSQL, the provider). On a
virtual machine, waking a thread that sleeps on another CPU can cost several times what
it costs on the same CPU, and that decides whether to pin a worker (`CPU_AFFINITY`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.common import say, table

NAME = "wakeups"
SUMMARY = "thread and process round trips on one CPU and across two (whether to pin)"
DESCRIPTION = """\
Two threads of one process pass a token back and forth through queue.SimpleQueue, and
two processes through a pair of pipes, --trips times each: first with both sides
pinned to one CPU, then with each side on a CPU of its own. Prints the time per round
trip (two wake-ups) and the cross-CPU/one-CPU ratio. A ratio well above 1 says that a
worker process gains from CPU_AFFINITY on this machine. The --backend option is
ignored: nothing here touches a broker or a database."""

DEFAULT_TRIPS = 20_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trips", type=int, default=DEFAULT_TRIPS,
                        help=f"round trips per measurement (default {DEFAULT_TRIPS:,})")


def _pinned(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})  # 0: the calling thread (Linux keeps one per thread)


def _threads(trips: int, cpus: tuple[int, int]) -> float:
    there: queue.SimpleQueue[int] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        _pinned(cpus[1])
        for _ in range(trips):
            back.put(there.get())

    echoer = threading.Thread(target=echo, name="bench-echo")
    echoer.start()
    _pinned(cpus[0])
    started = time.perf_counter()
    for trip in range(trips):
        there.put(trip)
        back.get()
    elapsed = time.perf_counter() - started
    echoer.join()
    return elapsed / trips


def _processes(trips: int, cpus: tuple[int, int]) -> float:
    there_r, there_w = os.pipe()
    back_r, back_w = os.pipe()
    child = os.fork()
    if child == 0:  # the echo side: it only reads and writes, then leaves at once
        try:
            _pinned(cpus[1])
            for _ in range(trips):
                os.read(there_r, 1)
                os.write(back_w, b".")
        finally:
            os._exit(0)
    _pinned(cpus[0])
    started = time.perf_counter()
    for _ in range(trips):
        os.write(there_w, b".")
        os.read(back_r, 1)
    elapsed = time.perf_counter() - started
    os.waitpid(child, 0)
    for fd in (there_r, there_w, back_r, back_w):
        os.close(fd)
    return elapsed / trips


def _measure(how: Callable[[int, tuple[int, int]], float], trips: int,
             cpus: tuple[int, int]) -> float:
    how(max(1, trips // 10), cpus)  # warm up: the first wake-ups of a sleeping CPU cost more
    return how(trips, cpus)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.trips < 1:
        raise SystemExit("--trips must be at least 1")
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        raise SystemExit("wakeups needs two CPUs this process may use")
    one, other = usable[0], usable[1]
    before = os.sched_getaffinity(0)
    figures: dict[str, Any] = {"trips": args.trips, "cpus": [one, other]}
    try:
        for kind, how in (("threads", _threads), ("processes", _processes)):
            same = _measure(how, args.trips, (one, one))
            across = _measure(how, args.trips, (one, other))
            figures[kind] = {"one_cpu_us": same * 1e6, "two_cpus_us": across * 1e6,
                             "ratio": across / same}
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
    say(f"wakeups: {args.trips:,} round trips each, CPUs {one} and {other}")
    say(table([
        (f"{kind}, round trip", f"one CPU {figures[kind]['one_cpu_us']:.1f} µs, two CPUs "
                                f"{figures[kind]['two_cpus_us']:.1f} µs "
                                f"({figures[kind]['ratio']:.1f}×)")
        for kind in ("threads", "processes")
    ]))
    return {
        "figures": figures,
        "goals": [],
        "headline": {
            "thread trip, one CPU µs": figures["threads"]["one_cpu_us"],
            "thread trip, two CPUs µs": figures["threads"]["two_cpus_us"],
            "process trip, one CPU µs": figures["processes"]["one_cpu_us"],
            "process trip, two CPUs µs": figures["processes"]["two_cpus_us"],
        },
    }
