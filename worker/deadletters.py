"""`python -m worker.deadletters list|replay`: alerts whose delivery gave up, and sending them again.

A consumer that stayed down longer than ICH_WEBHOOK_MAX_ATTEMPTS allow leaves its alerts in the
dead-letter list (`ich:alerts:dead`, newest first, the newest 10,000 kept). `list` prints them as
JSON lines (alerts carry no patient data); `replay` queues each chosen one again for the
consumer it failed on (named by its position in ICH_WEBHOOK_URLS, as the logs name it), with a
fresh attempt budget, and takes it off the list in the same transaction. Consumers drop the
repeat of an alert they did receive by its `Idempotency-Key`.

    python -m worker.deadletters list --limit 20
    python -m worker.deadletters replay ALERT_ID [ALERT_ID ...]
    python -m worker.deadletters replay --all
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid

from ich import keys
from ich.queue import DELIVER_TASK, RESULT_TASK, connect, task_message
from ich.settings import Settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.deadletters", description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", help="ICH_REDIS_URL")
    sub = p.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="print dead letters, newest first, one JSON per line")
    listing.add_argument("--limit", type=int, default=100)
    replay = sub.add_parser("replay", help="queue dead letters for delivery again")
    replay.add_argument("alert_ids", nargs="*", metavar="ALERT_ID")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    args = p.parse_args(argv)
    settings = Settings.from_env(redis_url=args.redis_url)
    client = connect(settings.redis_url)
    if args.command == "list":
        for raw in client.lrange(keys.DEAD_LETTERS, 0, args.limit - 1) if args.limit > 0 else []:
            record = json.loads(raw)
            alert = record["alert"]
            target = ({"destination": record["destination"]} if "destination" in record
                      else {"consumer": record["url_index"]})
            print(json.dumps({"alert_id": alert["alert_id"], "kind": alert["kind"],
                              "study_instance_uid": alert["study_instance_uid"],
                              **target, "attempts": record["attempts"],
                              "last_error": record["last_error"], "dead_at": record["dead_at"]}))
        return 0
    if not args.all and not args.alert_ids:
        p.error("replay needs ALERT_IDs or --all")
    wanted = set(args.alert_ids)
    replayed = skipped = 0
    for raw in client.lrange(keys.DEAD_LETTERS, 0, -1):
        record = json.loads(raw)
        alert = record["alert"]
        if not args.all and alert["alert_id"] not in wanted:
            continue
        # A webhook consumer (url_index) or a DICOM result destination (destination), by position.
        task, targets, index, what, setting = (
            (RESULT_TASK, settings.result_destinations, record["destination"], "destination",
             "ICH_RESULT_DESTINATIONS") if "destination" in record else
            (DELIVER_TASK, settings.webhook_urls, record["url_index"], "consumer", "ICH_WEBHOOK_URLS"))
        if not 0 <= index < len(targets):
            print(f"alert {alert['alert_id']}: {what} {index} is not in {setting}; kept", file=sys.stderr)
            skipped += 1
            continue
        message = task_message(task, keys.ALERTS_QUEUE, str(uuid.uuid4()), args=(alert, targets[index]))
        pipe = client.pipeline(transaction=True)
        pipe.lpush(keys.ALERTS_QUEUE, message)
        pipe.lrem(keys.DEAD_LETTERS, 1, raw)
        pipe.execute()
        replayed += 1
    print(f"replayed {replayed} dead letter(s); {skipped} kept")
    return 0 if not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
