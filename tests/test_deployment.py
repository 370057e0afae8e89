"""The deployment files as specifications, checked against the config they deploy.

No Docker engine or cluster is needed: the compose file, the Dockerfile and the
kustomize tree are parsed here and compared with `deployment/local/app.yaml`,
the ConfigMap's app.yaml, `main.AppSettings` and the upstream command line.
The kustomize tree is rendered by a small renderer of this module (resources,
images, strategic-merge patches, namespace), cross-checked with
`kubectl kustomize` where kubectl is installed. `orchestrator.healthcheck`, the
image's health probe, runs against real servers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import upstream.server
from main import AppSettings
from orchestrator import healthcheck
from orchestrator.config import MetricsSettings, load_settings
from orchestrator.metrics import METRICS_PATH, Metrics, MetricsServer
from tests.support.processes import ROOT, free_port, start_main, wait_for_serving

COMPOSE_FILE = ROOT / "deployment/local/docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "deployment/k8s"
KUSTOMIZATIONS = ("base", "overlays/dev")

APP_SERVICES = ("order", "payment", "orchestrator")
UPSTREAMS = ("order", "payment")
STACK_SERVICES = ("rabbitmq", "postgres", *APP_SERVICES)
CLOSE_MARGIN_SECONDS = 5.0
"""Time on top of drain + grace for closing the broker connection before SIGKILL."""
HEALTHCHECK_MODULE = "orchestrator.healthcheck"


# --- helpers: durations, ports, addresses ------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """A compose duration (`1m30s`, `20s`) in seconds."""
    parts = _DURATION_PART.findall(text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(number + unit for number, unit in parts) == text, f"bad duration {text!r}"
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def published_ports(service: Mapping[str, Any]) -> dict[int, int]:
    """{container port: host port} of a compose service's `ports` (short or long syntax)."""
    result: dict[int, int] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            result[int(entry["target"])] = int(entry["published"])
            continue
        *host_part, container = str(entry).split("/")[0].split(":")
        assert host_part, f"port {entry!r} is not published on the host"
        result[int(container)] = int(host_part[-1])
    return result


def host_and_port(address: str) -> tuple[str, int]:
    """`host:port` split."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def load_app_settings(path: Path, environ: Mapping[str, str] | None = None) -> AppSettings:
    """`path` loaded as the booking service would, with only `environ` as the environment."""
    return load_settings(AppSettings, path, environ=dict(environ or {}))


# --- helpers: compose --------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    """deployment/local/docker-compose.yaml, parsed (YAML merge keys resolved)."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(compose, dict)
    return compose


def compose_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A compose service's `environment`, as a mapping (list or mapping syntax)."""
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def volume_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """{container path: source} of a compose service's `volumes` (short syntax)."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *_ = str(entry).split(":")
        mounts[target] = source
    return mounts


def image_path(path: str, workdir: str) -> Path:
    """The repository file that the image has at `path` (the image copies the repo to workdir)."""
    relative = posixpath.relpath(path, workdir)
    assert not relative.startswith(".."), f"{path} is outside the image's {workdir}"
    return ROOT / relative


def healthcheck_target(test: list[str]) -> str:
    """The HOST:PORT that a `python -m orchestrator.healthcheck` healthcheck asks."""
    assert test[:4] == ["CMD", "python", "-m", HEALTHCHECK_MODULE], test
    args = healthcheck.build_arg_parser().parse_args(test[4:])
    return str(args.target)


def parse_upstream_args(argv: list[str]) -> Any:
    """`main.py ARGV` of an upstream, parsed by the upstream's own command line."""
    assert argv[:1] == ["upstream"], f"not an upstream command: {argv}"
    return upstream.server.build_arg_parser().parse_args(argv[1:])


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file."""
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    """The compose file's services."""
    return dict(compose["services"])


@pytest.fixture(scope="module")
def orchestrator_env(services: dict[str, Any]) -> dict[str, str]:
    """The environment of the compose orchestrator."""
    return compose_environment(services["orchestrator"])


@pytest.fixture(scope="module")
def compose_config_path(orchestrator_env: dict[str, str], dockerfile: Dockerfile) -> Path:
    """The repository file behind the compose orchestrator's ORCH_CONFIG."""
    return image_path(orchestrator_env["ORCH_CONFIG"], dockerfile.workdir)


@pytest.fixture(scope="module")
def compose_settings(compose_config_path: Path, orchestrator_env: dict[str, str]) -> AppSettings:
    """The settings the compose orchestrator runs with (its file and its environment)."""
    return load_app_settings(compose_config_path, orchestrator_env)


# --- compose -----------------------------------------------------------------------------------


def test_compose_defines_the_stack_services(services: dict[str, Any]) -> None:
    assert set(STACK_SERVICES) <= set(services), sorted(services)


def test_compose_orchestrator_config_file_is_in_the_repo(compose_config_path: Path) -> None:
    assert compose_config_path.is_file(), compose_config_path


def test_compose_orchestrator_config_loads_with_app_settings(
    compose_settings: AppSettings,
) -> None:
    assert compose_settings.broker.scheme == "amqp"
    assert compose_settings.embedded_upstreams.order is None
    assert compose_settings.embedded_upstreams.payment is None


def test_compose_orchestrator_publishes_the_configured_grpc_port(
    services: dict[str, Any], compose_settings: AppSettings
) -> None:
    port = compose_settings.grpc.port
    assert published_ports(services["orchestrator"])[port] == port


def test_compose_orchestrator_enables_metrics(compose_settings: AppSettings) -> None:
    assert compose_settings.metrics.enabled


def test_compose_orchestrator_publishes_the_metrics_port(
    services: dict[str, Any], compose_settings: AppSettings
) -> None:
    port = compose_settings.metrics.port
    assert published_ports(services["orchestrator"])[port] == port


@pytest.mark.parametrize("name", UPSTREAMS)
def test_compose_upstream_listens_and_publishes_on_its_configured_address_port(
    name: str, services: dict[str, Any], compose_settings: AppSettings
) -> None:
    _, port = host_and_port(getattr(compose_settings.upstreams, name).address)
    args = parse_upstream_args(services[name]["command"])
    assert args.port == port
    assert published_ports(services[name]) == {port: port}


def test_compose_config_hostnames_are_compose_services(
    services: dict[str, Any], compose_settings: AppSettings, compose_config_path: Path
) -> None:
    file_broker_url = load_app_settings(compose_config_path).broker.url.get_secret_value()
    broker_urls = {file_broker_url, compose_settings.broker.url.get_secret_value()}
    hosts = {urlsplit(url).hostname for url in broker_urls} | {
        host_and_port(getattr(compose_settings.upstreams, name).address)[0] for name in UPSTREAMS
    }
    assert hosts <= set(services), f"not compose services: {hosts - set(services)}"


def test_compose_upstream_hosts_are_the_upstream_services(compose_settings: AppSettings) -> None:
    for name in UPSTREAMS:
        assert host_and_port(getattr(compose_settings.upstreams, name).address)[0] == name


def test_compose_broker_url_reaches_rabbitmq_with_its_credentials(
    services: dict[str, Any], compose_settings: AppSettings
) -> None:
    url = urlsplit(compose_settings.broker.url.get_secret_value())
    rabbitmq = compose_environment(services["rabbitmq"])
    assert url.hostname == "rabbitmq"
    assert url.port in published_ports(services["rabbitmq"])
    assert (url.username, url.password) == (
        rabbitmq["RABBITMQ_DEFAULT_USER"],
        rabbitmq["RABBITMQ_DEFAULT_PASS"],
    )


@pytest.mark.parametrize("name", STACK_SERVICES)
def test_compose_service_has_a_healthcheck(name: str, services: dict[str, Any]) -> None:
    test = services[name].get("healthcheck", {}).get("test")
    assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name}: healthcheck test {test!r}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_app_healthcheck_probes_its_own_grpc_port(
    name: str, services: dict[str, Any], compose_settings: AppSettings
) -> None:
    if name == "orchestrator":
        port = compose_settings.grpc.port
    else:
        port = parse_upstream_args(services[name]["command"]).port
    target = healthcheck_target(services[name]["healthcheck"]["test"])
    assert host_and_port(target) == ("127.0.0.1", port)


def test_compose_orchestrator_waits_for_healthy_rabbitmq_and_upstreams(
    services: dict[str, Any],
) -> None:
    depends_on = services["orchestrator"]["depends_on"]
    assert {"rabbitmq", *UPSTREAMS} <= set(depends_on)


def test_compose_dependencies_wait_for_service_healthy(services: dict[str, Any]) -> None:
    conditions = {
        (name, dependency): (spec or {}).get("condition")
        for name, service in services.items()
        if isinstance(service.get("depends_on"), dict)
        for dependency, spec in service["depends_on"].items()
    }
    assert conditions
    assert set(conditions.values()) == {"service_healthy"}, conditions
    for name, service in services.items():
        assert not isinstance(service.get("depends_on"), list), f"{name}: no condition"


def test_compose_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = {
        source
        for service in compose["services"].values()
        for source in volume_mounts(service).values()
        if not source.startswith((".", "/", "~"))
    }
    assert used
    assert used <= declared, f"undeclared volumes: {used - declared}"


@pytest.mark.parametrize(
    ("name", "path"), [("postgres", "/var/lib/postgresql/data"), ("rabbitmq", "/var/lib/rabbitmq")]
)
def test_compose_broker_and_database_keep_their_data_on_a_volume(
    name: str, path: str, services: dict[str, Any]
) -> None:
    assert path in volume_mounts(services[name])


@pytest.mark.parametrize("name", UPSTREAMS)
def test_compose_upstream_command_parses_with_the_upstream_cli(
    name: str, services: dict[str, Any]
) -> None:
    args = parse_upstream_args(services[name]["command"])
    assert args.service == name
    assert args.host == "0.0.0.0"


@pytest.mark.parametrize("name", UPSTREAMS)
def test_compose_upstream_ledger_is_on_a_volume(name: str, services: dict[str, Any]) -> None:
    args = parse_upstream_args(services[name]["command"])
    assert posixpath.dirname(args.db) in volume_mounts(services[name])


def test_compose_orchestrator_stop_grace_period_covers_grace_and_drain(
    services: dict[str, Any], compose_settings: AppSettings
) -> None:
    grpc_settings = compose_settings.grpc
    needed = grpc_settings.shutdown_grace_seconds + grpc_settings.drain_seconds
    stop_grace = duration_seconds(services["orchestrator"]["stop_grace_period"])
    assert stop_grace >= needed + CLOSE_MARGIN_SECONDS


@pytest.mark.parametrize("name", UPSTREAMS)
def test_compose_upstream_stop_grace_period_covers_its_stop_grace(
    name: str, services: dict[str, Any]
) -> None:
    stop_grace = duration_seconds(services[name]["stop_grace_period"])
    assert stop_grace >= upstream.server.STOP_GRACE_SECONDS + CLOSE_MARGIN_SECONDS


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_app_services_build_the_repository_dockerfile(
    name: str, services: dict[str, Any]
) -> None:
    build = services[name]["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_compose_app_services_share_one_image(services: dict[str, Any]) -> None:
    assert len({services[name]["image"] for name in APP_SERVICES}) == 1


# --- Dockerfile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case) and its arguments' text."""

    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value


@dataclass(frozen=True)
class Dockerfile:
    """The repository's Dockerfile, as a list of instructions."""

    instructions: tuple[Instruction, ...]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        """Split `text` into instructions (comments dropped, continuation lines joined)."""
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        joined = re.sub(r"\\[ \t]*\n", " ", "\n".join(lines))
        instructions = []
        for line in joined.splitlines():
            if line.strip():
                keyword, _, args = line.strip().partition(" ")
                instructions.append(Instruction(keyword.upper(), args.strip()))
        return cls(tuple(instructions))

    def index(self, keyword: str, predicate: Any = None) -> int:
        """The position of the first `keyword` instruction for which `predicate(args)` holds."""
        for position, instruction in enumerate(self.instructions):
            if instruction.keyword == keyword and (predicate is None or predicate(instruction)):
                return position
        raise AssertionError(f"Dockerfile: no {keyword} instruction found")

    def only(self, keyword: str) -> Instruction:
        """The one `keyword` instruction."""
        found = [i for i in self.instructions if i.keyword == keyword]
        assert len(found) == 1, f"Dockerfile: expected one {keyword}, found {len(found)}"
        return found[0]

    @property
    def workdir(self) -> str:
        """The last WORKDIR: where `COPY . .` puts the repository."""
        return [i.args for i in self.instructions if i.keyword == "WORKDIR"][-1]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    """The repository's Dockerfile."""
    return Dockerfile.parse(DOCKERFILE.read_text(encoding="utf-8"))


def _is_code_copy(instruction: Instruction) -> bool:
    return shlex.split(instruction.args)[:1] == ["."]


def _is_dependency_install(instruction: Instruction) -> bool:
    return "pip install" in instruction.args


def test_dockerfile_base_is_slim_python_3_11(dockerfile: Dockerfile) -> None:
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", dockerfile.only("FROM").args)


def test_dockerfile_entrypoint_is_exec_form_python_main(dockerfile: Dockerfile) -> None:
    assert dockerfile.only("ENTRYPOINT").exec_form() == ["python", "main.py"]


def test_dockerfile_switches_to_a_non_root_user_before_the_entrypoint(
    dockerfile: Dockerfile,
) -> None:
    entrypoint = dockerfile.index("ENTRYPOINT")
    users = [i.args for i in dockerfile.instructions[:entrypoint] if i.keyword == "USER"]
    assert users, "no USER before ENTRYPOINT"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"


def test_dockerfile_healthcheck_runs_orchestrator_healthcheck_on_the_grpc_port(
    dockerfile: Dockerfile, compose_settings: AppSettings
) -> None:
    options, _, command = dockerfile.only("HEALTHCHECK").args.partition("CMD ")
    assert "--timeout=" in options
    test = ["CMD", *json.loads(command)]
    assert host_and_port(healthcheck_target(test)) == ("127.0.0.1", compose_settings.grpc.port)


def test_dockerfile_installs_dependencies_before_copying_the_code(dockerfile: Dockerfile) -> None:
    manifest = dockerfile.index("COPY", lambda i: shlex.split(i.args) == ["pyproject.toml", "./"])
    install = dockerfile.index("RUN", _is_dependency_install)
    code = dockerfile.index("COPY", _is_code_copy)
    assert manifest < install < code


def test_dockerfile_dependency_layer_lists_exactly_the_dependencies_and_the_postgres_extra(
    dockerfile: Dockerfile, tmp_path: Path
) -> None:
    # The layer's first step, run here as the image runs it: python in a dir with pyproject.toml.
    run = dockerfile.instructions[dockerfile.index("RUN", _is_dependency_install)]
    extract = run.args.split("&&")[0].replace("/tmp/requirements.txt", "requirements.txt")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    subprocess.run(["sh", "-c", extract], cwd=tmp_path, env=env, check=True, timeout=30)
    listed = (tmp_path / "requirements.txt").read_text().splitlines()
    with (ROOT / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    assert listed == [*project["dependencies"], *project["optional-dependencies"]["postgres"]]


def exposed_ports(dockerfile: Dockerfile) -> set[int]:
    """The ports of the Dockerfile's EXPOSE."""
    return {int(port.split("/")[0]) for port in dockerfile.only("EXPOSE").args.split()}


def test_dockerfile_exposes_the_grpc_and_metrics_ports(dockerfile: Dockerfile) -> None:
    metrics_port = MetricsSettings().port
    assert exposed_ports(dockerfile) == {
        10000,
        metrics_port,
        *upstream.server.DEFAULT_PORTS.values(),
    }


def test_dockerfile_exposes_the_metrics_port_of_the_shipped_configs(
    dockerfile: Dockerfile, compose_settings: AppSettings
) -> None:
    assert compose_settings.metrics.port in exposed_ports(dockerfile)


def test_dockerfile_sets_pythonunbuffered(dockerfile: Dockerfile) -> None:
    env = " ".join(i.args for i in dockerfile.instructions if i.keyword == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` leave `path` out of the build context (last match wins)."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        prefixes = ("/".join(parts[: n + 1]) for n in range(len(parts)))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


@pytest.fixture(scope="module")
def dockerignore() -> list[str]:
    """The patterns of .dockerignore."""
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_what_the_image_runs(
    dockerignore: list[str], compose_config_path: Path
) -> None:
    runtime = ["main.py", "pyproject.toml", compose_config_path.relative_to(ROOT).as_posix()]
    for folder in ("orchestrator", "facade", "node", "handler", "topic", "dto", "pb", "upstream"):
        runtime += [p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob("*.py")]
    runtime.append("orchestrator/healthcheck.py")
    assert [path for path in runtime if _ignored(path, dockerignore)] == []


def test_dockerignore_leaves_out_local_state_and_tests(dockerignore: list[str]) -> None:
    for path in (".git/HEAD", ".venv/bin/python", "tests/test_deployment.py", "x/__pycache__/y"):
        assert _ignored(path, dockerignore), path
    assert _ignored("upstream/order.db", dockerignore)


# --- Kubernetes: a small kustomize -------------------------------------------------------------

KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED_KINDS = {"Namespace"}
Resource = dict[str, Any]


def strategic_merge(target: Any, patch: Any) -> Any:
    """`patch` merged into `target` as a strategic merge patch of the fields used here.

    Mappings merge key by key; lists of mappings that all have a `name` merge by name
    (containers, env, volumes); any other value is replaced.
    """
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = strategic_merge(target[key], value) if key in target else value
        return merged
    named = isinstance(target, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in target + patch):
        by_name = {item["name"]: item for item in target}
        merged_list = [strategic_merge(item, _named(patch, item["name"])) for item in target]
        return merged_list + [item for item in patch if item["name"] not in by_name]
    return copy.deepcopy(patch)


def _named(items: list[Any], name: str) -> Any:
    return next((item for item in items if item["name"] == name), {})


def _containers(resource: Resource) -> list[dict[str, Any]]:
    if resource["kind"] != "Deployment":
        return []
    return list(resource["spec"]["template"]["spec"]["containers"])


def _split_image(image: str) -> tuple[str, str | None]:
    name, _, tag = image.rpartition(":")
    return (name, tag) if name and "/" not in tag else (image, None)


def render(directory: Path) -> list[Resource]:
    """What `kubectl kustomize directory` gives, for the fields in KUSTOMIZE_FIELDS."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = set(kustomization) - KUSTOMIZE_FIELDS
    assert not unsupported, f"{directory}: the test renderer does not support {unsupported}"
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources += render(path)
        else:
            resources += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    for patch_ref in kustomization.get("patches", []):
        assert set(patch_ref) == {"path"}, f"only `path:` patches are supported: {patch_ref}"
        patch = yaml.safe_load((directory / patch_ref["path"]).read_text(encoding="utf-8"))
        key = (patch["kind"], patch["metadata"]["name"])
        matches = [i for i, r in enumerate(resources) if (r["kind"], r["metadata"]["name"]) == key]
        assert len(matches) == 1, f"patch {patch_ref['path']} matches {len(matches)} resources"
        resources[matches[0]] = strategic_merge(resources[matches[0]], patch)
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, image
        for resource in resources:
            for container in _containers(resource):
                name, tag = _split_image(container["image"])
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    new_tag = image.get("newTag", tag)
                    container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
    if namespace := kustomization.get("namespace"):
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED_KINDS:
                resource["metadata"]["namespace"] = namespace
    return resources


@dataclass(frozen=True)
class Rendered:
    """A rendered kustomization, with lookups by kind and name."""

    name: str
    resources: tuple[Resource, ...]

    def of_kind(self, kind: str) -> list[Resource]:
        """Every resource of `kind`."""
        return [r for r in self.resources if r["kind"] == kind]

    def get(self, kind: str, name: str) -> Resource:
        """The one resource of `kind` named `name`."""
        found = [r for r in self.of_kind(kind) if r["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def container(self, deployment: str) -> dict[str, Any]:
        """The one container of `deployment`."""
        containers = _containers(self.get("Deployment", deployment))
        assert len(containers) == 1, f"{deployment}: expected one container"
        return containers[0]

    def secret_value(self, name: str, key: str) -> str:
        """A key of a Secret (stringData)."""
        secret = self.get("Secret", name)
        assert key in secret.get("stringData", {}), f"Secret {name} has no key {key}"
        return str(secret["stringData"][key])

    def env_of(self, deployment: str) -> dict[str, str]:
        """The container's environment, with secretKeyRef values resolved."""
        env = {}
        for var in self.container(deployment).get("env", []):
            if "value" in var:
                env[var["name"]] = str(var["value"])
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secret_value(ref["name"], ref["key"])
        return env


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    """The base and the dev overlay, rendered."""
    return Rendered(request.param, tuple(render(K8S / request.param)))


def orchestrator_config_file(rendered: Rendered, tmp_path: Path) -> Path:
    """The orchestrator's ORCH_CONFIG as the pod sees it: the ConfigMap key behind the mount."""
    deployment = rendered.get("Deployment", "orchestrator")
    path = rendered.env_of("orchestrator")["ORCH_CONFIG"]
    mounts = rendered.container("orchestrator")["volumeMounts"]
    mount = next(m for m in mounts if posixpath.dirname(path) == m["mountPath"])
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    config_map = rendered.get("ConfigMap", volume["configMap"]["name"])
    copy_path = tmp_path / posixpath.basename(path)
    copy_path.write_text(config_map["data"][posixpath.basename(path)], encoding="utf-8")
    return copy_path


@pytest.fixture
def k8s_settings(rendered: Rendered, tmp_path: Path) -> AppSettings:
    """The orchestrator's settings in the rendered Deployment: its ConfigMap and its env."""
    env = rendered.env_of("orchestrator")
    env.pop("ORCH_CONFIG")
    return load_app_settings(orchestrator_config_file(rendered, tmp_path), env)


def upstream_args(rendered: Rendered, name: str) -> Any:
    """The upstream Deployment's args, parsed by the upstream command line."""
    container = rendered.container(name)
    assert "command" not in container, "the image's ENTRYPOINT (python main.py) must stay"
    return parse_upstream_args(container["args"])


def container_port(rendered: Rendered, deployment: str, port: int | str) -> int:
    """The container port that `port` (a number or a port name) designates."""
    for declared in rendered.container(deployment)["ports"]:
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"{deployment} declares no port {port!r}")


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)([a-zA-Z]*)")
_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (`250m`, `1`, `256Mi`) as a number."""
    match = _QUANTITY.fullmatch(str(value))
    assert match and match[2] in _SUFFIXES, f"unsupported quantity {value!r}"
    return float(match[1]) * _SUFFIXES[match[2]]


def test_kustomize_renderer_agrees_with_kubectl_kustomize(rendered: Rendered) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / rendered.name)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d]

    def by_key(resources: Any) -> dict[tuple[str, str], Resource]:
        return {(r["kind"], r["metadata"]["name"]): r for r in resources}

    assert by_key(rendered.resources) == by_key(theirs)
    assert len(rendered.resources) == len(theirs)


@pytest.mark.parametrize("name", ["orchestrator", *UPSTREAMS])
def test_k8s_defines_deployment_and_service(rendered: Rendered, name: str) -> None:
    rendered.get("Deployment", name)
    rendered.get("Service", name)


def test_k8s_configmap_app_yaml_loads_with_app_settings(k8s_settings: AppSettings) -> None:
    assert k8s_settings.embedded_upstreams.order is None
    assert k8s_settings.embedded_upstreams.payment is None


def test_k8s_broker_url_comes_from_the_secret(
    rendered: Rendered, k8s_settings: AppSettings
) -> None:
    ref = next(
        v for v in rendered.container("orchestrator")["env"] if v["name"] == "ORCH_BROKER_URL"
    )
    assert "secretKeyRef" in ref["valueFrom"]
    assert k8s_settings.broker.scheme in {"amqp", "amqps"}


def test_k8s_secret_refs_name_existing_secret_keys(rendered: Rendered) -> None:
    refs = [
        var["valueFrom"]["secretKeyRef"]
        for deployment in rendered.of_kind("Deployment")
        for container in _containers(deployment)
        for var in container.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    ]
    assert refs
    for ref in refs:
        rendered.secret_value(ref["name"], ref["key"])


def test_k8s_secret_holds_broker_and_store_urls(rendered: Rendered) -> None:
    secret = rendered.get("Secret", "orchestrator-secrets")["stringData"]
    assert urlsplit(secret["ORCH_BROKER_URL"]).scheme == "amqp"
    assert urlsplit(secret["ORCH_STORE_URL"]).scheme == "postgresql+asyncpg"


def test_k8s_orchestrator_container_port_is_the_config_port(
    rendered: Rendered, k8s_settings: AppSettings
) -> None:
    assert container_port(rendered, "orchestrator", "grpc") == k8s_settings.grpc.port


@pytest.mark.parametrize("name", UPSTREAMS)
def test_k8s_upstream_listens_on_its_configured_address_port(
    rendered: Rendered, name: str, k8s_settings: AppSettings
) -> None:
    host, port = host_and_port(getattr(k8s_settings.upstreams, name).address)
    args = upstream_args(rendered, name)
    assert (args.service, args.host, args.port) == (name, "0.0.0.0", port)
    assert container_port(rendered, name, "grpc") == port
    service = rendered.get("Service", host)
    assert [p["port"] for p in service["spec"]["ports"]] == [port]


@pytest.mark.parametrize("name", UPSTREAMS)
def test_k8s_upstream_ledger_is_on_a_volume(rendered: Rendered, name: str) -> None:
    mounts = {m["mountPath"] for m in rendered.container(name)["volumeMounts"]}
    assert posixpath.dirname(upstream_args(rendered, name).db) in mounts


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
@pytest.mark.parametrize("name", ["orchestrator", *UPSTREAMS])
def test_k8s_grpc_probes_target_the_grpc_port(rendered: Rendered, name: str, probe: str) -> None:
    container = rendered.container(name)
    port = container[probe]["grpc"]["port"]
    assert port == container_port(rendered, name, "grpc")


def test_k8s_orchestrator_liveness_probes_the_liveness_health_name(rendered: Rendered) -> None:
    from orchestrator.server import LIVENESS_SERVICE

    liveness = rendered.container("orchestrator")["livenessProbe"]
    assert liveness["grpc"].get("service") == LIVENESS_SERVICE


def test_k8s_readiness_fails_within_the_drain(
    rendered: Rendered, k8s_settings: AppSettings
) -> None:
    readiness = rendered.container("orchestrator")["readinessProbe"]
    drain = k8s_settings.grpc.drain_seconds
    assert drain > 0
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) <= drain


def test_k8s_termination_grace_covers_grace_and_drain(
    rendered: Rendered, k8s_settings: AppSettings
) -> None:
    spec = rendered.get("Deployment", "orchestrator")["spec"]["template"]["spec"]
    needed = k8s_settings.grpc.shutdown_grace_seconds + k8s_settings.grpc.drain_seconds
    assert spec["terminationGracePeriodSeconds"] >= needed + CLOSE_MARGIN_SECONDS


@pytest.mark.parametrize("name", UPSTREAMS)
def test_k8s_upstream_termination_grace_covers_its_stop_grace(
    rendered: Rendered, name: str
) -> None:
    spec = rendered.get("Deployment", name)["spec"]["template"]["spec"]
    needed = upstream.server.STOP_GRACE_SECONDS + CLOSE_MARGIN_SECONDS
    assert spec["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("name", ["orchestrator", *UPSTREAMS])
def test_k8s_resource_requests_do_not_exceed_limits(rendered: Rendered, name: str) -> None:
    resources = rendered.container(name)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    for key, request in resources["requests"].items():
        assert quantity(request) <= quantity(resources["limits"][key]), key


def test_k8s_base_runs_at_least_two_orchestrators() -> None:
    base = Rendered("base", tuple(render(K8S / "base")))
    assert base.get("Deployment", "orchestrator")["spec"]["replicas"] >= 2


def test_k8s_dev_overlay_runs_one_orchestrator_with_smaller_requests() -> None:
    base = Rendered("base", tuple(render(K8S / "base")))
    dev = Rendered("dev", tuple(render(K8S / "overlays/dev")))
    assert dev.get("Deployment", "orchestrator")["spec"]["replicas"] == 1
    requests = dev.container("orchestrator")["resources"]["requests"]
    for key, value in requests.items():
        assert quantity(value) < quantity(
            base.container("orchestrator")["resources"]["requests"][key]
        )


def test_k8s_dev_overlay_puts_everything_in_its_namespace() -> None:
    dev = Rendered("dev", tuple(render(K8S / "overlays/dev")))
    namespace = dev.of_kind("Namespace")[0]["metadata"]["name"]
    namespaced = [r for r in dev.resources if r["kind"] not in CLUSTER_SCOPED_KINDS]
    assert {r["metadata"].get("namespace") for r in namespaced} == {namespace}


def test_k8s_dev_overlay_runs_the_image_the_compose_stack_builds(
    services: dict[str, Any],
) -> None:
    dev = Rendered("dev", tuple(render(K8S / "overlays/dev")))
    images = {dev.container(name)["image"] for name in ["orchestrator", *UPSTREAMS]}
    assert images == {services["orchestrator"]["image"]}


def test_k8s_deployment_selectors_match_their_pod_labels(rendered: Rendered) -> None:
    for deployment in rendered.of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]


def test_k8s_services_select_their_deployment_and_target_its_container_port(
    rendered: Rendered,
) -> None:
    for service in rendered.of_kind("Service"):
        selector = service["spec"]["selector"]
        selected = [
            d
            for d in rendered.of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        name = service["metadata"]["name"]
        assert [d["metadata"]["name"] for d in selected] == [name]
        for port in service["spec"]["ports"]:
            assert container_port(rendered, name, port["targetPort"]) == port["port"]


def test_k8s_orchestrator_service_ports_are_the_config_ports(
    rendered: Rendered, k8s_settings: AppSettings
) -> None:
    ports = rendered.get("Service", "orchestrator")["spec"]["ports"]
    assert {p["name"]: p["port"] for p in ports} == {
        "grpc": k8s_settings.grpc.port,
        "metrics": k8s_settings.metrics.port,
    }


def test_k8s_configmap_enables_metrics(k8s_settings: AppSettings) -> None:
    assert k8s_settings.metrics.enabled


def test_k8s_orchestrator_container_names_the_metrics_port(
    rendered: Rendered, k8s_settings: AppSettings
) -> None:
    assert container_port(rendered, "orchestrator", "metrics") == k8s_settings.metrics.port


def pod_annotations(rendered: Rendered, deployment: str) -> dict[str, str]:
    """The annotations of a Deployment's pod template."""
    metadata = rendered.get("Deployment", deployment)["spec"]["template"]["metadata"]
    annotations = metadata.get("annotations", {})
    assert all(isinstance(value, str) for value in annotations.values()), annotations
    return dict(annotations)


def test_k8s_orchestrator_pods_ask_prometheus_to_scrape_the_metrics_port(
    rendered: Rendered, k8s_settings: AppSettings
) -> None:
    annotations = pod_annotations(rendered, "orchestrator")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(k8s_settings.metrics.port)
    assert annotations["prometheus.io/path"] == METRICS_PATH


async def test_k8s_prometheus_path_is_served_by_the_metrics_server(rendered: Rendered) -> None:
    path = pod_annotations(rendered, "orchestrator")["prometheus.io/path"]
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    port = await server.start()
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: pod\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
    finally:
        await server.close()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"orchestrator_broker_connected" in answer


def test_k8s_disruption_budget_selects_the_orchestrator(rendered: Rendered) -> None:
    budget = rendered.get("PodDisruptionBudget", "orchestrator")
    labels = rendered.get("Deployment", "orchestrator")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", ["orchestrator", *UPSTREAMS])
def test_k8s_pods_run_as_the_image_non_root_user(
    rendered: Rendered, name: str, dockerfile: Dockerfile
) -> None:
    spec = rendered.get("Deployment", name)["spec"]["template"]["spec"]
    image_uid = int(dockerfile.instructions[dockerfile.index("USER")].args.split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == image_uid != 0
    container = rendered.container(name)["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


# --- orchestrator.healthcheck ------------------------------------------------------------------


def run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m orchestrator.healthcheck ARGS` from the repository root, as the image runs it."""
    return subprocess.run(
        [sys.executable, "-m", HEALTHCHECK_MODULE, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def order_upstream() -> Iterator[str]:
    """`python main.py upstream order` on a free port; its target."""
    port = free_port()
    with start_main("upstream", "order", "--port", str(port)) as process:
        target = f"127.0.0.1:{port}"
        wait_for_serving(target, process)
        yield target


@pytest.fixture
def not_serving_server() -> Iterator[str]:
    """A gRPC server whose health service answers NOT_SERVING; its target."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_healthcheck_exits_0_when_the_server_is_serving(order_upstream: str) -> None:
    result = run_healthcheck(order_upstream)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{order_upstream}: SERVING"


def test_healthcheck_exits_0_for_a_serving_named_service(order_upstream: str) -> None:
    service = upstream.server.SERVICE_NAMES["order"]
    result = run_healthcheck(order_upstream, "--service", service)
    assert result.returncode == 0, result.stdout + result.stderr


def test_healthcheck_exits_1_for_an_unknown_service(order_upstream: str) -> None:
    result = run_healthcheck(order_upstream, "--service", "no.such.Service")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stdout


def test_healthcheck_exits_1_when_nothing_listens() -> None:
    target = f"127.0.0.1:{free_port()}"
    result = run_healthcheck(target, "--timeout", "2")
    assert result.returncode == 1
    assert result.stdout.startswith(f"{target}: UNAVAILABLE")


def test_healthcheck_exits_1_when_the_server_is_not_serving(
    not_serving_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert healthcheck.main([not_serving_server]) == 1
    assert capsys.readouterr().out.strip() == f"{not_serving_server}: NOT_SERVING"


def test_healthcheck_defaults_to_the_orchestrator_port() -> None:
    args = healthcheck.build_arg_parser().parse_args([])
    assert args.target == f"127.0.0.1:{AppSettings().grpc.port}"
