"""deploy/ is consistent with the Procfile, the settings and the metric definitions.

These files cannot be run here (no Docker engine, cluster or systemd), so this test checks what
drifts: every file parses; the commands of listener/worker/alerts in compose, Kubernetes,
systemd and the images are the Procfile lines; ports agree with `Settings.from_env({})`; every
ICH_* name exists; every metric, label and label value that alert rules and the dashboard use
is one the code defines and emits; Redis keeps AOF + noeviction; workers get a GPU.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import worker.metrics as worker_metrics
from dicom_listener.metrics import ListenerMetrics
from dicom_listener.server import DRAIN_S
from ich.labels import LABELS
from ich.settings import THRESHOLD_PREFIX, Settings, table

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deployment.md"
DEFAULTS = Settings.from_env({})
ROLES = ("listener", "worker", "alerts")
METRICS_PORT = {"listener": DEFAULTS.listener_metrics_port,
                "worker": DEFAULTS.worker_metrics_port,
                "alerts": DEFAULTS.alerts_metrics_port}
JOBS = {f"ichwatch-{role}": role for role in ROLES}
PORT_FIELDS = ("dicom_port", "listener_metrics_port", "worker_metrics_port", "alerts_metrics_port")

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
K8S_FILES = sorted((DEPLOY / "k8s").rglob("*.yaml"))
UNITS = {name: DEPLOY / "systemd" / name for name in
         ("ichwatch-listener.service", "ichwatch-worker@.service", "ichwatch-alerts.service")}


# --- readers -------------------------------------------------------------------------------

def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def procfile() -> dict[str, list[str]]:
    lines = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            lines[name.strip()] = shlex.split(command)
    assert set(ROLES) <= set(lines), "the Procfile lacks a listener, worker or alerts line"
    return lines


def normalized(argv: list[str]) -> list[str]:
    """Allow an executable prefix (/app/.venv/bin/celery, /opt/.../python3) and nothing else."""
    name = Path(argv[0]).name
    name = {"python3": "python"}.get(name, name)
    return [name, *argv[1:]]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def k8s_objects() -> list[dict]:
    return [doc for path in K8S_FILES for doc in yaml.safe_load_all(path.read_text())
            if isinstance(doc, dict) and "kind" in doc]


def k8s(kind: str, name: str) -> dict:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/k8s, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict) -> dict:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1, obj["metadata"]["name"]
    return containers[0]


def unit(name: str) -> dict[str, list[str]]:
    """A systemd unit as {"Section.Key": [values...]} (keys may repeat; `\\` continues)."""
    out: dict[str, list[str]] = {}
    section = ""
    text = re.sub(r"\\\n", " ", UNITS[name].read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def systemd_expand(value: str, instance: str = "") -> str:
    """The specifiers and `$$` escapes systemd resolves in ExecStart (the ones we use)."""
    def spec(m: re.Match) -> str:
        if m.group(1) == "%":
            return "%"
        if m.group(1) in "iI":
            assert instance, "an instance specifier in a non-template unit"
            return instance
        raise AssertionError(f"unexpected systemd specifier %{m.group(1)} in {value!r}: "
                             "write %% for a literal % (Celery's %h)")
    value = re.sub(r"%(.)", spec, value)
    return value.replace("$$", "$")


def systemd_argv(name: str, instance: str = "0") -> list[str]:
    (exec_start,) = unit(name)["Service.ExecStart"]
    assert "$" not in exec_start.replace("$$", ""), \
        "a bare $ in ExecStart is expanded by systemd itself: write $$ for the shell"
    return shlex.split(systemd_expand(exec_start, instance))


def systemd_command(name: str, instance: str = "0") -> list[str]:
    """The program a unit runs; a `/bin/sh -c '...; exec PROGRAM'` wrapper is looked through."""
    argv = systemd_argv(name, instance)
    if Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        script = argv[2]
        assert "exec " in script, "a shell wrapper must exec the process (signals, PID)"
        argv = shlex.split(script.rsplit("exec ", 1)[1])
    return argv


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{rel(path)}: not NAME=value: {line!r}"
        assert " #" not in value, f"{rel(path)}: systemd keeps inline comments in the value: {line!r}"
        env[key.strip()] = value.strip()
    return env


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_env(service: dict) -> dict[str, str]:
    """The environment a compose service gets with nothing set in the shell or .env."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _INTERPOLATION.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def settings_from(env: dict[str, str], where: str) -> Settings:
    ich = {k: v for k, v in env.items() if k.startswith("ICH_")}
    try:
        return Settings.from_env(ich)
    except Exception as exc:  # noqa: BLE001 - the message names the variable
        pytest.fail(f"{where}: the settings do not start: {exc}")


def dockerfile(name: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "docker" / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def dockerfile_stages(name: str) -> list[dict]:
    stages: list[dict] = []
    for instruction, rest in dockerfile(name):
        if instruction == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            alias = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append({"base": words[0], "alias": alias, "lines": []})
        else:
            assert stages or instruction in ("ARG",), f"{name}: {instruction} before FROM"
            if stages:
                stages[-1]["lines"].append((instruction, rest))
    return stages


# --- metric definitions ----------------------------------------------------------------------

def metric_definitions() -> dict[str, dict]:
    """Exposed sample name -> {"family", "labels"} for listener and worker/alerts metrics."""
    listener = ListenerMetrics()
    families = list(listener.registry.collect())
    families += [f for f in REGISTRY.collect() if f.name.startswith("ich_")]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "summary": ("_sum", "_count"), "info": ("_info",)}
    label_names = {}
    for obj in [*vars(listener).values(), *vars(worker_metrics).values()]:
        if hasattr(obj, "_labelnames") and hasattr(obj, "_name"):
            label_names[obj._name] = set(obj._labelnames)
    names: dict[str, dict] = {}
    for family in families:
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = {"family": family.name,
                                           "labels": label_names.get(family.name, set())}
    assert "ich_slices_scored_total" in names and "ich_instances_queued_total" in names
    return names


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) of every alert rule and dashboard query."""
    exprs = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    exprs += [(f"panel {p['title']!r}", t["expr"]) for p in dashboard_panels()
              for t in p.get("targets", [])]
    assert len(exprs) > 20
    return exprs


_METRIC = re.compile(r"\b(ich_[a-z0-9_]+)")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_ALWAYS = {"job", "instance"}


# --- every file parses -----------------------------------------------------------------------

def test_the_deploy_tree_is_complete():
    expected = [
        "docker/Dockerfile", "docker/Dockerfile.cuda", "docker-compose.yml",
        "k8s/kustomization.yaml", "k8s/listener.yaml", "k8s/worker.yaml", "k8s/alerts.yaml",
        "k8s/redis.yaml", "k8s/configmap.yaml", "k8s/secret.example.yaml",
        "k8s/monitoring/servicemonitor.yaml", "k8s/monitoring/prometheusrule.yaml",
        "k8s/monitoring/prometheus-scrape-pods.yml",
        *(f"systemd/{name}" for name in UNITS), "systemd/ichwatch.env",
        "prometheus/prometheus.yml", "prometheus/alerts.yml", "grafana/dashboard.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/ichwatch.yml",
    ]
    missing = [name for name in expected if not (DEPLOY / name).is_file()]
    assert not missing
    assert DOCS.is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_yaml_file_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, (dict, list)) for d in docs), f"{rel(path)}: empty document"


def test_every_json_file_parses():
    files = sorted(DEPLOY.rglob("*.json"))
    assert files
    for path in files:
        assert isinstance(json.loads(path.read_text()), dict), rel(path)


def test_kustomizations_list_existing_files():
    for kustomization in (DEPLOY / "k8s").rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text())["resources"]
        for name in listed:
            assert (kustomization.parent / name).is_file(), f"{rel(kustomization)}: {name}"
        # Everything but the example secrets is applied by one of the kustomizations.
        for path in kustomization.parent.glob("*.yaml"):
            if path.name not in ("kustomization.yaml", "secret.example.yaml"):
                assert path.name in listed, f"{rel(path)} is in no kustomization.yaml"


# --- images ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, extra, role", [("Dockerfile", "cpu", "listener"),
                                               ("Dockerfile.cuda", "gpu", "worker")])
def test_dockerfile_pins_its_bases_runs_as_a_user_and_defaults_to_a_procfile_role(name, extra, role):
    stages = dockerfile_stages(name)
    assert stages, f"{name}: no FROM"
    aliases = set()
    for stage in stages:
        base = stage["base"]
        if base not in aliases:
            image, _, digest = base.partition("@")
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert digest or (tag and tag != "latest"), f"{name}: FROM {base} is not pinned"
        if stage["alias"]:
            aliases.add(stage["alias"])

    def user(stage: dict) -> str | None:
        users = [rest for instruction, rest in stage["lines"] if instruction == "USER"]
        if users:
            return users[-1]
        parent = [s for s in stages if s["alias"] == stage["base"]]
        return user(parent[0]) if parent else None

    runnable = [s for s in stages if any(i == "CMD" for i, _ in s["lines"])] + [stages[-1]]
    for stage in runnable:
        who = user(stage)
        assert who and who.split(":")[0] not in ("root", "0"), \
            f"{name}: stage {stage['alias']} runs as {who or 'root (no USER)'}"

    text = (DEPLOY / "docker" / name).read_text()
    assert f".[{extra}]" in text, f"{name} must install .[{extra}]"
    assert "/app/models" in text
    assert not re.search(r"^\s*(COPY|ADD)\s+[^\n]*\bmodels\b", text, re.M), "no model baked in"
    cmd = [rest for instruction, rest in stages[-1]["lines"] if instruction == "CMD"]
    assert cmd, f"{name}: the default target has no CMD"
    assert normalized(json.loads(cmd[-1])) == procfile()[role]
    exposed = {int(p.split("/")[0]) for i, rest in dockerfile(name) if i == "EXPOSE"
               for p in rest.split()}
    wanted = {METRICS_PORT[role]} | ({DEFAULTS.dicom_port} if role == "listener" else set())
    assert wanted <= exposed, f"{name}: EXPOSE {exposed}"


def test_the_slim_target_has_no_tensorflow_extra():
    slim = [s for s in dockerfile_stages("Dockerfile") if s["alias"] == "slim"]
    assert slim, "Dockerfile: no slim target for the listener"
    text = " ".join(rest for _, rest in slim[0]["lines"])
    assert ".[cpu]" not in text and ".[gpu]" not in text and "build-cpu" not in text


def test_images_are_pinned():
    images = [s["image"] for s in compose()["services"].values() if "build" not in s]
    images += [c["image"] for o in k8s_objects() if o["kind"] in ("Deployment", "StatefulSet")
               for c in pod_spec(o)["containers"]]
    assert len(images) >= 6
    for image in images:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@" in image or (tag and tag != "latest"), f"image {image} is not pinned"


# --- commands are the Procfile lines -----------------------------------------------------------

def compose_role_services() -> dict[str, list[tuple[str, dict]]]:
    services = compose()["services"]
    roles = {"listener": [("listener", services["listener"])],
             "alerts": [("alerts", services["alerts"])],
             "worker": [(n, s) for n, s in services.items() if n.startswith("worker")]}
    assert roles["worker"], "compose has no scoring worker service"
    return roles


def test_compose_commands_are_the_procfile_lines():
    lines = procfile()
    for role, services in compose_role_services().items():
        for name, service in services:
            command = service["command"]
            argv = shlex.split(command) if isinstance(command, str) else command
            assert normalized(argv) == lines[role], f"compose service {name}"


def test_k8s_commands_are_the_procfile_lines():
    lines = procfile()
    for role in ROLES:
        c = container(k8s("Deployment", f"ichwatch-{role}"))
        argv = [*c.get("command", []), *c.get("args", [])]
        assert normalized(argv) == lines[role], f"k8s Deployment ichwatch-{role}"


def test_systemd_commands_are_the_procfile_lines():
    lines = procfile()
    assert normalized(systemd_command("ichwatch-listener.service")) == lines["listener"]
    assert normalized(systemd_command("ichwatch-alerts.service")) == lines["alerts"]
    for gpu in ("0", "3"):
        argv = normalized(systemd_command("ichwatch-worker@.service", gpu))
        # The one allowed difference: the Celery node name carries the GPU index, so that
        # several workers on one host have distinct names (score-gpu3@host, not score@host).
        i = argv.index("-n")
        assert argv[i + 1].startswith(f"score-gpu{gpu}@")
        argv[i + 1] = argv[i + 1].replace(f"score-gpu{gpu}@", "score@", 1)
        assert argv == lines["worker"], f"ichwatch-worker@{gpu}.service"


def test_systemd_worker_instance_picks_its_gpu_and_a_distinct_metrics_port(tmp_path):
    """Run the unit's shell wrapper with a stand-in for celery: port = base + 10 x GPU index."""
    u = unit("ichwatch-worker@.service")
    assert "CUDA_VISIBLE_DEVICES=%i" in u["Service.Environment"]
    stub = tmp_path / "celery"
    stub.write_text('#!/bin/sh\necho "$ICH_WORKER_METRICS_PORT"\n')
    stub.chmod(0o755)
    ports = {}
    for gpu in range(8):
        argv = systemd_argv("ichwatch-worker@.service", str(gpu))
        assert Path(argv[0]).name == "sh" and argv[1] == "-c"
        script = argv[2].replace(systemd_command("ichwatch-worker@.service", str(gpu))[0], str(stub))
        for base in (None, str(DEFAULTS.worker_metrics_port)):
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            if base:
                env["ICH_WORKER_METRICS_PORT"] = base
            out = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True,
                                 text=True, timeout=10)
            assert out.returncode == 0, out.stderr
            ports.setdefault(gpu, set()).add(int(out.stdout))
    assert all(len(p) == 1 for p in ports.values()), "the unset default differs from the settings"
    ports = {gpu: p.pop() for gpu, p in ports.items()}
    assert ports[0] == DEFAULTS.worker_metrics_port
    assert len(set(ports.values())) == len(ports)
    assert not set(ports.values()) & {DEFAULTS.listener_metrics_port, DEFAULTS.alerts_metrics_port,
                                      DEFAULTS.dicom_port}
    # The Prometheus example targets use the same scheme.
    targets = yaml.safe_load((DEPLOY / "prometheus" / "targets" / "ichwatch-worker.yml").read_text())
    for target in (t for group in targets for t in group["targets"]):
        assert int(target.rsplit(":", 1)[1]) in ports.values(), target


# --- ports agree with the settings defaults -----------------------------------------------------

def container_port(spec: str) -> int:
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1])


def test_compose_ports_and_settings():
    roles = compose_role_services()
    listener = roles["listener"][0][1]
    assert {DEFAULTS.dicom_port, DEFAULTS.listener_metrics_port} <= \
        {container_port(p) for p in listener["ports"]}
    for role in ("worker", "alerts"):
        for name, service in roles[role]:
            exposed = {container_port(p) for p in [*service.get("expose", []), *service.get("ports", [])]}
            assert METRICS_PORT[role] in exposed, f"compose service {name}"
    for role, services in roles.items():
        for name, service in services:
            s = settings_from(compose_env(service), f"compose service {name}")
            for field in PORT_FIELDS:
                assert getattr(s, field) == getattr(DEFAULTS, field), f"{name}: {field}"


def named_port(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert found, f"no container port named {port}"
    return found[0]


def test_k8s_ports_and_settings():
    config = k8s("ConfigMap", "ichwatch-config")["data"]
    secret = k8s("Secret", "ichwatch-secrets")["stringData"]
    for role in ROLES:
        obj = k8s("Deployment", f"ichwatch-{role}")
        c = container(obj)
        env = {**config, **secret, **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}}
        s = settings_from(env, f"k8s ichwatch-{role}")
        for field in PORT_FIELDS:
            assert getattr(s, field) == getattr(DEFAULTS, field), f"k8s {role}: {field}"
        assert named_port(c, "metrics") == METRICS_PORT[role]
        annotations = obj["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == METRICS_PORT[role]
        service = k8s("Service", f"ichwatch-{role}")
        (port,) = service["spec"]["ports"]
        assert port["port"] == METRICS_PORT[role] and named_port(c, port["targetPort"]) == METRICS_PORT[role]
    listener = container(k8s("Deployment", "ichwatch-listener"))
    assert named_port(listener, "dicom") == DEFAULTS.dicom_port
    dicom = k8s("Service", "ichwatch-dicom")["spec"]
    assert dicom["type"] in ("LoadBalancer", "NodePort")
    assert [named_port(listener, p["targetPort"]) for p in dicom["ports"]] == [DEFAULTS.dicom_port]


def test_systemd_env_file_ports_and_settings():
    env = env_file(DEPLOY / "systemd" / "ichwatch.env")
    s = settings_from(env, "deploy/systemd/ichwatch.env")
    for field in PORT_FIELDS:
        assert getattr(s, field) == getattr(DEFAULTS, field), field
    for name in UNITS:
        assert "/etc/ichwatch/ichwatch.env" in unit(name)["Service.EnvironmentFile"], name


def test_prometheus_scrapes_each_role_on_its_default_port():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(JOBS) <= set(jobs)
    for job, role in JOBS.items():
        ports = [sd["port"] for sd in jobs[job].get("dns_sd_configs", [])]
        ports += [container_port(t) for sc in jobs[job].get("static_configs", []) for t in sc["targets"]]
        assert ports and set(ports) == {METRICS_PORT[role]}, job
    for role in ("listener", "alerts"):
        targets = yaml.safe_load((DEPLOY / "prometheus" / "targets" / f"ichwatch-{role}.yml").read_text())
        assert {container_port(t) for g in targets for t in g["targets"]} == {METRICS_PORT[role]}
    # Compose service names are what DNS discovery looks up.
    services = compose()["services"]
    names = {n for j in JOBS for sd in jobs[j].get("dns_sd_configs", []) for n in sd["names"]}
    aliases = {a for s in services.values()
               for a in ((s.get("networks") or {}).get("default") or {}).get("aliases", [])}
    assert names <= set(services) | aliases


# --- names: ICH_* variables and metrics -----------------------------------------------------------

def test_every_ich_variable_named_in_deploy_files_and_docs_exists():
    known = {env for env, _, _ in table()}
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [DOCS]
    seen = set()
    for path in files:
        for name in re.findall(r"\bICH_[A-Z0-9_]*[A-Z0-9]\b|\bICH_THRESHOLD_", path.read_text()):
            seen.add(name)
            if name.startswith(THRESHOLD_PREFIX):
                label = name[len(THRESHOLD_PREFIX):]
                assert label in ("", "LABEL") or label.lower() in LABELS, f"{rel(path)}: {name}"
            else:
                assert name in known, f"{rel(path)}: {name} is not a setting (ich/settings.py)"
    assert {"ICH_REDIS_URL", "ICH_WEBHOOK_SECRET", "ICH_DICOM_PORT"} <= seen


def test_app_processes_get_only_ich_variables():
    for role, services in compose_role_services().items():
        for name, service in services:
            assert all(k.startswith("ICH_") for k in compose_env(service)), f"compose {name}"
            assert "env_file" not in service, f"compose {name}: environment must be explicit"
    for role in ROLES:
        c = container(k8s("Deployment", f"ichwatch-{role}"))
        assert all(e["name"].startswith("ICH_") for e in c.get("env", [])), role
    assert all(k.startswith("ICH_") for k in k8s("ConfigMap", "ichwatch-config")["data"])
    assert all(k.startswith("ICH_") for k in k8s("Secret", "ichwatch-secrets")["stringData"])


def test_every_metric_in_alert_rules_and_dashboard_is_defined():
    defined = metric_definitions()
    for where, expr in promql_expressions():
        for name in _METRIC.findall(expr):
            assert name in defined, f"{where}: {name} is not a listener or worker metric"


def test_label_names_in_selectors_and_groupings_exist():
    defined = metric_definitions()
    for where, expr in promql_expressions():
        used = [defined[n] for n in _METRIC.findall(expr)]
        available = set().union(*(m["labels"] for m in used)) | _ALWAYS
        if any(n.endswith("_bucket") for n in _METRIC.findall(expr)):
            available.add("le")
        for metric, matchers in _SELECTOR.findall(expr):
            for label, _, _ in _MATCHER.findall(matchers):
                if metric.startswith("ich_"):
                    assert label in defined[metric]["labels"] | _ALWAYS, f"{where}: {metric}{{{label}}}"
        for group in _GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in available, f"{where}: grouping by {label}, which no metric has"


def test_label_values_in_matchers_are_ones_the_code_emits():
    source = "\n".join(p.read_text() for d in ("dicom_listener", "worker", "ich")
                       for p in (ROOT / d).glob("*.py"))
    checked = 0
    for where, expr in promql_expressions():
        for metric, matchers in _SELECTOR.findall(expr):
            for label, op, value in _MATCHER.findall(matchers):
                if label in _ALWAYS or op not in ("=", "=~") or not re.fullmatch(r"[\w|]+", value):
                    continue
                for literal in value.split("|"):
                    checked += 1
                    assert f'"{literal}"' in source, f"{where}: {label}={literal!r} is never emitted"
    assert checked >= 3


def test_job_matchers_match_the_scrape_jobs():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    for where, expr in promql_expressions():
        for _, matchers in _SELECTOR.findall(expr):
            for label, op, value in _MATCHER.findall(matchers):
                if label == "job" and op == "=~":
                    assert {j for j in JOBS if re.fullmatch(value, j)} == set(JOBS), where
                elif label == "job" and op == "=":
                    assert value in jobs, where
    # The Kubernetes variants produce the same job names.
    for role in ROLES:
        k8s("Service", f"ichwatch-{role}")  # ServiceMonitor: job = Service name
    pods = yaml.safe_load((DEPLOY / "k8s" / "monitoring" / "prometheus-scrape-pods.yml").read_text())
    relabel = [r for j in pods["scrape_configs"] for r in j["relabel_configs"]
               if r.get("target_label") == "job"]
    assert relabel and relabel[0]["replacement"].replace("$1", "listener") == "ichwatch-listener"


# --- alert rules and dashboard -----------------------------------------------------------------

def test_alert_rules_cover_the_failure_modes():
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    joined = "\n".join(exprs.values())
    assert "deriv(ich_queue_depth" in joined
    assert "ich_instances_queued_total" in joined and "ich_slices_scored_total" in joined
    assert 'ich_webhook_deliveries_total{outcome="dead_letter"}' in joined
    assert "ich_time_to_alert_seconds_bucket" in joined and "histogram_quantile" in joined
    assert "ich_queue_depth != ich_queue_depth" in joined
    assert "ich_instances_rejected_total" in joined
    assert re.search(r"\bup\{", joined)
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian: apt-get install prometheus)")
def test_rules_and_dashboard_queries_pass_promtool(tmp_path):
    """PromQL syntax of every rule and panel, and the rules' unit tests (alerts_test.yml, and
    alerts_rates_test.yml for the day- and week-long rate alerts)."""
    here = DEPLOY / "prometheus"
    for args in (["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml", "alerts_rates_test.yml"]):
        out = subprocess.run(["promtool", *args], cwd=here, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    queries = [{"record": f"dashboard:query_{i}",
                "expr": e.replace("$__rate_interval", "1m").replace("$__range", "1h")}
               for i, (where, e) in enumerate(promql_expressions()) if where.startswith("panel")]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": queries}]}))
    out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheusrule_carries_the_same_groups_as_alerts_yml():
    rule = k8s("PrometheusRule", "ichwatch")
    assert rule["spec"]["groups"] == yaml.safe_load(
        (DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]


def test_prometheus_loads_the_rules_compose_mounts():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    volumes = compose()["services"]["prometheus"]["volumes"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in volumes if v.startswith("./")}
    for path in config["rule_files"]:
        assert mounts.get(path) == "./prometheus/alerts.yml", path


def test_dashboard_is_a_provisioned_grafana_dashboard():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for p in panels:
        assert "gridPos" in p, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"], p["title"]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for needed in ("ich_instances_received_total", "ich_instances_queued_total",
                   "ich_slices_scored_total", "ich_end_to_end_seconds_bucket",
                   "ich_time_to_alert_seconds_bucket", "ich_store_handler_seconds_bucket",
                   "ich_batch_size", "ich_queue_depth", "ich_alerts_total",
                   "ich_webhook_deliveries_total", "ich_slices_failed_total", "ich_model_info"):
        assert needed in exprs, f"the dashboard does not show {needed}"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "ichwatch.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    volumes = compose()["services"]["grafana"]["volumes"]
    assert any(v.startswith("./grafana/dashboard.json:" + path + "/") for v in volumes)
    assert any(v.startswith("./grafana/provisioning:/etc/grafana/provisioning") for v in volumes)


# --- Redis durability, GPUs, graceful termination, k8s wiring --------------------------------------

def assert_durable(command: str, where: str) -> None:
    assert re.search(r"--appendonly\s+yes\b", command), f"{where}: Redis without AOF"
    assert re.search(r"--maxmemory-policy\s+noeviction\b", command), f"{where}: Redis may evict"
    # Success means "in Redis": fsync before Redis replies, not within the next second
    # (bench/bench_redis_fsync.py: 0.80 of the throughput with AOF off; issue 14 item 8).
    assert re.search(r"--appendfsync\s+always\b", command), f"{where}: Redis fsyncs only every second"


def test_redis_keeps_aof_and_noeviction():
    run = (ROOT / "scripts" / "run").read_text()
    assert_durable(run[run.index("redis-server --port"):].split("\n\n")[0].replace("\\\n", " "),
                   "scripts/run")
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert_durable(command if isinstance(command, str) else " ".join(command), "compose")
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "compose: Redis without a volume"
    c = container(k8s("StatefulSet", "ichwatch-redis"))
    assert_durable(" ".join([*c.get("command", []), *c.get("args", [])]), "k8s")
    claims = k8s("StatefulSet", "ichwatch-redis")["spec"]["volumeClaimTemplates"]
    assert {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/data"} <= \
        {v["metadata"]["name"] for v in claims}


def test_scoring_workers_request_a_gpu_and_the_others_do_not():
    roles = compose_role_services()
    device_ids = []
    for name, service in roles["worker"]:
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        device_ids += [i for d in devices for i in d.get("device_ids", [])]
        assert all("count" not in d for d in devices), \
            f"{name}: `count` gives every replica the same GPU; use device_ids"
    assert len(device_ids) == len(set(device_ids)) == len(roles["worker"]), "one GPU per worker"
    for role in ("listener", "alerts"):
        assert "deploy" not in roles[role][0][1], role
    limits = container(k8s("Deployment", "ichwatch-worker"))["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    for role in ("listener", "alerts"):
        assert "nvidia.com/gpu" not in str(container(k8s("Deployment", f"ichwatch-{role}"))), role


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)?", str(value).strip())
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_the_listener_may_drain_before_it_is_killed():
    spec = pod_spec(k8s("Deployment", "ichwatch-listener"))
    assert spec["terminationGracePeriodSeconds"] >= max(45, DRAIN_S + 10)
    assert seconds(unit("ichwatch-listener.service")["Service.TimeoutStopSec"][-1]) >= DRAIN_S + 10
    assert seconds(compose()["services"]["listener"]["stop_grace_period"]) >= DRAIN_S + 10
    for name in UNITS:
        u = unit(name)
        assert u["Service.KillSignal"] == ["SIGTERM"], name
        assert u["Service.Restart"] == ["on-failure"], name
        assert u["Service.User"] == ["ichwatch"], name
        for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
            key, value = option.split("=")
            assert u.get(f"Service.{key}") == [value], f"{name}: {option}"
    for role in ("worker", "alerts"):
        assert pod_spec(k8s("Deployment", f"ichwatch-{role}"))["terminationGracePeriodSeconds"] >= 30


def test_listener_probes_are_tcp_on_the_dicom_port_and_not_too_frequent():
    c = container(k8s("Deployment", "ichwatch-listener"))
    for probe in ("readinessProbe", "livenessProbe"):
        spec = c[probe]
        assert named_port(c, spec["tcpSocket"]["port"]) == DEFAULTS.dicom_port, probe
        # Each probe holds an association slot for the ACSE timeout: keep them rare.
        assert spec.get("periodSeconds", 10) >= 10, probe


def test_the_scoring_worker_probe_reads_the_file_it_touches_on_a_writable_mount():
    c = container(k8s("Deployment", "ichwatch-worker"))
    s = settings_from({e["name"]: e["value"] for e in c["env"]}, "k8s ichwatch-worker")
    assert s.worker_alive_file is not None
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"] == ["python", "-m", "worker.liveness",
                                               str(s.worker_alive_file)], probe
    # readOnlyRootFilesystem: the file must lie on a mounted volume (the /tmp emptyDir).
    mounts = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert any(s.worker_alive_file.is_relative_to(m) for m in mounts)
    # Room for the model to load before the file is first touched, and a stalled worker is
    # restarted within a few minutes, well before IchWatchNotScoring (5 min) has to page.
    startup, live = c["startupProbe"], c["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180
    assert s.worker_stall_s + live["periodSeconds"] * live["failureThreshold"] + 30 <= 300


def test_k8s_services_and_servicemonitor_select_real_pods_and_ports():
    workloads = [o for o in k8s_objects() if o["kind"] in ("Deployment", "StatefulSet")]
    for obj in workloads:
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), obj["metadata"]["name"]
    services = [o for o in k8s_objects() if o["kind"] == "Service"]
    for service in services:
        selected = [o for o in workloads
                    if service["spec"]["selector"].items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        c = container(selected[0])
        for port in service["spec"]["ports"]:
            named_port(c, port["targetPort"])
    monitor = k8s("ServiceMonitor", "ichwatch")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    monitored = {s["metadata"]["name"] for s in services if wanted <= s["metadata"]["labels"].items()}
    assert monitored == set(JOBS), "the ServiceMonitor must select the three metrics Services"
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for service in services:
        if service["metadata"]["name"] in monitored:
            assert endpoint_ports <= {p["name"] for p in service["spec"]["ports"]}


def test_deployment_doc_names_every_alert_and_every_way_to_deploy():
    text = DOCS.read_text()
    for rule in alert_rules():
        assert rule["alert"] in text, f"docs/deployment.md does not explain {rule['alert']}"
    for needed in ("docker compose", "kubectl apply -k", "systemctl", "appendonly", "noeviction",
                   "ICH_ALLOWED_CALLING_AETS", "ICH_TLS_CERT", "ICH_WEBHOOK_SECRET"):
        assert needed in text, needed
