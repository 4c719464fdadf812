"""The push scenarios' rig: a fake APNs process, users with one APNs device each, and
herald's worker(s) in this process or as `python supervisor.py worker` processes."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.apns_server import ApnsServerProcess
from settings import parse_cpu_list


def add_rig_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="the fake APNs answers after this many ms (default 0)")
    parser.add_argument("--shards", type=int, default=1, help="PUSH_SHARDS (default 1)")
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes (`python supervisor.py worker`, production "
                             "only); 0 = one worker in this process (default)")
    parser.add_argument("--worker-threads", type=int, default=common.DEFAULT_WORKER_THREADS,
                        help="Dramatiq threads per worker (default "
                             f"{common.DEFAULT_WORKER_THREADS} = WORKER_THREADS' default)")
    parser.add_argument("--inflight-cap", type=int, default=None,
                        help="PUSH_INFLIGHT_CAP (default: herald's, 200)")
    parser.add_argument("--rig-nice", type=int, default=0,
                        help="nice value of the fake APNs and of push-latency's publisher "
                             "threads (Linux). They stand in for the provider and the chat "
                             "server, other machines in production; 10 lets herald, "
                             "RabbitMQ and PostgreSQL go first when the cores are contended "
                             "(default 0: all share the cores as equals)")
    parser.add_argument("--worker-nice", type=int, default=0,
                        help="start the worker processes under `nice -n N` (--workers 1 "
                             "or more; below 0 needs root), as an operator gives a worker "
                             "priority on a host it shares (default 0)")
    parser.add_argument("--worker-cpus", default="auto",
                        help="CPU_AFFINITY of the worker processes (--workers 1 or more): "
                             "`auto` pins worker i to CPU i modulo the CPUs there are, as "
                             "the README advises; `none` lets them run on any CPU; a CPU "
                             "list (such as 1 or 0-1) is given to each worker (default auto)")


@dataclass
class Rig:
    herald: Any
    fake: ApnsServerProcess
    env: dict[str, str]
    tmp: Any
    args: argparse.Namespace
    processes: list[Any] = field(default_factory=list)
    # The worker processes' `/metrics` (empty: the worker runs in this process).
    metrics_urls: list[str] = field(default_factory=list)

    def start_workers(self) -> None:
        if self.args.workers <= 0:
            common.start_worker(self.herald, self.args.worker_threads)
            return
        from tests.harness import HeraldProcess, free_port

        for _ in range(self.args.workers):
            port = free_port()
            env = {**self.env, "LOG_LEVEL": "INFO", "METRICS_PORT": str(port)}
            cpus = worker_cpus(self.args, len(self.processes))
            if cpus is not None:
                env["CPU_AFFINITY"] = cpus
            worker = HeraldProcess(env, mode="worker", cwd=self.tmp, nice=self.args.worker_nice)
            self.processes.append(worker)
            self.metrics_urls.append(f"http://127.0.0.1:{port}/metrics")
            worker.start(wait=False)
        from tests.harness import wait_until

        for worker in self.processes:
            wait_until(functools.partial(_started, worker.log), timeout=60,
                       what="worker to start")

    def stop(self) -> None:
        for worker in self.processes:
            with contextlib.suppress(Exception):
                worker.terminate(timeout=30)
            with contextlib.suppress(Exception):
                worker.__exit__()


def worker_cpus(args: argparse.Namespace, index: int) -> str | None:
    """The CPU_AFFINITY of worker process `index` (None: any CPU)."""
    if args.workers <= 0 or args.worker_cpus == "none":
        return None
    if args.worker_cpus == "auto":
        usable = sorted(os.sched_getaffinity(0))
        return str(usable[index % len(usable)])
    return str(args.worker_cpus)


def describe_worker_cpus(args: argparse.Namespace) -> str:
    """How the worker processes were placed, for a scenario's header."""
    pinned = [worker_cpus(args, i) for i in range(max(args.workers, 0))]
    if not pinned or pinned[0] is None:
        return "any CPU"
    return "CPU " + " / ".join(str(cpus) for cpus in pinned)


@contextlib.contextmanager
def rig(args: argparse.Namespace, users: list[int]) -> Iterator[Rig]:
    if args.workers > 0 and args.backend != "production":
        raise SystemExit("--workers needs --backend production (worker processes share "
                         "RabbitMQ and PostgreSQL)")
    if args.worker_nice and args.workers <= 0:
        raise SystemExit("--worker-nice needs --workers 1 or more (an in-process worker "
                         "shares the bench's process)")
    if args.worker_cpus not in ("auto", "none"):
        if args.workers <= 0:
            raise SystemExit("--worker-cpus needs --workers 1 or more (an in-process worker "
                             "shares the bench's process)")
        try:
            parse_cpu_list(args.worker_cpus)
        except ValueError as exc:
            raise SystemExit(f"--worker-cpus: {exc}") from None
    with ApnsServerProcess(args.delay_ms, args.rig_nice) as fake, \
            common.backend(args.backend) as (env, tmp):
        env = {**env, **fake.env(common.CLIENT_TOPIC), "PUSH_SHARDS": str(args.shards),
               "WORKER_THREADS": str(args.worker_threads), "OUTBOX_DIR": str(tmp / "outbox")}
        if args.inflight_cap:
            env["PUSH_INFLIGHT_CAP"] = str(args.inflight_cap)
        herald = common.in_process_herald(env)
        the_rig = Rig(herald, fake, env, tmp, args)
        try:
            common.insert_users(users)
            common.insert_apns_devices(users)
            yield the_rig
        finally:
            the_rig.stop()
            herald.stop()


def _started(log: Path) -> bool:
    return b"worker started" in log.read_bytes()
