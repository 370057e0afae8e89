"""The saga console: sagas, dead letters and health in a browser, served by the orchestrator.

Turn it on with `ui.enabled` (`ORCH_UI_PORT`), with the `console` extra
installed (`pip install 'saga-orchestrator[console]'`); `OrchestratorServer`
serves it on its own HTTP port from the same event loop as gRPC, and logs
its address at startup. Pages:

- **Sagas**: newest first, filtered by facade, state and request id prefix,
  paged, with counts by state; the first page follows new and changing
  sagas live.
- **A saga**: facade, state, request and error, a timeline of its steps,
  compensations and operator actions; followed live while it runs (through
  `WatchSaga` itself).
- **Dead letters**: every kept dead letter joined to its saga, with reason
  and delivery count.
- **Actions**: retry, compensate, resolve, replay and discard, each behind a
  confirmation and a note, calling the SagaAdmin servicer.
- **Health**: broker, store, sagas in flight, step latency.

Pages are server-rendered HTML (Jinja2, autoescaped); a small script, served
from the package like the stylesheet, shows times in the viewer's time zone
and applies live updates sent as Server-Sent Events. Everything works
without it, only not live. Access follows the admin API's rules (see
`orchestrator.console._auth`).
"""

from orchestrator.console._server import ConsoleServer

__all__ = ["ConsoleServer"]
