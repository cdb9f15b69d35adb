"""ich.settings, ich.labels and ich.keys: defaults, validation naming the variable, no secrets."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ich import keys, labels
from ich.settings import Settings, SettingsError, parse_destination, table

DESIGN_VARIABLES = {
    "ICH_REDIS_URL": "redis://127.0.0.1:6379/0", "ICH_AE_TITLE": "ICHWATCH",
    "ICH_DICOM_PORT": 11112, "ICH_DICOM_HOST": "0.0.0.0", "ICH_ALLOWED_CALLING_AETS": [],
    "ICH_MODEL_DIR": "models/current", "ICH_BATCH_MAX": 32, "ICH_BATCH_WINDOW_MS": 50,
    "ICH_WEBHOOK_URLS": [], "ICH_WEBHOOK_SECRET": "", "ICH_STUDY_QUIET_S": 10.0,
    "ICH_LISTENER_METRICS_PORT": 9101, "ICH_WORKER_METRICS_PORT": 9102,
    "ICH_ALERTS_METRICS_PORT": 9103, "ICH_MAX_QUEUE": 10000,
    "ICH_TLS_CERT": None, "ICH_TLS_KEY": None, "ICH_TLS_CA": None,
}


def test_defaults_match_the_design_contract():
    described = Settings.from_env({}).describe()
    for name, default in DESIGN_VARIABLES.items():
        assert described[name] == default, name
    assert Settings.from_env({}).thresholds()["any"] == 0.15


def test_environment_is_parsed_and_typed():
    s = Settings.from_env({
        "ICH_DICOM_PORT": "104", "ICH_ALLOWED_CALLING_AETS": "CT1, PACS_A ,",
        "ICH_BATCH_WINDOW_MS": "20", "ICH_STUDY_QUIET_S": "2.5", "ICH_MODEL_DIR": "/m/v1",
        "ICH_WEBHOOK_URLS": "http://a:8000/x,https://b.example/hook",
    })
    assert s.dicom_port == 104 and s.batch_window_ms == 20 and s.study_quiet_s == 2.5
    assert s.allowed_calling_aets == ("CT1", "PACS_A")
    assert s.model_dir == Path("/m/v1")
    assert s.webhook_urls == ("http://a:8000/x", "https://b.example/hook")


def test_overrides_win_and_none_means_not_given():
    s = Settings.from_env({"ICH_DICOM_PORT": "104"}, dicom_port=4242, ae_title=None)
    assert s.dicom_port == 4242 and s.ae_title == "ICHWATCH"
    with pytest.raises(TypeError, match="unknown settings: nope"):
        Settings.from_env({}, nope=1)


def test_result_destinations_parse():
    s = Settings.from_env({"ICH_RESULT_DESTINATIONS": "PACS@10.0.0.5:104, ORTHANC@pacs.local:4242"})
    assert s.result_destinations == ("PACS@10.0.0.5:104", "ORTHANC@pacs.local:4242")
    assert parse_destination(s.result_destinations[1]) == ("ORTHANC", "pacs.local", 4242)


@pytest.mark.parametrize("name, value", [
    ("ICH_DICOM_PORT", "abc"), ("ICH_DICOM_PORT", "70000"), ("ICH_BATCH_MAX", "0"),
    ("ICH_AE_TITLE", "A_TITLE_LONGER_THAN_16"), ("ICH_AE_TITLE", "BAD\\AE"),
    ("ICH_ALLOWED_CALLING_AETS", "OK,WAY_TOO_LONG_AE_TITLE"), ("ICH_REDIS_URL", "localhost:6379"),
    ("ICH_WEBHOOK_URLS", "ftp://x/y"), ("ICH_STUDY_QUIET_S", "-1"), ("ICH_LOG_LEVEL", "LOUD"),
    ("ICH_THRESHOLD_ANY", "1.5"),
    ("ICH_THRESHOLD_BLEED", "0.2"), ("ICH_VISIBILITY_TIMEOUT_S", "7200"),
    ("ICH_RESULT_DESTINATIONS", "PACS@host"), ("ICH_RESULT_DESTINATIONS", "host:104"),
    ("ICH_RESULT_DESTINATIONS", "PACS@:104"), ("ICH_RESULT_DESTINATIONS", "PACS@host:0"),
    ("ICH_RESULT_DESTINATIONS", "A_TITLE_LONGER_THAN_16@host:104"), ("ICH_LISTENER_PROCESSES", "0"),
])
def test_bad_value_is_an_error_naming_the_variable(name, value):
    with pytest.raises(SettingsError, match=re.escape(name)):
        Settings.from_env({name: value})


def test_missing_files_stop_only_the_process_that_needs_them(tmp_path):
    s = Settings.from_env({"ICH_TLS_CERT": "/no/such/cert.pem", "ICH_TLS_KEY": "/no/such/key.pem"})
    with pytest.raises(SettingsError, match="ICH_TLS_CERT='/no/such/cert.pem': file does not exist"):
        s.require_files("tls_cert", "tls_key", "tls_ca")


def test_tls_needs_cert_and_key_together(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="ICH_TLS_CERT and ICH_TLS_KEY"):
        Settings.from_env({"ICH_TLS_CERT": str(cert)})
    with pytest.raises(SettingsError, match="ICH_TLS_CA"):
        Settings.from_env({"ICH_TLS_CA": str(cert)})
    s = Settings.from_env({"ICH_TLS_CERT": str(cert), "ICH_TLS_KEY": str(cert),
                           "ICH_TLS_CA": str(cert)})
    assert s.tls_ca == cert


def test_threshold_overrides_apply_over_the_model_card():
    s = Settings.from_env({"ICH_THRESHOLD_ANY": "0.1", "ICH_THRESHOLD_SUBDURAL": "0.3"})
    t = s.thresholds({"any": 0.2, "epidural": 0.4})
    assert t["any"] == 0.1 and t["subdural"] == 0.3 and t["epidural"] == 0.4
    assert set(t) == set(labels.LABELS)


def test_secrets_never_appear_in_repr_or_errors():
    env = {"ICH_REDIS_URL": "redis://app:hunter2@redis:6379/0",
           "ICH_WEBHOOK_SECRET": "s3cr3t-key",
           "ICH_WEBHOOK_URLS": "https://hooks.example/alert?token=tok-123"}
    s = Settings.from_env(env)
    text = repr(s) + str(s.describe())
    for secret in ("hunter2", "s3cr3t-key", "tok-123"):
        assert secret not in text
    assert "redis://app:***@redis:6379/0" in text and "ICH_WEBHOOK_SECRET" in text
    assert s.webhook_secret == "s3cr3t-key" and s.redis_url == env["ICH_REDIS_URL"]


def test_configuration_table_covers_every_setting():
    names = [row[0] for row in table()]
    assert set(DESIGN_VARIABLES) <= set(names)
    assert len(names) == len(set(names)) and all(row[2] for row in table())


def test_labels_order_and_weights():
    assert labels.LABELS == ("epidural", "intraparenchymal", "intraventricular",
                             "subarachnoid", "subdural", "any")
    assert labels.WEIGHTS["any"] == 2 and sum(labels.WEIGHTS.values()) == 7
    np.testing.assert_array_equal(labels.WEIGHT_VECTOR, [1, 1, 1, 1, 1, 2])
    assert labels.index("any") == 5
    with pytest.raises(KeyError, match="unknown label"):
        labels.index("ANY")


def test_redis_keys_are_namespaced_and_distinct():
    made = {keys.slice_bytes("t"), keys.study_state("1.2"), keys.study_results("1.2"),
            keys.alert_sent("1.2", "v1", "first_positive"), keys.DEAD_LETTERS, keys.ACTIVE_STUDIES}
    assert len(made) == 6 and all(k.startswith(keys.PREFIX + ":") for k in made)
    assert keys.SCORE_QUEUE != keys.ALERTS_QUEUE and keys.ALERTS_QUEUE == "alerts"


def test_readme_configuration_table_is_current():
    from ich.settings import markdown_table
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate: make docs"
