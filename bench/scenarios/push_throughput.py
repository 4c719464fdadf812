"""`push-throughput`: push events in, pushes accepted by a fake APNs over HTTP/2 + TLS."""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import common, pushrig
from bench.common import fmt_rate, goal, say, table
from bench.scenarios import baseline
from intake.publisher import PUSH_EVENTS_PER_MESSAGE

NAME = "push-throughput"
SUMMARY = "push events → FakeApns (separate process, HTTP/2+TLS): pushes/s, ratio to baseline"
DESCRIPTION = """\
N users, each with one APNs device (bulk-inserted). N push events (one per user) are
queued through HeraldAPI.submit_events in batches of --batch (the POST /v1/events path
without HTTP; on RabbitMQ with publisher confirms), so one queue message carries
min(--batch, intake.publisher.PUSH_EVENTS_PER_MESSAGE) events; --batch 1 measures one
event per message. Then the worker starts: in this process
(ActorTree + dramatiq.Worker, as tests.harness.InProcessHerald wires them) or as
--workers `python supervisor.py worker` processes with APNS_* settings. Pushes go
out through herald's real aioapns client to tests.fakes.apns.FakeApns running in
its own process (`python -m bench.apns_server`). The rate is the fake's: accepted
pushes over the span from the first to the last one it recorded.
Goals: >= 1,500 pushes/s and >= 30% of baseline on production; with --delay-ms 50,
>= 1,000 pushes/s."""

DEFAULT_EVENTS = 10_000
TIMEOUT = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", "-n", type=int, default=DEFAULT_EVENTS,
                        help=f"push events, one per user (default {DEFAULT_EVENTS:,})")
    parser.add_argument("--batch", type=int, default=500,
                        help="events per submit_events call (default 500)")
    parser.add_argument("--publish-threads", type=int, default=4)
    parser.add_argument("--baseline-messages", type=int, default=baseline.DEFAULT_MESSAGES)
    pushrig.add_rig_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = baseline.measure(args.backend, args.baseline_messages)
    baseline.report(base, args.backend)
    n = args.events
    users = list(range(1, n + 1))
    bodies = [common.message_event(u, 2_000_000 + u, ("push",)) for u in users]
    batches = [{"events": bodies[i:i + args.batch]} for i in range(0, n, args.batch)]

    with pushrig.rig(args, users) as rig:
        def send(batch: dict[str, Any]) -> int:
            return int(rig.herald.api.submit_events(batch)["accepted"])

        publish_s = common.publish_parallel(batches, send, args.publish_threads, "publish",
                                            n, TIMEOUT)
        started_wall = time.time()
        rig.start_workers()
        workers_up_s = time.time() - started_wall
        _seen, _ = common.wait_for_count(lambda: int(rig.fake.stats()["count"]), n, TIMEOUT,
                                        "pushes accepted", 0.2, "push")
        finished_wall = time.time()
        log = rig.fake.log()
    times = sorted(t for t, _token, status in log if status == 200)
    ok = len(times)
    span = (times[-1] - times[0]) if ok > 1 else None
    rate = (ok - 1) / span if span else None
    wall = finished_wall - started_wall
    figures = {
        "events": n, "accepted": ok, "requests": len(log), "delay_ms": args.delay_ms,
        "events_per_message": min(args.batch, PUSH_EVENTS_PER_MESSAGE),
        "shards": args.shards, "workers": args.workers or "in-process",
        "worker_threads": args.worker_threads, "worker_cpus": pushrig.describe_worker_cpus(args),
        "publish_path": "ingest.api.HeraldAPI.submit_events (no HTTP)",
        "publish_s": publish_s, "publish_rate": n / publish_s,
        "workers_up_s": workers_up_s,
        "rate": rate, "rate_from_worker_start": ok / wall if wall else None,
        "baseline_rate": base["rate"],
        "ratio": rate / base["rate"] if rate and base["rate"] else None,
    }
    # Accepted pushes per 100 ms bucket, for the report's plot.
    buckets: dict[int, int] = {}
    for t in times:
        key = int((t - times[0]) * 10)
        buckets[key] = buckets.get(key, 0) + 1
    series = {"per_100ms": [[k / 10, buckets.get(k, 0) * 10]
                            for k in range(max(buckets) + 1)] if buckets else []}
    workers = (f"{args.workers} process(es) on {figures['worker_cpus']}" if args.workers
               else "in-process")
    say(f"push-throughput ({args.backend}, worker {workers}, {args.worker_threads} threads, "
        f"{args.shards} shard(s), fake delay {args.delay_ms:g} ms); events via "
        f"{figures['publish_path']}, {figures['events_per_message']} per queue message")
    say(table([
        ("pushes accepted", f"{ok:,} of {n:,} ({len(log):,} requests)"),
        ("publish (submit_events)", fmt_rate(figures["publish_rate"])),
        ("pushes/s (fake's first→last)", fmt_rate(rate)),
        ("pushes/s (from worker start)", fmt_rate(figures["rate_from_worker_start"])),
        ("baseline no-op consume", fmt_rate(base["rate"])),
        ("ratio to baseline", "n/a" if figures["ratio"] is None else f"{figures['ratio']:.2f}"),
    ]))
    goals = []
    if args.delay_ms >= 50:
        goals.append(goal(f"pushes/s with the fake answering after {args.delay_ms:g} ms",
                          rate, 1_000, unit="/s"))
    elif args.backend == "production":
        goals.append(goal("pushes/s on production", rate, 1_500, unit="/s"))
        goals.append(goal("pushes/s as % of baseline", None if figures["ratio"] is None
                          else figures["ratio"] * 100, 30, unit="%"))
    return {"figures": figures, "baseline": base, "goals": goals, "series": series,
            "headline": {"pushes/s": rate, "ratio": figures["ratio"]}}
