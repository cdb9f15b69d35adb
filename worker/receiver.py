"""`python -m worker.receiver`: a reference webhook consumer that verifies and prints alerts.

For the demo (`make run` starts it when no ICH_WEBHOOK_URLS are set) and as the example an
integrator copies: check that `X-ICH-Timestamp` is recent and that `X-ICH-Signature` is
HMAC-SHA256 of "<timestamp>.<raw body>" with the shared secret before trusting anything, and
drop duplicates by `Idempotency-Key`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from worker.alerts import verify


#: The largest alert body read (an alert lists at most a study's slices: ~300 bytes each).
MAX_BODY = 4 << 20
#: Seconds a client may take per socket operation: a stalled sender cannot hold a thread.
TIMEOUT_S = 10


def make_handler(secret: str):
    seen: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        timeout = TIMEOUT_S

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:   # the peer's word: bound it before reading
                self.send_response(411 if length < 0 else 413)
                self.end_headers()
                return
            body = self.rfile.read(length)
            if secret and not verify(body, self.headers.get("X-ICH-Signature", ""), secret,
                                     self.headers.get("X-ICH-Timestamp", "")):
                self.send_response(401)
                self.end_headers()
                print("rejected an alert with a bad or stale signature", flush=True)
                return
            self.send_response(204)
            self.end_headers()
            key = self.headers.get("Idempotency-Key", "")
            if key in seen:
                return
            seen.add(key)
            alert = json.loads(body)
            positive = [label for label, p in alert["positive"].items() if p]
            print(f"*** {alert['kind'].upper()} study {alert['study_instance_uid']} "
                  f"accession {alert['accession_number'] or '-'}: "
                  f"{'POSITIVE ' + ','.join(positive) if positive else 'negative'} "
                  f"(any={alert['probabilities']['any']:.2f}, threshold {alert['thresholds']['any']}, "
                  f"{alert['slices_scored']} slices, {alert['latency_seconds']:.2f} s after receipt)",
                  flush=True)

        def log_message(self, *args) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.receiver", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--secret", default=os.environ.get("ICH_WEBHOOK_SECRET", ""),
                   help="shared HMAC key (default: ICH_WEBHOOK_SECRET)")
    args = p.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.secret))
    print(f"webhook receiver on http://{args.host}:{args.port}/alerts "
          f"({'verifying signatures' if args.secret else 'NOT verifying: no secret'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
