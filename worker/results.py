"""`python -m worker.results STUDY_UID`: a study's per-slice results and state, as JSON.

For radiology informatics staff checking what the system saw: every slice scored (or the
reason it failed), the probabilities, the study rule's current verdict, and the alert status.
Reads only Redis.
"""
from __future__ import annotations

import argparse
import json
import sys

from ich import keys
from ich.queue import connect
from ich.settings import Settings
from worker.study import FIRST_POSITIVE, STUDY_SUMMARY, StudyStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.results", description=__doc__.splitlines()[0])
    p.add_argument("study_uid")
    p.add_argument("--redis-url", help="ICH_REDIS_URL")
    args = p.parse_args(argv)
    settings = Settings.from_env(redis_url=args.redis_url)
    store = StudyStore(connect(settings.redis_url), settings.result_ttl_s)
    state = store.state(args.study_uid)
    if not state:
        print(f"no results for study {args.study_uid} (unknown, or older than ICH_RESULT_TTL_S)",
              file=sys.stderr)
        return 1
    version = state.get("model_version", "")
    _, _, _, rule, decision = store.decide(args.study_uid)
    print(json.dumps({
        "study_instance_uid": args.study_uid,
        "state": state,
        "alerts_sent": {kind: store.alerted(args.study_uid, version, kind)
                        for kind in (FIRST_POSITIVE, STUDY_SUMMARY)},
        "awaiting_summary": store.client.zscore(keys.ACTIVE_STUDIES, args.study_uid) is not None,
        "decision": {"study_rule": rule.describe(), "thresholds": dict(rule.thresholds),
                     "scores": decision.scores, "positive": decision.positive},
        "slices": store.results(args.study_uid),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
