"""herald's entry point: `python supervisor.py [all|web|worker|migrate|dead-letters …]`.

- `all` (default): HTTP ingest API, Dramatiq consumers and the actor tree in one
  process. With no configuration: SQLite `herald.db`, an in-process broker, emails
  written to `outbox/`, pushes logged (dry run), and an API key generated on the first
  start and kept in the database for every later one.
- `web`: the ingest API only; publishes to RabbitMQ (`BROKER_URL` required).
- `worker`: consumers and actors only (`BROKER_URL` required).
- `migrate`: apply database migrations and exit.
- `dead-letters list|show ID|replay ID…|replay --all`: operate the dead-letter store.

SIGTERM (or Ctrl-C) drains: the API stops taking requests, the Dramatiq worker
finishes the messages in hand and hands the prefetched ones back to the broker, the
actor tree finishes in-flight sends; then the process exits 0. If the root
supervisor's restart budget is spent, the process exits 70 for its manager to restart;
if the database cannot be reached at start-up, it exits 75 with one line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# Exit statuses: a configuration error, a command line that makes no sense (both as
# argparse's own), a supervisor that gave up, and a database out of reach at start-up
# (sysexits' EX_TEMPFAIL: starting again later may work).
EXIT_CONFIG = 2
EXIT_USAGE = 2
EXIT_GAVE_UP = 70
EXIT_UNAVAILABLE = 75
# Seconds a draining worker's threads get, once the actors have stopped, to fail the
# events still in hand for their retry (a PushActor's stop is seen within a second).
SETTLE_AFTER_STOP_SECONDS = 10.0
# Connections the API's socket queues before it accepts them (uvicorn's default).
API_BACKLOG = 2048
# Random bytes in the API key `all` generates without HERALD_API_KEYS (32 characters).
EMBEDDED_KEY_BYTES = 24
# The largest id (and `list --limit`) the dead-letter commands take: SQLite's largest
# integer, past which it cannot even be asked (PostgreSQL compares it as a bigint).
MAX_ID = 2**63 - 1

logger = logging.getLogger("herald")


def _configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter at INFO would drown herald's own lines.
    for noisy in ("pika", "dramatiq", "uvicorn.access", "aioapns", "httpx", "peewee_migrate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python supervisor.py",
        description="herald: missed-message push notifications and email digests.",
        epilog="Configuration comes from environment variables; see README.md.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("all", help="API, consumers and actors in one process (default)")
    sub.add_parser("web", help="the ingest API only (needs BROKER_URL)")
    sub.add_parser("worker", help="consumers and actors only (needs BROKER_URL)")
    sub.add_parser("migrate", help="apply database migrations and exit")
    dl = sub.add_parser("dead-letters", help="list, show or replay dead letters")
    dl_sub = dl.add_subparsers(dest="action", required=True)
    ls = dl_sub.add_parser("list", help="the newest dead letters")
    ls.add_argument("--limit", type=_positive_integer, default=50,
                    help="how many to list (default 50)")
    ls.add_argument("--all", action="store_true", help="include replayed ones")
    show = dl_sub.add_parser("show", help="one dead letter with its payload")
    show.add_argument("id", type=_positive_integer)
    replay = dl_sub.add_parser(
        "replay", help="send dead letters' work again: by id, or --all that the filters select")
    replay.add_argument("ids", type=_positive_integer, nargs="*", metavar="ID")
    replay.add_argument("--all", action="store_true",
                        help="every dead letter not yet replayed, of a replayable kind, "
                             "oldest first")
    replay.add_argument("--kind", choices=("queue_message", "email_batch"),
                        help="with --all: only this kind")
    replay.add_argument("--queue", help="with --all: only letters from this queue")
    replay.add_argument("--reason", help="with --all: only those whose reason contains this")
    replay.add_argument("--dry-run", action="store_true",
                        help="list what would be replayed, and change nothing")
    return parser


def _positive_integer(text: str) -> int:
    """A dead letter id or a count, as a usage error when no letter could have it:
    asked about an integer past 64 bits, SQLite raises OverflowError."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_ID}, not {text}")
    return value


class Process:
    """One herald process: what it runs, and how it stops.

    Parameters:
      settings: the validated configuration.
      mode: "all", "web" or "worker".
    """

    def __init__(self, settings: Any, mode: str) -> None:
        self.settings = settings
        self.mode = mode
        self.exit_code = 0
        self.stopping = threading.Event()
        self.server: Any = None
        # The API's socket (`all`, `web`), bound before any thread starts.
        self.listener: socket.socket | None = None
        self.tree: Any = None
        self.worker: Any = None

    def give_up(self, reason: str) -> None:
        """The root supervisor spent its budget: drain and exit non-zero."""
        self.exit_code = EXIT_GAVE_UP
        self.request_stop()

    def request_stop(self, *_args: Any) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.should_exit = True

    def run(self) -> int:
        import dramatiq

        import models
        from intake.broker import make_broker
        from intake.broker import ping as broker_ping
        from intake.consumers import Consumers
        from intake.memory import InMemoryBroker, requeue_kept

        s = self.settings
        models.open_database(s.DATABASE_URL)
        applied = models.migrate()
        if applied:
            logger.info("applied migrations: %s", ", ".join(applied))
        if self.mode == "all" and not s.api_keys:
            # After the migrations, which create the table the key is kept in; before
            # anything reads `api_keys` or signs an unsubscribe link with it.
            s = self.settings = _with_embedded_api_key(s)
        broker = make_broker(s)
        consumers = Consumers(broker, s.PUSH_SHARDS)
        if isinstance(broker, InMemoryBroker):
            requeue_kept(broker)  # what the last stop kept, before anything new
        # Before any thread starts: a port that is taken must stop the process here,
        # not leave it running without its metrics (or hung by its actors' threads),
        # nor start consuming only to stop again because the API cannot listen.
        if s.METRICS_PORT:
            _serve_metrics(s.METRICS_PORT, s.HOST)
        if self.mode in ("all", "web"):
            self.listener = _listen(s.HOST, s.PORT)

        if self.mode in ("all", "worker"):
            from actors.tree import ActorTree

            if self.mode == "worker" and not s.PUBLIC_URL:
                logger.warning("PUBLIC_URL is not set: unsubscribe links in emails point "
                               "at %s", s.public_url)

            self.tree = ActorTree(s, self.give_up)
            self.tree.start()
            consumers.attach(self.tree)
            self.worker = dramatiq.Worker(broker, worker_threads=s.WORKER_THREADS)
            self.worker.start()
            logger.info("worker started: %d push shard(s), %d consumer threads",
                        s.PUSH_SHARDS, s.WORKER_THREADS)

        # uvicorn hands a caught SIGTERM back to the previous handler after its own
        # graceful shutdown: that handler must drain, not kill the process.
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            if self.mode in ("all", "web"):
                self._serve_http(broker, lambda: models.ping(), lambda: broker_ping(broker))
            else:
                while not self.stopping.wait(1.0):
                    pass
        finally:
            self._drain(broker)
        return self.exit_code

    def _serve_http(self, broker: Any, *checks: Callable[[], None]) -> None:
        import uvicorn

        from ingest.api import HeraldAPI
        from ingest.app import create_app

        def database() -> None:
            checks[0]()

        def queue() -> None:
            checks[1]()

        app = create_app(HeraldAPI(self.settings, broker), [database, queue])
        config = uvicorn.Config(
            app, host=self.settings.HOST, port=self.settings.PORT, log_config=None,
            access_log=False, lifespan="off", timeout_graceful_shutdown=30,
        )
        self.server = uvicorn.Server(config)
        if self.stopping.is_set():
            return
        assert self.listener is not None
        self.server.run(sockets=[self.listener])

    def _drain(self, broker: Any) -> None:
        logger.info("draining")
        if self.worker is not None:
            # Finishes messages in hand; prefetched ones go back to the broker.
            self.worker.stop(timeout=int(self.settings.DRAIN_SECONDS * 1000))
        if self.tree is not None:
            self.tree.stop()
        if self.worker is not None:
            # Messages still in hand after the drain: the actors' stop has failed their
            # work; their threads now queue the retries (or dead letters), which the
            # in-memory queue must hold before it is kept below.
            _join_worker_threads(self.worker, SETTLE_AFTER_STOP_SECONDS)
        from intake.memory import InMemoryBroker, keep

        if isinstance(broker, InMemoryBroker):
            try:
                keep(broker)  # the in-process queue would die with the process
            except Exception:
                logger.exception("could not keep the queue messages still in memory: "
                                 "they are lost")
        broker.close()
        if self.listener is not None:
            self.listener.close()  # uvicorn closes it too, unless it never ran
        logger.info("stopped")


def _join_worker_threads(worker: Any, seconds: float) -> None:
    """Wait up to `seconds` in all for `worker`'s (stopped) threads to finish."""
    deadline = time.monotonic() + seconds
    for thread in worker.workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    busy = sum(thread.is_alive() for thread in worker.workers)
    if busy:
        logger.error("%d worker thread(s) still busy %.0f s after the actors stopped: "
                     "RabbitMQ delivers their messages again; on the in-memory queue "
                     "their events are lost", busy, seconds)


def _with_embedded_api_key(settings: Any) -> Any:
    """`settings` with the API key this database keeps, generated and stored on the
    first start without HERALD_API_KEYS; prints it with lines to try it.

    The key must outlive the process: the operator has configured it in their chat
    server, and unless HERALD_SECRET_KEY is set, unsubscribe links in emails already
    sent are signed with a key derived from it.

    Parameters:
      settings: the validated configuration, without API keys; its database is open
        and migrated.
    """
    import models
    from settings import load_settings

    key, created = models.instance_secret(
        models.EMBEDDED_API_KEY_NAME, lambda: secrets.token_urlsafe(EMBEDDED_KEY_BYTES))
    # Through the environment, as if the operator had set it: anything that loads the
    # settings again in this process sees the same key.
    os.environ["HERALD_API_KEYS"] = key
    settings = load_settings()
    logger.info("API key: %s the database (HERALD_API_KEYS is unset)",
                "generated and stored in" if created else "read from")
    _print_key_hint(settings, created)
    return settings


def _print_key_hint(settings: Any, created: bool) -> None:
    """Print the API key and two `curl` lines to try it (on stdout, for the operator).

    Parameters:
      settings: the configuration, whose first API key is the one printed.
      created: whether the key was generated by this start (else it was kept from an
        earlier one).
    """
    import models

    key = settings.api_keys[0]
    base = f"http://{settings.HOST}:{settings.PORT}"
    origin = "generated for this database and stored in it" if created else "stored in the database"
    table = models.InstanceSecret._meta.table_name
    print(
        f"herald: API key: {key}\n"
        f"herald: {origin} (table {table}): every start uses it until you set "
        f"HERALD_API_KEYS\n"
        f"herald: try it:\n"
        f"  curl -s -X PUT {base}/v1/users/7 -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' "
        f"-d '{{\"email\": \"ada@example.com\", \"full_name\": \"Ada\"}}'\n"
        f"  curl -s -X POST {base}/v1/events -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{{\"type\": \"message\", \"user_id\": 7, "
        f"\"trigger\": \"direct_message\", \"message\": {{\"id\": 1, \"sender_id\": 3, "
        f"\"sender_full_name\": \"Bob\", \"sender_email\": \"bob@example.com\", "
        f"\"recipient_type\": \"private\", \"content_html\": \"<p>hi</p>\", "
        f"\"date_sent\": {int(time.time())}}}}}'",
        flush=True,
    )


def _dead_letters(settings: Any, args: argparse.Namespace) -> int:
    import models
    from intake import dead_letters

    models.open_database(settings.DATABASE_URL)
    models.migrate()
    if args.action == "list":
        rows = dead_letters.list_dead_letters(limit=args.limit, include_replayed=args.all)
        if not rows:
            print("no dead letters")
        for row in rows:
            _print_dead_letter(row)
        return 0
    if args.action == "replay":
        return _replay(settings, args)
    found = dead_letters.get_dead_letter(args.id)
    if found is None:
        print(f"herald: no dead letter {args.id}", file=sys.stderr)
        return 1
    print(json.dumps(found.as_dict(with_payload=True), indent=2, sort_keys=True))
    return 0


def _print_dead_letter(row: Any) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row.created_at))
    replayed = " (replayed)" if row.replayed_at else ""
    print(f"{row.id:>6}  {when}  {row.kind:<14} {row.queue or '-':<14} "
          f"tries={row.attempts:<3} {row.reason[:80]}{replayed}")


def _replay(settings: Any, args: argparse.Namespace) -> int:
    from intake.replay import Replayer, ReplayRefused, Selection

    filters = args.kind or args.queue or args.reason
    if bool(args.ids) == bool(args.all) or (filters and not args.all):
        print("herald: replay takes dead letter ids, or --all (with --kind, --queue and "
              "--reason to narrow it)", file=sys.stderr)
        return EXIT_USAGE
    ids = Selection(args.kind, args.queue, args.reason).ids() if args.all else args.ids
    replayer = Replayer(settings)
    if args.dry_run:
        # The replay's own checks, so the count is what the replay would send and the
        # refusals are the ones it would print.
        chosen = []
        for letter_id in ids:
            try:
                chosen.append(replayer.check(letter_id))
            except ReplayRefused as exc:
                print(f"herald: {exc}", file=sys.stderr)
        for row in chosen:
            _print_dead_letter(row)
        print(f"would replay {len(chosen)} dead letter(s)")
        return 0
    try:
        done, problems = replayer.replay_all(ids)
    finally:
        with contextlib.suppress(Exception):
            replayer.close()
    for row in done:
        print(f"replayed dead letter {row.id}")
    for problem in problems:
        print(f"herald: {problem}", file=sys.stderr)
    if args.all:
        print(f"replayed {len(done)} of {len(ids)} dead letter(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    mode = args.command or "all"
    from settings import ConfigError, load_settings

    try:
        settings = load_settings()
        if mode in ("web", "worker") and not settings.BROKER_URL:
            raise ConfigError(f"BROKER_URL: required for `{mode}` (processes share RabbitMQ)")
        if mode == "web" and not settings.api_keys:
            raise ConfigError("HERALD_API_KEYS: required for `web`")
        if mode == "worker" and not (settings.HERALD_SECRET_KEY or settings.api_keys):
            # Without either, its emails' unsubscribe links would carry a signature
            # the web process refuses.
            raise ConfigError("HERALD_SECRET_KEY: required for `worker` (or the web's "
                              "HERALD_API_KEYS): it signs the unsubscribe links that "
                              "the web process checks")
        if mode in ("all", "worker"):
            _check_push_providers(settings)
    except ConfigError as exc:
        print(f"herald: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logging(settings.LOG_FORMAT, settings.LOG_LEVEL)
    if settings.cpu_affinity is not None:
        _pin_to(settings.cpu_affinity)
    from models import DATABASE_UNAVAILABLE

    try:
        return _start(settings, mode, args)
    except ConfigError as exc:
        print(f"herald: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DATABASE_UNAVAILABLE as exc:
        # Only start-up gets here: once running, database errors are retried inside.
        print(f"herald: database unavailable: {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _serve_metrics(port: int, host: str) -> None:
    """Serve `/metrics` on `port` from a thread of its own; ConfigError if it is taken."""
    from prometheus_client import start_http_server

    from settings import ConfigError

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(f"METRICS_PORT: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None


def _listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound now; ConfigError if the address is taken."""
    from settings import ConfigError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=API_BACKLOG)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"PORT: cannot listen on {host}:{port}: {reason}") from None


def _check_push_providers(settings: Any) -> None:
    """Raise ConfigError when a push provider's key, certificate or credentials cannot
    be used: the process that would send with them must not start."""
    from actors._push_engine import check_providers
    from settings import ConfigError

    try:
        check_providers(settings)
    except (ValueError, OSError) as exc:  # the senders' errors name their setting
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _pin_to(cpus: frozenset[int]) -> None:
    """Keep every thread of this process, and those it starts later, on `cpus`.

    Linux keeps an affinity per thread and a new thread inherits its creator's, so each
    thread that exists now (an import may have started one) is pinned as well as this one.
    """
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(task), cpus)
    logger.info("running on CPU %s", ",".join(str(cpu) for cpu in sorted(cpus)))


def _start(settings: Any, mode: str, args: argparse.Namespace) -> int:
    if mode == "migrate":
        import models

        models.open_database(settings.DATABASE_URL)
        applied = models.migrate()
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        return 0
    if mode == "dead-letters":
        return _dead_letters(settings, args)
    return Process(settings, mode).run()


if __name__ == "__main__":
    sys.exit(main())
