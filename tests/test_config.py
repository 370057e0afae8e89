"""Configuration: app.yaml into pydantic models, with clear errors and environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from main import AppSettings
from orchestrator.config import BrokerSettings, Settings, load_settings, redact_url
from orchestrator.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "app.yaml"
    path.write_text(text)
    return path


def test_the_root_app_yaml_is_the_embedded_default() -> None:
    settings = load_settings(AppSettings, ROOT / "app.yaml", environ={})

    assert settings.grpc.port == 10000
    assert settings.broker.scheme == "memory"
    assert settings.embedded_upstreams.order is not None
    assert settings.embedded_upstreams.payment is not None


def test_the_local_deployment_app_yaml_is_valid() -> None:
    settings = load_settings(AppSettings, ROOT / "deployment/local/app.yaml", environ={})

    assert settings.broker.scheme == "amqp"
    assert settings.embedded_upstreams.order is None


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "grpc:\n  prot: 1\n")
    with pytest.raises(ConfigError, match=r"app.yaml: grpc.prot: unknown key"):
        load_settings(Settings, path, environ={})


def test_a_bad_value_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\n  topics:\n    create_order: {concurrency: 0}\n")
    with pytest.raises(
        ConfigError, match=r"broker.topics.create_order.concurrency: Input should be"
    ):
        load_settings(Settings, path, environ={})


def test_an_unsupported_broker_scheme_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\n  url: kafka://localhost\n")
    with pytest.raises(ConfigError, match="unsupported scheme 'kafka'"):
        load_settings(Settings, path, environ={})


def test_a_nats_url_selects_nats_and_its_token_or_password_is_masked() -> None:
    token = BrokerSettings.model_validate({"url": "nats://s3cret-token@host:4222"})
    password = BrokerSettings.model_validate({"url": "nats://user:s3cret-pw@host:4222"})

    assert token.scheme == "nats"
    assert token.safe_url == "nats://***@host:4222"
    assert password.safe_url == "nats://user:***@host:4222"


def test_a_nats_topic_prefix_must_start_subjects(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\n  url: nats://localhost\n  topic_prefix: 'a b.'\n")
    with pytest.raises(ConfigError, match="topic_prefix must be empty or dot-separated"):
        load_settings(Settings, path, environ={})


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_settings(Settings, tmp_path / "nope.yaml", environ={})


def test_invalid_yaml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(Settings, write(tmp_path, "grpc: [1\n"), environ={})


def test_environment_overrides_port_broker_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, "grpc: {port: 1}\n")
    settings = load_settings(
        Settings,
        environ={
            "ORCH_CONFIG": str(path),
            "ORCH_GRPC_PORT": "2345",
            "ORCH_BROKER_URL": "amqp://u:p@h:5672/",
        },
    )

    assert settings.grpc.port == 2345
    assert settings.broker.url.get_secret_value() == "amqp://u:p@h:5672/"


def test_the_broker_password_never_shows_in_reprs_or_errors(tmp_path: Path) -> None:
    settings = BrokerSettings(url="amqp://user:s3cret-pw@host:5672/")  # type: ignore[arg-type]
    assert "s3cret-pw" not in repr(settings)
    assert settings.safe_url == "amqp://user:***@host:5672/"

    path = write(tmp_path, "broker:\n  url: amqp://user:s3cret-pw@host/\n  bogus: 1\n")
    with pytest.raises(ConfigError) as failure:
        load_settings(Settings, path, environ={})
    assert "s3cret-pw" not in str(failure.value)


def test_redact_url_leaves_urls_without_password_alone() -> None:
    assert redact_url("amqp://guest@localhost/") == "amqp://guest@localhost/"
    assert redact_url("memory://") == "memory://"


def test_per_topic_concurrency_falls_back_to_the_default() -> None:
    settings = BrokerSettings.model_validate(
        {"default_concurrency": 8, "topics": {"create_order": {"concurrency": 64}}}
    )

    assert settings.concurrency_of("create_order") == 64
    assert settings.concurrency_of("create_payment") == 8


def test_the_readme_config_reference_is_current() -> None:
    from tools.config_reference import README, rendered

    current = README.read_text(encoding="utf-8")
    assert current == rendered(current), "run: python tools/config_reference.py"


def test_every_field_is_documented() -> None:
    from orchestrator.config import config_reference

    for row in config_reference(AppSettings).splitlines():
        if row.startswith("| `"):
            assert not row.rstrip().endswith("|  |"), f"undocumented: {row}"


def test_every_documented_environment_variable_takes_effect(tmp_path: Path) -> None:
    from orchestrator.config import ENVIRONMENT_VARIABLES

    path = write(tmp_path, "{}\n")
    pem = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca", "bca", "bc", "bk")}
    for file in pem.values():
        file.write_text("-----BEGIN CERTIFICATE-----\n")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("- {name: bot, role: read, token: abcdefghijklmnop}\n")
    environ = {
        "ORCH_CONFIG": str(path),
        "ORCH_GRPC_PORT": "4321",
        "ORCH_BROKER_URL": "amqps://x@h/",
        "ORCH_METRICS_PORT": "9999",
        "ORCH_STORE_URL": "sqlite+aiosqlite:///x.db",
        "ORCH_UI_PORT": "8765",
        "ORCH_GRPC_TLS_CERT": str(pem["cert"]),
        "ORCH_GRPC_TLS_KEY": str(pem["key"]),
        "ORCH_GRPC_TLS_CLIENT_CA": str(pem["ca"]),
        "ORCH_BROKER_TLS_CA": str(pem["bca"]),
        "ORCH_BROKER_TLS_CERT": str(pem["bc"]),
        "ORCH_BROKER_TLS_KEY": str(pem["bk"]),
        "ORCH_ACCESS_TOKENS_FILE": str(tokens),
        "ORCH_WORKERS": "2",
    }
    assert set(environ) == set(ENVIRONMENT_VARIABLES)
    settings = load_settings(Settings, environ=environ)
    assert settings.grpc.port == 4321
    assert settings.broker.scheme == "amqps"
    assert settings.grpc.tls is not None
    assert (settings.grpc.tls.cert_file, settings.grpc.tls.key_file) == (pem["cert"], pem["key"])
    assert settings.grpc.tls.client_ca_file == pem["ca"]
    assert settings.broker.tls is not None
    assert settings.broker.tls.ca_file == pem["bca"]
    assert (settings.broker.tls.cert_file, settings.broker.tls.key_file) == (pem["bc"], pem["bk"])
    assert [token.name for token in settings.access.all_tokens] == ["bot"]
    assert settings.metrics.enabled and settings.metrics.port == 9999
    assert settings.ui.enabled and settings.ui.port == 8765
    assert settings.store.url.get_secret_value() == "sqlite+aiosqlite:///x.db"
    assert settings.workers == 2
