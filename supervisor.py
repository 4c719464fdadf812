"""herald's entry point: `python supervisor.py [all|web|worker|migrate|dead-letters …]`.

- `all` (default): HTTP ingest API, Dramatiq consumers and the actor tree in one
  process. With no configuration: SQLite `herald.db`, an in-process broker, emails
  written to `outbox/`, pushes logged (dry run).
- `web`: the ingest API only; publishes to RabbitMQ (`BROKER_URL` required).
- `worker`: consumers and actors only (`BROKER_URL` required).
- `migrate`: apply database migrations and exit.
- `dead-letters list|show ID|replay ID`: operate the dead-letter store.

SIGTERM (or Ctrl-C) drains: the API stops taking requests, the Dramatiq worker
finishes the messages in hand and hands the prefetched ones back to the broker, the
actor tree finishes in-flight sends; then the process exits 0. If the root
supervisor's restart budget is spent, the process exits 70 for its manager to restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# Exit statuses: a configuration error, and a supervisor that gave up.
EXIT_CONFIG = 2
EXIT_GAVE_UP = 70
# How long a draining worker waits for messages in hand (milliseconds).
DRAIN_TIMEOUT_MS = 60_000

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
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--all", action="store_true", help="include replayed ones")
    show = dl_sub.add_parser("show", help="one dead letter with its payload")
    show.add_argument("id", type=int)
    replay = dl_sub.add_parser("replay", help="send a dead letter's work again")
    replay.add_argument("id", type=int)
    return parser


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

        s = self.settings
        models.open_database(s.DATABASE_URL)
        applied = models.migrate()
        if applied:
            logger.info("applied migrations: %s", ", ".join(applied))
        broker = make_broker(s)
        consumers = Consumers(broker, s.PUSH_SHARDS)

        if self.mode in ("all", "worker"):
            from actors.tree import ActorTree

            self.tree = ActorTree(s, self.give_up)
            self.tree.start()
            consumers.attach(self.tree)
            self.worker = dramatiq.Worker(broker, worker_threads=s.WORKER_THREADS)
            self.worker.start()
            logger.info("worker started: %d push shard(s), %d consumer threads",
                        s.PUSH_SHARDS, s.WORKER_THREADS)
        if s.METRICS_PORT:
            from prometheus_client import start_http_server

            start_http_server(s.METRICS_PORT, addr=s.HOST)

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
        self.server.run()

    def _drain(self, broker: Any) -> None:
        logger.info("draining")
        if self.worker is not None:
            # Finishes messages in hand; prefetched ones go back to the broker.
            self.worker.stop(timeout=DRAIN_TIMEOUT_MS)
        if self.tree is not None:
            self.tree.stop()
        broker.close()
        logger.info("stopped")


def _print_key_hint(settings: Any) -> None:
    key = settings.api_keys[0]
    base = f"http://{settings.HOST}:{settings.PORT}"
    print(
        f"herald: API key: {key}\n"
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
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row.created_at))
            replayed = " (replayed)" if row.replayed_at else ""
            print(f"{row.id:>6}  {when}  {row.kind:<14} {row.queue or '-':<14} "
                  f"tries={row.attempts:<3} {row.reason[:80]}{replayed}")
        return 0
    found = dead_letters.get_dead_letter(args.id)
    if found is None:
        print(f"herald: no dead letter {args.id}", file=sys.stderr)
        return 1
    row = found
    if args.action == "show":
        print(json.dumps(row.as_dict(with_payload=True), indent=2, sort_keys=True))
        return 0
    return _replay(settings, row)


def _replay(settings: Any, row: Any) -> int:
    import dramatiq

    import models
    from intake import dead_letters
    from intake.broker import make_broker
    from intake.consumers import COMMAND_REPLAY_EMAIL_BATCH, Consumers
    from intake.publisher import Publisher
    from intake.queues import EMAIL_ACTOR, EMAIL_QUEUE

    payload = json.loads(row.payload)
    if row.replayed_at:
        print(f"herald: dead letter {row.id} was already replayed", file=sys.stderr)
        return 1
    if row.kind == dead_letters.KIND_EMAIL_BATCH and not settings.BROKER_URL:
        # Embedded default: put the rows back; the running herald's sweep picks them up.
        from actors._batch_store import restore_rows

        restore_rows(payload["user_id"], payload["rows"], time.time())
    elif not settings.BROKER_URL:
        print("herald: replaying a queue message needs BROKER_URL (the in-process broker "
              "lives in the running herald); POST its event to /v1/events instead:\n"
              + json.dumps(payload.get("args", [None])[0]), file=sys.stderr)
        return 1
    else:
        broker = make_broker(settings)
        Consumers(broker, settings.PUSH_SHARDS)
        if row.kind == dead_letters.KIND_EMAIL_BATCH:
            Publisher(broker, settings.PUSH_SHARDS).command(
                EMAIL_QUEUE, EMAIL_ACTOR, COMMAND_REPLAY_EMAIL_BATCH, payload)
        elif row.kind == dead_letters.KIND_QUEUE_MESSAGE:
            broker.enqueue(dramatiq.Message(
                queue_name=payload["queue"], actor_name=payload["actor"],
                args=tuple(payload["args"]), kwargs=payload.get("kwargs", {}), options={}))
        else:
            print(f"herald: dead letters of kind {row.kind} cannot be replayed "
                  "(the provider refused them permanently)", file=sys.stderr)
            return 1
        broker.close()
    with models.db.connection_context():
        dead_letters.mark_replayed(row.id)
    print(f"replayed dead letter {row.id}")
    return 0


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
    except ConfigError as exc:
        print(f"herald: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logging(settings.LOG_FORMAT, settings.LOG_LEVEL)

    if mode == "migrate":
        import models

        models.open_database(settings.DATABASE_URL)
        applied = models.migrate()
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        return 0
    if mode == "dead-letters":
        return _dead_letters(settings, args)
    if mode == "all" and not settings.api_keys:
        key = secrets.token_urlsafe(24)
        os.environ["HERALD_API_KEYS"] = key
        settings = load_settings()
        _print_key_hint(settings)
    return Process(settings, mode).run()


if __name__ == "__main__":
    sys.exit(main())
