"""Hostile input (issue 7): a generated corpus through ONE real listener process in ONE
association, interleaved with good CT slices, then the queued bytes through the worker's decoder
and an in-process `Scorer`; plus a property-based test over mutated headers of a valid slice.

Every case of tests/reliability/hostile.py has a defined outcome (status and reason, or the
worker's failed reason). Known product bugs are xfail(strict=True) with the bug in the reason;
their case asserts the invariant the bug breaks, so any fix turns them into an XPASS.
"""
from __future__ import annotations

import io
import re
import socket
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pynetdicom.association
import pytest
import redis
from hypothesis import HealthCheck, event, given, settings, strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
    ImplicitVRLittleEndian, RLELossless, UID,
)
from pynetdicom import AE as SCU
from pynetdicom.dsutils import decode

from dicom_listener import policy
from dicom_listener.send import responses_stay_queued
from ich import imaging, keys
from tests.listener.conftest import AE, Listener, queued_messages
from tests.reliability import hostile
from tests.reliability.hostile import Case
from tests.services import RedisServer

CALLING = "HOSTILESCU"
#: Peak RSS growth allowed to the listener while it handles one instance.
LISTENER_BOUND_MB = 64
#: Peak traced allocation allowed to one in-process load_slice.
DECODE_BOUND_MB = 64
DECODE_SIZE = 96  # the worker's input size with the test models (tests/modelfactory.SIZE)

CORPUS = hostile.corpus()
BY_NAME = {c.name: c for c in CORPUS}
assert len(BY_NAME) == len(CORPUS), "case names must be unique"
HOSTILE = [c for c in CORPUS if not c.name.startswith("good_")]
assert len(HOSTILE) >= 40


# --- the run: the whole corpus through one listener, one association --------------------

@dataclass
class Sent:
    case: Case
    status: int | None              # None: no accepted presentation context
    comment: str = ""               # ErrorComment of a failure response
    growth_mb: float = 0.0          # listener peak RSS during the C-STORE minus RSS before it
    seconds: float = 0.0
    outcome: str = ""               # observed: queued / ignored / rejected / context_rejected
    reason: str = ""                # observed reason (ErrorComment, or the log for ignored)
    blob: bytes | None = None       # the bytes the listener stored in Redis, if queued
    token: str = ""


@dataclass
class Run:
    sent: dict[str, Sent]
    alive: bool
    log: str
    metrics: dict[str, float]
    queued: list[dict]
    after_status: int               # a good slice on a fresh association after the corpus
    redis_url: str
    refusal_lines: list[tuple[str, str]] = field(default_factory=list)


def _proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak(pid: int) -> bool:
    """VmHWM := VmRSS (proc(5) clear_refs); False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_growth_mb(pid: int, run_instance) -> float:
    """Peak RSS growth of process `pid` while `run_instance()` runs, in MiB (without
    clear_refs only a new all-time peak is seen: a lower bound)."""
    reset = _reset_peak(pid)
    before = _proc_kb(pid, "VmRSS") if reset else max(_proc_kb(pid, "VmRSS"), _proc_kb(pid, "VmHWM"))
    run_instance()
    return max(0, _proc_kb(pid, "VmHWM") - before) / 1024


def _carrier(c: Case) -> Dataset:
    """What pynetdicom's SCU needs to build the C-STORE request; the data set bytes it sends
    come from the case (see `send_corpus`)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = c.sop_class, c.sop_instance
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = c.transfer_syntax
    return ds


_LOG_LINE = re.compile(rf"C-STORE from {CALLING}: (?:refused \((\w+)\)|cannot parse data set "
                       rf"\((\w+)\)|.* instance ignored \((\w+)\))")


def send_corpus(listener: Listener, cases: list[Case]) -> dict[str, Sent]:
    scu = SCU(ae_title=CALLING)
    scu.dimse_timeout = scu.network_timeout = 60
    for pair in sorted({(c.sop_class, c.transfer_syntax) for c in cases}):
        scu.add_requested_context(*pair)
    payloads: dict[int, bytes] = {}
    real_encode = pynetdicom.association.encode

    def encode(ds, *args):  # the peer sends the case's bytes, whatever they are
        return payloads[id(ds)] if id(ds) in payloads else real_encode(ds, *args)

    pid = listener.proc.pid
    sent: dict[str, Sent] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pynetdicom.association, "encode", encode)
        assoc = scu.associate("127.0.0.1", listener.port, ae_title=AE)
        assert assoc.is_established
        responses_stay_queued(assoc)
        # Nagle on the sender's side would add a delayed-ACK wait (~40 ms) to every C-STORE.
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        try:
            for c in cases:
                if (c.sop_class, c.transfer_syntax) not in accepted:
                    sent[c.name] = Sent(c, None, outcome="context_rejected")
                    continue
                assert assoc.is_established, f"association lost before {c.name}"
                carrier = _carrier(c)
                payloads[id(carrier)] = c.payload
                response: list[Dataset] = []
                t = time.perf_counter()
                growth = _peak_growth_mb(pid, lambda: response.append(assoc.send_c_store(carrier)))
                seconds = time.perf_counter() - t
                del payloads[id(carrier)]
                rsp = response[0]
                sent[c.name] = Sent(c, int(rsp.get("Status", -1)), str(rsp.get("ErrorComment", "")),
                                    growth, seconds)
        finally:
            if assoc.is_established:
                assoc.release()
    return sent


def _attribute_outcomes(sent: dict[str, Sent], queued: list[dict], log: str,
                        client: redis.Redis) -> list[tuple[str, str]]:
    """Observed outcome and reason of each instance: queued ones are the queue's messages in
    order (one association, one instance at a time); each other instance has its log line."""
    lines = [(("rejected", a) if a else ("undecodable", b) if b else ("ignored", c))
             for a, b, c in _LOG_LINE.findall(log)]
    messages, refusals = iter(queued), iter(lines)
    pending = next(messages, None)
    for s in sent.values():
        if s.status is None:
            continue
        if s.status == policy.SUCCESS and pending and \
                pending["kwargs"]["sop_instance_uid"] == s.case.sop_instance:
            s.outcome, s.token = "queued", pending["kwargs"]["token"]
            s.blob = client.get(keys.slice_bytes(s.token))
            pending = next(messages, None)
            continue
        kind, reason = next(refusals, ("missing log line", ""))
        if s.status == policy.SUCCESS:
            s.outcome, s.reason = ("ignored", reason) if kind == "ignored" else (f"? {kind}", reason)
        else:
            s.outcome = "rejected" if kind != "ignored" else "? ignored with failure status"
            s.reason = s.comment if kind == "undecodable" else reason
    assert pending is None, "queued messages left over: the attribution is wrong"
    return lines


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("hostile")
    server = RedisServer(tmp / "redis").start()
    listener = Listener(tmp, server.url, ICH_MAX_QUEUE="10000").start()
    try:
        sent = send_corpus(listener, CORPUS)
        alive = listener.proc.poll() is None
        after = hostile.case("good_after", hostile.base("good_after", seed=999), hostile.SUCCESS,
                             what="a valid slice on a new association after the corpus")
        after_status = send_corpus(listener, [after])[after.name].status if alive else -1
        metrics = listener.metrics() if alive else {}
        client = server.client()
        queued = queued_messages(client)
        log = listener.log()
        lines = _attribute_outcomes(sent, queued[:-1] if after_status == 0 else queued, log, client)
        yield Run(sent, alive, log, metrics, queued, after_status, server.url, lines)
    finally:
        listener.stop()
        server.stop()


# --- the worker's decoder, measured ------------------------------------------------------

_decoded: dict[tuple[bytes, int], tuple[str, float]] = {}


def decode_outcome(data: bytes, size: int = DECODE_SIZE) -> tuple[str, float]:
    """('ok' | 'nonfinite' | 'out of range' | SliceError reason | 'raised <Type>', peak MiB)
    of `ich.imaging.load_slice` on `data` (memoised: the bombs take a second each)."""
    if (data, size) not in _decoded:
        _decoded[(data, size)] = _decode_outcome(data, size) if size == DECODE_SIZE else None
    return _decoded[(data, size)] or _decode_outcome(data, size)


def _decode_outcome(data: bytes, size: int) -> tuple[str, float]:
    tracemalloc.start()
    try:
        images = [frame.image for frame in imaging.load_frames(data, size)]   # as the worker does
        image = np.stack(images)
        if image.shape[1:] != (size, size, 3) or image.dtype != np.float32:
            result = f"bad shape {image.shape} {image.dtype}"
        elif not np.isfinite(image).all():
            result = "nonfinite"
        elif image.min() < 0 or image.max() > 1:
            result = "out of range"
        else:
            result = "ok"
    except imaging.SliceError as exc:
        result = exc.reason
    except Exception as exc:  # noqa: BLE001 - the contract says this never happens
        result = f"raised {type(exc).__name__}"
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    return result, peak


# --- per case ----------------------------------------------------------------------------

def _xfail(bug: str):
    return pytest.mark.xfail(strict=True, reason=bug)


@pytest.mark.parametrize("name", [pytest.param(c.name, marks=_xfail(c.bug) if c.bug else ())
                                  for c in CORPUS])
def test_listener_outcome(run, name):
    """Each instance got its defined answer, within the listener's memory bound; a queued
    one fails or decodes in the worker as defined."""
    s = run.sent[name]
    c = s.case
    worker, peak = decode_outcome(s.blob) if s.blob is not None else (None, 0.0)
    observed = f"{hostile.describe(s.status, s.reason, worker)} [{s.outcome}], " \
               f"listener +{s.growth_mb:.0f} MiB, decode {peak:.0f} MiB"
    if c.invariant == "refused":
        assert s.status in (policy.DATASET_MISMATCH, policy.CANNOT_UNDERSTAND) and s.comment, observed
        return
    if c.invariant == "worker_agrees":
        assert s.outcome != "queued" or worker == "ok", observed
        return
    if c.invariant == "finite":
        assert s.outcome != "queued" or worker == "ok" or worker in imaging.REASONS, observed
        return
    if c.invariant == "bounded":
        assert s.growth_mb < LISTENER_BOUND_MB, observed
        assert s.outcome != "queued" or peak < DECODE_BOUND_MB, observed
        return
    assert s.status == c.status or (s.status, s.reason) in c.also, observed
    assert s.outcome == c.outcome or (s.status, s.reason) in c.also, observed
    assert s.reason == c.reason or (s.status, s.reason) in c.also, observed
    if s.status not in (None, policy.SUCCESS):
        assert s.comment == s.reason, observed  # the sender is told why
    assert worker == c.worker, observed
    assert s.growth_mb < LISTENER_BOUND_MB, observed
    assert peak < DECODE_BOUND_MB, observed


@pytest.mark.parametrize("name", [pytest.param(c.name, marks=_xfail(c.decoder_bug) if c.decoder_bug else ())
                                  for c in HOSTILE])
def test_decoder_contract(name):
    """Whatever the bytes (even those the listener refuses), the worker's `load_frames` returns
    a finite [0, 1] float32 image or raises SliceError with a known reason, in bounded memory."""
    result, peak = decode_outcome(hostile.case_part10(BY_NAME[name]))
    assert result == "ok" or result in imaging.REASONS, result
    assert peak < DECODE_BOUND_MB, f"{result}, peak {peak:.0f} MiB"


# --- the run as a whole ----------------------------------------------------------------

def test_listener_survives_and_every_good_slice_is_queued(run):
    assert run.alive, run.log[-3000:]
    assert run.after_status == 0  # still serving new associations afterwards
    goods = [s for s in run.sent.values() if s.case.name.startswith("good_")]
    assert len(goods) >= 10
    assert [(s.case.name, s.status, s.outcome) for s in goods] == \
           [(s.case.name, 0, "queued") for s in goods]
    for s in goods:
        assert s.blob.endswith(s.case.payload)  # stored exactly as received
        assert decode_outcome(s.blob)[0] == "ok"


def test_every_refused_or_ignored_instance_has_its_reason_logged(run):
    """One log line per instance not queued, in order, with the reason (the exception type
    for a data set that could not be parsed), and none for a queued one."""
    not_queued = [s for s in run.sent.values() if s.status is not None and s.outcome != "queued"]
    assert len(run.refusal_lines) == len(not_queued)
    for s, (kind, reason) in zip(not_queued, run.refusal_lines):
        if kind == "undecodable":
            assert s.status == policy.CANNOT_UNDERSTAND and s.comment == "undecodable", s.case.name
        else:
            assert (kind, reason) == (s.outcome, s.reason), s.case.name
    assert "Traceback" not in run.log


def test_metrics_count_every_instance_by_outcome_and_reason(run):
    m = run.metrics
    handled = [s for s in run.sent.values() if s.status is not None]
    assert m["ich_instances_received_total"] == len(handled) + 1  # + the one after the corpus
    assert m["ich_instances_queued_total"] == sum(s.outcome == "queued" for s in handled) + 1
    for outcome, metric in (("ignored", "ich_instances_ignored_total"),
                            ("rejected", "ich_instances_rejected_total")):
        expected = Counter(s.reason for s in handled if s.outcome == outcome)
        got = {k.split('"')[1]: v for k, v in m.items() if k.startswith(metric + "{")}
        assert {k: v for k, v in got.items() if v} == expected


def test_outcome_table(run):
    """Every case was sent and answered; the table (`pytest -rP`) is the report of issue 7."""
    rows = []
    for name, s in run.sent.items():
        worker = decode_outcome(s.blob)[0] if s.blob is not None else None
        got = hostile.describe(s.status, s.reason, worker)
        flag = "" if got == s.case.expected() else f"   (expected {s.case.expected()})"
        rows.append(f"{name:36s} {got:52s} +{s.growth_mb:5.1f} MiB {s.seconds * 1000:7.1f} ms{flag}")
        assert s.outcome and not s.outcome.startswith("?"), (name, s.outcome)
    print(f"{len(HOSTILE)} hostile cases, {len(CORPUS) - len(HOSTILE)} good slices, one association")
    print("\n".join(rows))


def test_context_refusals_are_negotiated_not_crashes(run):
    refused = {n for n, s in run.sent.items() if s.status is None}
    deflated = {"deflated_valid", "deflate_corrupt", "deflate_truncated", "deflate_bomb_ct",
                "deflate_bomb_mr"}  # Deflated Explicit VR is not offered (unbounded inflation)
    assert refused == {"unknown_sop_class_context", "big_endian_context"} | deflated


def test_duplicate_sop_instance_uid_is_queued_twice_each_with_its_own_bytes(run):
    first, again = run.sent["good_0"], run.sent["duplicate_sop_instance_uid"]
    assert first.case.sop_instance == again.case.sop_instance
    assert first.outcome == again.outcome == "queued" and first.token != again.token
    assert first.blob.endswith(first.case.payload) and again.blob.endswith(again.case.payload)
    assert first.case.payload != again.case.payload


def test_huge_declared_dimensions_allocate_nothing(run):
    """65535 x 65535 x 16 bits would be 8 GiB: refused from the header, in the listener and in
    the worker's decoder, before any pixel buffer exists."""
    for name in ("dims_65535_square", "dims_65535_8bit"):
        s = run.sent[name]
        assert (s.status, s.reason) == (policy.DATASET_MISMATCH, "too_large")
        assert s.growth_mb < 8, f"listener grew {s.growth_mb:.1f} MiB"
        result, peak = decode_outcome(hostile.case_part10(s.case))
        assert result == "too_large" and peak < 1, f"{result}, {peak:.2f} MiB"


def test_deflate_bombs_never_reach_a_decoder(run):
    """The listener refuses the Deflated context, so a bomb costs nothing there; a deflated
    file read by ich.imaging (training data) is refused after a bounded inflate."""
    for name in ("deflate_bomb_ct", "deflate_bomb_mr"):
        s = run.sent[name]
        assert s.status is None and s.growth_mb < 8, (name, s.growth_mb)
        assert len(s.case.payload) < 2 ** 20  # < 1 MiB on the wire
        result, peak = decode_outcome(hostile.case_part10(s.case))
        assert result == "too_large" and peak < 64, f"{result}, {peak:.0f} MiB"
    assert run.alive and run.after_status == 0


@pytest.fixture(scope="module")
def scorer(run, tmp_path_factory):
    """The worker's scoring hot path in-process (as tests/worker/test_scorer.py), on the
    run's Redis, with the tiny blood_detector model."""
    pytest.importorskip("tensorflow")
    from ich.settings import Settings
    from tests.modelfactory import blood_detector
    from worker.scoring import Scorer

    return Scorer(Settings.from_env({"ICH_REDIS_URL": run.redis_url}),
                  redis.Redis.from_url(run.redis_url),
                  blood_detector(tmp_path_factory.mktemp("models")))


def _metas(run, sent: list[Sent]):
    """The queued task metas of `sent`, their bytes put back in Redis (the scorer deletes the
    bytes of what it has scored)."""
    from worker.scoring import meta_from_kwargs

    client = redis.Redis.from_url(run.redis_url)
    for s in sent:
        client.set(keys.slice_bytes(s.token), s.blob)
    tokens = {s.token for s in sent}
    return [meta_from_kwargs(m["kwargs"]) for m in run.queued if m["kwargs"]["token"] in tokens]


def test_queued_slices_are_scored_or_failed_alone_by_the_worker(run, scorer):
    """Every slice the listener queued, in one batch: good slices are scored with finite
    probabilities, the others fail alone with the reason `load_frames` gives."""
    queued = [s for s in run.sent.values() if s.outcome == "queued"]
    metas = _metas(run, queued)
    images, pending, failed = scorer.pre_process(metas)
    by_token = {s.token: s for s in queued}
    errors = {f.meta.token: f.error for f in failed}
    for token, s in by_token.items():
        expected = decode_outcome(s.blob)[0]
        got = errors.get(token, "ok")
        assert got == expected or (expected == "nonfinite" and got == "ok"), s.case.name
    probabilities = scorer.predict(images)
    good = [i for i, r in enumerate(pending) if by_token[r.meta.token].case.name.startswith("good_")]
    assert len(good) == sum(s.case.name.startswith("good_") for s in queued) >= 10
    assert np.isfinite(probabilities[good]).all()
    scorer.post_process(pending, probabilities, failed)
    results = {r["sop_instance_uid"]: r for r in scorer.studies.results(hostile.STUDY)}
    for s in queued:
        if s.case.name.startswith("good_") and s.case.name != "good_0":  # good_0's UID is reused
            assert "error" not in results[s.case.sop_instance], s.case.name
            assert np.isfinite(list(results[s.case.sop_instance]["probabilities"].values())).all()
        elif s.token in errors:
            assert results[s.case.sop_instance]["error"] == errors[s.token], s.case.name


def test_a_poison_slice_fails_alone_not_its_batch(run, scorer):
    """A queued slice whose header only the worker reads (RescaleSlope with an unknown VR)
    fails alone; its batch is scored."""
    batch = [run.sent["good_1"], run.sent["slope_invalid_vr"], run.sent["good_2"]]
    assert [s.outcome for s in batch] == ["queued"] * 3
    images, pending, failed = scorer.pre_process(_metas(run, batch))
    assert len(pending) == 2 and [f.error for f in failed] == ["undecodable"]


# --- property: mutated headers of a valid slice ------------------------------------------

US = {"Rows": hostile.ROWS, "Columns": hostile.COLUMNS, "BitsAllocated": hostile.BITS_ALLOCATED,
      "BitsStored": hostile.BITS_STORED, "HighBit": hostile.HIGH_BIT,
      "PixelRepresentation": hostile.PIXEL_REPRESENTATION, "SamplesPerPixel": hostile.SAMPLES,
      "PixelPaddingValue": hostile.PIXEL_PADDING}
TEXT = {"PhotometricInterpretation": (hostile.PHOTOMETRIC, b"CS"),
        "NumberOfFrames": (hostile.NUMBER_OF_FRAMES, b"IS"),
        "RescaleSlope": (hostile.RESCALE_SLOPE, b"DS"),
        "RescaleIntercept": (hostile.RESCALE_INTERCEPT, b"DS"),
        "Modality": (0x00080060, b"CS")}
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda f: f"{f:.6g}"),
    st.integers(-70000, 70000).map(str),
    st.sampled_from(["", " ", "abc", "1\\2", "1e38", "-1e38", "1e39", "NaN", "-inf", "0", "-0",
                     "1e-45", "+1", "1.0.0", "\0"]))


def _us(*typical: int):
    return st.one_of(st.none(), st.sampled_from(typical), st.integers(0, 65535))


FIELDS = {
    "Rows": _us(0, 1, 2, 16, 64, 100, 512, 4096, 4097, 65535),
    "Columns": _us(0, 1, 2, 16, 64, 100, 512, 4096, 4097, 65535),
    "BitsAllocated": _us(0, 1, 8, 12, 16, 24, 32, 64),
    "BitsStored": _us(0, 1, 8, 12, 15, 16, 17, 32, 33),
    "HighBit": _us(0, 7, 11, 15, 16, 31),
    "PixelRepresentation": _us(0, 1, 2),
    "SamplesPerPixel": _us(0, 1, 3, 4),
    "PixelPaddingValue": _us(0, 24, 1024, 32768, 65535),
    "PhotometricInterpretation": st.one_of(st.none(), st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "",
         "monochrome2", "MONOCHROME3", "HSV"])),
    "NumberOfFrames": st.one_of(st.none(), st.integers(-3, 2 ** 31 - 1).map(str),
                                st.sampled_from(["", "abc", "1.5", " 1", "+1", "1", "2"])),
    "RescaleSlope": st.one_of(st.none(), _numbers),
    "RescaleIntercept": st.one_of(st.none(), _numbers),
    "Modality": st.one_of(st.none(), st.sampled_from(["ct", "MR", "", "C T", "CT\\MR"])),
    "TransferSyntax": st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                       DeflatedExplicitVRLittleEndian, RLELossless,
                                       ExplicitVRBigEndian]),
    # "fit": as many bytes as the mutated header implies (capped), so decoding gets its turn.
    "PixelData": st.one_of(st.just("fit"), st.integers(0, 3 * 8192),
                           st.sampled_from([0, 1, 8191, 8192, 8193, 16384])),
}


@st.composite
def mutations(draw) -> dict:
    """A handful (1-4) of the header attributes above, each given a hostile value."""
    chosen = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True))
    return {keyword: draw(FIELDS[keyword]) for keyword in chosen}


_VALID = hostile.base("property", seed=3)
FIT_CAP = 1 << 20


def _header(mutation: dict, keyword: str) -> int:
    value = mutation.get(keyword, _VALID.get(keyword))
    return int(value or 0)


def frame_bytes(mutation: dict) -> int:
    """Bytes of one frame the mutated header implies (PS3.5 §8.1.1)."""
    return (_header(mutation, "Rows") * _header(mutation, "Columns") *
            max(_header(mutation, "SamplesPerPixel"), 1) * _header(mutation, "BitsAllocated") // 8)


def mutated(mutation: dict) -> tuple[bytes, str]:
    """(data set bytes as sent, transfer syntax) of the valid slice with `mutation` applied."""
    ts = UID(mutation.get("TransferSyntax", ExplicitVRLittleEndian))
    implicit = ts.is_implicit_VR

    def vr(code: bytes) -> bytes | None:
        return None if implicit else code

    raw: dict[int, bytes | None] = {}
    for keyword, tag in US.items():
        if keyword in mutation:
            value = mutation[keyword]
            raw[tag] = None if value is None else hostile.element(tag, vr(b"US"), value.to_bytes(2, "little"))
    for keyword, (tag, code) in TEXT.items():
        if keyword in mutation:
            value = mutation[keyword]
            raw[tag] = None if value is None else hostile.element(tag, vr(code), hostile.text(value))
    if "PixelData" in mutation:
        n = mutation["PixelData"]
        if n == "fit":
            n = min(frame_bytes(mutation), FIT_CAP)
        pixels = (_VALID.PixelData * (n // len(_VALID.PixelData) + 1))[:n]
        raw[hostile.PIXEL_DATA] = hostile.element(hostile.PIXEL_DATA, vr(b"OW"), pixels)
    payload = hostile.encode(_VALID, implicit=implicit, raw=raw)
    return (hostile.deflate(payload) if ts.is_deflated else payload), str(ts)


def listener_answer(payload: bytes, ts: str) -> policy.Decision:
    """What the C-STORE handler decides: classify, or 0xC210 when parsing raises."""
    t = UID(ts)
    try:
        ds = decode(io.BytesIO(payload), t.is_implicit_VR, t.is_little_endian, t.is_deflated)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = t
        return policy.classify(ds, CTImageStorage, _VALID.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - handlers._store answers this 0xC210 "undecodable"
        return policy.Decision("reject", "undecodable", policy.CANNOT_UNDERSTAND)


#: Worker reasons the listener's header check exists to catch first (DESIGN §4: refuse what
#: the worker cannot score while the sender can still be told).
HEADER_REASONS = {"not_ct", "no_pixel_data", "bad_geometry", "too_large", "multi_frame",
                  "unsupported_photometric", "unsupported_bits"}


@settings(max_examples=200, deadline=800, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mutations())
def test_mutated_headers_decode_or_fail_with_a_reason(mutation):
    payload, ts = mutated(mutation)
    data = hostile.part10(payload, ts, CTImageStorage, _VALID.SOPInstanceUID)
    result, peak = decode_outcome(data, size=32)
    event(f"worker: {result}")
    assert result == "ok" or result in imaging.REASONS, result
    assert peak < DECODE_BOUND_MB, f"{result}: {peak:.0f} MiB"

    decision = listener_answer(payload, ts)
    event(f"listener: {decision.action} {decision.reason}")
    assert decision.action in ("queue", "ignore", "reject")
    assert decision.status in (policy.SUCCESS, policy.DATASET_MISMATCH, policy.CANNOT_UNDERSTAND)
    assert (decision.status == policy.SUCCESS) == (decision.action != "reject")
    assert bool(decision.reason) == (decision.action != "queue")
    if decision.action == "queue":
        # What the listener queued, the worker scores or fails for a reason only decoding shows.
        assert result not in HEADER_REASONS, result
        if not UID(ts).is_compressed:
            assert result != "truncated", result
