"""The environment variables `load_settings` reads, and how each overrides the file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ENVIRONMENT_VARIABLES", "apply_environment"]

ENVIRONMENT_VARIABLES: dict[str, str] = {
    "ORCH_CONFIG": "Path of the configuration file (default `app.yaml`).",
    "ORCH_GRPC_PORT": "Overrides `grpc.port`.",
    "ORCH_BROKER_URL": "Overrides `broker.url`; keep credentials out of config files with it.",
    "ORCH_METRICS_PORT": "Sets `metrics.port` and turns `metrics.enabled` on.",
    "ORCH_STORE_URL": "Overrides `store.url`; keep database credentials out of config files.",
    "ORCH_UI_PORT": "Sets `ui.port` and turns `ui.enabled` on.",
    "ORCH_WORKERS": "Overrides `workers` (`--workers N` overrides both).",
    "ORCH_GRPC_TLS_CERT": "Sets `grpc.tls.cert_file`.",
    "ORCH_GRPC_TLS_KEY": "Sets `grpc.tls.key_file`.",
    "ORCH_GRPC_TLS_CLIENT_CA": "Sets `grpc.tls.client_ca_file` (mutual TLS).",
    "ORCH_BROKER_TLS_CA": "Sets `broker.tls.ca_file`.",
    "ORCH_BROKER_TLS_CERT": "Sets `broker.tls.cert_file`.",
    "ORCH_BROKER_TLS_KEY": "Sets `broker.tls.key_file`.",
    "ORCH_ACCESS_TOKENS_FILE": "Sets `access.tokens_file`.",
}
"""The environment variables `load_settings` reads, with what each does."""


def apply_environment(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Write the variables of `env` that are set into the raw configuration `raw`."""
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
    if workers := env.get("ORCH_WORKERS"):
        raw["workers"] = workers
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
