"""Shared helpers of the benchmark scenarios: backends, bulk data, waiting, results.

Every load loop here is bounded twice: by a count and by a deadline. Nothing here
asserts a timing; scenarios print figures and compare them with the goals.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKENDS = ("embedded", "production")

# The iOS app id every benchmark device carries (the apns-topic of its pushes).
IOS_APP_ID = "org.zulip.Zulip"
# The bundle id the APNs client is configured with.
CLIENT_TOPIC = "org.herald.bench"
REALM = {"realm_name": "Bench", "realm_url": "https://chat.example.com"}
# A batching period long enough that nothing flushes during a benchmark (seconds).
LONG_BATCHING_PERIOD = 86_400
# A worker's Dramatiq threads unless a scenario is told otherwise: the shipped default.
DEFAULT_WORKER_THREADS: int = Settings.model_fields["WORKER_THREADS"].default
# Rows per INSERT statement in bulk loads.
INSERT_CHUNK = 1_000


# Output ---------------------------------------------------------------------------------


def say(text: str = "") -> None:
    """Print a line without tearing an active progress bar."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def progress(total: int, desc: str, unit: str = "msg") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                dynamic_ncols=True, file=sys.stderr, mininterval=0.25)


def table(rows: Sequence[tuple[str, str]]) -> str:
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"  {label.ljust(width)}  {value}" for label, value in rows)


def fmt_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}/s"


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:,.1f} ms"


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


def downsample(values: Sequence[Any], limit: int = 2_000) -> list[Any]:
    """At most `limit` evenly spaced items of `values` (for plots in the results)."""
    if len(values) <= limit:
        return list(values)
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


def rss_mib() -> float:
    """This process's resident set size (VmRSS of /proc/self/status), in MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def goal(name: str, value: float | None, target: float, *, higher_is_better: bool = True,
         unit: str = "") -> dict[str, Any]:
    """A goal line for the results: met when `value` reaches `target`."""
    met = None if value is None else (value >= target if higher_is_better else value <= target)
    return {"name": name, "value": value, "target": target, "unit": unit,
            "higher_is_better": higher_is_better, "met": met}


def describe_goals(goals: Sequence[dict[str, Any]]) -> str:
    lines = []
    for g in goals:
        value = g["value"]
        sign = "≥" if g["higher_is_better"] else "≤"
        if value is None:
            verdict = "not measured"
        elif g["met"]:
            verdict = "met"
        else:
            off = abs(value - g["target"]) / g["target"] * 100 if g["target"] else 0
            verdict = f"MISSED by {off:.0f}%"
        shown = "n/a" if value is None else f"{value:,.1f}{g['unit']}"
        lines.append(f"  goal {g['name']}: {shown} (target {sign} {g['target']:,}{g['unit']})"
                     f" — {verdict}")
    return "\n".join(lines)


def command_line(argv: Sequence[str]) -> str:
    return "python -m bench " + " ".join(argv)


def save_result(scenario: str, backend: str, result: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{scenario}-{backend}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
    return path


# Backends -------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(prefix: str = "herald-bench-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def backend(name: str) -> Iterator[tuple[dict[str, str], Path]]:
    """Environment for a fresh backend (SQLite file, or a PostgreSQL schema + RabbitMQ
    vhost of its own) and a scratch directory; both are removed afterwards."""
    from tests.harness import backend_env

    with scratch_dir() as tmp, backend_env(name, tmp) as env:
        yield dict(env), tmp


def quiet_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pika", "dramatiq", "aioapns", "peewee_migrate", "herald"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Bulk data ------------------------------------------------------------------------------


def user_email(user_id: int) -> str:
    return f"user{user_id}@example.com"


def insert_users(user_ids: Sequence[int], period: int = LONG_BATCHING_PERIOD,
                 desc: str = "users") -> None:
    """Insert users in bulk (peewee insert_many), bypassing the API."""
    import peewee as pw

    from models import User, db

    now = time.time()
    with db.connection_context(), progress(len(user_ids), f"insert {desc}", "row") as bar:
        for chunk in pw.chunked(user_ids, INSERT_CHUNK):
            rows = [{"id": u, "email": user_email(u), "full_name": f"User {u}",
                     "email_batching_period_seconds": period, "uuid": f"00000000-0000-4000-8000-"
                     f"{u:012d}", "created_at": now, "updated_at": now, **REALM} for u in chunk]
            with db.atomic():
                User.insert_many(rows).execute()
            bar.update(len(chunk))


def apns_token(user_id: int) -> str:
    return f"{user_id:064x}"


def insert_apns_devices(user_ids: Sequence[int]) -> None:
    import peewee as pw

    from models import PushDevice, db

    now = time.time()
    with db.connection_context(), progress(len(user_ids), "insert devices", "row") as bar:
        for chunk in pw.chunked(user_ids, INSERT_CHUNK):
            rows = [{"user_id": u, "kind": "apns", "token": apns_token(u),
                     "ios_app_id": IOS_APP_ID, "created_at": now} for u in chunk]
            with db.atomic():
                PushDevice.insert_many(rows).execute()
            bar.update(len(chunk))


def message_event(user_id: int, message_id: int, channels: Sequence[str]) -> dict[str, Any]:
    """A valid stream-mention event for `user_id`."""
    return {
        "type": "message", "user_id": user_id, "trigger": "mentioned",
        "channels": list(channels),
        "message": {
            "id": message_id, "sender_id": 3, "sender_full_name": "Ada",
            "sender_email": "ada@example.com", "recipient_type": "stream",
            "stream": "design", "stream_id": 12, "topic": "logo",
            "content_html": f"<p>Hello <b>there</b>, message {message_id}</p>",
            "date_sent": 1_700_000_000 + message_id,
        },
    }


def insert_pending_rows(deadlines: dict[int, float], message_base: int) -> dict[int, int]:
    """One pending email row (and its message) per user, due at the given deadline.

    Returns {user_id: message_id}.
    """
    import peewee as pw

    from events import parse_event
    from models import Message, db
    from models import ScheduledMessageNotificationEmail as Row

    users = sorted(deadlines)
    ids = {u: message_base + i for i, u in enumerate(users)}
    now = time.time()
    with db.connection_context(), progress(len(users), "insert pending rows", "row") as bar:
        for chunk in pw.chunked(users, INSERT_CHUNK):
            messages = []
            rows = []
            for u in chunk:
                event = parse_event(message_event(u, ids[u], ("email",)))
                messages.append({"id": ids[u], "data": event.message.model_dump_json(),  # type: ignore[union-attr]
                                 "created_at": now})
                rows.append({"user_id": u, "message_id": ids[u], "trigger": "mentioned",
                             "scheduled_timestamp": deadlines[u], "created_at": now})
            with db.atomic():
                Message.insert_many(messages).execute()
                Row.insert_many(rows).execute()
            bar.update(len(chunk))
    return ids


def count_rows(model: Any) -> int:
    from models import db

    with db.connection_context():
        return int(model.select().count())


# Waiting and publishing ------------------------------------------------------------------


def wait_for_count(count: Callable[[], int], total: int, timeout: float, desc: str,
                   interval: float = 0.1, unit: str = "msg") -> tuple[int, float | None]:
    """Poll `count()` until it reaches `total`, at most `timeout` seconds.

    Returns (last count, seconds until `total` was seen or None on timeout); the time
    is measured from the call.
    """
    started = time.perf_counter()
    deadline = started + timeout
    seen = 0
    with progress(total, desc, unit) as bar:
        while True:
            seen = count()
            bar.update(max(0, min(seen, total) - bar.n))
            if seen >= total:
                return seen, time.perf_counter() - started
            if time.perf_counter() > deadline:
                return seen, None
            time.sleep(interval)


def lower_thread_priority(nice: int) -> None:
    """Run the calling thread at `nice` (Linux keeps a nice value per thread; raising it
    needs no privilege). 0 leaves the thread as it is."""
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def publish_parallel(batches: Sequence[Any], send: Callable[[Any], int], threads: int,
                     desc: str, total: int, timeout: float = 600.0) -> float:
    """Run `send(batch)` for every batch on `threads` threads; returns seconds taken.

    `send` returns how many events the batch held (for the progress bar). Bounded by
    the batch count and by `timeout` (threads stop taking batches after it).
    """
    lock = threading.Lock()
    todo = list(reversed(batches))
    errors: list[BaseException] = []
    started = time.perf_counter()
    deadline = started + timeout

    with progress(total, desc, "ev") as bar:
        def work() -> None:
            while time.perf_counter() < deadline:
                with lock:
                    if not todo or errors:
                        return
                    batch = todo.pop()
                try:
                    sent = send(batch)
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                    return
                with lock:
                    bar.update(sent)

        workers = [threading.Thread(target=work, name=f"bench-publish-{i}", daemon=True)
                   for i in range(max(1, threads))]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout + 5)
    if errors:
        raise errors[0]
    if todo:
        raise TimeoutError(f"publishing did not finish within {timeout}s")
    return time.perf_counter() - started


def start_worker(herald: Any, threads: int) -> Any:
    """Start the actor tree and a Dramatiq worker of an `InProcessHerald` built with
    `start_worker=False`, wired as `supervisor.py worker` wires them."""
    import dramatiq

    herald.tree.start()
    herald.consumers.attach(herald.tree)
    herald.worker = dramatiq.Worker(herald.broker, worker_threads=threads, worker_timeout=100)
    herald.worker.start()
    return herald.worker


def in_process_herald(env: dict[str, str], **kwargs: Any) -> Any:
    """`tests.harness.InProcessHerald` without a worker yet (see `start_worker`)."""
    from tests.harness import InProcessHerald

    return InProcessHerald(env, start_worker=False, **kwargs)


def source_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env
