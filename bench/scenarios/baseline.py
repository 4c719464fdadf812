"""`baseline`: a no-op Dramatiq actor's consume rate on the same broker.

The denominator of the throughput scenarios (ingest-email, push-throughput): each
calls `measure()` in its own run, on a broker of its own, so its ratio compares
figures taken minutes apart on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from bench.common import fmt_rate, progress, say, table, wait_for_count

NAME = "baseline"
SUMMARY = "no-op Dramatiq actor: consume rate on the backend's broker (the denominator)"
DESCRIPTION = """\
Publishes N messages for a no-op Dramatiq actor (RabbitMQ: a fresh vhost, no
publisher confirms; embedded: Dramatiq's in-process StubBroker), then starts one
dramatiq.Worker with --threads threads and times it draining them. Dramatiq's default
middleware; nothing of herald runs. ingest-email and push-throughput measure this
again in their own runs and print their rates as a ratio of it."""

DEFAULT_MESSAGES = 20_000
DEFAULT_THREADS = 8
# Upper bound for draining (seconds).
DRAIN_TIMEOUT = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", "-n", type=int, default=DEFAULT_MESSAGES,
                        help=f"messages to publish and drain (default {DEFAULT_MESSAGES:,})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"worker threads (default {DEFAULT_THREADS})")


@contextlib.contextmanager
def _broker(backend: str) -> Iterator[Any]:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.brokers.stub import StubBroker

    if backend == "embedded":
        broker = StubBroker()
        broker.emit_after("process_boot")
        try:
            yield broker
        finally:
            broker.close()
        return
    from tests.harness import rabbit_vhost

    with rabbit_vhost() as url:
        rabbit = RabbitmqBroker(url=url, confirm_delivery=False)
        broker = rabbit  # type: ignore[assignment]
        try:
            yield broker
        finally:
            broker.close()


def measure(backend: str, messages: int = DEFAULT_MESSAGES,
            threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """Publish `messages` no-op messages, then time one worker draining them."""
    import dramatiq

    done = [0]
    lock = threading.Lock()

    def noop(i: int) -> None:
        with lock:
            done[0] += 1

    with _broker(backend) as broker:
        actor = dramatiq.actor(broker=broker, actor_name="bench_noop",
                               queue_name="bench_noop", max_retries=0)(noop)
        started = time.perf_counter()
        with progress(messages, f"baseline: publish ({backend})") as bar:
            for i in range(messages):
                actor.send(i)
                if i % 500 == 499:
                    bar.update(500)
        publish_s = time.perf_counter() - started

        worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
        began = time.perf_counter()
        worker.start()
        try:
            seen, drain_s = wait_for_count(lambda: done[0], messages, DRAIN_TIMEOUT,
                                           f"baseline: drain ({backend})", interval=0.02)
        finally:
            worker.stop(timeout=10_000)
        if drain_s is None:
            drain_s = time.perf_counter() - began
    return {
        "messages": messages,
        "consumed": seen,
        "threads": threads,
        "publish_s": publish_s,
        "publish_rate": messages / publish_s if publish_s else None,
        "drain_s": drain_s,
        "rate": seen / drain_s if drain_s else None,
    }


def report(figures: dict[str, Any], backend: str) -> None:
    say(f"baseline ({backend}, no-op actor, {figures['threads']} threads):")
    say(table([
        ("messages", f"{figures['consumed']:,} of {figures['messages']:,}"),
        ("publish (no confirms)", fmt_rate(figures["publish_rate"])),
        ("consume", fmt_rate(figures["rate"])),
    ]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures = measure(args.backend, args.messages, args.threads)
    report(figures, args.backend)
    return {"figures": figures, "goals": [], "headline": {"consume/s": figures["rate"]}}
