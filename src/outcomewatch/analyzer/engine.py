"""The outcome engine: live traces, open runs, verdicts. The reference for what a rule means.

Contract
- ``observe(batch)`` takes spans that are already committed; ``replay(spans)`` takes stored
  (span, received_ns) pairs after a restart; ``tick()`` advances time. Each returns the events
  it decided, in order (a run's RunOpened before its verdict): RunOpened, RunPassed, RunFailed,
  LateOutcome. All synchronous, no I/O, time read only from the injected clock.
- Only spans whose *name* some selector (trigger, expect or forbid) can match are decoded; the
  rest cost no Python step of their own: each distinct name of a batch is looked up once (the
  decision is cached per name) and the batch finds the positions of the names that matter
  (``SpanBatch.spans_named``, in Arrow for a worker's batch). When some rule has ``correlate``,
  the spans with links are visited too.

Runs
- A span matching a rule's ``trigger`` opens one run per (rule, trigger span): the run id is
  ``run_id_for(rule, trace_id, span_id)``, so a re-sent trigger never opens a second run.
- An expectation counts the *distinct* spans (by trace and span id) that match its selector
  (name, service, status, ``where``, ``duration``) in the trigger's trace, whenever they arrive:
  spans sent before the trigger count too. With ``after: trigger`` only spans whose start_ns is
  >= the trigger's start_ns count. It is met when the count reaches ``count.gte``: 1 without
  ``count``, 0 for a count without ``gte`` (``{lte: 1}``: at most once) or ``gte: 0``. Without
  an upper bound, the first ``gte`` spans counted are the ones that count (later ones are
  ignored). One span may count for several expectations (the trigger itself too).
- The run passes as soon as every expectation is met, unless some expectation has an upper
  bound (``count.lte``): then it can only pass when its wait ends (tick returns that RunPassed),
  since another match could still come. A match beyond ``lte`` fails the run at once: reason
  ``count``, the surplus spans in ``offending``.
- ``max_duration``: when every expectation is met but the latest end_ns among the counted spans
  is more than ``max_duration`` after the trigger's start_ns, the run fails (``max_duration``)
  instead of passing.
- ``forbid``: a span of the trigger's trace matching a ``forbid`` selector, sent before or after
  the trigger, fails the open run at once: reason ``forbidden``, that span in ``offending``,
  ``missing`` the expectations still unmet. Checked before counts and max_duration.
- The wait: a rule with ``within`` waits until trigger start + ``within`` (never later than
  opening time + ``within``: a client clock ahead of ours does not extend it), reason
  ``deadline``; without it the run waits for its trace to be idle for ``idle`` (no span of any
  kind), reason ``trace_idle``. Runs ended this way list the unmet expectations in ``missing``.
- ``group_by``: the trigger's values of those keys (attributes, then resource; missing: None),
  on RunPassed and RunFailed as ``group``.
- ``correlate`` (always with ``within``): an expectation may also be met by spans of other
  traces (1) that carry the trigger's values of every ``correlate`` key (attributes, then
  resource; typed equality as in ``where``; a trigger missing a key correlates by links only),
  or (2) of a trace X in which
  some span has an OTel link into the trigger's trace (to any of its spans): all of X counts.
  Such spans and links are held for the longest ``within`` of the correlated rules (clock time
  since seen), so outcomes sent before the trigger count. Links are read from every span while
  a correlated rule is loaded. The run's ``trace_id`` is its trigger's; ``forbid`` looks at the
  trigger's trace only.
- At risk: a span whose name and service match an expectation's selector but not its other
  conditions (status, ``where``, duration) gives a RunAtRisk for each open run of that rule in
  the trace that still wants the expectation (at most MAX_AT_RISK per run); a trace holds up to
  MAX_NEAR such near misses with status error until its first run opens, so a failed attempt
  exported before its trigger counts too. The run still waits: only ``forbid`` fails it at once.
- Verdicts are final. After a failure, the run's unmet expectations are remembered (the 10,000
  most recent failed runs, for 24h of clock time) by its trace (and correlate values): a
  matching span arriving later gives one LateOutcome per (run, expectation), nothing else.

Schedules (``schedule``): every cron slot is judged once, when the clock passes slot + grace.
A trigger span of the rule that *started* within [slot - grace, slot + grace] keeps the slot (a
start keeps one slot only); otherwise a RunFailed with reason ``missed``, trigger None, trace_id
"", id ``run_id_for(rule, "schedule", slot.isoformat())``, opened_at the slot. A trigger span is
exported when it *ends*: one that runs longer than its grace is seen too late and the slot is
reported missed, so make the trigger a span that ends soon after the job starts. Slots after
``schedule_since[rule]`` (else after the engine's creation) are judged; ``schedule_progress()``
tells how far each rule has been judged, for the next ``schedule_since``.

Bounded state: per trace and expectation at most ``lte + 1`` (else ``gte``) matching spans are
held (for ``after: trigger``: the latest-starting), one per forbid selector, so a huge trace
costs no more than a small one. ``max_live_traces`` / ``max_live_spans`` (held spans: those kept
plus the triggers of open runs) / ``max_live_bytes`` (``live_bytes``: the estimated memory of
live traces, held spans and open runs) bound the rest: past any after an observe, the oldest live
traces (by first seen) are dropped until under budget, each of their open runs failing with
reason ``evicted`` (``missing``: its unmet expectations, possibly none for a run waiting out an
upper bound); ``evicted_traces`` counts them. A trace is live while it holds a run or a span,
until it has been idle for ``idle`` and has no run with a pending deadline; a trace that holds
only outcome spans (no run yet) is kept until it has been idle for the longest ``within`` of
any rule (at least ``idle``), since its trigger may be a long root span exported last. Spans
and links held for ``correlate`` are bounded in time (above), not by ``max_live_spans``.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from outcomewatch.analyzer.correlate import Correlation
from outcomewatch.analyzer.late import LateOutcomes
from outcomewatch.analyzer.runs import (
    MAX_AT_RISK,
    NO_INTEREST,
    RUN_BYTES,
    CompiledRule,
    Expect,
    Forbid,
    Interest,
    LiveTrace,
    OpenRun,
    Verdict,
    compile_rules,
    correlation_key,
    group_values,
    interest_in,
    reload_rules,
    run_id_for,
    span_bytes,
)
from outcomewatch.analyzer.schedule import ScheduleWatch
from outcomewatch.clock import Clock, from_ns
from outcomewatch.model import (
    FailureReason,
    RunAtRisk,
    RunEvent,
    RunFailed,
    RunOpened,
    RunPassed,
    Span,
    SpanStatus,
    search_keys,
)
from outcomewatch.otlp import SpanBatch
from outcomewatch.rules import RuleSet

_CLOSED_MEMORY = 100_000  # run ids remembered after their verdict, to ignore re-sent triggers
_INTEREST_MEMORY = 65_536  # distinct span names cached; past it the cache starts over

__all__ = ["Engine", "run_id_for"]


class Engine:
    def __init__(
        self,
        rules: RuleSet,
        *,
        idle: timedelta,
        clock: Clock,
        max_live_traces: int | None = None,
        max_live_spans: int | None = None,
        max_live_bytes: int | None = None,
        schedule_since: Mapping[str, datetime] | None = None,
    ) -> None:
        self._idle = idle
        self._clock = clock
        self._max_traces = max_live_traces
        self._max_spans = max_live_spans
        self._max_bytes = max_live_bytes
        self._rules = compile_rules(rules)
        self._retired: tuple[CompiledRule, ...] = ()  # replaced, with runs still open
        self._interest: dict[str, Interest] = {}
        self._correlation: Correlation | None = None
        self._correlate_for_rules()
        self._hold_for_rules()
        self._late = LateOutcomes()
        self._schedules = ScheduleWatch(rules.rules, schedule_since, clock())
        self._live: dict[str, LiveTrace] = {}  # in the order first seen
        # (due time, sequence, trace id); an entry may be stale, and is re-checked when popped.
        self._due: list[tuple[datetime, int, str]] = []
        self._sequence = 0
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._open = 0
        self._held = 0
        self._bytes = 0
        # (now, now + idle) of the last new trace: new traces of one batch share the datetime.
        self._idle_due: tuple[datetime | None, datetime] = (None, datetime.min)
        self.evicted_traces = 0

    def load_rules(self, rules: RuleSet) -> None:
        """Replace the rules (hot reload). New spans are judged by the new rules. A rule whose
        definition did not change keeps its state (open runs, held spans, schedule progress); a
        run opened under a changed or removed rule is decided by the definition it opened with
        (that definition keeps receiving outcomes until its last run is decided)."""
        self._rules, self._retired = reload_rules(self._rules, self._retired, rules)
        self._interest.clear()
        self._correlate_for_rules()
        self._hold_for_rules()
        self._schedules.reload(rules.rules, self._clock())

    def _hold_for_rules(self) -> None:
        within = [r.rule.within for r in (*self._rules, *self._retired) if r.rule.within]
        self._hold = max([self._idle, *within])

    def _correlate_for_rules(self) -> None:
        within = [r.rule.within for r in (*self._rules, *self._retired)
                  if r.correlated and r.rule.within]
        if not within:
            self._correlation = None
        elif self._correlation is None:
            self._correlation = Correlation(max(within))
        else:
            self._correlation.horizon = max(within)

    @property
    def correlates(self) -> bool:
        """Whether some rule correlates traces (by links or shared ids)."""
        return self._correlation is not None

    def interesting(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that some rule triggers on, expects or forbids."""
        return [name for name in names
                if (self._interest.get(name) or self._interest_in(name)) is not NO_INTEREST]

    @property
    def live_traces(self) -> int:
        return len(self._live)

    @property
    def open_runs(self) -> int:
        return self._open

    @property
    def held_spans(self) -> int:
        """Spans held by live traces (kept candidates and open runs' triggers)."""
        return self._held

    @property
    def live_bytes(self) -> int:
        """Estimated memory of the live traces: their own state, held spans and open runs
        (``runs.span_bytes``, ``TRACE_BYTES``, ``RUN_BYTES``); what ``max_live_bytes`` bounds."""
        return self._bytes

    @property
    def correlated_spans(self) -> int:
        """Spans held for correlated rules (bounded in time, not by ``max_live_spans``)."""
        return self._correlation.held if self._correlation is not None else 0

    def schedule_progress(self) -> dict[str, datetime]:
        """Per scheduled rule, the instant up to which its slots have been judged."""
        return self._schedules.progress()

    def forget_closed(self, run_ids: list[str]) -> None:
        """Mark runs as already decided (used when rebuilding state after a restart)."""
        for run_id in run_ids:
            self._remember_closed(run_id)

    # -- spans in --------------------------------------------------------------------------

    def observe(self, batch: SpanBatch) -> list[RunEvent]:
        now = self._clock()
        events: list[RunEvent] = []
        self._expire(now)
        live = self._live
        for trace_id in batch.trace_ids():
            trace = live.get(trace_id)
            if trace is not None:
                trace.last_seen = now
                trace.last_received_ns = max(trace.last_received_ns, batch.received_ns)
        interest_of = self._interest.get
        # Only the spans of names some rule looks at (and, with correlation, the linked ones)
        # are visited, in batch order: most of a batch is neither.
        wanted = {name for name in batch.names()
                  if (interest_of(name) or self._interest_in(name)) is not NO_INTEREST}
        named = dict(batch.spans_named(wanted))
        decoded = dict(zip(named, batch.decode_many(list(named)), strict=True))
        linked = batch.linked() if self._correlation is not None else frozenset()
        for i in sorted(named.keys() | linked) if linked else named:
            name = named.get(i)
            if name is None:
                self._link(batch.trace_id_of(i), batch.link_targets(i), now, events)
                continue
            interest = interest_of(name) or self._interest_in(name)
            self._observe_span(decoded[i], interest, batch.received_ns, now, events)
        self._enforce_budget(now, events)
        return events

    def replay(self, spans: Iterable[tuple[Span, int]]) -> list[RunEvent]:
        """Observe stored (span, received_ns) pairs again, in the order received: rebuilds live
        traces and open runs after a restart. Runs already decided must first be passed to
        ``forget_closed`` so that their re-read triggers open nothing."""
        now = self._clock()
        events: list[RunEvent] = []
        self._expire(now)
        for span, received_ns in spans:
            trace = self._live.get(span.trace_id)
            if trace is not None:
                trace.last_seen = now
                trace.last_received_ns = max(trace.last_received_ns, received_ns)
            interest = self._interest.get(span.name) or self._interest_in(span.name)
            if interest is not NO_INTEREST:
                self._observe_span(span, interest, received_ns, now, events)
            elif self._correlation is not None and span.links:
                self._link(span.trace_id, [link.trace_id for link in span.links], now, events)
        self._enforce_budget(now, events)
        return events

    def _interest_in(self, name: str) -> Interest:
        if len(self._interest) >= _INTEREST_MEMORY:
            self._interest.clear()
        interest = self._interest[name] = interest_in(self._rules, name, self._retired)
        return interest

    def _observe_span(
        self, span: Span, interest: Interest, received_ns: int, now: datetime,
        events: list[RunEvent],
    ) -> None:
        if self._correlation is not None and span.links:
            self._link(span.trace_id, [link.trace_id for link in span.links], now, events)
        expects = [e for e in interest.expects if e.selector.matches(span)]
        forbids = [f for f in interest.forbids if f.selector.matches(span)]
        triggered = [r for r in interest.triggers if r.rule.trigger.matches(span)]
        near = [e for e in interest.expects
                if e not in expects and e.selector.matches_service(span.service)]
        if not expects and not forbids and not triggered and not near:
            return
        live = self._live.get(span.trace_id)
        if live is None:
            live = self._live[span.trace_id] = LiveTrace(span.trace_id, now, received_ns,
                                                         last_received_ns=received_ns)
            self._bytes += live.bytes
            if self._idle_due[0] is not now:
                self._idle_due = (now, now + self._idle)
            self._schedule(live, self._idle_due[1])
        for expect in expects:
            self._outcome(live, expect, span, now, events)
        for expect in near:
            self._near_miss(live, expect, span, now, events)
        for forbid in forbids:
            self._forbidden(live, forbid, span, now, events)
        for rule in triggered:
            self._trigger(live, rule, span, now, events)

    def _outcome(
        self, live: LiveTrace, expect: Expect, span: Span, now: datetime, events: list[RunEvent]
    ) -> None:
        self._keep(live, expect, span)
        if live.runs:
            for run in live.waiting(expect):
                self._offer(run, expect, span, now, events)
        values = None
        if self._correlation is not None and expect.rule.correlated:
            values = correlation_key(span, expect.rule.rule.correlate)
            for run in self._correlation.add_outcome(expect, span, values, now):
                self._offer(run, expect, span, now, events)
        if self._late:
            events.extend(self._late.match(expect, span, values, now))

    def _near_miss(
        self, live: LiveTrace, expect: Expect, span: Span, now: datetime,
        events: list[RunEvent],
    ) -> None:
        message = span.status_message or span.status.value
        for run in live.runs.values():
            if run.rule is expect.rule and run.wants(expect) and run.at_risk < MAX_AT_RISK:
                run.at_risk += 1
                events.append(RunAtRisk(run.run_id, run.rule.name, run.trace_id, span.name,
                                        message, now))
        if not live.had_run and span.status is SpanStatus.ERROR:
            # Its trigger may still come (exported after its children). Only errors are held:
            # a healthy-looking near miss of one rule is often another rule's outcome.
            self._bytes += live.keep_near(expect, span.name, message)

    def _forbidden(
        self, live: LiveTrace, forbid: Forbid, span: Span, now: datetime, events: list[RunEvent]
    ) -> None:
        self._keep(live, forbid, span)
        for run in list(live.runs.values()):
            if run.rule is forbid.rule and run.forbidden is None:
                run.forbidden = span
                self._settle(run, None, now, events)

    def _keep(self, live: LiveTrace, what: Expect | Forbid, span: Span) -> None:
        before = live.bytes
        self._held += live.keep(what, span)
        self._bytes += live.bytes - before

    def _link(self, trace_id: str, targets: list[str], now: datetime,
              events: list[RunEvent]) -> None:
        assert self._correlation is not None
        for target in targets:
            for run, candidates in self._correlation.add_link(trace_id, target, now):
                for expect, span in candidates:
                    self._offer(run, expect, span, now, events)

    # -- runs ------------------------------------------------------------------------------

    def _trigger(
        self, live: LiveTrace, rule: CompiledRule, trigger: Span, now: datetime,
        events: list[RunEvent],
    ) -> None:
        self._schedules.saw(rule.rule, trigger)
        run_id = run_id_for(rule.name, trigger.trace_id, trigger.span_id)
        if run_id in live.runs or run_id in self._closed:
            return
        deadline = None
        if rule.rule.within is not None:
            # From the trigger's start (a root span is exported only when it ends, possibly long
            # after it started), but a client clock ahead of ours must not extend the wait.
            deadline = min(from_ns(trigger.start_ns), now) + rule.rule.within
            self._schedule(live, deadline)
        values = correlation_key(trigger, rule.rule.correlate) if rule.correlated else None
        run = OpenRun(run_id, rule, trigger, now, deadline, group_values(rule.rule, trigger),
                      values, [None] * len(rule.expects))
        live.runs[run_id] = run
        live.had_run = True
        live.held += 1
        self._held += 1
        cost = run.cost = RUN_BYTES + span_bytes(trigger)
        live.bytes += cost
        self._bytes += cost
        self._open += 1
        rule.open += 1
        events.append(RunOpened(run_id, rule.name, trigger.trace_id, trigger.span_id, now,
                                deadline, search_keys(trigger.attributes)))
        for expect, name, message in live.near or ():
            if expect.rule is rule and run.at_risk < MAX_AT_RISK:
                run.at_risk += 1
                events.append(RunAtRisk(run_id, rule.name, trigger.trace_id, name, message, now))
        for expect in rule.expects:
            kept = live.kept.get(expect)
            if kept is not None:
                for span in list(kept.spans.values()):
                    run.offer(expect, span)
        for forbid in rule.forbids:
            kept = live.kept.get(forbid)
            if kept is not None and kept.spans and run.forbidden is None:
                run.forbidden = next(iter(kept.spans.values()))
        if self._correlation is not None and rule.correlated:
            for expect, span in self._correlation.register(run):
                run.offer(expect, span)
        self._settle(run, None, now, events)

    def _offer(
        self, run: OpenRun, expect: Expect, span: Span, now: datetime, events: list[RunEvent]
    ) -> None:
        live = self._live.get(run.trace_id)
        if live is None or run.run_id not in live.runs or not run.offer(expect, span):
            return  # closed meanwhile
        self._settle(run, None, now, events)

    def _settle(
        self, run: OpenRun, wait_over: FailureReason | None, now: datetime,
        events: list[RunEvent],
    ) -> None:
        verdict = run.settle(wait_over)
        if verdict is not None:
            self._close(run, verdict, now, events)

    def _close(self, run: OpenRun, verdict: Verdict, now: datetime,
               events: list[RunEvent]) -> None:
        live = self._live[run.trace_id]
        del live.runs[run.run_id]
        live.held -= 1
        self._held -= 1
        cost = run.cost
        live.bytes -= cost
        self._bytes -= cost
        self._open -= 1
        run.rule.open -= 1
        if self._correlation is not None and run.rule.correlated:
            self._correlation.unregister(run)
        self._remember_closed(run.run_id)
        rule = run.rule.name
        if not isinstance(verdict, FailureReason):
            events.append(RunPassed(run.run_id, rule, run.trace_id, run.opened_at, now,
                                    group=run.group))
            return
        offending: tuple[Span, ...] = ()
        if verdict is FailureReason.FORBIDDEN and run.forbidden is not None:
            offending = (run.forbidden,)
        elif verdict is FailureReason.COUNT:
            offending = run.surplus()
        events.append(RunFailed(
            run_id=run.run_id, rule=rule, trace_id=run.trace_id, trigger=run.trigger,
            opened_at=run.opened_at, closed_at=now, reason=verdict, missing=run.missing(),
            first_received_ns=live.first_received_ns, offending=offending, group=run.group,
            last_received_ns=live.last_received_ns,
        ))
        self._late.remember(run, now)

    def _remember_closed(self, run_id: str) -> None:
        self._closed[run_id] = None
        if len(self._closed) > _CLOSED_MEMORY:
            self._closed.popitem(last=False)

    # -- time and budget -------------------------------------------------------------------

    def _schedule(self, live: LiveTrace, due: datetime) -> None:
        self._sequence += 1
        heapq.heappush(self._due, (due, self._sequence, live.trace_id))

    def _expire(self, now: datetime) -> None:
        if self._correlation is not None:
            self._correlation.expire(now)
        self._late.expire(now)

    def tick(self) -> list[RunEvent]:
        """End the waits that are over (deadline, idle trace), forget quiet traces, judge
        schedule slots whose grace has passed. Returns the verdicts (failures, and passes of
        runs that waited for an upper count bound), then missed slots."""
        now = self._clock()
        events: list[RunEvent] = []
        self._expire(now)
        while self._due and self._due[0][0] <= now:
            _, _, trace_id = heapq.heappop(self._due)
            live = self._live.get(trace_id)
            if live is None:
                continue
            idle_due = live.last_seen + self._idle
            for run in list(live.runs.values()):
                if run.deadline_at is not None:
                    expired, reason = run.deadline_at <= now, FailureReason.DEADLINE
                else:
                    expired, reason = idle_due <= now, FailureReason.TRACE_IDLE
                if expired:
                    self._settle(run, reason, now, events)
            pending = [r.deadline_at for r in live.runs.values() if r.deadline_at is not None]
            if idle_due > now:
                pending.append(idle_due)
            if pending:
                self._schedule(live, min(pending))
            elif not live.runs:
                # Only held outcome spans are left. A long-running trigger (a root span, say a
                # 20-minute backup.run) is exported when it ends, long after its children: hold
                # them as long as some rule's `within` lets an outcome wait for its trigger.
                hold_due = live.last_seen + self._hold
                if hold_due > now and live.held and not live.had_run:
                    self._schedule(live, hold_due)
                else:
                    self._drop(trace_id)
        events.extend(self._schedules.due(now))
        if any(not r.open for r in self._retired):
            self._retired = tuple(r for r in self._retired if r.open)
            self._interest.clear()
            self._correlate_for_rules()
            self._hold_for_rules()
        return events

    def _drop(self, trace_id: str) -> None:
        live = self._live.pop(trace_id)
        self._held -= live.held
        self._bytes -= live.bytes

    def _enforce_budget(self, now: datetime, events: list[RunEvent]) -> None:
        max_traces, max_spans, max_bytes = self._max_traces, self._max_spans, self._max_bytes
        while self._live and (
            (max_traces is not None and len(self._live) > max_traces)
            or (max_spans is not None and self._held > max_spans)
            or (max_bytes is not None and self._bytes > max_bytes)
        ):
            trace_id = next(iter(self._live))
            for run in list(self._live[trace_id].runs.values()):
                self._close(run, FailureReason.EVICTED, now, events)
            self._drop(trace_id)
            self.evicted_traces += 1
