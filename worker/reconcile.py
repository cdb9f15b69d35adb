"""The slice ledger's reconciler: re-queue what the broker lost (issue 14).

Celery and kombu can lose a score message that the listener was already answered Success for:
kombu's Redis transport BRPOPs a message before it records it as unacknowledged, so a worker
killed while the reply waits in its socket (with the solo pool, for a whole forward pass) loses
it for good; an exception escaping a celery-batches task acknowledges its whole batch.

So the application keeps its own ledger (`keys.LEDGER`, written with the slice bytes, removed
only with the slice's result) and the alerts process runs this reconciler beside the summary
sweeper. A token older than the visibility timeout plus a margin, with no result, whose message
is neither in the score queue nor in kombu's unacknowledged hash, is a suspect; still missing at
the next sweep, it is re-queued from the message the listener stored. The two looks keep a
message caught between BRPOP and kombu's bookkeeping from being copied; a copy would cost one
extra forward pass and nothing else, since a result, once recorded, is never overwritten.
"""
from __future__ import annotations

import json
import logging

import redis

from ich import keys

log = logging.getLogger("worker.reconcile")

# KEYS: ledger, ledger messages, score queue.  ARGV: token, its ledger score as read.
# Compare-and-set on the score: of two reconcilers (two alerts processes), one re-queues.
# RPUSH: BRPOP pops from the right, so a slice that waited this long is scored next.
_REQUEUE_LUA = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
local message = redis.call('HGET', KEYS[2], ARGV[1])
if not message then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return -1
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[1])
redis.call('RPUSH', KEYS[3], message)
return 1
"""


def server_time(client: redis.Redis) -> float:
    """Redis's clock: the one ledger scores are written with, whatever host we run on."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def task_id(message: bytes | dict) -> str | None:
    """The Celery task id of a kombu Redis-transport message: a score request's receipt token."""
    try:
        return (json.loads(message) if isinstance(message, bytes) else message)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None


class Reconciler:
    """One per alerts process; `sweep()` every few seconds (state: the previous sweep's suspects)."""

    def __init__(self, client: redis.Redis, older_than_s: float, queue: str = keys.SCORE_QUEUE,
                 batch: int = 1000, chunk: int = 500) -> None:
        self.client = client
        self.older_than_s = older_than_s
        self.queue = queue
        self.batch = batch  # tokens looked at per sweep (oldest first): bounded work
        self.chunk = chunk
        self.suspects: set[str] = set()
        self._requeue = client.register_script(_REQUEUE_LUA)

    def sweep(self) -> list[str]:
        """Look once; re-queue the tokens missing at this look and the previous one. Returns
        the tokens re-queued."""
        cutoff = server_time(self.client) - self.older_than_s
        old = self.client.zrangebyscore(keys.LEDGER, "-inf", cutoff, start=0, num=self.batch,
                                        withscores=True, score_cast_func=bytes.decode)
        if not old:
            self.suspects.clear()
            return []
        in_flight = self.in_flight()
        missing = {token.decode(): score for token, score in old if token.decode() not in in_flight}
        due = [t for t in missing if t in self.suspects]
        self.suspects = set(missing) - set(due)
        requeued = []
        for token in due:
            done = self._requeue(keys=[keys.LEDGER, keys.LEDGER_MESSAGES, self.queue],
                                 args=[token, missing[token]])
            if done == 1:
                requeued.append(token)
                log.warning("slice %s: no result and no message in flight %.0f s after it was "
                            "queued; re-queued", token, self.older_than_s)
            elif done == -1:
                log.error("slice %s: ledger entry without its message; dropped", token)
        return requeued

    def in_flight(self) -> set[str]:
        """Task ids in the score queue or delivered and unacknowledged (kombu's hash)."""
        ids = set()
        for _, raw in self.client.hscan_iter(keys.KOMBU_UNACKED, count=self.chunk):
            try:   # kombu stores [message, exchange, routing key]
                ids.add(task_id(json.loads(raw)[0]))
            except (ValueError, IndexError, KeyError, TypeError):
                continue
        start = 0
        while chunk := self.client.lrange(self.queue, start, start + self.chunk - 1):
            ids.update(task_id(m) for m in chunk)
            start += self.chunk
        ids.discard(None)
        return ids

    def pending(self) -> int:
        """Slices accepted and not yet resolved (scored or failed with a reason)."""
        return self.client.zcard(keys.LEDGER)
