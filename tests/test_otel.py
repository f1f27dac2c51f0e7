"""The OpenTelemetry export, with the SDK's in-memory reader and exporter, against real Redis and
the fake K2 server, on both providers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from k2_shared_token import InvalidCredentialsError, SharedTokenProvider
from k2_shared_token.contrib.otel import (
    EVENTS_COUNTER,
    EXCHANGE_DURATION,
    EXCHANGE_SPAN,
    LIFETIME_REMAINING,
    WAIT_DURATION,
    WAIT_SPAN,
    OtelInstrumentation,
    instrument,
)
from k2_shared_token.testing.fake_k2 import FakeK2Server, Fault
from tests.conftest import CLIENT_SECRET

Make = Callable[..., SharedTokenProvider]
WRONG_SECRET = "wrong-secret-d0n7-l34k"


class Otel:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.spans = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.spans))

    def points(self) -> dict[str, list[Any]]:
        """Metric name -> its data points, from one collection."""
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out

    def finished(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.spans.get_finished_spans())

    def instrument(self, *providers: Any) -> OtelInstrumentation:
        return instrument(*providers, meter_provider=self.meters, tracer_provider=self.tracers)


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.meters.shutdown()
    o.tracers.shutdown()


def event_count(points: dict[str, list[Any]], namespace: str, event: str) -> float:
    return sum(
        p.value
        for p in points[EVENTS_COUNTER]
        if p.attributes == {"namespace": namespace, "event": event}
    )


def histogram(points: dict[str, list[Any]], name: str, **attrs: Any) -> Any:
    found = [p for p in points.get(name, []) if dict(p.attributes) == attrs]
    assert len(found) == 1, (name, attrs, points.get(name))
    return found[0]


def test_cold_exchange_retry_wait_and_remaining_lifetime(
    make_provider: Make, fake_k2: FakeK2Server, otel: Otel
) -> None:
    first, second = make_provider(), make_provider()
    otel.instrument(first, second)
    ns = first.namespace
    fake_k2.latency = 0.3
    fake_k2.inject(Fault.status(503))  # the first attempt fails: the exchange makes 2
    tokens: list[str] = []
    holder = threading.Thread(target=lambda: tokens.append(first.get_token()))
    holder.start()
    assert fake_k2.wait_for_token_requests(1)
    tokens.append(second.get_token())  # waits for the holder's announcement
    holder.join()
    assert tokens[0] == tokens[1]
    for _ in range(3):
        first.get_token()

    points = otel.points()
    assert event_count(points, ns, "exchange_ok") == 1
    assert event_count(points, ns, "miss") == 2
    assert event_count(points, ns, "wait") == 1
    assert event_count(points, ns, "local_hit") == 3
    assert event_count(points, ns, "exchange_failed") == 0
    assert {p.attributes["event"] for p in points[EVENTS_COUNTER]} >= {
        "local_hit", "shared_hit", "miss", "exchange_ok", "exchange_failed", "wait",
        "lock_takeover", "refresh_failed", "redis_error", "fallback",
    }  # fmt: skip
    exchange = histogram(points, EXCHANGE_DURATION, namespace=ns, outcome="ok")
    assert exchange.count == 1
    assert 0.3 <= exchange.sum < 10
    wait = histogram(points, WAIT_DURATION, namespace=ns, outcome="announced")
    assert wait.count == 1
    # The wait began after the exchange did and ends when its announcement arrives: at most the
    # exchange plus the publish and the message in transit.
    assert 0 < wait.sum <= exchange.sum + 0.05
    (left,) = points[LIFETIME_REMAINING]
    assert left.attributes == {"namespace": ns}
    assert 3590 < left.value <= 3600

    spans = {s.name: s for s in otel.finished()}
    assert set(spans) == {EXCHANGE_SPAN, WAIT_SPAN}
    ex, wt = spans[EXCHANGE_SPAN], spans[WAIT_SPAN]
    assert dict(ex.attributes or {}) == {"namespace": ns, "outcome": "ok", "attempts": 2}
    assert dict(wt.attributes or {}) == {"namespace": ns, "outcome": "announced"}
    assert ex.start_time is not None and ex.end_time is not None
    assert wt.start_time is not None and wt.end_time is not None
    assert ex.end_time - ex.start_time == pytest.approx(exchange.sum * 1e9, rel=0.01)
    assert ex.start_time <= wt.start_time <= wt.end_time <= ex.end_time + 50_000_000
    assert_nothing_secret(otel, [*tokens, *(r.token for r in fake_k2.issued), CLIENT_SECRET])


def test_failed_exchange(make_provider: Make, fake_k2: FakeK2Server, otel: Otel) -> None:
    provider = make_provider(client_id="unknown-client", client_secret=WRONG_SECRET)
    otel.instrument(provider)
    with pytest.raises(InvalidCredentialsError):
        provider.get_token()
    ns = provider.namespace
    points = otel.points()
    assert event_count(points, ns, "exchange_failed") == 1
    assert event_count(points, ns, "exchange_ok") == 0
    failed = histogram(points, EXCHANGE_DURATION, namespace=ns, outcome="invalid_client")
    assert failed.count == 1
    assert LIFETIME_REMAINING not in points  # no token held: nothing to report
    (span,) = otel.finished()
    assert span.name == EXCHANGE_SPAN
    assert dict(span.attributes or {}) == {
        "namespace": ns,
        "outcome": "invalid_client",
        "attempts": 1,
    }
    assert not span.status.is_ok
    assert span.status.description is None
    assert_nothing_secret(otel, [WRONG_SECRET, CLIENT_SECRET])


def test_close_stops_the_export(make_provider: Make, otel: Otel) -> None:
    provider = make_provider()
    exported = otel.instrument(provider)
    exported.close()
    provider.get_token()
    assert otel.finished() == ()
    assert otel.points().get(EVENTS_COUNTER, []) == []


def assert_nothing_secret(otel: Otel, secrets: list[str]) -> None:
    """Every metric attribute and span name and attribute, scanned for tokens and secrets."""
    seen: list[str] = []
    for points in otel.points().values():
        for point in points:
            seen.extend(f"{k}={v}" for k, v in point.attributes.items())
    for span in otel.finished():
        seen.append(span.name)
        seen.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        seen.append(str(span.status.description))
        seen.extend(e.name for e in span.events)
    assert seen
    text = "\n".join(seen)
    for secret in secrets:
        assert secret
        assert secret not in text
