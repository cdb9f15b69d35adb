"""`python -m dicom_listener.send`: send DICOM files, or synthetic phantom studies, to any node.

The demo and load tool, usable without DCMTK: one association per sender process (processes,
not threads, so several senders are not serialised by the GIL), prints instances/s and the
count of each C-STORE status.

    python -m dicom_listener.send data/synthetic/stage_2_train --port 11112 --concurrency 4
    python -m dicom_listener.send --synthetic-studies 2 --seed 7 --positive
"""
from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from ich.settings import parse_destination

MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1-255


def find_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return files


def synthetic_datasets(studies: int, seed: int, positive: bool | None,
                       site: str = "randomised") -> list[Dataset]:
    """Phantom slices of `site` (training.synthetic.SITES) in memory; `positive` picks studies
    with (True) or without (False) bleeds."""
    from training.synthetic import make_study  # the sender works without it for real files

    out: list[Dataset] = []
    index = 0
    while len({ds.StudyInstanceUID for ds in out}) < studies:
        study = make_study(seed, index, site=site)
        index += 1
        is_positive = any(s.labels["any"] for s in study)
        if positive is None or positive == is_positive:
            out.extend(s.dataset for s in study)
        if index > 50 * studies:
            raise SystemExit("could not find enough phantom studies of the requested kind")
    return out


def send(host: str, port: int, called: str, calling: str, items: list) -> Counter:
    """One association; every item (a path or a Dataset) gets one C-STORE. Returns statuses."""
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = 128 * 1024
    ae.connection_timeout = 10   # a destination that never answers the TCP connect (pynetdicom: none)
    headers = [_header(item) for item in items]
    contexts = sorted({(h.SOPClassUID, h.file_meta.TransferSyntaxUID) for h in headers})
    if len(contexts) > MAX_CONTEXTS:
        raise SystemExit(f"{len(contexts)} SOP class/transfer syntax pairs: more than one "
                         f"association can negotiate ({MAX_CONTEXTS})")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    statuses: Counter = Counter()
    assoc = ae.associate(host, port, ae_title=called,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        statuses["association_failed"] += len(items)
        return statuses
    responses_stay_queued(assoc)
    try:
        for item in items:
            status = assoc.send_c_store(item)
            statuses[f"0x{status.Status:04X}" if "Status" in status else "no_response"] += 1
    finally:
        assoc.release()
    return statuses


def responses_stay_queued(assoc) -> None:
    """Work around a race in pynetdicom 3.0's requestor (pydicom/pynetdicom#875, #435).

    The association's reactor thread polls the DIMSE queue without blocking, and its pause
    handshake with `send_c_store` is racy: under CPU contention the reactor can take the
    C-STORE response the sending thread is waiting for, discard it as "unexpected", and the
    sender waits out its whole DIMSE timeout and aborts. Seen once in `make demo` (23 of 34
    slices stored, then a 30 s stall and an abort); reproduced in about 1 of 800 associations,
    every time with the window widened. A sender's reactor only ever needs requests: leave
    responses, and the abort marker, for the thread blocked in `send_c_store`."""
    get_msg = assoc.dimse.get_msg

    def reactor_safe_get_msg(block: bool = False):
        if not block:
            _, msg = assoc.dimse.peek_msg()
            if msg is None or not msg.is_valid_request:
                return None, None
        return get_msg(block)

    assoc.dimse.get_msg = reactor_safe_get_msg


def _header(item) -> Dataset:
    return item if isinstance(item, Dataset) else pydicom.dcmread(item, stop_before_pixels=True)


def _nodelay(event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _send_share(args: tuple) -> Counter:
    return send(*args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dicom_listener.send",
                                description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", type=Path, help="DICOM files or folders")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--called-aet", default="ICHWATCH")
    p.add_argument("--calling-aet", default="ICHSEND")
    p.add_argument("--concurrency", type=int, default=1, help="parallel associations")
    p.add_argument("--synthetic-studies", type=int, default=0, help="send N phantom studies")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--site", default="randomised",
                   help="phantom site: randomised (default, as `make run` trains on) | legacy | site-d")
    p.add_argument("--also", action="append", default=[], metavar="AET@HOST:PORT",
                   help="store the same instances there first, as a modality also sends them to "
                        "PACS (results to PACS then land in a study that holds its slices)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--positive", dest="positive", action="store_true", default=None,
                      help="only phantom studies with a bleed")
    kind.add_argument("--negative", dest="positive", action="store_false",
                      help="only phantom studies without a bleed")
    args = p.parse_args(argv)

    items: list = find_files(args.paths)
    if args.synthetic_studies:
        items += synthetic_datasets(args.synthetic_studies, args.seed, args.positive, args.site)
    if not items:
        p.error("nothing to send: give paths or --synthetic-studies")
    for destination in args.also:
        try:
            aet, host, port = parse_destination(destination)
        except ValueError:
            p.error(f"--also {destination}: not AET@host:port")
        also = send(host, port, aet, args.calling_aet, items)
        print(f"also stored at {destination}: statuses {dict(sorted(also.items()))}")
        if also.get("0x0000", 0) != len(items):
            return 1
    n = max(1, min(args.concurrency, len(items)))
    shares = [(args.host, args.port, args.called_aet, args.calling_aet, items[i::n]) for i in range(n)]

    started = time.perf_counter()
    if n == 1:
        results = [_send_share(shares[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            results = pool.map(_send_share, shares)
    seconds = time.perf_counter() - started
    total = sum(results, Counter())
    print(f"sent {len(items)} instances over {n} association(s) in {seconds:.2f} s: "
          f"{len(items) / seconds:.1f} instances/s; statuses: {dict(sorted(total.items()))}")
    return 0 if total.get("0x0000", 0) == len(items) else 1


if __name__ == "__main__":
    sys.exit(main())
