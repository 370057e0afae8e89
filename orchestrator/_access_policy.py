"""Who a call comes from and what it needs: the access rules, apart from gRPC's plumbing.

`AccessPolicy.decide` takes the method, the call's metadata and its TLS auth
context, and returns the principal to run as or the refusal (a status code and
a message that never quotes a secret).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from orchestrator.access import ANONYMOUS, Principal, Role
from orchestrator.config import AccessSettings

__all__ = [
    "ADMIN_SERVICE",
    "STATUS_SERVICE",
    "AccessPolicy",
    "Refusal",
    "required_role",
]

STATUS_SERVICE = "orchestrator.v1.SagaService"
ADMIN_SERVICE = "orchestrator.v1.SagaAdmin"
_READ_ADMIN_METHODS = frozenset({"ListDeadLetters"})
_AUTHORIZATION = "authorization"
_BEARER = "bearer "
_ROLES = {"read": Role.READ, "operate": Role.OPERATE}
_OPEN_STATUS = Principal("anonymous", Role.READ)
# Certificate identities gRPC puts in a mutual-TLS call's auth context.
_CERT_NAMES = ("x509_common_name", "x509_subject_alternative_name")


def required_role(method: str) -> Role | None:
    """The role `/package.Service/Method` needs, or None for a method access leaves alone."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service == STATUS_SERVICE:
        return Role.READ
    if service == ADMIN_SERVICE:
        return Role.READ if name in _READ_ADMIN_METHODS else Role.OPERATE
    return None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call is refused: its status code and a message safe to send and log."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True, slots=True, repr=False)
class _Token:
    digest: bytes
    principal: Principal


class AccessPolicy:
    """The configured credentials and the rules that map a call onto a principal."""

    def __init__(self, settings: AccessSettings) -> None:
        # Only digests are kept: equal-length values for compare_digest, no secret to leak.
        self._tokens = tuple(
            _Token(_digest(t.token.get_secret_value()), Principal(t.name, _ROLES[t.role]))
            for t in settings.all_tokens
        )
        self._certificates = {
            c.name: Principal(c.name, _ROLES[c.role]) for c in settings.client_certificates
        }
        self.enforced = settings.configured
        """False when no credential is configured: every call runs as ANONYMOUS."""
        self._open_status = settings.open_status

    def __repr__(self) -> str:
        return (
            f"AccessPolicy(tokens={len(self._tokens)}, "
            f"certificates={sorted(self._certificates)}, enforced={self.enforced})"
        )

    def decide(
        self,
        method: str,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Principal | Refusal:
        """The principal `method` runs as, or why it may not run."""
        if required_role(method) is None or not self.enforced:
            return ANONYMOUS
        principal = self._authenticate(metadata, auth_context)
        if isinstance(principal, Refusal):
            return principal
        return self.admit(method, principal)

    def authenticate_token(self, token: str) -> Principal | Refusal:
        """The principal a bearer token's secret proves (the console's sign-in), or the
        refusal of a token that matches none."""
        return self._token_principal([f"{_BEARER}{token}"])

    def admit(self, method: str, principal: Principal | None) -> Principal | Refusal:
        """The principal `method` runs as when called by `principal` (None: a caller without
        credentials), or why it may not run: the rules of `decide` once the caller is known."""
        needed = required_role(method)
        if needed is None or not self.enforced:
            return ANONYMOUS
        if principal is None:
            if self._open_status and method.lstrip("/").startswith(f"{STATUS_SERVICE}/"):
                return _OPEN_STATUS
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "credentials required: a bearer token or a known client certificate",
            )
        if not principal.may(needed):
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.name!r} has role {principal.role.name.lower()}; "
                f"{method} needs {needed.name.lower()}",
            )
        return principal

    def _authenticate(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Principal | Refusal | None:
        values = [value for key, value in metadata if key.lower() == _AUTHORIZATION]
        if values:
            return self._token_principal(values)
        for key in _CERT_NAMES:
            for identity in auth_context.get(key, ()):
                principal = self._certificates.get(identity.decode("utf-8", "replace"))
                if principal is not None:
                    return principal
        return None

    def _token_principal(self, values: Sequence[str | bytes]) -> Principal | Refusal:
        bad = Refusal(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        if len(values) != 1 or not isinstance(values[0], str):
            return bad
        value = values[0]
        if value[: len(_BEARER)].lower() != _BEARER:
            return bad
        digest = _digest(value[len(_BEARER) :].strip())
        found: Principal | None = None
        for token in self._tokens:  # every one compared, in constant time each
            if hmac.compare_digest(digest, token.digest):
                found = token.principal
        return bad if found is None else found


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()
