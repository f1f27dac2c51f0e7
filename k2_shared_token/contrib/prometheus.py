"""Prometheus export of provider counters (the ``prometheus`` extra).

A collector reads ``provider.stats()`` at scrape time rather than incrementing Prometheus
counters on every call: the hot path stays a bare integer increment, and a scrape costs one
dictionary copy per provider.

    from .prometheus import register
    register(provider)            # default registry; pass registry=... for your own
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .._core.metrics import EVENTS, TIMED

if TYPE_CHECKING:
    from .._core.source import StatsSource


class ProviderCollector(Collector):
    def __init__(self, *providers: StatsSource) -> None:
        self.providers = providers

    def collect(self) -> Iterator[CounterMetricFamily]:
        events = CounterMetricFamily(
            "k2_token_events",
            "Token provider events: " + ", ".join(EVENTS),
            labels=["namespace", "event"],
        )
        seconds = CounterMetricFamily(
            "k2_token_event_seconds",
            "Time spent in exchanges and waits",
            labels=["namespace", "event"],
        )
        for provider in self.providers:
            stats = provider.stats()
            for name in EVENTS:
                events.add_metric([provider.namespace, name], stats.get(name, 0))
            for name in TIMED:
                seconds.add_metric([provider.namespace, name], stats.get(f"{name}_seconds", 0.0))
        yield events
        yield seconds


def register(
    *providers: StatsSource, registry: CollectorRegistry = REGISTRY
) -> ProviderCollector:
    collector = ProviderCollector(*providers)
    registry.register(collector)
    return collector
