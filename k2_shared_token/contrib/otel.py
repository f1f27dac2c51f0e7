"""OpenTelemetry export of provider metrics and spans (the ``otel`` extra: opentelemetry-api).

    from k2_shared_token.contrib.otel import instrument
    otel = instrument(provider)   # global meter and tracer providers; or pass your own
    ...
    otel.close()                  # stop exporting (e.g. before the provider is closed)

Works for the blocking and the asyncio provider alike. What it exports:

* ``k2_token.events`` (observable counter, ``{namespace, event}``): every event of
  :data:`k2_shared_token._core.metrics.EVENTS` (``local_hit``, ``shared_hit``, ``miss``,
  ``exchange_ok``, ``exchange_failed``, ``wait``, ``lock_takeover``, ``refresh_failed``,
  ``redis_error`` (the breaker opened), ``fallback``), read from ``provider.stats()`` at
  collection time: local hits are counted on the hot path, which calls no hook;
* ``k2_token.exchange.duration`` and ``k2_token.wait.duration`` (histograms, seconds,
  ``{namespace, outcome}``);
* ``k2_token.lifetime_remaining`` (observable gauge, seconds, ``{namespace}``): how long the token
  this process holds has left (nothing is reported while it holds none);
* spans ``k2_token.exchange`` and ``k2_token.wait``, made when the event arrives with its start
  and end derived from the event's duration, children of the span current in the caller, with
  ``namespace``, ``outcome`` and (exchanges) ``attempts``; a failed
  exchange's span has an error status.

Attributes are the namespace (a hash of the client id and base URL, see the README), event
names, outcome words and counts: never a token, a secret or an error message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._core import metrics
from .._core.metrics import EVENTS, Event
from .._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from .._core.source import ObservedSource

SCOPE = "k2_shared_token"
EVENTS_COUNTER = "k2_token.events"
EXCHANGE_DURATION = "k2_token.exchange.duration"
WAIT_DURATION = "k2_token.wait.duration"
LIFETIME_REMAINING = "k2_token.lifetime_remaining"
EXCHANGE_SPAN = "k2_token.exchange"
WAIT_SPAN = "k2_token.wait"

_SPANS = {
    metrics.EXCHANGE_OK: EXCHANGE_SPAN,
    metrics.EXCHANGE_FAILED: EXCHANGE_SPAN,
    metrics.WAIT: WAIT_SPAN,
}


class OtelInstrumentation:
    """The instruments for a set of providers; :func:`instrument` makes one."""

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        meter = otel_metrics.get_meter(SCOPE, __version__, meter_provider)
        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
        self._lock = threading.Lock()
        self._providers: tuple[ObservedSource, ...] = ()
        meter.create_observable_counter(
            EVENTS_COUNTER,
            callbacks=[self._observe_events],
            unit="{event}",
            description="Token provider events: " + ", ".join(EVENTS),
        )
        meter.create_observable_gauge(
            LIFETIME_REMAINING,
            callbacks=[self._observe_lifetime],
            unit="s",
            description="Seconds the token this process holds has left, per namespace",
        )
        self._durations = {
            metrics.EXCHANGE_OK: meter.create_histogram(
                EXCHANGE_DURATION, unit="s", description="Token exchanges with K2, retries included"
            ),
            metrics.WAIT: meter.create_histogram(
                WAIT_DURATION, unit="s", description="Waits for another worker's token"
            ),
        }
        self._durations[metrics.EXCHANGE_FAILED] = self._durations[metrics.EXCHANGE_OK]

    def add(self, *providers: ObservedSource) -> None:
        """Export these providers too."""
        with self._lock:
            new = [p for p in providers if p not in self._providers]
            self._providers = (*self._providers, *new)
        for provider in new:
            provider.add_hook(self.on_event)

    def remove(self, *providers: ObservedSource) -> None:
        with self._lock:
            self._providers = tuple(p for p in self._providers if p not in providers)
        for provider in providers:
            provider.remove_hook(self.on_event)

    def close(self) -> None:
        """Stop exporting every provider (the instruments stay, reporting nothing)."""
        self.remove(*self._providers)

    @property
    def providers(self) -> tuple[ObservedSource, ...]:
        return self._providers

    # -- hooks and callbacks -----------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """A provider hook: record a timed event's duration and its span."""
        histogram = self._durations.get(event.name)
        if histogram is None or event.seconds is None:
            return
        attributes: dict[str, str | int] = {"namespace": event.namespace}
        if event.outcome is not None:
            attributes["outcome"] = event.outcome
        histogram.record(event.seconds, attributes)
        self._span(event)

    def _span(self, event: Event) -> None:
        end = time.time_ns()
        start = end - int((event.seconds or 0.0) * 1e9)
        attributes: dict[str, str | int] = {"namespace": event.namespace}
        if event.outcome is not None:
            attributes["outcome"] = event.outcome
        if event.attempts is not None:
            attributes["attempts"] = event.attempts
        span = self._tracer.start_span(
            _SPANS[event.name], kind=SpanKind.INTERNAL, attributes=attributes, start_time=start
        )
        if event.name == metrics.EXCHANGE_FAILED:
            span.set_status(Status(StatusCode.ERROR))  # no description: messages stay out
        span.end(end_time=end)

    def _observe_events(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[str, str], float] = {}
        for provider in self._providers:
            stats = provider.stats()
            for name in EVENTS:
                key = (provider.namespace, name)
                totals[key] = totals.get(key, 0) + stats.get(name, 0)
        return [
            Observation(value, {"namespace": namespace, "event": name})
            for (namespace, name), value in totals.items()
        ]

    def _observe_lifetime(self, options: CallbackOptions) -> Iterable[Observation]:
        left: dict[str, float] = {}
        for provider in self._providers:
            seconds = provider.seconds_left()
            if seconds is not None:
                # Two providers of one namespace: report the copy that dies first.
                left[provider.namespace] = min(seconds, left.get(provider.namespace, seconds))
        return [Observation(s, {"namespace": ns}) for ns, s in left.items()]


def instrument(
    *providers: ObservedSource,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
) -> OtelInstrumentation:
    """Export ``providers`` (blocking or asyncio) to OpenTelemetry: the global meter and tracer
    providers unless given. Call it once per meter provider and add more providers with
    ``.add(provider)``; ``.close()`` stops the export."""
    otel = OtelInstrumentation(meter_provider=meter_provider, tracer_provider=tracer_provider)
    otel.add(*providers)
    return otel
