"""Configuration: `app.yaml` loaded with pyyaml into pydantic models.

Unknown keys and bad values stop startup with a message naming the file and
the key. An application extends `Settings` with sections of its own and passes
its class to `load_settings`.

Environment overrides: `ORCH_CONFIG` (the file), `ORCH_GRPC_PORT`,
`ORCH_BROKER_URL` (`memory://`, `amqp://user:password@host:port/vhost` or
`nats://user:password@host:port`), and
the others of `ENVIRONMENT_VARIABLES`.

Files the configuration names (certificates, keys, the tokens file) are read
while it is validated: a missing or unreadable one stops startup naming its key.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator._config_reference import markdown_reference
from orchestrator._urls import (
    BROKER_SCHEMES,
    STORE_SCHEMES,
    checked_client,
    checked_nats_prefix,
    checked_url,
    redact_url,
)
from orchestrator.errors import ConfigError

__all__ = [
    "ENVIRONMENT_VARIABLES",
    "AccessSettings",
    "BrokerSettings",
    "BrokerTlsSettings",
    "ClientCertificateSettings",
    "ConfigError",
    "DeadLetterSettings",
    "FacadeSagaSettings",
    "GrpcSettings",
    "MetricsSettings",
    "PemFile",
    "SagaSettings",
    "ServerTlsSettings",
    "Settings",
    "StoreSettings",
    "StrictModel",
    "TokenSettings",
    "TopicSettings",
    "TracingSettings",
    "UiSettings",
    "UiTlsSettings",
    "config_reference",
    "load_settings",
    "redact_url",
]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated."""

    # Attribute docstrings become field descriptions: the config reference is built from them.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _readable_pem(path: Path) -> Path:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in text:
        raise ValueError(f"{path} holds no PEM data")
    return path


PemFile = Annotated[Path, AfterValidator(_readable_pem)]
"""A path to a PEM file (certificate, key or CA bundle), checked readable when loaded."""


class ServerTlsSettings(StrictModel):
    """TLS for the gRPC server; with `client_ca_file`, mutual TLS."""

    cert_file: PemFile
    """The server's certificate chain (PEM). Env: `ORCH_GRPC_TLS_CERT`."""
    key_file: PemFile
    """The server certificate's private key (PEM). Env: `ORCH_GRPC_TLS_KEY`."""
    client_ca_file: PemFile | None = None
    """CA bundle (PEM) that client certificates must chain to; when set, every connection
    must present one (mutual TLS). Env: `ORCH_GRPC_TLS_CLIENT_CA`."""


class GrpcSettings(StrictModel):
    """The orchestrator's gRPC server."""

    host: str = "0.0.0.0"
    """Address the gRPC server binds."""
    port: int = Field(default=10000, ge=0, le=65535)
    """gRPC port (0: any free port). Env: `ORCH_GRPC_PORT`."""
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=600)
    """In-flight calls get this long to finish after SIGTERM."""
    drain_seconds: float = Field(default=0.0, ge=0, le=600)
    """After SIGTERM, health answers NOT_SERVING this long before new calls are refused,
    so load balancers that poll it stop routing here first."""
    tls: ServerTlsSettings | None = None
    """Serve TLS (and, with a client CA, mutual TLS) instead of plaintext."""


class TopicSettings(StrictModel):
    """Per-topic consumer settings."""

    concurrency: int = Field(ge=1, le=10_000)
    """Deliveries handled at once (the prefetch count on RabbitMQ, the messages pulled at once
    on NATS JetStream)."""


class BrokerTlsSettings(StrictModel):
    """How an `amqps://` connection verifies RabbitMQ and, optionally, proves who it is."""

    ca_file: PemFile | None = None
    """CA bundle (PEM) the broker's certificate must chain to; without it, the system's CAs.
    The host name of the URL is always verified. Env: `ORCH_BROKER_TLS_CA`."""
    cert_file: PemFile | None = None
    """Client certificate (PEM) for brokers that require one. Env: `ORCH_BROKER_TLS_CERT`."""
    key_file: PemFile | None = None
    """The client certificate's private key (PEM). Env: `ORCH_BROKER_TLS_KEY`."""

    @model_validator(mode="after")
    def _cert_with_key(self) -> BrokerTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class BrokerSettings(StrictModel):
    """The message broker the facades publish to and consume from."""

    url: SecretStr = SecretStr("memory://")
    """`memory://` (in process), `amqp://user:password@host:5672/vhost`, `amqps://...:5671/`
    (TLS, see `tls`), or `nats://user:password@host:4222` or `nats://token@host:4222` (NATS
    JetStream; needs the `nats` extra). Env: `ORCH_BROKER_URL`. Logged only with its password or
    token masked."""
    topic_prefix: str = ""
    """Prepended to every topic name, so several deployments can share a broker."""
    default_concurrency: int = Field(default=16, ge=1, le=10_000)
    """Deliveries handled at once for a topic not listed in `topics`."""
    topics: dict[str, TopicSettings] = Field(default_factory=dict)
    """Per-topic settings by topic name (without the prefix)."""
    publish_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """A publish not confirmed by then fails with UNAVAILABLE (a caller may ask for less); also
    bounds declares and acks."""
    delivery_limit: int = Field(default=5, ge=1, le=1000)
    """Deliveries of one message before it is dead-lettered (on NATS JetStream the consumer's
    `max_deliver` is one more: the last delivery only dead-letters)."""
    redelivery_delay_seconds: float = Field(default=0.05, ge=0, le=60)
    """Backoff before a failed delivery is retried, times its delivery count."""
    heartbeat_seconds: int = Field(default=30, ge=1, le=600)
    """AMQP heartbeat: a connection silent for three times (this + 1) seconds is given up and
    reconnected (aiormq's rule). On NATS, the client's ping interval: a server that answers
    two pings in a row with silence is given up and reconnected."""
    ack_wait_seconds: float = Field(default=30.0, ge=1, le=3600)
    """NATS JetStream only: a delivery neither acknowledged nor reported in progress for this
    long is delivered again (its consumer died; a handler still running reports progress every
    third of it). RabbitMQ gives deliveries back when their connection closes instead."""
    max_message_bytes: int = Field(default=1 << 20, ge=1024, le=128 << 20)
    """Larger messages are refused before they reach the broker."""
    connect_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    """How long `start()` keeps retrying the first connection before giving up."""
    reconnect_interval_seconds: float = Field(default=5.0, gt=0, le=300)
    """Pause between reconnection attempts after the broker connection is lost."""
    tls: BrokerTlsSettings | None = None
    """Certificates for an `amqps://` URL (without it: the system's CAs, no client certificate)."""

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: SecretStr) -> SecretStr:
        checked_url(
            value.get_secret_value(), BROKER_SCHEMES, "memory://, amqp://, amqps:// or nats://"
        )
        checked_client(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _fits_the_scheme(self) -> BrokerSettings:
        if self.tls is not None and self.scheme != "amqps":
            raise ValueError("tls is set but the url is not amqps://")
        if self.scheme == "nats":
            checked_nats_prefix(self.topic_prefix)
        return self

    @property
    def scheme(self) -> str:
        """`memory`, `amqp`, `amqps` or `nats`."""
        return urlsplit(self.url.get_secret_value()).scheme

    @property
    def safe_url(self) -> str:
        """The URL with its password (or a NATS token) masked, fit for logs."""
        return redact_url(self.url.get_secret_value())

    def concurrency_of(self, topic: str) -> int:
        """How many deliveries of `topic` are handled at once."""
        configured = self.topics.get(topic)
        return configured.concurrency if configured else self.default_concurrency

    def queue_name(self, topic: str) -> str:
        """The broker-side name of a topic."""
        return f"{self.topic_prefix}{topic}"


class MetricsSettings(StrictModel):
    """Prometheus metrics over HTTP (`GET /metrics`)."""

    enabled: bool = False
    """Serve `GET /metrics`. Env: `ORCH_METRICS_PORT` enables it on that port."""
    host: str = "0.0.0.0"
    """Address the metrics server binds."""
    port: int = Field(default=9464, ge=0, le=65535)
    """Metrics port (0: any free port)."""


class UiTlsSettings(StrictModel):
    """HTTPS for the console."""

    cert_file: PemFile
    """The console's certificate chain (PEM)."""
    key_file: PemFile
    """The certificate's private key (PEM)."""


class UiSettings(StrictModel):
    """The saga console: a web UI the orchestrator serves on an HTTP port of its own
    (needs `pip install 'saga-orchestrator[console]'`)."""

    enabled: bool = False
    """Serve the console. Env: `ORCH_UI_PORT` enables it on that port."""
    host: str = "127.0.0.1"
    """Address the console binds: this machine only by default; `0.0.0.0` for every
    interface (then serve it over `tls`, or behind a proxy that does)."""
    port: int = Field(default=8080, ge=0, le=65535)
    """Console port (0: any free port)."""
    tls: UiTlsSettings | None = None
    """Serve HTTPS (and mark the session cookie Secure) instead of plain HTTP."""
    session_minutes: float = Field(default=480.0, gt=0, le=10080)
    """A signed-in browser is signed out after this long without a request."""
    live_update_seconds: float = Field(default=0.5, ge=0.05, le=60)
    """The least time between two live updates of one open page: changes in between are
    sent together."""

    @field_validator("enabled")
    @classmethod
    def _extra_installed(cls, enabled: bool) -> bool:
        if enabled:
            for module in _CONSOLE_MODULES:
                try:
                    importlib.import_module(module)
                except ImportError:
                    raise ValueError(
                        f"the console needs the 'console' extra ({module} cannot be imported): "
                        "pip install 'saga-orchestrator[console]'"
                    ) from None
        return enabled


_CONSOLE_MODULES = ("aiohttp", "aiohttp_jinja2", "aiohttp_sse", "jinja2")
"""What `orchestrator.console` imports beyond the base install (the `console` extra)."""


class TracingSettings(StrictModel):
    """OpenTelemetry tracing (needs `pip install 'saga-orchestrator[tracing]'`)."""

    enabled: bool = False
    """Record spans and propagate trace context."""
    exporter: Literal["otlp", "console"] = "otlp"
    """`otlp`: OTLP over gRPC to `endpoint`; `console`: print spans (for trying it out)."""
    endpoint: str = "http://localhost:4317"
    """The OTLP collector."""
    service_name: str = "orchestrator"
    """The `service.name` resource attribute."""


class StoreSettings(StrictModel):
    """The saga store: every saga's state and step log."""

    url: SecretStr = SecretStr("")
    """`sqlite+aiosqlite:///path.db` or `postgresql+asyncpg://user:password@host/db`; empty or
    `memory://`: sagas are kept in process memory only (lost on restart). Env: `ORCH_STORE_URL`."""
    heartbeat_seconds: float = Field(default=2.0, gt=0, le=60)
    """How often this replica records that it is alive, and looks for orphaned sagas."""
    lease_seconds: float = Field(default=10.0, gt=0, le=600)
    """A replica silent this long is dead: its running sync sagas are rolled back by another."""

    @field_validator("url")
    @classmethod
    def _known_store(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value().strip()
        if url:
            checked_url(
                url,
                STORE_SCHEMES,
                "memory://, sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db",
            )
        return value

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> StoreSettings:
        if self.lease_seconds <= self.heartbeat_seconds:
            raise ValueError("lease_seconds must be longer than heartbeat_seconds")
        return self

    @property
    def safe_url(self) -> str:
        """The URL with its password masked, fit for logs."""
        return redact_url(self.url.get_secret_value())


class FacadeSagaSettings(StrictModel):
    """One facade's saga deadlines, overriding the defaults of `sagas`."""

    deadline_seconds: float | None = Field(default=None, gt=0, le=30 * 86400)
    """A saga of this facade still running this long after it began is rolled back."""
    compensation_seconds: float | None = Field(default=None, gt=0, le=30 * 86400)
    """How long this facade's rollback may take before recovery runs it itself."""


class SagaSettings(StrictModel):
    """How long sagas may take before recovery drives them to an end."""

    deadline_seconds: float = Field(default=300.0, gt=0, le=30 * 86400)
    """A saga still running this long after it began (a lost or dead-lettered message, a
    stuck node) is rolled back by recovery, with the cause in its record."""
    compensation_seconds: float = Field(default=120.0, gt=0, le=30 * 86400)
    """A saga still compensating this long (its rollback message lost or failing) has its
    compensation run by recovery; one that cannot succeed ends COMPENSATION_FAILED."""
    facades: dict[str, FacadeSagaSettings] = Field(default_factory=dict)
    """Per-facade deadlines by facade name; a facade named here must be registered."""

    def deadlines_of(self, facade: str) -> tuple[float, float]:
        """`facade`'s (deadline_seconds, compensation_seconds)."""
        own = self.facades.get(facade) or FacadeSagaSettings()
        return (
            own.deadline_seconds or self.deadline_seconds,
            own.compensation_seconds or self.compensation_seconds,
        )


class DeadLetterSettings(StrictModel):
    """The dead-letter list operators act on (`orchestrator.v1.SagaAdmin`)."""

    collect: bool = True
    """Take the messages of the facades' dead-letter queues into the saga store, joined to
    their sagas, where operators list, replay and discard them. Off, they stay in the
    broker's dead-letter queues."""
    interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    """How often each replica looks for new dead letters (each look costs a broker channel
    and a `basic.get` per topic: dead letters are rare, and a few seconds' wait is nothing to
    an operator)."""


RoleName = Literal["read", "operate"]


class TokenSettings(StrictModel):
    """A bearer token (`authorization: Bearer <token>`) and whose it is."""

    name: str = Field(min_length=1, max_length=200)
    """Who holds it: what records and logs name as the caller (never the token)."""
    role: RoleName
    """`read`: SagaService and ListDeadLetters; `operate`: every SagaAdmin method too."""
    token: SecretStr = Field(min_length=16)
    """The secret itself, at least 16 characters; never logged."""


class ClientCertificateSettings(StrictModel):
    """A mutual-TLS client identity and its role."""

    name: str = Field(min_length=1, max_length=200)
    """The certificate's subject common name (CN) or one of its DNS/URI subject alternative
    names; the caller is recorded by it."""
    role: RoleName
    """`read` or `operate`, as for tokens."""


class AccessSettings(StrictModel):
    """Who may call SagaService and SagaAdmin. With no credentials configured access is open
    (a warning is logged at startup); application services are never affected."""

    tokens: list[TokenSettings] = Field(default_factory=list)
    """Bearer tokens, each with a name and a role."""
    tokens_file: Path | None = None
    """A YAML file holding a list of tokens in the same form as `tokens` (`name`, `role`,
    `token`), added to them; keeps secrets out of the config file. Env:
    `ORCH_ACCESS_TOKENS_FILE`."""
    client_certificates: list[ClientCertificateSettings] = Field(default_factory=list)
    """Client certificate identities (needs `grpc.tls.client_ca_file`)."""
    open_status: bool = False
    """Let anyone read SagaService (as `anonymous`, role read) without credentials."""

    _file_tokens: tuple[TokenSettings, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _read_tokens_file(self) -> AccessSettings:
        if self.tokens_file is not None:
            self._file_tokens = _load_tokens_file(self.tokens_file)
        names = [token.name for token in self.all_tokens]
        if len(names) != len(set(names)):
            raise ValueError("two tokens share a name")
        secrets = [token.token.get_secret_value() for token in self.all_tokens]
        if len(secrets) != len(set(secrets)):
            raise ValueError("two tokens share a secret")
        return self

    @property
    def all_tokens(self) -> tuple[TokenSettings, ...]:
        """`tokens` and those of `tokens_file`."""
        return (*self.tokens, *self._file_tokens)

    @property
    def configured(self) -> bool:
        """True when any credential is configured: access is then enforced."""
        return bool(self.all_tokens or self.client_certificates)


def _load_tokens_file(path: Path) -> tuple[TokenSettings, ...]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"tokens_file {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError:
        # The parser's message may quote the file, secrets included.
        raise ValueError(f"tokens_file {path}: not valid YAML") from None
    if not isinstance(raw, list):
        raise ValueError(f"tokens_file {path}: must be a list of name/role/token entries")
    tokens = []
    for index, entry in enumerate(raw):
        try:
            tokens.append(TokenSettings.model_validate(entry))
        except ValidationError as exc:
            raise ValueError(f"tokens_file {path}: entry {index}: {_describe(exc)}") from None
    return tuple(tokens)


class Settings(StrictModel):
    """The framework's settings; applications subclass it to add sections."""

    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    """The gRPC server."""
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    """The message broker."""
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    """Prometheus metrics."""
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    """OpenTelemetry tracing."""
    store: StoreSettings = Field(default_factory=StoreSettings)
    """The saga store."""
    sagas: SagaSettings = Field(default_factory=SagaSettings)
    """Saga deadlines."""
    dead_letters: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    """The dead-letter list operators act on."""
    access: AccessSettings = Field(default_factory=AccessSettings)
    """Who may call SagaService and SagaAdmin."""
    ui: UiSettings = Field(default_factory=UiSettings)
    """The saga console."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Least severe level logged."""
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object a line, for log collectors; `text` for people."""


SettingsT = TypeVar("SettingsT", bound=Settings)


def load_settings(
    model: type[SettingsT],
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> SettingsT:
    """Read `path` (or `$ORCH_CONFIG`, or `app.yaml`), apply environment overrides, validate."""
    env = os.environ if environ is None else environ
    config_path = Path(path or env.get("ORCH_CONFIG") or "app.yaml")
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping")
    _apply_environment(raw, env)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: {_describe(exc)}") from None


ENVIRONMENT_VARIABLES: dict[str, str] = {
    "ORCH_CONFIG": "Path of the configuration file (default `app.yaml`).",
    "ORCH_GRPC_PORT": "Overrides `grpc.port`.",
    "ORCH_BROKER_URL": "Overrides `broker.url`; keep credentials out of config files with it.",
    "ORCH_METRICS_PORT": "Sets `metrics.port` and turns `metrics.enabled` on.",
    "ORCH_STORE_URL": "Overrides `store.url`; keep database credentials out of config files.",
    "ORCH_UI_PORT": "Sets `ui.port` and turns `ui.enabled` on.",
    "ORCH_GRPC_TLS_CERT": "Sets `grpc.tls.cert_file`.",
    "ORCH_GRPC_TLS_KEY": "Sets `grpc.tls.key_file`.",
    "ORCH_GRPC_TLS_CLIENT_CA": "Sets `grpc.tls.client_ca_file` (mutual TLS).",
    "ORCH_BROKER_TLS_CA": "Sets `broker.tls.ca_file`.",
    "ORCH_BROKER_TLS_CERT": "Sets `broker.tls.cert_file`.",
    "ORCH_BROKER_TLS_KEY": "Sets `broker.tls.key_file`.",
    "ORCH_ACCESS_TOKENS_FILE": "Sets `access.tokens_file`.",
}
"""The environment variables `load_settings` reads, with what each does."""


def config_reference(model: type[BaseModel]) -> str:
    """A Markdown reference of every key of `model` and of the environment variables.

    Built from the models themselves (types, defaults, bounds and attribute
    docstrings), so documentation generated with it cannot drift.
    """
    return markdown_reference(model, ENVIRONMENT_VARIABLES)


def _apply_environment(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    if port := env.get("ORCH_GRPC_PORT"):
        raw.setdefault("grpc", {})["port"] = port
    if url := env.get("ORCH_BROKER_URL"):
        raw.setdefault("broker", {})["url"] = url
    if store_url := env.get("ORCH_STORE_URL"):
        raw.setdefault("store", {})["url"] = store_url
    if port := env.get("ORCH_METRICS_PORT"):
        raw.setdefault("metrics", {}).update(enabled=True, port=port)
    if port := env.get("ORCH_UI_PORT"):
        raw.setdefault("ui", {}).update(enabled=True, port=port)
    for variable, (section, sub, key) in _FILE_VARIABLES.items():
        if value := env.get(variable):
            parent = raw.setdefault(section, {})
            if sub:
                if not isinstance(parent.get(sub), dict):
                    parent[sub] = {}
                parent = parent[sub]
            parent[key] = value


_FILE_VARIABLES: dict[str, tuple[str, str, str]] = {
    "ORCH_GRPC_TLS_CERT": ("grpc", "tls", "cert_file"),
    "ORCH_GRPC_TLS_KEY": ("grpc", "tls", "key_file"),
    "ORCH_GRPC_TLS_CLIENT_CA": ("grpc", "tls", "client_ca_file"),
    "ORCH_BROKER_TLS_CA": ("broker", "tls", "ca_file"),
    "ORCH_BROKER_TLS_CERT": ("broker", "tls", "cert_file"),
    "ORCH_BROKER_TLS_KEY": ("broker", "tls", "key_file"),
    "ORCH_ACCESS_TOKENS_FILE": ("access", "", "tokens_file"),
}


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{key}: {message}")
    return "; ".join(problems)
