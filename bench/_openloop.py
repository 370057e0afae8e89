"""Open-loop load: calls offered at a fixed rate, whatever became of the earlier ones.

As `vegeta attack -rate R` does, the k-th call of a run starts at t0 + k/R: a
slow or refused call does not hold the next one back, so a target past its
capacity sees the load it would see from many independent clients, and the
run shows what it does with the excess (refuse it, queue it, time out). The
only limit on calls in progress is a large safety one (`--max-outstanding`),
and a call it holds back is reported.

The schedule runs for `--warmup` + `--seconds`, and the run waits for every
call it started (each bounded by its deadline) before it ends. Its throughput
is what the target answered OK inside the window (after the warm-up), whichever
call it was: past capacity, what the target sustains. Its refusals, other
errors and latencies are those of the calls scheduled inside the window, a
latency running from the call's scheduled start, so time the generator itself
lost is never hidden. How late the generator started calls (its lag) is
reported: a run where half the calls started more than 20 ms late, or that
started them at less than 90% of the rate asked, fell behind its schedule (it
offered less than asked) and is flagged; one where a tenth started late kept
the rate in bursts (the machine did not give the generator the CPU on time).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from bench._runs import Load, Run, report_leftovers
from bench.common import TARGETS, Target, booking_stubs, mean, new_request_id, percentile
from pb import booking_pb2

REFUSED: Final = "RESOURCE_EXHAUSTED"
"""A call the target refused by admission control: RESOURCE_EXHAUSTED with the
`grpc-retry-pushback-ms` trailer (the framework's, and the baselines' that refuse)."""
PUSHBACK_TRAILER: Final = "grpc-retry-pushback-ms"
UNPACED: Final = "RESOURCE_EXHAUSTED(no pushback)"
"""RESOURCE_EXHAUSTED without the trailer: gRPC itself refused the call (too many calls not
yet handed to the application, say), not the target's admission control."""
OVERLOAD_CODES: Final = frozenset({REFUSED, UNPACED, "DEADLINE_EXCEEDED"})
"""What overload looks like to a caller: figures of a run, not failures of the bench."""
LATE_SECONDS: Final = 0.020
"""A call started later than this after its scheduled time started late."""
LEAD_SECONDS: Final = 0.01
"""Between arming the schedule and its first call."""

Call = Callable[[int, float, bool], Awaitable[None]]
"""`call(k, due, counted)`: make the k-th call, scheduled at `due` (time.monotonic), and
record it in the run when `counted` (scheduled inside the window)."""


def ms(seconds: float) -> str:
    """`12.3ms`."""
    return f"{seconds * 1000:.1f}ms"


def spread(values: Sequence[float]) -> str:
    """`p50=1.0ms p90=2.0ms p99=3.0ms max=4.0ms`."""
    if not values:
        return "p50=- p90=- p99=- max=-"
    quantiles = [f"p{round(q * 100)}={ms(percentile(values, q))}" for q in (0.5, 0.9, 0.99)]
    return " ".join([*quantiles, f"max={ms(max(values))}"])


@dataclass
class OpenLoopRun(Run):
    """One open-loop run. Its throughput is what the target answered inside the window
    (`answered`, whichever call it was); its refusals, errors and latencies are those of the
    calls scheduled inside the window (`latencies`: from their scheduled start)."""

    unit_name: str = ""  # its summary gives the CPU per answered call
    rate: float = 0.0
    window: tuple[float, float] = (math.inf, -math.inf)
    """The window's first scheduled start and its end (time.monotonic)."""
    offered: int = 0
    """Calls started among those scheduled inside the window."""
    held_back: int = 0
    """Calls scheduled inside the window that the safety limit kept from starting."""
    lags: list[float] = field(default_factory=list)
    """How late each call of the window started after its scheduled time, in seconds."""
    span: float = 0.0
    """From the window's first scheduled start to the start of its last call, in seconds."""
    peak_outstanding: int = 0
    answered: int = 0
    """Calls answered OK inside the window."""
    completions: list[float] | None = None
    """The async bench's: scheduled start to payment recorded, of each completed saga."""
    completed_in_window: int = 0
    """The async bench's: sagas whose payment was recorded inside the window."""
    backlog: dict[str, int] = field(default_factory=dict)
    """Messages still queued for the target after the run had settled (bench/_broker.py)."""
    details: dict[str, str] = field(default_factory=dict)
    """When the first failed call of each status ended, and its details."""

    def in_window(self, moment: float) -> bool:
        """True when `moment` (time.monotonic) falls inside the window."""
        return self.window[0] <= moment <= self.window[1]

    @property
    def refused(self) -> int:
        """Calls refused with RESOURCE_EXHAUSTED."""
        return self.errors[REFUSED]

    @property
    def other_errors(self) -> int:
        """Calls that failed with another status than RESOURCE_EXHAUSTED."""
        return sum(self.errors.values()) - self.refused

    @property
    def failed(self) -> int:
        """Calls that failed otherwise than overload does, plus calls held back."""
        other = sum(n for code, n in self.errors.items() if code not in OVERLOAD_CODES)
        return other + self.held_back

    @property
    def behind(self) -> bool:
        """True when the generator did not keep its schedule: half its calls started late, or
        it started them at less than 90% of the rate asked."""
        return percentile(self.lags, 0.5) > LATE_SECONDS or self.offered_rate < 0.9 * self.rate

    @property
    def bursty(self) -> bool:
        """True when 10% of the calls started late: the generator kept the rate on average but
        was not always given the CPU on time."""
        return percentile(self.lags, 0.9) > LATE_SECONDS

    def per_second(self, count: int) -> float:
        """`count` over the window's length."""
        return count / self.seconds

    @property
    def offered_rate(self) -> float:
        """Calls started per second of the window (less than asked when it fell behind)."""
        return self.offered / max(self.seconds, self.span)

    @property
    def done(self) -> list[float]:
        """The latencies of the answered calls; for the async bench, of the completed sagas."""
        return self.latencies if self.completions is None else self.completions

    @property
    def goodput(self) -> float:
        """Calls answered OK per second of the window; for the async bench, sagas completed."""
        done = self.answered if self.completions is None else self.completed_in_window
        return self.per_second(done)

    def line(self) -> str:
        """`framework run 1: offered 800/s answered 190/s refused 610/s errors=0 latency ...`."""
        other = {code: n for code, n in self.errors.items() if code != REFUSED}
        detail = ", ".join(f"{code}={n}" for code, n in sorted(other.items()))
        return (
            f"{self.target} run {self.number}: offered {self.offered_rate:.0f}/s"
            f" answered {self.per_second(self.answered):.0f}/s"
            f" refused {self.per_second(self.refused):.0f}/s"
            f" errors={self.other_errors}{f' ({detail})' if detail else ''}"
            f" latency {spread(self.latencies)}"
        )

    def schedule(self) -> str:
        """Whether the generator kept its schedule."""
        if self.behind:
            return "!!! THE LOAD GENERATOR FELL BEHIND ITS SCHEDULE: it offered less than asked !!!"
        if self.bursty:
            return "kept on average, in bursts (the machine is busy)"
        return "kept"

    def notes(self) -> list[str]:
        """The schedule's line, and the async bench's sagas line."""
        lines = [
            f"  schedule: asked {self.rate:g}/s, start lag {spread(self.lags)},"
            f" peak {self.peak_outstanding} calls in progress: {self.schedule()}"
        ]
        lines += [f"  first {code} {detail}" for code, detail in sorted(self.details.items())]
        if self.held_back:
            lines.append(f"  !!! {self.held_back} calls held back by --max-outstanding !!!")
        if self.backlog:
            lines.append(
                f"  !!! backlog: {sum(self.backlog.values())} messages still queued after the"
                f" run had settled ({self.backlog}): the next run shares the machine with them !!!"
            )
        if self.completions is not None:
            lines.append(
                f"  sagas: completed {self.goodput:.0f}/s, submit to payment"
                f" {spread(self.completions)}, never_completed={self.never_completed}"
                + ("  <<< !!! LOST OR LATE SAGAS !!!" if self.never_completed else "")
            )
        return lines


async def offer(run: OpenLoopRun, call: Call, load: Load) -> None:
    """Start `call` on schedule, `run.rate` a second for the warm-up + `run.seconds`, then wait
    for every call started."""
    clock = time.monotonic
    interval = 1.0 / run.rate
    first = math.ceil(load.warmup * run.rate)
    total = first + round(run.seconds * run.rate)
    in_progress: set[asyncio.Task[None]] = set()
    start = clock() + LEAD_SECONDS
    run.window = (start + first * interval, start + first * interval + run.seconds)
    for k in range(total):
        due = start + k * interval
        if (delay := due - clock()) > 0:
            await asyncio.sleep(delay)
        counted = k >= first
        if counted:
            run.lags.append(clock() - due)
        if len(in_progress) >= load.max_outstanding:
            run.held_back += counted
            continue
        task = asyncio.create_task(call(k, due, counted))
        in_progress.add(task)
        task.add_done_callback(in_progress.discard)
        if counted:
            run.offered += 1
            run.peak_outstanding = max(run.peak_outstanding, len(in_progress))
    run.span = clock() - run.window[0]
    await asyncio.gather(*in_progress)


async def timed_call(
    run: OpenLoopRun,
    rpc: Callable[..., Awaitable[Any]],
    request_id: str,
    due: float,
    *,
    counted: bool,
    call_timeout: float,
) -> bool:
    """Call `rpc` (ProductID 1, `x-request-id` `request_id`); record its answer or status in
    `run` when `counted`. True when it answered OK."""
    try:
        await rpc(
            booking_pb2.BookingRequest(ProductID=1),
            metadata=(("x-request-id", request_id),),
            timeout=call_timeout,
        )
    except grpc.aio.AioRpcError as exc:
        if counted:
            code = exc.code().name
            trailers = exc.trailing_metadata() or ()
            if code == REFUSED and all(key != PUSHBACK_TRAILER for key, _ in trailers):
                code = UNPACED
            run.errors[code] += 1
            run.details.setdefault(code, f"after {ms(time.monotonic() - due)}: {exc.details()!r}")
        return False
    answered = time.monotonic()
    run.answered += run.in_window(answered)
    if counted:
        run.latencies.append(answered - due)
    return True


async def offer_rpc(run: OpenLoopRun, address: str, method: str, run_id: str, load: Load) -> None:
    """An open-loop run of BookingService's `method`, an RPC that answers at the end of its
    work (sync, throttling), over `load.channels` channels."""
    async with booking_stubs(address, load.channels) as stubs:

        async def call(k: int, due: float, counted: bool) -> None:
            rpc = getattr(stubs[k % len(stubs)], method)
            request_id = new_request_id(run_id)
            if await timed_call(
                run, rpc, request_id, due, counted=counted, call_timeout=load.call_timeout
            ):
                run.completed += 1

        await offer(run, call, load)


def summarize_open(results: Sequence[Run], leftovers: Mapping[str, int]) -> int:
    """Print the open-loop means, what compares (throughput under the same offered load, and
    each side's latency: a ratio of latencies would say nothing), any invalid run, and
    `answered_ratio=` (async: `completed_ratio=`) last; return the exit status."""
    runs = [result for result in results if isinstance(result, OpenLoopRun)]
    goodput: dict[Target, float] = {}
    p99: dict[Target, float] = {}
    what = "completed" if any(run.completions is not None for run in runs) else "answered"
    unit = "saga" if what == "completed" else "answered call"
    for target in TARGETS:
        mine = [run for run in runs if run.target == target]
        goodput[target] = mean([run.goodput for run in mine])
        p99[target] = mean([percentile(run.done, 0.99) for run in mine])
        other = mean([run.per_second(run.other_errors) for run in mine])
        cpu = [c for run in mine if (c := run.per_unit(run.server_cpu)) is not None]
        print(
            f"{target} mean: offered {mean([run.offered_rate for run in mine]):.0f}/s,"
            f" answered {mean([run.per_second(run.answered) for run in mine]):.0f}/s,"
            f" refused {mean([run.per_second(run.refused) for run in mine]):.0f}/s,"
            f" other errors {other:.0f}/s"
            f" (latency p99 per run: {', '.join(ms(percentile(r.latencies, 0.99)) for r in mine)};"
            f" max per run: {', '.join(ms(max(r.latencies, default=math.nan)) for r in mine)}"
            + (f"; server cpu {mean(cpu) * 1e6:.0f}us/{unit})" if cpu else ")")
        )
        if what == "completed":
            print(
                f"  sagas: completed {goodput[target]:.0f}/s (submit to payment p99 per run:"
                f" {', '.join(ms(percentile(r.completions or [], 0.99)) for r in mine)};"
                f" never completed: {sum(r.never_completed for r in mine)})"
            )
    ratio = goodput["framework"] / goodput["baseline"] if goodput["baseline"] else 0.0
    latency = "submit to payment" if what == "completed" else "latency"
    print(
        f"{what}/s framework/baseline: {ratio:.2f}; {latency} p99 framework"
        f" {ms(p99['framework'])}, baseline {ms(p99['baseline'])}"
        f" (each asked for {mean([run.rate for run in runs]):g}/s)"
    )
    status = 0
    if behind := sum(run.behind for run in runs):
        print(f"!!! the load generator fell behind its schedule in {behind} runs !!!")
        status = 1
    if failed := sum(run.failed for run in runs):
        codes = collections.Counter[str]()
        for run in runs:
            codes.update({k: n for k, n in run.errors.items() if k not in OVERLOAD_CODES})
        detail = ", ".join(f"{code}={n}" for code, n in sorted(codes.items()))
        print(
            f"!!! {failed} calls failed otherwise than by overload ({detail or 'none'}),"
            " or were held back !!!"
        )
        status = 1
    if backlogged := sum(bool(run.backlog) for run in runs):
        print(f"!!! {backlogged} runs left a backlog the next run shared the machine with !!!")
        status = 1
    status = max(status, report_leftovers(leftovers))
    print(f"{what}_ratio={ratio:.2f}")
    return status
