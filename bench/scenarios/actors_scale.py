"""`actors-scale`: pooled actors per process, and re-arming real UserBatchActors."""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import common
from bench.common import goal, say, table

NAME = "actors-scale"
SUMMARY = "100,000 pooled actors (RSS, threads) + restart with N pending users (re-arm time)"
DESCRIPTION = """\
Part 1 wraps bench.actors_scale.run: --actors PooledActors on an 8-thread pool
against Pykka's thread-per-actor baseline, each in a fresh interpreter (start time,
one ask to each, RSS, threads). Goal: >= 100,000 pending users per process within
1 GiB RSS.

Part 2 is herald's own restart path: --users users each with one pending email row
(bulk-inserted with peewee insert_many, deadlines an hour ahead), then an ActorTree
is started; the clock runs until the BatchRouter's PendingCount equals N (one
UserBatchActor per user) and until every user's timer is armed (the TimerWheel
holds N deadlines). Prints the process RSS (VmRSS) after. Goal: restart with
100,000 pending users, all re-armed within 10 s."""

DEFAULT_ACTORS = 100_000
DEFAULT_USERS = 100_000
TIMEOUT = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actors", type=int, default=DEFAULT_ACTORS,
                        help=f"pooled actors in part 1 (default {DEFAULT_ACTORS:,})")
    parser.add_argument("--users", type=int, default=DEFAULT_USERS,
                        help=f"pending users in part 2 (default {DEFAULT_USERS:,})")
    parser.add_argument("--pool-threads", type=int, default=8)
    parser.add_argument("--skip-pooled", action="store_true", help="run part 2 only")
    parser.add_argument("--skip-rearm", action="store_true", help="run part 1 only")


def _pooled(args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        from bench.actors_scale import run as scale_run
    except ImportError as exc:
        say(f"bench.actors_scale is not importable ({exc}); part 1 skipped")
        return None
    say(f"part 1: bench.actors_scale.run({args.actors:,} pooled actors) …")
    figures = scale_run(args.actors, args.pool_threads)
    pooled, threaded = figures["pooled"], figures["threading"]
    say(table([
        ("pooled actors", f"{pooled['actors']:,} on {args.pool_threads} threads"),
        ("start", f"{pooled['start_s']:.2f} s"),
        ("one ask to each", f"{pooled['ask_all_s']:.2f} s"),
        ("RSS after start", f"{pooled['rss_mib']:.0f} MiB "
                            f"({pooled['rss_per_actor_bytes']:,.0f} B/actor)"),
        ("threads (OS)", str(pooled["threads_os"])),
        ("stop all", f"{pooled['stop_s']:.2f} s"),
        ("thread-per-actor baseline", f"{threaded['actors']:,} actors, "
                                      f"{threaded['rss_per_actor_bytes']:,.0f} B/actor"),
        ("memory ratio", f"{figures['memory_ratio']:.1f}x less per actor"),
    ]))
    return figures


def _rearm(args: argparse.Namespace) -> dict[str, Any]:
    import models
    from actors.tree import ActorTree
    from settings import load_settings

    n = args.users
    with common.backend(args.backend) as (env, tmp):
        settings = load_settings({**env, "ACTOR_POOL_THREADS": str(args.pool_threads),
                                  "OUTBOX_DIR": str(tmp / "outbox")})
        database = models.open_database(settings.DATABASE_URL)
        models.migrate()
        users = list(range(1, n + 1))
        common.insert_users(users)
        later = time.time() + 3600
        common.insert_pending_rows({u: later for u in users}, 10_000_000)
        rss_before = common.rss_mib()

        gave_up: list[str] = []
        tree = ActorTree(settings, gave_up.append)
        say(f"part 2: starting an ActorTree over {n:,} pending users ({args.backend}) …")
        began = time.perf_counter()
        tree.start()
        tree_started_s = time.perf_counter() - began

        def pending() -> int:
            routers = tree.routers()
            if routers.batch is None:
                return 0
            try:
                from actors.batch import PendingCount

                return int(routers.batch.ask(PendingCount(), timeout=60))  # type: ignore[arg-type]
            except Exception:
                return 0

        seen, routed = common.wait_for_count(pending, n, TIMEOUT, "actors started", 0.05,
                                             "actor")
        routed_s = None if routed is None else routed + tree_started_s
        assert tree.timers is not None
        timers = tree.timers
        # N user deadlines plus the router's sweep timer.
        armed_count, armed = common.wait_for_count(lambda: max(0, len(timers) - 1), n, TIMEOUT,
                                                   "timers armed", 0.05, "timer")
        armed_s = None if armed is None else time.perf_counter() - began
        rss_after = common.rss_mib()
        threads = common_threads()
        say("stopping the tree …")
        stop_began = time.perf_counter()
        tree.stop(timeout=120)
        stop_s = time.perf_counter() - stop_began
        database.close()
    figures = {
        "users": n, "actors_started": seen, "timers_armed": armed_count,
        "tree_start_s": tree_started_s, "all_routed_s": routed_s, "all_armed_s": armed_s,
        "rss_before_mib": rss_before, "rss_after_mib": rss_after,
        "rss_per_user_bytes": (rss_after - rss_before) * 1024 * 1024 / n if n else None,
        "threads_os": threads, "stop_s": stop_s, "gave_up": gave_up,
    }
    say(table([
        ("pending users", f"{n:,}"),
        ("PendingCount == N after", _s(routed_s)),
        ("all timers armed after", _s(armed_s)),
        ("RSS before / after", f"{rss_before:.0f} / {rss_after:.0f} MiB "
                               f"(+{figures['rss_per_user_bytes']:,.0f} B/user)"),
        ("threads (OS)", str(threads)),
        ("tree stop", f"{stop_s:.2f} s"),
    ]))
    return figures


def common_threads() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


def _s(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f} s"


def run(args: argparse.Namespace) -> dict[str, Any]:
    pooled = None if args.skip_pooled else _pooled(args)
    rearm = None if args.skip_rearm else _rearm(args)
    goals = []
    if pooled is not None:
        p = pooled["pooled"]
        goals.append(goal(f"pooled actors within 1 GiB (RSS MiB at {p['actors']:,})",
                          p["rss_mib"], 1024, higher_is_better=False, unit=" MiB"))
    if rearm is not None:
        if rearm["users"] >= 100_000:
            goals.append(goal("re-arm 100,000 pending users (s)", rearm["all_armed_s"], 10,
                              higher_is_better=False, unit=" s"))
        goals.append(goal("process RSS with N pending users (MiB)", rearm["rss_after_mib"],
                          1024, higher_is_better=False, unit=" MiB"))
    return {
        "figures": {"pooled": pooled, "rearm": rearm},
        "goals": goals,
        "headline": {
            "pooled RSS MiB": pooled["pooled"]["rss_mib"] if pooled else None,
            "re-arm s": rearm["all_armed_s"] if rearm else None,
            "re-arm RSS MiB": rearm["rss_after_mib"] if rearm else None,
        },
    }
