"""A FakeApns (tests.fakes.apns) in a process of its own, for the push benchmarks.

    python -m bench.apns_server [--delay-ms 50] [--nice 10]

Prints one JSON line: `endpoint`, `ca_file`, `key_file`, `key_id`, `team_id` (the
APNS_* settings a herald needs), then serves HTTP/2 over TLS on 127.0.0.1 until its
stdin closes. Commands on stdin, one per line, each answered by one JSON line:

    stats          {"count", "ok", "first", "last", "connections"} (times: time.time())
    dump PATH      writes [[time, token, status], ...] to PATH; {"count": n}
    delay MS       answers wait MS milliseconds from now on
    quit           exit

Its own process keeps the fake's HTTP/2 work off herald's GIL; both read the same
machine clock, so a recorded time compares with times taken in herald's process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.fakes.apns import FakeApns, RecordedRequest, make_apns_key


class _CountingApns(FakeApns):
    """Keeps (time, token, status) per request instead of whole requests."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log: list[tuple[float, str, int]] = []

    def _record(self, request: RecordedRequest) -> None:
        # Runs on the fake's loop thread; list.append is atomic.
        self.log.append((time.time(), request.token, request.status))


def serve(delay_ms: float, nice: int = 0) -> int:
    if nice:
        os.nice(nice)
    directory = Path(tempfile.mkdtemp(prefix="bench-apns-key-"))
    key_file, key_id, team_id, public_key = make_apns_key(directory)
    fake = _CountingApns(public_key=public_key, key_id=key_id, team_id=team_id,
                         delay=delay_ms / 1000.0)
    fake.start()
    print(json.dumps({"endpoint": fake.endpoint, "ca_file": fake.ca_file,
                      "key_file": key_file, "key_id": key_id, "team_id": team_id}), flush=True)
    try:
        for line in sys.stdin:
            command, _, rest = line.strip().partition(" ")
            log = list(fake.log)
            if command == "stats":
                answer: dict[str, Any] = {
                    "count": len(log), "ok": sum(1 for r in log if r[2] == 200),
                    "first": log[0][0] if log else None, "last": log[-1][0] if log else None,
                    "connections": fake.connections_total,
                }
            elif command == "dump":
                Path(rest).write_text(json.dumps(log))
                answer = {"count": len(log)}
            elif command == "delay":
                fake.delay = float(rest) / 1000.0
                answer = {"delay_ms": float(rest)}
            elif command == "quit":
                break
            else:
                answer = {"error": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        fake.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


class ApnsServerProcess:
    """Starts `python -m bench.apns_server` and talks to it (one caller at a time)."""

    def __init__(self, delay_ms: float = 0.0, nice: int = 0) -> None:
        from bench.common import ROOT, source_env

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.apns_server", "--delay-ms", str(delay_ms),
             "--nice", str(nice)],
            cwd=ROOT, env=source_env({}), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()
        self.info: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.apns_server exited {self.proc.poll()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, command: str) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return self._read()

    def stats(self) -> dict[str, Any]:
        return self.ask("stats")

    def log(self) -> list[tuple[float, str, int]]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            path = Path(handle.name)
        try:
            self.ask(f"dump {path}")
            return [tuple(r) for r in json.loads(path.read_text())]  # type: ignore[misc]
        finally:
            path.unlink(missing_ok=True)

    def env(self, topic: str) -> dict[str, str]:
        """The APNS_* settings for a herald sending to this fake."""
        return {
            "APNS_KEY_FILE": self.info["key_file"], "APNS_KEY_ID": self.info["key_id"],
            "APNS_TEAM_ID": self.info["team_id"], "APNS_TOPIC": topic,
            "APNS_ENDPOINT": self.info["endpoint"], "APNS_CA_FILE": self.info["ca_file"],
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> ApnsServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.apns_server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="milliseconds to wait before answering each request")
    parser.add_argument("--nice", type=int, default=0,
                        help="run at this nice value (default 0)")
    args = parser.parse_args(argv)
    return serve(args.delay_ms, args.nice)


if __name__ == "__main__":
    sys.exit(main())
