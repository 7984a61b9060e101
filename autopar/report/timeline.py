"""Pipeline schedules simulated into a timeline: the events a chart draws.

The order each rank runs its actions in comes from ``autopar.schedule`` (the one home of
every schedule's order); ``simulate_schedule`` replays it with per-stage times and
point-to-point transfer times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from autopar._compat import StrEnum
from autopar.plan import Plan, Schedule
from autopar.schedule import Action, schedule_order


class EventKind(StrEnum):
    """What a pipeline rank is doing during an event."""

    FORWARD = "forward"
    BACKWARD = "backward"
    COMM = "comm"  # waiting on a point-to-point transfer from a neighbouring rank
    BUBBLE = "bubble"  # idle: pipeline fill/drain or waiting on a slower stage


class Event(NamedTuple):
    """A span of time on one pipeline rank."""

    stage: int
    """Pipeline rank (the chart row)."""
    kind: EventKind
    """What the rank is doing."""
    start_s: float
    """Start time from the beginning of the step."""
    end_s: float
    """End time."""
    micro_batch: int | None
    """Micro-batch being computed or received (None for bubbles)."""
    chunk: int = 0
    """Model chunk (virtual stage) on that rank: stage index // pp."""


def simulate_schedule(schedule: Schedule, *, pp: int, num_micro_batches: int,
                      forward_time_s: Sequence[float], backward_time_s: Sequence[float],
                      virtual_stages: int = 1, p2p_time_s: float = 0.0) -> list[Event]:
    """Replay a schedule: each rank runs its actions in order, each as soon as its inputs have arrived.

    A forward of stage s needs stage s − 1's forward of the same micro-batch, plus one
    transfer; a backward needs stage s + 1's backward (the last stage: its own forward).
    The gaps each rank spends waiting become ``comm`` events (while a transfer it waits
    on is in flight) and ``bubble`` events (the rest), up to the end of the last action.

    Args:
        schedule: the pipeline schedule.
        pp: pipeline ranks.
        num_micro_batches: micro-batches per step.
        forward_time_s: forward time of one micro-batch per stage, in model order (pp · v entries).
        backward_time_s: backward time of one micro-batch per stage (pp · v entries).
        virtual_stages: chunks per rank.
        p2p_time_s: time of one activation or gradient transfer between neighbouring stages.

    Returns:
        Events sorted by rank, then start time; they tile [0, makespan] on every rank.

    Raises:
        ValueError: wrong number of stage times, negative times, or an order that deadlocks.

    Example:
        >>> ev = simulate_schedule(Schedule.GPIPE, pp=2, num_micro_batches=2,
        ...                        forward_time_s=[1, 1], backward_time_s=[2, 2])
        >>> [(e.kind.value, e.start_s, e.end_s) for e in ev if e.stage == 1]
        [('bubble', 0.0, 1.0), ('forward', 1.0, 2.0), ('forward', 2.0, 3.0), ('backward', 3.0, 5.0), ('backward', 5.0, 7.0), ('bubble', 7.0, 9.0)]
    """
    num_stages = pp * virtual_stages
    if len(forward_time_s) != num_stages or len(backward_time_s) != num_stages:
        raise ValueError(f"need {num_stages} forward and backward times (pp={pp} × v={virtual_stages}), "
                         f"got {len(forward_time_s)} and {len(backward_time_s)}")
    if min(*forward_time_s, *backward_time_s, p2p_time_s) < 0:
        raise ValueError("stage and transfer times must be non-negative")
    orders = schedule_order(schedule, pp=pp, num_micro_batches=num_micro_batches, virtual_stages=virtual_stages)
    runs = _run(orders, num_stages, forward_time_s, backward_time_s, p2p_time_s)
    makespan = max((run[2] for rank_runs in runs for run in rank_runs), default=0.0)
    events: list[Event] = []
    for rank, rank_runs in enumerate(runs):
        events += _rank_events(rank, pp, rank_runs, makespan)
    return events


_Run = tuple[Action, float, float, float, float]
"""(action, start_s, end_s, input_sent_s, input_arrived_s): when it ran, and when its input left and arrived."""


def _run(orders: tuple[tuple[Action, ...], ...], num_stages: int, fwd: Sequence[float],
         bwd: Sequence[float], p2p_s: float) -> list[list[_Run]]:
    done: dict[tuple[int, bool, int], float] = {}
    free = [0.0] * len(orders)
    cursor = [0] * len(orders)
    runs: list[list[_Run]] = [[] for _ in orders]
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for rank, order in enumerate(orders):
            while cursor[rank] < len(order):
                action = order[cursor[rank]]
                ready = _ready_time(action, num_stages, done, p2p_s)
                if ready is None:
                    break
                sent_s, arrive_s = ready
                start = max(free[rank], arrive_s)
                end = start + (fwd[action.stage] if action.forward else bwd[action.stage])
                done[(action.stage, action.forward, action.micro_batch)] = end
                runs[rank].append((action, start, end, sent_s, arrive_s))
                free[rank], cursor[rank] = end, cursor[rank] + 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(o[cursor[r]]) for r, o in enumerate(orders) if cursor[r] < len(o)}
            raise ValueError(f"schedule deadlocks: ranks wait on each other at {stuck}")
    return runs


def _ready_time(action: Action, num_stages: int, done: dict[tuple[int, bool, int], float],
                p2p_s: float) -> tuple[float, float] | None:
    """(time the input left its producer, time it arrives), or None if the producer has not run."""
    s, mb = action.stage, action.micro_batch
    if action.forward:
        if s == 0:
            return 0.0, 0.0
        sent = done.get((s - 1, True, mb))
        return None if sent is None else (sent, sent + p2p_s)
    own_forward = done.get((s, True, mb))
    if own_forward is None:
        return None
    if s == num_stages - 1:
        return own_forward, own_forward
    sent = done.get((s + 1, False, mb))
    return None if sent is None else (sent, max(sent + p2p_s, own_forward))


def _rank_events(rank: int, pp: int, rank_runs: list[_Run], makespan: float) -> list[Event]:
    events: list[Event] = []
    clock = 0.0
    for action, start, end, sent_s, arrive_s in rank_runs:
        chunk = action.stage // pp
        if start > clock:  # a gap: split into idle, transfer in flight, idle
            comm_start, comm_end = max(clock, sent_s), min(start, arrive_s)
            if comm_end > comm_start:
                if comm_start > clock:
                    events.append(Event(rank, EventKind.BUBBLE, clock, comm_start, None))
                events.append(Event(rank, EventKind.COMM, comm_start, comm_end, action.micro_batch, chunk))
                if start > comm_end:
                    events.append(Event(rank, EventKind.BUBBLE, comm_end, start, None))
            else:
                events.append(Event(rank, EventKind.BUBBLE, clock, start, None))
        kind = EventKind.FORWARD if action.forward else EventKind.BACKWARD
        events.append(Event(rank, kind, start, end, action.micro_batch, chunk))
        clock = end
    if makespan > clock:
        events.append(Event(rank, EventKind.BUBBLE, clock, makespan, None))
    return events


def bubble_fraction(events: Sequence[Event]) -> float:
    """Share of rank-time not spent computing: (idle + waiting) / (ranks × makespan).

    Example:
        >>> ev = simulate_schedule(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=8,
        ...                        forward_time_s=[1] * 4, backward_time_s=[2] * 4)
        >>> round(bubble_fraction(ev), 4) == round(3 / (8 + 3), 4)
        True
    """
    if not events:
        return 0.0
    ranks = {e.stage for e in events}
    makespan = max(e.end_s for e in events)
    busy = sum(e.end_s - e.start_s for e in events if e.kind in (EventKind.FORWARD, EventKind.BACKWARD))
    return 1.0 - busy / (len(ranks) * makespan) if makespan > 0 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    """A plan's pipeline schedule, simulated for charting."""

    events: tuple[Event, ...]
    """Events on every rank (see ``simulate_schedule``)."""
    num_ranks: int
    """Pipeline ranks (chart rows)."""
    num_micro_batches: int
    """Micro-batches simulated."""
    total_micro_batches: int
    """Micro-batches per step in the plan (more than simulated when capped)."""
    p2p_time_s: float
    """Time of one stage-to-stage transfer used in the simulation."""

    @property
    def makespan_s(self) -> float:
        """End of the last event."""
        return max((e.end_s for e in self.events), default=0.0)

    @property
    def capped(self) -> bool:
        """Whether fewer micro-batches were simulated than the plan runs."""
        return self.num_micro_batches < self.total_micro_batches


DEFAULT_MAX_MICRO_BATCHES = 32
"""Micro-batches drawn at most; past fill and drain the steady state only repeats."""


def timeline_from_plan(plan: Plan, *, max_micro_batches: int = DEFAULT_MAX_MICRO_BATCHES) -> Timeline:
    """Simulate a plan's schedule from its layout and per-stage times.

    The point-to-point time per transfer is the plan's exposed ``p2p`` time per step spread
    over the transfers one rank receives (one per micro-batch per chunk, forward and backward).
    When the plan runs more micro-batches than ``max_micro_batches``, the first
    ``max_micro_batches`` (rounded down to a multiple of pp for interleaved 1F1B) are simulated.

    Args:
        plan: the plan to draw.
        max_micro_batches: cap on simulated micro-batches.

    Returns:
        The simulated timeline.
    """
    lay = plan.layout
    m = lay.num_micro_batches
    shown = min(m, max(1, max_micro_batches))
    if lay.schedule is Schedule.INTERLEAVED_1F1B and shown < m:
        shown = max(lay.pp, shown - shown % lay.pp)
    schedule = lay.schedule if lay.pp > 1 else Schedule.ONE_F_ONE_B
    transfers = 2 * m * lay.virtual_stages
    p2p = plan.predicted.communication.pp_p2p_s / transfers if lay.pp > 1 else 0.0
    events = simulate_schedule(
        schedule, pp=lay.pp, num_micro_batches=shown, virtual_stages=lay.virtual_stages,
        forward_time_s=[s.forward_time_s for s in plan.stages],
        backward_time_s=[s.backward_time_s for s in plan.stages], p2p_time_s=p2p,
    )
    return Timeline(events=tuple(events), num_ranks=lay.pp, num_micro_batches=shown,
                    total_micro_batches=m, p2p_time_s=p2p if math.isfinite(p2p) else 0.0)


__all__ = [
    "DEFAULT_MAX_MICRO_BATCHES",
    "Event",
    "EventKind",
    "Timeline",
    "bubble_fraction",
    "simulate_schedule",
    "timeline_from_plan",
]
