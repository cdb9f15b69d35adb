"""One settings object for every process, read from `ICH_*` environment variables.

Every process (listener, worker, alerts, training) builds its settings here so that names,
defaults and validation are the same everywhere (DESIGN §3). A bad value stops start-up with
an error that names the variable; `repr()` and `describe()` never show secrets, so settings
can be logged at start-up.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ich.labels import DEFAULT_THRESHOLDS, LABELS

THRESHOLD_PREFIX = "ICH_THRESHOLD_"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 §6.2 AE: no backslash, ≤16


class SettingsError(ValueError):
    """A setting has a value the service cannot start with; the message names the variable."""


# --- parsers: each takes the raw string and returns the typed value or raises ValueError ---

def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _number(raw, int)
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}")
        return value
    return parse


def _number(raw: str, kind: type) -> Any:
    try:
        return kind(raw.strip())
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None


def _positive_float(raw: str) -> float:
    value = _number(raw, float)
    if not value > 0:
        raise ValueError("expected a number greater than 0")
    return value


def _probability(raw: str) -> float:
    value = _number(raw, float)
    if not 0.0 < value < 1.0:
        raise ValueError("expected a probability strictly between 0 and 1")
    return value


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/true/yes/on or 0/false/no/off")


def _ae_title(raw: str) -> str:
    value = raw.strip()
    if not _AE_TITLE.match(value):
        raise ValueError("expected 1-16 printable ASCII characters without a backslash")
    return value


def _ae_list(raw: str) -> tuple[str, ...]:
    return tuple(_ae_title(part) for part in raw.split(",") if part.strip())


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"expected a URL of scheme {'/'.join(schemes)} with a host")
        return value
    return parse


def _url_list(raw: str) -> tuple[str, ...]:
    one = _url(("http", "https"))
    return tuple(one(part) for part in raw.split(",") if part.strip())


def _destination(raw: str) -> str:
    """`AET@host:port`, a DICOM Storage SCP that receives our results (issue 15)."""
    value = raw.strip()
    try:
        aet, host, port = parse_destination(value)
    except ValueError:
        raise ValueError(f"expected AET@host:port, got {value!r}") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"expected AET@host:port, got {value!r}")
    _ae_title(aet)
    return value


def _destination_list(raw: str) -> tuple[str, ...]:
    return tuple(_destination(part) for part in raw.split(",") if part.strip())


def parse_destination(value: str) -> tuple[str, str, int]:
    """`AET@host:port` → (AE title, host, port); ValueError when it is not that shape."""
    aet, at, address = value.partition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not port.isdigit():
        raise ValueError(value)
    return aet, host, int(port)


def _optional_path(raw: str) -> Path | None:
    value = raw.strip()
    return Path(value) if value else None


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return value


def _setting(env: str, default: str, parse: Callable[[str], Any], help: str, secret: bool = False):
    """A dataclass field that knows its environment variable, its parser and its help text."""
    return field(
        default=parse(default),
        metadata={"env": env, "raw_default": default, "parse": parse, "help": help, "secret": secret},
    )


def _mask_url(url: str) -> str:
    """Hide a password in user-info and any query string (webhook tokens often live there)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else ""))


@dataclass(frozen=True)
class Settings:
    """Resolved configuration; build it with `Settings.from_env()`."""

    redis_url: str = _setting(
        "ICH_REDIS_URL", "redis://127.0.0.1:6379/0", _url(("redis", "rediss", "unix")),
        "Redis: Celery broker, study state and slice bytes")
    ae_title: str = _setting("ICH_AE_TITLE", "ICHWATCH", _ae_title, "our DICOM AE title")
    dicom_port: int = _setting("ICH_DICOM_PORT", "11112", _int_range(1, 65535), "DICOM listen port")
    dicom_host: str = _setting("ICH_DICOM_HOST", "0.0.0.0", str, "DICOM listen address")
    allowed_calling_aets: tuple[str, ...] = _setting(
        "ICH_ALLOWED_CALLING_AETS", "", _ae_list,
        "comma list of calling AE titles allowed to associate; empty = any")
    listener_processes: int = _setting(
        "ICH_LISTENER_PROCESSES", "1", _int_range(1, 64),
        "listener processes sharing the DICOM port (SO_REUSEPORT), supervised by one parent")
    max_associations: int = _setting(
        "ICH_MAX_ASSOCIATIONS", "16", _int_range(1, 1000), "concurrent associations accepted")
    dicom_timeout_s: float = _setting(
        "ICH_DICOM_TIMEOUT_S", "30", _positive_float, "ACSE, DIMSE and network timeouts")
    model_dir: Path = _setting("ICH_MODEL_DIR", "models/current", Path, "model artifact folder")
    allow_failed_model: bool = _setting(
        "ICH_ALLOW_FAILED_MODEL", "0", _boolean,
        "serve a model whose card says training failed its quality check (inspection only)")
    batch_max: int = _setting("ICH_BATCH_MAX", "32", _int_range(1, 1024), "slices per batch")
    batch_window_ms: int = _setting(
        "ICH_BATCH_WINDOW_MS", "50", _int_range(1, 60000), "longest wait to fill a batch")
    webhook_urls: tuple[str, ...] = _setting(
        "ICH_WEBHOOK_URLS", "", _url_list, "comma list of alert consumer URLs")
    webhook_secret: str = _setting(
        "ICH_WEBHOOK_SECRET", "", str, "HMAC-SHA256 key for X-ICH-Signature", secret=True)
    webhook_allow_unsigned: bool = _setting(
        "ICH_WEBHOOK_ALLOW_UNSIGNED", "0", _boolean,
        "let the alerts process send UNSIGNED alerts when ICH_WEBHOOK_SECRET is empty")
    webhook_max_attempts: int = _setting(
        "ICH_WEBHOOK_MAX_ATTEMPTS", "8", _int_range(1, 50),
        "delivery attempts per consumer before the alert is dead-lettered")
    webhook_backoff_s: float = _setting(
        "ICH_WEBHOOK_BACKOFF_S", "1", _positive_float,
        "first retry delay; doubles per attempt (with jitter), capped at 30 s")
    result_destinations: tuple[str, ...] = _setting(
        "ICH_RESULT_DESTINATIONS", "", _destination_list,
        "comma list of AET@host:port (PACS) that receive each result as DICOM: an SR and a key image")
    result_tls_ca: Path | None = _setting(
        "ICH_RESULT_TLS_CA", "", _optional_path,
        "CA bundle: results are stored over DICOM TLS, the PACS verified against it "
        "(ICH_TLS_CERT/KEY, if set, is presented as the client certificate)")
    study_quiet_s: float = _setting(
        "ICH_STUDY_QUIET_S", "10", _positive_float, "quiet time before a study summary")
    listener_metrics_port: int = _setting(
        "ICH_LISTENER_METRICS_PORT", "9101", _int_range(0, 65535), "listener /metrics (0 = off)")
    worker_metrics_port: int = _setting(
        "ICH_WORKER_METRICS_PORT", "9102", _int_range(0, 65535), "worker /metrics (0 = off)")
    alerts_metrics_port: int = _setting(
        "ICH_ALERTS_METRICS_PORT", "9103", _int_range(0, 65535), "alerts /metrics (0 = off)")
    worker_alive_file: Path | None = _setting(
        "ICH_WORKER_ALIVE_FILE", "", _optional_path,
        "file the scoring worker touches while it consumes, for a liveness probe "
        "(python -m worker.liveness FILE); empty = off")
    worker_stall_s: float = _setting(
        "ICH_WORKER_STALL_S", "120", _positive_float,
        "slices queued this long while the worker started no batch: it stops touching "
        "ICH_WORKER_ALIVE_FILE")
    max_queue: int = _setting(
        "ICH_MAX_QUEUE", "10000", _int_range(1, 10_000_000),
        "queued slices at which the listener answers 0xA700 (out of resources)")
    visibility_timeout_s: int = _setting(
        "ICH_VISIBILITY_TIMEOUT_S", "60", _int_range(5, 3600),
        "seconds before Redis redelivers an unacknowledged slice of a lost worker")
    slice_ttl_s: int = _setting(
        "ICH_SLICE_TTL_S", "86400", _int_range(60, 30 * 86400),
        "how long queued slice bytes may wait in Redis before expiring")
    result_ttl_s: int = _setting(
        "ICH_RESULT_TTL_S", "604800", _int_range(60, 365 * 86400),
        "how long per-slice results and study state are kept")
    tls_cert: Path | None = _setting("ICH_TLS_CERT", "", _optional_path, "DICOM TLS certificate")
    tls_key: Path | None = _setting("ICH_TLS_KEY", "", _optional_path, "DICOM TLS private key")
    tls_ca: Path | None = _setting(
        "ICH_TLS_CA", "", _optional_path, "CA bundle; set = mutual TLS (client certs required)")
    log_level: str = _setting("ICH_LOG_LEVEL", "INFO", _log_level, "log level of every process")
    threshold_overrides: Mapping[str, float] = field(
        default_factory=dict,
        metadata={"env": THRESHOLD_PREFIX + "<LABEL>", "raw_default": "from model.json",
                  "help": "per-label override of the study threshold (compared with the study "
                          "rule's score; model.json has the calibrated value, 0.15 for any "
                          "without one)"})

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("ICH_TLS_CERT and ICH_TLS_KEY must be set together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise SettingsError("ICH_TLS_CA (mutual TLS) needs ICH_TLS_CERT and ICH_TLS_KEY")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read `ICH_*` from `environ` (default: the process environment); keyword overrides
        (already typed, e.g. from CLI flags; None means "not given") win over the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            parse = f.metadata.get("parse")
            if parse is None or f.metadata["env"] not in environ:
                continue
            raw = environ[f.metadata["env"]]
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                shown = "***" if f.metadata["secret"] else repr(raw)
                raise SettingsError(f"{f.metadata['env']}={shown}: {exc}") from None
        values["threshold_overrides"] = _thresholds(environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**values)

    def require_files(self, *names: str) -> None:
        """Stop start-up if a configured file is missing. Only the process that uses a file
        checks it (TLS files live on listener hosts, not on GPU hosts sharing an env file)."""
        for f in dataclasses.fields(self):
            path = getattr(self, f.name)
            if f.name in names and path is not None and not Path(path).is_file():
                raise SettingsError(f"{f.metadata['env']}={str(path)!r}: file does not exist")

    def thresholds(self, model_thresholds: Mapping[str, float] | None = None) -> dict[str, float]:
        """Per-label thresholds: the model card's, else the defaults, then env overrides."""
        return {**DEFAULT_THRESHOLDS, **(model_thresholds or {}), **self.threshold_overrides}

    def describe(self) -> dict[str, Any]:
        """Every setting by environment variable, secrets hidden: safe to log at start-up."""
        shown: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = "***" if value else ""
            elif f.name == "redis_url":
                value = _mask_url(value)
            elif f.name == "webhook_urls":
                value = [_mask_url(u) for u in value]
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            shown[f.metadata["env"]] = value
        return shown

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.describe().items()) + ")"


def _thresholds(environ: Mapping[str, str]) -> dict[str, float]:
    found: dict[str, float] = {}
    for name, raw in environ.items():
        if not name.startswith(THRESHOLD_PREFIX):
            continue
        label = name[len(THRESHOLD_PREFIX):].lower()
        if label not in LABELS:
            raise SettingsError(f"{name}: unknown label; expected one of "
                                + ", ".join(THRESHOLD_PREFIX + x.upper() for x in LABELS))
        try:
            found[label] = _probability(raw)
        except ValueError as exc:
            raise SettingsError(f"{name}={raw!r}: {exc}") from None
    return found


def table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the README's configuration table."""
    return [(f.metadata["env"], f.metadata["raw_default"], f.metadata["help"])
            for f in dataclasses.fields(Settings)]


def markdown_table() -> str:
    """The configuration table as Markdown; README.md carries it (a test keeps them in sync)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{env}` | {f'`{default}`' if default else 'empty'} | {meaning} |"
             for env, default, meaning in table()]
    return "\n".join(rows)


if __name__ == "__main__":  # python -m ich.settings: print the table, or the resolved settings
    import json
    import sys

    print(markdown_table() if "--markdown" in sys.argv else json.dumps(Settings.from_env().describe(), indent=2))
