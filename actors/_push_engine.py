"""The async delivery engine behind one PushActor.

One thread per engine runs an asyncio event loop that owns the shard's provider
clients (aioapns, firebase-admin, the bouncer client). A consumer thread first
`admit`s its work: each piece takes its place in its user's line (`UserOrder`), and a
message push with nothing of its user's ahead of it is planned there and then, on
that thread (`GroupPlanner`). The work then reaches the loop through the PushActor
and `submit()`, and runs when its turn in its user's line comes, so one user's pushes
and removes run in the order they were taken, while different users' sends overlap up
to `PUSH_INFLIGHT_CAP` per provider. The loop's own database calls run on a small
executor so the loop never blocks on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pykka

from actors import _push_store as store
from actors._push_planner import GroupPlanner
from actors._user_order import Place, UserOrder
from delivery.outcomes import (
    DELIVERED,
    Outcome,
    PermanentDeliveryError,
    SendResult,
    TransientDeliveryError,
)
from events import MessageDeletedEvent, MessageEvent, ReadEvent
from metrics import PUSH_LATENCY, PUSH_STAGE, PUSHES
from models import DATABASE_UNAVAILABLE, in_call_connection
from rendering.push import (
    Recipient,
    apns_payload,
    apns_remove_payload,
    fcm_data,
    fcm_remove_data,
)
from settings import Settings

logger = logging.getLogger("herald.push")

T = TypeVar("T")

# APNs notifications expire after a day, as Zulip's do.
APNS_EXPIRY_SECONDS = 86_400
# APNs priorities: 10 delivers at once; 5 lets the device batch (fine for removes).
APNS_PRIORITY_MESSAGE = 10
APNS_PRIORITY_REMOVE = 5
# Threads the engine uses for database calls.
DB_THREADS = 4
# The most pushes one batched database call (one transaction) takes.
DB_BATCH_MAX = 500
# Seconds to wait for the event loop to start or finish.
LOOP_WAIT_SECONDS = 10.0
# How often the thread stopping a half-started engine looks whether its loop thread
# ended without ever getting ready (seconds); readiness itself wakes it at once.
HALF_STARTED_POLL_SECONDS = 0.5
# How long the outcome of sends already made is tried again while the database is out
# of reach (seconds), and the longest wait between tries: well inside the consumer's
# hand-off timeout, after which the event would be retried and sent twice.
RECORD_PATIENCE_SECONDS = 60.0
RECORD_RETRY_MAX_SECONDS = 5.0
# The stages of a message push, as `herald_push_stage_seconds` labels them. The plan
# comes before the hand-off when the consumer's thread makes it, after it otherwise.
STAGES = ("handoff", "plan", "send", "record")
# `PushWork.plan` of work that the consumer's thread did not plan.
UNPLANNED: Any = object()


@dataclass
class PushWork:
    """One event or command for the engine, and where to report its outcome."""

    event: MessageEvent | ReadEvent | MessageDeletedEvent | None
    command: dict[str, Any] | None
    reply: pykka.Future[Any]
    # When the consumer's thread made it (`time.perf_counter()`): its stages start.
    created: float = field(default_factory=time.perf_counter)
    # Its place in its user's line, once admitted.
    place: Place | None = field(default=None)
    # Its plan, when the consumer's thread made it (a PushPlan, or None for no push).
    plan: Any = field(default=UNPLANNED)
    # A message push's stage clock, started on the consumer's thread.
    stages: _StageClock | None = field(default=None)


class PushEngine:
    """The asyncio side of a PushActor.

    Parameters:
      settings: provider credentials, in-flight cap, timeouts, redaction.
      shard: the shard this engine serves (users with `user_id % PUSH_SHARDS == shard`).
      providers: optional factory returning (apns, fcm, bouncer) clients, created on
        the engine's loop; defaults to building them from `settings`.
    """

    def __init__(
        self,
        settings: Settings,
        shard: int,
        providers: Callable[[Settings], tuple[Any, Any, Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.shard = shard
        self._providers_factory = providers or build_providers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        # Set by the PushActor once it has stopped or crashed and failed the works left
        # in its mailbox: a work told to it and not answered by then never will be.
        self.gone = threading.Event()
        self._db = ThreadPoolExecutor(DB_THREADS, thread_name_prefix=f"herald-push{shard}-db")
        self.order = UserOrder()
        self._planner = GroupPlanner(store.plan_pushes, in_call_connection)
        self._inflight: set[asyncio.Task[None]] = set()
        # Set on the loop as the engine stops: work whose turn comes after that is failed
        # for a retry instead of being started (a stop waits only for sends under way).
        self._stopping = False
        self.apns: Any = None
        self.fcm: Any = None
        self.bouncer: Any = None
        # Why the provider clients could not be built, if they could not: pushes then
        # fail as transient (retried, then dead letters) instead of counting as sent.
        self._providers_error: str | None = None
        self._apns_cap: asyncio.Semaphore | None = None
        self._fcm_cap: asyncio.Semaphore | None = None
        self._plan = _Batched(self._run_db, store.plan_pushes)
        # What was sent is recorded even through a database restart: a record given up
        # on would retry the event and send its pushes a second time.
        self._record = _Batched(self._run_db_patiently, _record_all)

    # Lifecycle (called from the PushActor's thread) --------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run_loop, name=f"herald-push{self.shard}-loop", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(LOOP_WAIT_SECONDS):
            raise RuntimeError("push engine did not start")

    def stop(self) -> None:
        """Finish in-flight work (bounded), close the providers, end the loop.

        An engine whose `start` timed out may still be setting up on its loop thread,
        typically building its provider clients; its loop runs once that is done. It is
        handed to a thread of its own that stops it once it is ready, so that the
        caller (the actor, as it crashes) does not wait for a set-up that may never end.
        """
        # Read first: a loop that gets ready after this is one `_stop_loop` may miss.
        was_ready = self._ready.is_set()
        self._stop_loop()
        thread = self._thread
        if was_ready or thread is None or not thread.is_alive():
            return
        logger.warning("push shard %d: the engine that did not start is stopped once "
                       "its loop is ready", self.shard)
        threading.Thread(target=self._stop_when_ready, args=(thread,),
                         name=f"herald-push{self.shard}-half-started", daemon=True).start()

    def _stop_when_ready(self, thread: threading.Thread) -> None:
        """Runs on a thread of its own, as long as a half-started engine's loop thread."""
        while thread.is_alive():
            if self._ready.wait(HALF_STARTED_POLL_SECONDS):
                self._stop_loop()
                return

    def _stop_loop(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        done = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            done.result(self.settings.PUSH_TIMEOUT_SECONDS + LOOP_WAIT_SECONDS)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(LOOP_WAIT_SECONDS)
        self._db.shutdown(wait=False)

    # The consumer's thread ----------------------------------------------------------

    def admit(self, works: list[PushWork]) -> list[PushWork]:
        """Give each work its place in its user's line, and plan the message pushes
        that have nothing of their user's ahead of them; returns the works still to
        `submit`. The others are settled here: a push with no one to send to
        (`reply` set to None), or a plan that failed (`reply` set to its exception).
        Runs on a consumer thread.
        """
        try:
            ready = []
            for work in works:
                if isinstance(work.event, MessageDeletedEvent):
                    # Marked here, before anything taken after it is planned: a push of
                    # these messages must find them deleted, not wait for the deletion's
                    # turn on the loop (it is in no user's line).
                    in_call_connection(store.mark_deleted, work.event.message_ids)
                work.place = self.order.join(_line_key(work))
                if work.place.first and isinstance(work.event, MessageEvent):
                    work.stages = _StageClock(work.created)
                    ready.append(work)
            if ready:
                self._plan_now(ready)
        except BaseException:
            # Raised into this thread (a shutdown): a place kept would hold up its
            # user's line for good.
            self.abandon(works)
            raise
        return [work for work in works if work.plan is not None]

    def _plan_now(self, ready: list[PushWork]) -> None:
        try:
            plans = self._planner([work.event for work in ready])
        except Exception:
            error = sys.exc_info()
            for work in ready:
                work.plan = None
                self._settle_early(work, error)
            return
        for work, plan in zip(ready, plans, strict=True):
            assert work.stages is not None
            work.stages.mark("plan")
            work.plan = plan
            if plan is None:
                self._settle_early(work, None)

    def _settle_early(self, work: PushWork, error: Any) -> None:
        assert work.place is not None
        self.order.leave(work.place)
        if error is None:
            work.reply.set(None)
        else:
            work.reply.set_exception(error)

    def abandon(self, works: list[PushWork]) -> None:
        """Leave the lines of works that will not reach the loop (any thread)."""
        for work in works:
            if work.place is not None:
                self.order.leave(work.place)

    def submit(self, works: list[PushWork]) -> None:
        """Start `works` on the loop, in their order (one wake-up for the lot)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start, works)

    # The loop's thread -------------------------------------------------------------

    def _start(self, works: list[PushWork]) -> None:
        loop = asyncio.get_running_loop()
        for work in works:
            # The loop holds tasks weakly: keep each until it is done.
            task = loop.create_task(self._process(work))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _run_loop(self) -> None:
        loop = _new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self.order.attach(loop)
        cap = self.settings.PUSH_INFLIGHT_CAP
        self._apns_cap = asyncio.Semaphore(cap)
        self._fcm_cap = asyncio.Semaphore(cap)
        try:
            self.apns, self.fcm, self.bouncer = self._providers_factory(self.settings)
        except Exception as exc:
            logger.exception("push shard %d: could not set up providers", self.shard)
            self._providers_error = ("push providers could not be set up: "
                                     + _one_line(f"{type(exc).__name__}: {exc}"))
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        self._stopping = True
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.PUSH_TIMEOUT_SECONDS)
        for client in (self.apns, self.fcm, self.bouncer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()

    async def _run_db(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: store.in_connection(fn, *args))

    async def _run_db_patiently(self, fn: Callable[..., T], *args: Any) -> T:
        """`_run_db`, tried again with a backoff while the database is out of reach."""
        deadline = time.monotonic() + RECORD_PATIENCE_SECONDS
        delay = 0.1
        while True:
            try:
                return await self._run_db(fn, *args)
            except DATABASE_UNAVAILABLE as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("push shard %d: recording outcomes failed (%s), trying again "
                               "in %.1fs", self.shard, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(RECORD_RETRY_MAX_SECONDS, delay * 2)

    @contextlib.asynccontextmanager
    async def _turn(self, place: Place) -> AsyncIterator[None]:
        """Wait for `place` to head its line, and leave the line afterwards."""
        try:
            await self.order.turn(place)
            yield
        finally:
            self.order.leave(place)

    async def _process(self, work: PushWork) -> None:
        try:
            assert work.place is not None  # admitted on the consumer's thread
            async with self._turn(work.place):
                if self._stopping:
                    raise TransientDeliveryError(
                        f"push shard {self.shard} stopped before the event's turn came")
                await self._handle(work)
            work.reply.set(None)
        except BaseException:
            work.reply.set_exception(sys.exc_info())  # type: ignore[arg-type]

    async def _handle(self, work: PushWork) -> None:
        if work.command is not None:
            await self._bouncer_command(work.command)
        elif isinstance(work.event, MessageEvent):
            # The hand-off ends here, at the head of the user's line.
            stages = work.stages or _StageClock(work.created)
            stages.mark("handoff")
            await self._push_message(work.event, stages, work.plan)
        elif isinstance(work.event, ReadEvent):
            await self._remove(work.event.user_id, work.event.message_ids, mark_read=True)
        elif isinstance(work.event, MessageDeletedEvent):
            # Marked deleted when it was taken (`admit`).
            users = await self._run_db(
                store.pushes_out_for, work.event.message_ids, self.shard,
                self.settings.PUSH_SHARDS,
            )
            for user_id in users:
                # In the user's own line, so the remove never overtakes (or runs
                # alongside) a push of that user taken before it.
                async with self._turn(self.order.join(("user", user_id))):
                    await self._remove(user_id, work.event.message_ids, mark_read=False)

    # Messages ------------------------------------------------------------------------

    async def _push_message(self, event: MessageEvent, stages: _StageClock,
                            plan: Any = UNPLANNED) -> None:
        if plan is UNPLANNED:
            # Something of this user's was ahead of it when it was taken: plan it now,
            # after that, as the order of the user's events asks.
            plan = await self._plan(event)
            stages.mark("plan")
        if plan is None:
            return
        recipient: Recipient = plan.recipient
        redact = self.settings.PUSH_REDACT_CONTENT
        if self.bouncer is not None:
            await self._via_bouncer(
                plan,
                apns_payload(recipient, event, redact=redact),
                fcm_data(recipient, event, redact=redact),
                priority="high",
                receipt_event=store.EVENT_MESSAGE,
                message_id=event.message.id,
                stages=stages,
            )
            return
        sends = []
        apns: dict[str, Any] | None = None
        fcm: dict[str, str] | None = None
        for device in plan.devices:
            if device.kind == "apns":
                apns = apns or apns_payload(recipient, event, redact=redact)
                sends.append(self._send_apns(device, apns, APNS_PRIORITY_MESSAGE))
            else:
                fcm = fcm or fcm_data(recipient, event, redact=redact)
                sends.append(self._send_fcm(device, fcm, "high"))
        results = await asyncio.gather(*sends)
        stages.mark("send")
        await self._settle(plan.user_id, event.message.id, store.EVENT_MESSAGE,
                           list(zip(plan.devices, results, strict=True)), stages)

    async def _remove(self, user_id: int, message_ids: list[int], *, mark_read: bool) -> None:
        plan = await self._run_db(store.plan_remove, user_id, message_ids, mark_read)
        if plan is None:
            return
        recipient, ids = plan.recipient, plan.message_ids
        if self.bouncer is not None:
            await self._via_bouncer(
                plan, apns_remove_payload(recipient, ids), fcm_remove_data(recipient, ids),
                priority="normal", receipt_event=store.EVENT_REMOVE, message_id=max(ids),
            )
            await self._run_db(store.clear_active, user_id, ids)
            return
        sends = []
        for device in plan.devices:
            if device.kind == "apns":
                sends.append(self._send_apns(device, apns_remove_payload(recipient, ids),
                                             APNS_PRIORITY_REMOVE))
            else:
                sends.append(self._send_fcm(device, fcm_remove_data(recipient, ids), "normal"))
        results = await asyncio.gather(*sends)
        await self._settle(user_id, max(ids), store.EVENT_REMOVE,
                           list(zip(plan.devices, results, strict=True)))
        await self._run_db(store.clear_active, user_id, ids)

    async def _settle(
        self,
        user_id: int,
        message_id: int,
        event: str,
        results: list[tuple[Any, SendResult]],
        stages: _StageClock | None = None,
    ) -> None:
        """Record what each device said; raise to retry the devices that can be retried."""
        await self._record([(user_id, message_id, event, d, r) for d, r in results])
        if stages is not None:
            stages.mark("record")
        transient = [(d, r) for d, r in results if r.outcome is Outcome.TRANSIENT]
        if transient:
            floors = [r.retry_after for _, r in transient if r.retry_after]
            reasons = sorted({r.reason for _, r in transient})
            raise TransientDeliveryError(
                f"{len(transient)} device(s) to retry: {', '.join(reasons)}",
                retry_after=max(floors) if floors else None,
            )

    # Providers -----------------------------------------------------------------------

    async def _send_apns(self, device: Any, payload: dict[str, Any], priority: int) -> SendResult:
        if self.apns is None:
            return self._no_client("apns")
        assert self._apns_cap is not None
        async with self._apns_cap:
            return await self._timed("apns", self.apns.send(
                device.token,
                topic=device.ios_app_id,
                payload=payload,
                push_type="alert",
                expiration=int(time.time()) + APNS_EXPIRY_SECONDS,
                priority=priority,
            ))

    async def _send_fcm(self, device: Any, data: dict[str, str], priority: str) -> SendResult:
        if self.fcm is None:
            return self._no_client("fcm")
        assert self._fcm_cap is not None
        async with self._fcm_cap:
            return await self._timed("fcm", self.fcm.send(device.token, data=data,
                                                          priority=priority))

    def _no_client(self, provider: str) -> SendResult:
        """The result of a push for a provider without a client: a dry run when it has
        no credentials configured, a failure to retry when its client could not be built."""
        if self._providers_error is not None:
            return SendResult(Outcome.TRANSIENT, self._providers_error)
        return _dry_run(provider)

    async def _timed(self, provider: str, send: Coroutine[Any, Any, SendResult]) -> SendResult:
        started = time.perf_counter()
        try:
            result = await send
        except Exception as exc:  # a client bug must not lose the event: retry it
            result = SendResult(Outcome.TRANSIENT, f"{type(exc).__name__}: {exc}")
        PUSH_LATENCY.labels(provider).observe(time.perf_counter() - started)
        PUSHES.labels(provider, result.outcome.value).inc()
        return result

    async def _via_bouncer(
        self,
        plan: Any,
        apns: dict[str, Any],
        gcm: dict[str, str],
        *,
        priority: str,
        receipt_event: str,
        message_id: int,
        stages: _StageClock | None = None,
    ) -> None:
        apple = [d.token for d in plan.devices if d.kind == "apns"]
        android = [d.token for d in plan.devices if d.kind == "fcm"]
        if not apple and not android:
            return
        started = time.perf_counter()
        try:
            result = await self.bouncer.notify(
                user_id=plan.user_id, user_uuid=plan.user_uuid, realm_uuid=None,
                apns_payload=apns, gcm_payload=gcm, gcm_options={"priority": priority},
                android_devices=android, apple_devices=apple,
            )
        except (TransientDeliveryError, PermanentDeliveryError) as exc:
            outcome = Outcome.TRANSIENT if isinstance(exc, TransientDeliveryError) \
                else Outcome.PERMANENT
            PUSHES.labels("bouncer", outcome.value).inc()
            if receipt_event == store.EVENT_MESSAGE:
                # Else a remove of this message waits out PUSH_ON_ITS_WAY_SECONDS.
                with contextlib.suppress(Exception):
                    await self._run_db(store.push_not_on_its_way, plan.user_id, message_id)
            raise
        PUSH_LATENCY.labels("bouncer").observe(time.perf_counter() - started)
        PUSHES.labels("bouncer", Outcome.DELIVERED.value).inc()
        if stages is not None:
            stages.mark("send")
        dead = set(result.deleted_android_devices) | set(result.deleted_apple_devices)
        outcomes = [
            (d, SendResult(Outcome.INVALID_DEVICE, "deleted by bouncer") if d.token in dead
             else DELIVERED)
            for d in plan.devices
        ]
        await self._record([(plan.user_id, message_id, receipt_event, d, r)
                            for d, r in outcomes])
        if stages is not None:
            stages.mark("record")

    async def _bouncer_command(self, command: dict[str, Any]) -> None:
        if self.bouncer is None:
            if self._providers_error is not None:
                raise TransientDeliveryError(self._providers_error)
            return
        kind = command["command"]
        args = dict(user_id=command["user_id"], user_uuid=command.get("user_uuid"),
                    token=command["token"], token_kind=command["kind"])
        if kind == "register_push_device_to_bouncer":
            await self.bouncer.register(ios_app_id=command.get("ios_app_id"), **args)
        else:
            await self.bouncer.unregister(**args)


class _StageClock:
    """Times one message push's stages: each `mark(stage)` observes the time since the
    previous mark (or since `since`, a `time.perf_counter()` reading) as
    `herald_push_stage_seconds{stage}`. Marked on the consumer's thread (a plan made
    there), then on the engine's loop.
    """

    __slots__ = ("_last",)

    def __init__(self, since: float) -> None:
        self._last = since

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        _STAGE_HISTOGRAMS[stage].observe(now - self._last)
        self._last = now


# Bound once: a label lookup per observation would cost more than the observation.
_STAGE_HISTOGRAMS = {stage: PUSH_STAGE.labels(stage) for stage in STAGES}


class _Batched:
    """Runs many coroutines' calls of one database function as one call.

    Parameters:
      run_db: runs a function on the engine's database threads.
      fn: takes a list of arguments; returns one result per argument.

    Calls that arrive while a batch is in the database wait and go together in the
    next one, so the batch grows with the load and a lone call is not held back. A
    batch that fails is retried one call at a time, so one bad call fails alone (not
    when the database was out of reach: then every call fails with it).
    Runs on the engine's loop.
    """

    def __init__(self, run_db: Callable[..., Coroutine[Any, Any, Any]],
                 fn: Callable[[list[Any]], list[Any]]) -> None:
        self._run_db = run_db
        self._fn = fn
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._draining = False

    async def __call__(self, argument: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((argument, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:DB_BATCH_MAX]
                del self._pending[:DB_BATCH_MAX]
                await self._run_batch(batch)
        finally:
            self._draining = False

    async def _run_batch(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._run_db(self._fn, [a for a, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, DATABASE_UNAVAILABLE):
                # Alone, or the database itself is away: one at a time would fail alike.
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for one in batch:
                await self._run_batch([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    # uvloop's loop and TLS run the same protocols at a fraction of the CPU per push;
    # it does not run on every platform, and asyncio's own loop is the fallback.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


def _record_all(groups: list[list[store.Settled]]) -> list[None]:
    store.record_results([settled for group in groups for settled in group])
    return [None] * len(groups)


def _line_key(work: PushWork) -> Any:
    if work.command is not None:
        return ("user", work.command.get("user_id"))
    event = work.event
    if isinstance(event, MessageEvent | ReadEvent):
        return ("user", event.user_id)
    # A deletion is for many users: each of its removes joins its user's line itself.
    return ("deleted", id(work))


def _dry_run(provider: str) -> SendResult:
    # No credentials for this provider: log that a push would go out, without content.
    logger.info("dry run: %s push not sent (no credentials configured)", provider)
    PUSHES.labels(provider, "dry_run").inc()
    return DELIVERED


def check_providers(settings: Settings) -> None:
    """Build the provider clients the settings call for and close them again, so that
    a key, certificate or credentials file that cannot be used stops the process at
    start (ValueError or OSError) rather than failing every push later.

    Runs on the calling thread, with an event loop of its own; nothing is sent.
    """

    async def probe() -> None:
        for client in build_providers(settings):
            if client is not None:
                await client.close()

    asyncio.run(probe())


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def build_providers(settings: Settings) -> tuple[Any, Any, Any]:
    """Create the provider clients the settings call for (on the engine's loop)."""
    apns = fcm = bouncer = None
    if settings.PUSH_BOUNCER_URL:
        from delivery.bouncer import BouncerClient

        assert settings.PUSH_BOUNCER_SERVER_UUID and settings.PUSH_BOUNCER_API_KEY
        bouncer = BouncerClient(
            settings.PUSH_BOUNCER_URL,
            settings.PUSH_BOUNCER_SERVER_UUID,
            settings.PUSH_BOUNCER_API_KEY,
            timeout=settings.PUSH_TIMEOUT_SECONDS,
        )
        return apns, fcm, bouncer
    if settings.apns_enabled:
        from delivery.apns import ApnsSender

        apns = ApnsSender(
            topic=settings.APNS_TOPIC or "",
            key_file=settings.APNS_KEY_FILE,
            key_id=settings.APNS_KEY_ID,
            team_id=settings.APNS_TEAM_ID,
            cert_file=settings.APNS_CERT_FILE,
            sandbox=settings.APNS_SANDBOX,
            endpoint=settings.APNS_ENDPOINT,
            ca_file=settings.APNS_CA_FILE,
            timeout=settings.PUSH_TIMEOUT_SECONDS,
        )
    if settings.fcm_enabled:
        from delivery.fcm import FcmSender

        assert settings.FCM_CREDENTIALS
        fcm = FcmSender(
            credentials_file=settings.FCM_CREDENTIALS,
            project_id=settings.FCM_PROJECT_ID,
            endpoint=settings.FCM_ENDPOINT,
            timeout=settings.PUSH_TIMEOUT_SECONDS,
        )
    return apns, fcm, bouncer

