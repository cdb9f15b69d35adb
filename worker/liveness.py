"""Whether a scoring worker is consuming: a file it refreshes, for a liveness probe to read.

Celery can stay up after a Redis reset and consume nothing more (celery/celery#10205, #10302,
reported on the 5.6 we pin): the process lives, so nothing restarts it, and every slice waits
while bleeds go unreported. So the worker says itself whether it consumes. With
ICH_WORKER_ALIVE_FILE set, a thread touches that file every few seconds unless slices have
waited in the score queue for ICH_WORKER_STALL_S while this worker started no batch.
`python -m worker.liveness FILE` (the Kubernetes liveness probe, deploy/k8s/worker.yaml) fails
once the file is older than `--max-age`; the restarted worker's prefetched slices come back by
the visibility timeout, and the ledger re-queues anything else.

Redis unreachable is not a stall: a restart would not bring it back (IchWatchRedisUnavailable
says so). A stalled worker beside a healthy one is not seen here either: the healthy one keeps
the queue empty, and the stalled one's prefetched slices are redelivered after the visibility
timeout; IchWatchNotScoring covers a fleet that consumes nothing.
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("worker")

#: `python -m worker.liveness`'s default: the file is touched every few seconds when healthy.
MAX_AGE_S = 30


class Liveness:
    """Call `consumed` as each batch starts (the consumer delivered it, whatever its fate) and
    `check` every tick; `check` touches `path` unless the worker looks stalled. A forward pass
    hung longer than `stall_s` with slices waiting counts as stalled too."""

    def __init__(self, client, queue: str, path: Path, stall_s: float) -> None:
        self.client, self.queue, self.path, self.stall_s = client, queue, Path(path), stall_s
        self.last_batch = time.monotonic()
        self._waiting_since: float | None = None
        self._said = False

    def consumed(self) -> None:
        self.last_batch = time.monotonic()

    def check(self) -> bool:
        """True, and the file touched, unless the queue has held slices for `stall_s` while this
        worker started no batch."""
        from redis.exceptions import RedisError

        now = time.monotonic()
        try:
            depth = self.client.llen(self.queue)
        except RedisError:
            depth = 0
        if depth == 0:
            self._waiting_since = None
        elif self._waiting_since is None:
            self._waiting_since = now
        idle = now - max(self._waiting_since or now, self.last_batch)
        if depth and idle >= self.stall_s:
            if not self._said:
                log.error("%d slices wait in %s and this worker has started no batch for %.0f s: "
                          "its consumer looks stalled; %s is no longer refreshed, so the liveness "
                          "probe will restart it", depth, self.queue, idle, self.path)
                self._said = True
            return False
        self._said = False
        self.path.touch()
        return True

    def run(self, stop: threading.Event, every: float) -> None:
        while True:
            try:
                self.check()
            except OSError:     # the file's folder gone or read-only: say so, keep checking
                log.exception("cannot touch the liveness file %s", self.path)
            if stop.wait(every):
                return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.liveness",
                                description="Exit 0 if a scoring worker's ICH_WORKER_ALIVE_FILE "
                                            "is fresh, 1 if not (a liveness probe).")
    p.add_argument("file", type=Path)
    p.add_argument("--max-age", type=float, default=MAX_AGE_S,
                   help=f"seconds since the worker last touched it (default {MAX_AGE_S})")
    args = p.parse_args(argv)
    try:
        age = time.time() - args.file.stat().st_mtime
    except OSError as exc:
        print(f"not alive: {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"not alive: {args.file} last touched {age:.0f} s ago (over {args.max_age:.0f} s): "
              "the worker is stalled or gone; see its log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
