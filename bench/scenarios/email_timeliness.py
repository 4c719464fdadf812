"""`email-timeliness`: how late digests go out after their deadline."""

from __future__ import annotations

import argparse
import random
import re
import threading
import time
from email.message import Message as MimeMessage
from typing import Any

from bench import common
from bench.common import fmt_ms, goal, percentile, say, table

NAME = "email-timeliness"
SUMMARY = "10,000 pending users, deadlines spread over 10-20 s: send time − deadline"
DESCRIPTION = """\
--users users each get one pending email row (bulk-inserted; deadlines uniformly
spread between --lead and --lead + --spread seconds after the insert), then an
ActorTree starts and re-arms them. Its mailer_factory returns a recording mailer
that notes time.time() per recipient (and, with --mailer outbox, also writes the
.eml through herald's OutboxMailer). Lateness = send time − the row's deadline.
The batching timers, claim, render and outbox/mailer run for real; the events are
not ingested here (see ingest-email). Goal: p99 lateness <= 100 ms."""

DEFAULT_USERS = 10_000
_RECIPIENT = re.compile(r"user(\d+)@")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", "-n", type=int, default=DEFAULT_USERS,
                        help=f"pending users (default {DEFAULT_USERS:,})")
    parser.add_argument("--lead", type=float, default=10.0,
                        help="seconds from insert to the first deadline (default 10)")
    parser.add_argument("--spread", type=float, default=10.0,
                        help="deadlines spread over this many seconds (default 10)")
    parser.add_argument("--mailer", choices=("record", "outbox"), default="record",
                        help="record only (default) or also write .eml files to an outbox")
    parser.add_argument("--pool-threads", type=int, default=8)


class _Recorder:
    """Send times per user, shared by the recording mailers of every mail thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[int, float] = {}

    def note(self, message: MimeMessage) -> None:
        now = time.time()
        match = _RECIPIENT.search(str(message["To"]))
        if match:
            with self.lock:
                self.sent.setdefault(int(match.group(1)), now)


class _RecordingMailer:
    def __init__(self, recorder: _Recorder, inner: Any = None) -> None:
        self.recorder = recorder
        self.inner = inner

    def send(self, message: MimeMessage) -> None:
        if self.inner is not None:
            self.inner.send(message)
        self.recorder.note(message)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import models
    from actors.tree import ActorTree
    from delivery.smtp import OutboxMailer
    from settings import load_settings

    n = args.users
    recorder = _Recorder()
    with common.backend(args.backend) as (env, tmp):
        outbox = tmp / "outbox"
        settings = load_settings({**env, "ACTOR_POOL_THREADS": str(args.pool_threads),
                                  "OUTBOX_DIR": str(outbox), "HERALD_API_KEYS": "bench"})
        database = models.open_database(settings.DATABASE_URL)
        models.migrate()
        users = list(range(1, n + 1))
        common.insert_users(users)
        rng = random.Random(7)
        t0 = time.time()
        deadlines = {u: t0 + args.lead + rng.uniform(0, args.spread) for u in users}
        common.insert_pending_rows(deadlines, 10_000_000)
        setup_s = time.time() - t0
        if setup_s > args.lead:
            say(f"warning: setup took {setup_s:.1f} s, longer than --lead {args.lead} s; "
                "early deadlines will read late")

        def factory() -> Any:
            inner = OutboxMailer(str(outbox)) if args.mailer == "outbox" else None
            return _RecordingMailer(recorder, inner)

        tree = ActorTree(settings, lambda reason: None, mailer_factory=factory)
        tree.start()
        last = max(deadlines.values())
        timeout = max(0.0, last - time.time()) + 60
        _seen, _ = common.wait_for_count(lambda: len(recorder.sent), n, timeout, "emails sent",
                                        0.1, "mail")
        tree.stop(timeout=60)
        database.close()

    with recorder.lock:
        sent = dict(recorder.sent)
    lateness = sorted(sent[u] - deadlines[u] for u in sent)
    early = sum(1 for x in lateness if x < 0)
    send_times = sorted(sent.values())
    span = send_times[-1] - send_times[0] if len(send_times) > 1 else 0.0
    needed = n / args.spread if args.spread else None
    figures = {
        "users": n, "sent": len(sent), "lead_s": args.lead, "spread_s": args.spread,
        "mailer": args.mailer, "setup_s": setup_s,
        "p50_s": percentile(lateness, 50), "p90_s": percentile(lateness, 90),
        "p99_s": percentile(lateness, 99), "max_s": lateness[-1] if lateness else None,
        "min_s": lateness[0] if lateness else None, "early": early,
        "flush_rate": (len(send_times) - 1) / span if span else None,
        "needed_rate": needed,
    }
    say(f"email-timeliness ({args.backend}, mailer {args.mailer}): "
        f"{len(sent):,} of {n:,} digests sent")
    say(table([
        ("deadlines", f"{args.lead:.0f}–{args.lead + args.spread:.0f} s after insert"),
        ("lateness p50", fmt_ms(figures["p50_s"])),
        ("lateness p90", fmt_ms(figures["p90_s"])),
        ("lateness p99", fmt_ms(figures["p99_s"])),
        ("lateness max", fmt_ms(figures["max_s"])),
        ("sent before deadline", f"{early:,}"),
        ("digests/s achieved (first→last send)", common.fmt_rate(figures["flush_rate"])),
        ("digests/s the deadlines ask for", common.fmt_rate(needed)),
    ]))
    by_deadline = sorted((deadlines[u] - t0, sent[u] - deadlines[u]) for u in sent)
    p99_ms = None if figures["p99_s"] is None else figures["p99_s"] * 1000
    return {
        "figures": figures,
        "goals": [goal("p99 lateness (ms)", p99_ms, 100, higher_is_better=False, unit=" ms")],
        "series": {"lateness_s": common.downsample(lateness, 5_000),
                   "deadline_vs_lateness": common.downsample(by_deadline, 3_000)},
        "headline": {"p50 ms": _ms(figures["p50_s"]), "p99 ms": p99_ms,
                     "max ms": _ms(figures["max_s"])},
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000
