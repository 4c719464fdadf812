"""`ingest-email`: email events in, `ScheduledMessageNotificationEmail` rows committed."""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from bench import common
from bench.common import fmt_rate, goal, say, table
from bench.scenarios import baseline

NAME = "ingest-email"
SUMMARY = "email events → rows committed by a running worker (events/s, ratio to baseline)"
DESCRIPTION = """\
Users are bulk-inserted with a one-day batching period (nothing flushes). N email
events for --users users are queued through HeraldAPI.submit_events in batches of
--batch (the same validation and Publisher path as POST /v1/events, without HTTP),
from --publish-threads threads (on RabbitMQ each enqueue waits for its publisher
confirm). A worker wired like `supervisor.py worker` (ActorTree + dramatiq.Worker
with --worker-threads threads) records them; the clock stops when every
ScheduledMessageNotificationEmail row is committed (counted in the database).

--mode drain (default): publish everything first, then start the worker and time
the drain (compares with `baseline`, which drains the same way).
--mode live: start the worker first and time from the first publish to the last
row (includes the publisher-confirm cost).
Goal (issue): >= 2,000 email events/s committed on PostgreSQL."""

DEFAULT_EVENTS = 10_000
DEFAULT_USERS = 2_000
TIMEOUT = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", "-n", type=int, default=DEFAULT_EVENTS,
                        help=f"email events (default {DEFAULT_EVENTS:,})")
    parser.add_argument("--users", type=int, default=DEFAULT_USERS,
                        help=f"distinct users the events go to (default {DEFAULT_USERS:,})")
    parser.add_argument("--batch", type=int, default=500,
                        help="events per submit_events call (default 500)")
    parser.add_argument("--publish-threads", type=int, default=4,
                        help="threads calling submit_events (default 4)")
    parser.add_argument("--worker-threads", type=int, default=common.DEFAULT_WORKER_THREADS,
                        help="Dramatiq worker threads (default: WORKER_THREADS' default, "
                             f"{common.DEFAULT_WORKER_THREADS})")
    parser.add_argument("--mode", choices=("drain", "live"), default="drain")
    parser.add_argument("--baseline-messages", type=int, default=baseline.DEFAULT_MESSAGES)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from models import ScheduledMessageNotificationEmail as Row

    base = baseline.measure(args.backend, args.baseline_messages)
    baseline.report(base, args.backend)

    events = args.events
    users = list(range(1, max(1, args.users) + 1))
    bodies = [common.message_event(users[i % len(users)], 1_000_000 + i, ("email",))
              for i in range(events)]
    batches = [{"events": bodies[i:i + args.batch]} for i in range(0, events, args.batch)]

    with common.backend(args.backend) as (env, _tmp):
        herald = common.in_process_herald(env)
        try:
            common.insert_users(users)

            def send(batch: dict[str, Any]) -> int:
                return int(herald.api.submit_events(batch)["accepted"])

            figures: dict[str, Any] = {
                "events": events, "users": len(users), "batch": args.batch,
                "publish_threads": args.publish_threads,
                "worker_threads": args.worker_threads, "mode": args.mode,
                "publish_path": "ingest.api.HeraldAPI.submit_events (no HTTP)",
            }
            if args.mode == "drain":
                publish_s = common.publish_parallel(batches, send, args.publish_threads,
                                                    "publish", events, TIMEOUT)
                common.start_worker(herald, args.worker_threads)
                seen, elapsed = common.wait_for_count(lambda: common.count_rows(Row), events,
                                                      TIMEOUT, "rows committed", 0.1, "row")
            else:
                common.start_worker(herald, args.worker_threads)
                started = time.perf_counter()
                publish_time: list[float] = []

                def publish() -> None:
                    publish_time.append(common.publish_parallel(
                        batches, send, args.publish_threads, "publish", events, TIMEOUT))

                publisher = threading.Thread(target=publish, daemon=True)
                publisher.start()
                seen, _ = common.wait_for_count(lambda: common.count_rows(Row), events,
                                                TIMEOUT, "rows committed", 0.1, "row")
                elapsed = time.perf_counter() - started if seen >= events else None
                publisher.join(TIMEOUT)
                publish_s = publish_time[0] if publish_time else float("nan")
            rate = seen / elapsed if elapsed else None
            figures.update(
                publish_s=publish_s, publish_rate=events / publish_s if publish_s else None,
                committed=seen, commit_s=elapsed, rate=rate,
                baseline_rate=base["rate"],
                ratio=(rate / base["rate"]) if rate and base["rate"] else None,
                pending_users=herald.tree.pending_email_users(),
            )
        finally:
            herald.stop()

    say(f"ingest-email ({args.backend}, mode {args.mode}): events via "
        f"{figures['publish_path']}, {args.publish_threads} publisher thread(s)")
    say(table([
        ("events / users", f"{events:,} / {len(users):,}"),
        ("publish (submit_events)", fmt_rate(figures["publish_rate"])),
        ("rows committed", f"{figures['committed']:,}"),
        ("ingest → row committed", fmt_rate(rate)),
        ("baseline no-op consume", fmt_rate(base["rate"])),
        ("ratio to baseline", "n/a" if figures["ratio"] is None else f"{figures['ratio']:.2f}"),
        ("pending users (router)", f"{figures['pending_users']:,}"),
    ]))
    goals = []
    if args.backend == "production":
        goals.append(goal("email events committed/s on PostgreSQL", rate, 2_000, unit="/s"))
    return {"figures": figures, "baseline": base, "goals": goals,
            "headline": {"events/s": rate, "ratio": figures["ratio"]}}
