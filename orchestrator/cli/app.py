"""The `orchestrator` command: its options, its `sagas` and `dlq` commands, and their help."""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.client import Connection, OrchestratorClient
from orchestrator.cli.errors import EXIT_CODES_HELP
from orchestrator.cli.rendering import OutputFormat, Renderer
from orchestrator.proto import saga_pb2

__all__ = ["DEFAULT_TARGET", "app"]

DEFAULT_TARGET = "127.0.0.1:10000"
"""Where the orchestrator is when neither --target nor ORCH_TARGET says."""
DEFAULT_TIMEOUT = 10.0
DEFAULT_LIMIT = 50

_HELP = (
    "Operate the sagas of a running orchestrator over gRPC (orchestrator.v1.SagaService and "
    "SagaAdmin): list, show and watch sagas; retry, compensate or resolve them; list, replay "
    "or discard dead letters. Connection options go before the command: "
    "`orchestrator --target HOST:PORT sagas list`."
)
_EPILOG = (
    f"{EXIT_CODES_HELP} Errors go to stderr, one line starting with the gRPC status name. "
    "--output defaults to table on a terminal and json otherwise."
)

app = typer.Typer(
    help=_HELP,
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
sagas_app = typer.Typer(
    help="Sagas: list, show, watch; retry, compensate, resolve.",
    epilog=_EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)
dlq_app = typer.Typer(
    help="Dead-lettered messages: list, replay, discard.",
    epilog=_EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(sagas_app, name="sagas")
app.add_typer(dlq_app, name="dlq")


class SagaStateChoice(enum.StrEnum):
    """The saga states `--state` accepts (any case)."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    RESOLVED = "RESOLVED"


class DeadLetterStateChoice(enum.StrEnum):
    """The dead-letter states `dlq list --state` accepts."""

    WAITING = "waiting"
    REPLAYED = "replayed"
    DISCARDED = "discarded"


_DEAD_LETTER_STATES = {
    DeadLetterStateChoice.WAITING: saga_pb2.DEAD_LETTER_WAITING,
    DeadLetterStateChoice.REPLAYED: saga_pb2.DEAD_LETTER_REPLAYED,
    DeadLetterStateChoice.DISCARDED: saga_pb2.DEAD_LETTER_DISCARDED,
}


@dataclass(frozen=True)
class Session:
    """What the root options decided, handed to each command."""

    connection: Connection
    renderer: Renderer

    def client(self) -> OrchestratorClient:
        """A client of the orchestrator, to use in a `with` block."""
        return OrchestratorClient(self.connection)


def _session(ctx: typer.Context) -> Session:
    session = ctx.find_root().obj
    assert isinstance(session, Session)
    return session


def _positive(value: float) -> float:
    if value <= 0:
        raise typer.BadParameter(f"must be more than 0 seconds; got {value:g}")
    return value


def _text(value: str | None) -> str | None:
    """Refuse a note or reason that is empty or white space only."""
    if value is not None and not value.strip():
        raise typer.BadParameter("must not be empty")
    return value


@app.callback()
def root(  # noqa: PLR0917 (Typer passes each option by name; the order is the help's)
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Option(envvar="ORCH_TARGET", help="host:port of the orchestrator's gRPC server."),
    ] = DEFAULT_TARGET,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="ORCH_ADMIN_TOKEN",
            show_default=False,
            help="Bearer token sent as `authorization` metadata. Never printed.",
        ),
    ] = None,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls", envvar="ORCH_TLS", help="Use TLS with the system's root certificates."
        ),
    ] = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            show_default=False,
            envvar="ORCH_TLS_CA",
            help="PEM root certificates to verify the server with (implies TLS).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            show_default=False,
            envvar="ORCH_TLS_CERT",
            help="PEM client certificate for mutual TLS (with --tls-key).",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            show_default=False,
            envvar="ORCH_TLS_KEY",
            help="PEM private key of --tls-cert.",
        ),
    ] = None,
    tls_server_name: Annotated[
        str | None,
        typer.Option(
            envvar="ORCH_TLS_SERVER_NAME",
            show_default=False,
            help="Name the server's certificate must carry, if not the target's host.",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            envvar="ORCH_TIMEOUT",
            callback=_positive,
            help="Seconds each call may take (for watch: the first answer).",
        ),
    ] = DEFAULT_TIMEOUT,
    output: Annotated[
        OutputFormat | None,
        typer.Option(
            "--output",
            "-o",
            envvar="ORCH_OUTPUT",
            case_sensitive=False,
            show_default=False,
            help="table or json. Default: table on a terminal, json otherwise.",
        ),
    ] = None,
) -> None:
    """Operate the sagas of a running orchestrator."""
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter(
            "--tls-cert and --tls-key go together", param_hint="'--tls-cert' / '--tls-key'"
        )
    if output is None:
        output = OutputFormat.TABLE if sys.stdout.isatty() else OutputFormat.JSON
    connection = Connection(
        target=target,
        timeout=timeout,
        token=token or None,
        tls=tls,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_server_name=tls_server_name,
    )
    ctx.obj = Session(connection, Renderer(output))


_Facade = Annotated[
    str,
    typer.Option(
        "--facade",
        "-f",
        help="The saga's facade; needed only when several facades hold the request id.",
    ),
]
_RequestId = Annotated[str, typer.Argument(help="The saga's request id.", show_default=False)]
_Limit = Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most this many.")]


@sagas_app.command("list", epilog=_EPILOG)
def list_sagas(
    ctx: typer.Context,
    facade: Annotated[str, typer.Option("--facade", "-f", help="Only this facade's sagas.")] = "",
    state: Annotated[
        SagaStateChoice | None,
        typer.Option(
            "--state", "-s", case_sensitive=False, show_default=False, help="Only sagas in it."
        ),
    ] = None,
    limit: _Limit = DEFAULT_LIMIT,
    prefix: Annotated[
        str,
        typer.Option("--prefix", "-p", help="Only sagas whose request id starts with this."),
    ] = "",
) -> None:
    """List sagas, newest first."""
    session = _session(ctx)
    proto_state = saga_pb2.SagaState.Value(state.value) if state else 0
    with session.client() as client:
        page = client.list_sagas(
            facade=facade, state=proto_state, limit=limit, request_id_prefix=prefix
        )
    session.renderer.saga_list(page)


@sagas_app.command("show", epilog=_EPILOG)
def show_saga(ctx: typer.Context, request_id: _RequestId, facade: _Facade = "") -> None:
    """Show one saga: its state, the timeline of its steps and the operators' actions."""
    session = _session(ctx)
    with session.client() as client:
        saga = client.get_saga(request_id, facade)
    session.renderer.saga(saga)


@sagas_app.command("watch", epilog=_EPILOG)
def watch_saga(ctx: typer.Context, request_id: _RequestId, facade: _Facade = "") -> None:
    """Follow a saga: a line now and one per change, until it ends (Ctrl+C to stop)."""
    session = _session(ctx)
    with session.client() as client:
        for saga in client.watch_saga(request_id, facade):
            session.renderer.saga_change(saga)


@sagas_app.command("retry", epilog=_EPILOG)
def retry_saga(
    ctx: typer.Context,
    request_id: _RequestId,
    note: Annotated[
        str, typer.Option(callback=_text, help="What was fixed; kept in the saga's record.")
    ],
    facade: _Facade = "",
) -> None:
    """Run a saga again from where it stopped (COMPENSATION_FAILED, or RUNNING and stuck)."""
    session = _session(ctx)
    with session.client() as client:
        saga = client.retry_saga(request_id, note, facade)
    session.renderer.saga(saga)


@sagas_app.command("compensate", epilog=_EPILOG)
def compensate_saga(
    ctx: typer.Context,
    request_id: _RequestId,
    reason: Annotated[
        str, typer.Option(callback=_text, help="Why; it becomes the saga's error reason.")
    ],
    facade: _Facade = "",
) -> None:
    """Roll a RUNNING saga back now."""
    session = _session(ctx)
    with session.client() as client:
        saga = client.compensate_saga(request_id, reason, facade)
    session.renderer.saga(saga)


@sagas_app.command("resolve", epilog=_EPILOG)
def resolve_saga(
    ctx: typer.Context,
    request_id: _RequestId,
    note: Annotated[
        str, typer.Option(callback=_text, help="What was done by hand; kept in the record.")
    ],
    facade: _Facade = "",
) -> None:
    """Record that a saga was settled by hand: it ends RESOLVED."""
    session = _session(ctx)
    with session.client() as client:
        saga = client.resolve_saga(request_id, note, facade)
    session.renderer.saga(saga)


@dlq_app.command("list", epilog=_EPILOG)
def list_dead_letters(
    ctx: typer.Context,
    topic: Annotated[str, typer.Option("--topic", "-t", help="Only this topic's.")] = "",
    facade: Annotated[
        str, typer.Option("--facade", "-f", help="Only those of this facade's sagas.")
    ] = "",
    state: Annotated[
        DeadLetterStateChoice,
        typer.Option("--state", "-s", case_sensitive=False, help="Which ones."),
    ] = DeadLetterStateChoice.WAITING,
    limit: _Limit = DEFAULT_LIMIT,
) -> None:
    """List dead-lettered messages, newest first, with their sagas."""
    session = _session(ctx)
    with session.client() as client:
        page = client.list_dead_letters(
            topic=topic, facade=facade, state=_DEAD_LETTER_STATES[state], limit=limit
        )
    session.renderer.dead_letter_list(page)


_DeadLetterId = Annotated[str, typer.Argument(help="The dead letter's id.", show_default=False)]


@dlq_app.command("replay", epilog=_EPILOG)
def replay_dead_letter(
    ctx: typer.Context,
    dead_letter_id: _DeadLetterId,
    note: Annotated[
        str | None,
        typer.Option(callback=_text, show_default=False, help="Why; kept with the message."),
    ] = None,
) -> None:
    """Put a dead-lettered message back on its topic (once)."""
    session = _session(ctx)
    with session.client() as client:
        letter = client.replay_dead_letter(dead_letter_id, note or "")
    session.renderer.dead_letter(letter)


@dlq_app.command("discard", epilog=_EPILOG)
def discard_dead_letter(
    ctx: typer.Context,
    dead_letter_id: _DeadLetterId,
    note: Annotated[str, typer.Option(callback=_text, help="Why: kept with the message.")],
) -> None:
    """Drop a dead-lettered message (once)."""
    session = _session(ctx)
    with session.client() as client:
        letter = client.discard_dead_letter(dead_letter_id, note)
    session.renderer.dead_letter(letter)
