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

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TypeVar
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

from orchestrator._config_env import ENVIRONMENT_VARIABLES, apply_environment
from orchestrator._config_reference import markdown_reference
from orchestrator._extras import CONSOLE_MODULES, require_extra
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
    "FacadeKindName",
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
    max_length: int | None = Field(default=None, ge=1, le=100_000_000)
    """Most messages the topic's queue holds waiting (RabbitMQ `x-max-length`, `reject-publish`):
    a call whose first hop it refuses is RESOURCE_EXHAUSTED, nothing started (see the README's
    admission control). Unset: no limit. Not on NATS JetStream."""


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
            if any(topic.max_length for topic in self.topics.values()):
                raise ValueError("topics' max_length is a RabbitMQ queue limit, not on nats://")
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

    def max_length_of(self, topic: str) -> int | None:
        """How many messages `topic`'s queue may hold waiting; None: no limit."""
        configured = self.topics.get(topic)
        return configured.max_length if configured else None

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
            require_extra("console", CONSOLE_MODULES, "the console")
        return enabled


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


FacadeKindName = Literal["sync", "async", "throttling", "inline"]
"""How a facade's sagas run: in the caller's call (`sync`), through the broker answered at once
(`async`) or at the saga's end (`throttling`), or in the caller's task (`inline`)."""


class FacadeSagaSettings(StrictModel):
    """One facade's settings, overriding the defaults of `sagas`."""

    deadline_seconds: float | None = Field(default=None, gt=0, le=30 * 86400)
    """A saga of this facade still running this long after it began is rolled back."""
    compensation_seconds: float | None = Field(default=None, gt=0, le=30 * 86400)
    """How long this facade's rollback may take before recovery runs it itself."""
    run_as: FacadeKindName | None = None
    """Run the facade as this kind instead of the one it was built as: an async facade as
    `throttling` or `inline`, a throttling one as `inline`. Unset: as built."""
    max_in_flight: int | None = Field(default=None, ge=0, le=1_000_000)
    """Calls of this facade in progress on this replica at most (0: no limit)."""
    max_wait_seconds: float | None = Field(default=None, gt=0, le=86400)
    """How long a throttling call of this facade waits for its saga's end at most."""


class SagaSettings(StrictModel):
    """How long sagas may take, how many run at once, and how each facade runs."""

    deadline_seconds: float = Field(default=300.0, gt=0, le=30 * 86400)
    """A saga still running this long after it began (a lost or dead-lettered message, a
    stuck node) is rolled back by recovery, with the cause in its record."""
    compensation_seconds: float = Field(default=120.0, gt=0, le=30 * 86400)
    """A saga still compensating this long (its rollback message lost or failing) has its
    compensation run by recovery; one that cannot succeed ends COMPENSATION_FAILED."""
    max_in_flight: int = Field(default=0, ge=0, le=1_000_000)
    """Calls of each sync, throttling or inline facade in progress on this replica at most;
    past it a new call gets RESOURCE_EXHAUSTED at once (0: no limit)."""
    max_wait_seconds: float = Field(default=180.0, gt=0, le=86400)
    """How long a throttling call waits for its saga's end at most (the caller's deadline may
    cut it shorter); then it gets DEADLINE_EXCEEDED and the saga goes on."""
    retry_pushback_seconds: float = Field(default=1.0, ge=0, le=3600)
    """How long a refused caller is asked to wait before trying again (the
    `grpc-retry-pushback-ms` trailer of a RESOURCE_EXHAUSTED answer)."""
    facades: dict[str, FacadeSagaSettings] = Field(default_factory=dict)
    """Per-facade settings by facade name; a facade named here must be registered."""

    def own(self, facade: str) -> FacadeSagaSettings:
        """`facade`'s own settings (all unset when it has none)."""
        return self.facades.get(facade) or FacadeSagaSettings()

    def deadlines_of(self, facade: str) -> tuple[float, float]:
        """`facade`'s (deadline_seconds, compensation_seconds)."""
        own = self.own(facade)
        return (
            own.deadline_seconds or self.deadline_seconds,
            own.compensation_seconds or self.compensation_seconds,
        )

    def max_in_flight_of(self, facade: str) -> int:
        """How many calls of `facade` may be in progress on this replica (0: no limit)."""
        own = self.own(facade).max_in_flight
        return self.max_in_flight if own is None else own

    def max_wait_of(self, facade: str) -> float:
        """How long a throttling call of `facade` waits for its saga's end at most."""
        return self.own(facade).max_wait_seconds or self.max_wait_seconds


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
    """Saga deadlines, admission control, and how each facade runs."""
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
    workers: int = Field(default=1, ge=0, le=1024)
    """Orchestrator processes sharing the gRPC port under a supervisor (0: one per core). More
    than one needs a broker and a store they share and a fixed `grpc.port`. Env: `ORCH_WORKERS`;
    `--workers N` on the command line."""

    @model_validator(mode="after")
    def _workers_share_what_they_need(self) -> Settings:
        if self.workers == 1:
            return self
        what = "one per core" if self.workers == 0 else f"{self.workers}"
        if self.broker.scheme == "memory":
            raise ValueError(
                f"workers: {what} cannot share broker.url memory:// (each process would have "
                "a broker of its own): use amqp://, amqps:// or nats://"
            )
        if self.store.url.get_secret_value() in ("", "memory://"):
            raise ValueError(
                f"workers: {what} cannot share a store in memory (each process would have its "
                "own): set store.url to sqlite+aiosqlite:///... or postgresql+asyncpg://..."
            )
        if self.grpc.port == 0:
            raise ValueError(
                f"workers: {what} need a fixed grpc.port to share (0 would give each its own)"
            )
        return self


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
    apply_environment(raw, env)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: {_describe(exc)}") from None


def config_reference(model: type[BaseModel]) -> str:
    """A Markdown reference of every key of `model` and of the environment variables.

    Built from the models themselves (types, defaults, bounds and attribute
    docstrings), so documentation generated with it cannot drift.
    """
    return markdown_reference(model, ENVIRONMENT_VARIABLES)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{key}: {message}" if key else message)
    return "; ".join(problems)
