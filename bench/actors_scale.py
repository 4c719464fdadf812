"""How many actors one process holds: pooled actors against Pykka's threads.

Run it as::

    python -m bench.actors_scale --actors 100000

It starts `--actors` pooled actors on a pool of `--pool-threads` threads,
asks each of them once, and stops them all; then does the same with
`pykka.ThreadingActor` at a count a thread-per-actor runtime can hold
(`--baseline-actors`). Each measurement runs in a fresh interpreter so one
cannot inherit the other's memory. It prints a table and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pykka

from actors.runtime import ActorPool, PooledActor

# Thread-per-actor stops near 21,800 actors on the reference machine; this
# many is enough to measure its per-actor cost without nearing the wall.
DEFAULT_BASELINE_ACTORS = 2_000

# Root of the source tree, put on the path of the measuring subprocesses.
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


class _EchoMixin:
    """What each measured actor does: answer an ask with its argument plus one."""

    def on_receive(self, message: Any) -> Any:
        return message + 1


class _PooledEcho(_EchoMixin, PooledActor):
    pass


class _ThreadedEcho(_EchoMixin, pykka.ThreadingActor):
    # Daemon threads so a failed run cannot hang the interpreter at exit.
    use_daemon_thread = True


def _proc_status(field: str) -> int:
    """Read an integer field of /proc/self/status (kB for memory fields)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    msg = f"/proc/self/status has no {field} field"
    raise RuntimeError(msg)


def _measure(kind: str, actor_class: type[pykka.Actor], actors: int) -> dict[str, Any]:
    """Start, ask and stop `actors` actors of `actor_class`, in this process."""
    rss_before_kib = _proc_status("VmRSS")

    began = time.perf_counter()
    refs = [actor_class.start() for _ in range(actors)]
    start_s = time.perf_counter() - began

    rss_after_kib = _proc_status("VmRSS")
    threads_python = threading.active_count()
    threads_os = _proc_status("Threads")

    began = time.perf_counter()
    futures = [ref.ask(i, block=False) for i, ref in enumerate(refs)]
    answers = [future.get(timeout=600) for future in futures]
    ask_all_s = time.perf_counter() - began
    if answers != [i + 1 for i in range(actors)]:
        msg = f"{kind}: wrong answers"
        raise RuntimeError(msg)

    began = time.perf_counter()
    stops = [ref.stop(block=False) for ref in refs]
    stopped = sum(1 for stop in stops if stop.get(timeout=600))
    stop_s = time.perf_counter() - began

    return {
        "kind": kind,
        "actors": stopped,
        "start_s": start_s,
        "ask_all_s": ask_all_s,
        "rss_mib": rss_after_kib / 1024,
        "rss_per_actor_bytes": (rss_after_kib - rss_before_kib) * 1024 / actors,
        "threads_python": threads_python,
        "threads_os": threads_os,
        "stop_s": stop_s,
    }


def measure_pooled(actors: int, pool_threads: int = 8) -> dict[str, Any]:
    """Measure `actors` pooled actors on a new pool, in this process."""
    pool = ActorPool(pool_threads, "herald-bench-pool")
    actor_class = type("PooledEcho", (_PooledEcho,), {"actor_pool": pool})
    try:
        return _measure("pooled", actor_class, actors)
    finally:
        pool.shutdown()


def measure_threading(actors: int) -> dict[str, Any]:
    """Measure `actors` Pykka thread-per-actor actors, in this process."""
    return _measure("threading", _ThreadedEcho, actors)


def _measure_in_subprocess(kind: str, actors: int, pool_threads: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.actors_scale",
        "--measure",
        kind,
        "--actors",
        str(actors),
        "--pool-threads",
        str(pool_threads),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_SOURCE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        command, cwd=_SOURCE_ROOT, env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run(
    actors: int, pool_threads: int = 8, baseline_actors: int = DEFAULT_BASELINE_ACTORS
) -> dict[str, Any]:
    """Measure pooled actors and the thread-per-actor baseline.

    Each measurement runs in its own fresh interpreter.

    Returns:
        `{"pooled": figures, "threading": figures, "memory_ratio": float}`,
        where figures has `actors` (started and stopped), `start_s`,
        `ask_all_s` (one ask to every actor, all in flight at once),
        `rss_mib` (after start), `rss_per_actor_bytes`, `threads_python`,
        `threads_os` and `stop_s`; `memory_ratio` is the baseline's memory
        per actor over the pooled actors'.
    """
    pooled = _measure_in_subprocess("pooled", actors, pool_threads)
    threaded = _measure_in_subprocess("threading", baseline_actors, pool_threads)
    return {
        "pooled": pooled,
        "threading": threaded,
        "memory_ratio": threaded["rss_per_actor_bytes"] / pooled["rss_per_actor_bytes"],
    }


def _format_table(figures: dict[str, Any], pool_threads: int) -> str:
    pooled = figures["pooled"]
    threaded = figures["threading"]
    rows = [
        ("actors started", "{:,}", "actors"),
        ("start, s", "{:.2f}", "start_s"),
        ("one ask to every actor, s", "{:.2f}", "ask_all_s"),
        ("RSS after start, MiB", "{:.1f}", "rss_mib"),
        ("RSS per actor, bytes", "{:,.0f}", "rss_per_actor_bytes"),
        ("threads (threading.active_count)", "{}", "threads_python"),
        ("threads (/proc Threads)", "{}", "threads_os"),
        ("stop all, s", "{:.2f}", "stop_s"),
    ]
    headers = ("", f"PooledActor ({pool_threads} threads)", "ThreadingActor", "ratio")
    lines = [headers]
    for label, fmt, key in rows:
        ratio = ""
        if key == "rss_per_actor_bytes":
            ratio = f"{figures['memory_ratio']:.1f}x"
        lines.append((label, fmt.format(pooled[key]), fmt.format(threaded[key]), ratio))
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, default=100_000)
    parser.add_argument("--pool-threads", type=int, default=8)
    parser.add_argument("--baseline-actors", type=int, default=DEFAULT_BASELINE_ACTORS)
    # Internal: measure one kind in this process and print JSON.
    parser.add_argument("--measure", choices=["pooled", "threading"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure == "pooled":
        print(json.dumps(measure_pooled(args.actors, args.pool_threads)))
        return
    if args.measure == "threading":
        print(json.dumps(measure_threading(args.actors)))
        return

    figures = run(args.actors, args.pool_threads, args.baseline_actors)
    print(_format_table(figures, args.pool_threads))


if __name__ == "__main__":
    main()
