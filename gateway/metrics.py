"""Prometheus metrics of delivery, tokens and targets (``GET /metrics``).

Two kinds:

* events counted where they happen (deliveries by outcome, attempt latency, intake-to-EHR
  latency, token requests by outcome), in the process that does the work: the API process
  when it runs the worker (``serve``, embedded mode), or each ``fhir-gateway worker``,
  which serves them with ``--metrics-port``;
* the state of the queue and the targets (queue depth, oldest pending age, dead letters,
  circuit state, token state), read from the database when ``/metrics`` is scraped, so
  every API process reports the same numbers whatever worker did the work.

Labels are target names, kinds and outcomes: never ids, never PHI.

=======================================================  =========  ==========================
metric                                                   type       labels
=======================================================  =========  ==========================
``fhir_gateway_deliveries_total``                        counter    kind, target, outcome
``fhir_gateway_delivery_attempt_seconds``                histogram  kind, target
``fhir_gateway_intake_to_ehr_seconds``                   histogram  target
``fhir_gateway_oauth_token_requests_total``              counter    target, outcome
``fhir_gateway_delivery_queue_depth``                    gauge      kind, target
``fhir_gateway_delivery_oldest_pending_age_seconds``     gauge      kind, target
``fhir_gateway_deliveries_dead``                         gauge      kind, target
``fhir_gateway_deliveries_review``                       gauge      kind, target
``fhir_gateway_circuit_state``                           gauge      kind, target, state
``fhir_gateway_circuit_failure_rate``                    gauge      kind, target
``fhir_gateway_circuit_next_trial_seconds``              gauge      kind, target
``fhir_gateway_oauth_token_expires_in_seconds``          gauge      target
``fhir_gateway_oauth_auth_circuit_open``                 gauge      target
=======================================================  =========  ==========================

Outcomes of ``deliveries_total``: ``delivered``, ``transient`` (will retry), ``dead``,
``review``, ``waiting`` (not attempted: no token, misconfigured target). Outcomes of
``oauth_token_requests_total``: ``success``, ``unavailable``, ``config_error``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: The registry of everything this module defines (not the library's global default).
REGISTRY = CollectorRegistry(auto_describe=True)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DELIVERIES = Counter(
    "fhir_gateway_deliveries",
    "Delivery attempts by outcome (delivered, transient, dead, review, waiting).",
    ["kind", "target", "outcome"],
    registry=REGISTRY,
)
ATTEMPT_SECONDS = Histogram(
    "fhir_gateway_delivery_attempt_seconds",
    "Duration of one delivery attempt (all requests of it), seconds.",
    ["kind", "target"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
    registry=REGISTRY,
)
INTAKE_TO_EHR_SECONDS = Histogram(
    "fhir_gateway_intake_to_ehr_seconds",
    "From receiving a message to its resources being delivered to the EHR, seconds.",
    ["target"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400),
    registry=REGISTRY,
)
TOKEN_REQUESTS = Counter(
    "fhir_gateway_oauth_token_requests",
    "Token endpoint requests by outcome (success, unavailable, config_error).",
    ["target", "outcome"],
    registry=REGISTRY,
)

CIRCUIT_STATES = ("closed", "half_open", "open")


@dataclass(frozen=True)
class TargetSnapshot:
    """Database-derived state of one target at scrape time."""

    kind: str
    target: str
    queue_depth: int = 0
    oldest_pending_age_s: float = 0.0
    dead: int = 0
    review: int = 0
    circuit: str = "closed"
    failure_rate: float = 0.0
    next_trial_in_s: float | None = None
    token_expires_in_s: float | None = None
    auth_circuit_open: bool | None = None


@dataclass(eq=False)  # collectors are registered in a set: hash by identity
class StateCollector(Collector):
    """Yields the gauges of a list of :class:`TargetSnapshot` (set before each scrape)."""

    snapshots: list[TargetSnapshot] = field(default_factory=list)

    def collect(self) -> Iterator[Metric]:
        """The gauges for the current snapshots."""
        depth = GaugeMetricFamily(
            "fhir_gateway_delivery_queue_depth",
            "Deliveries pending or in flight.",
            labels=["kind", "target"],
        )
        age = GaugeMetricFamily(
            "fhir_gateway_delivery_oldest_pending_age_seconds",
            "Age of the oldest delivery pending or in flight, seconds (0 when none).",
            labels=["kind", "target"],
        )
        dead = GaugeMetricFamily(
            "fhir_gateway_deliveries_dead", "Dead-lettered deliveries.", labels=["kind", "target"]
        )
        review = GaugeMetricFamily(
            "fhir_gateway_deliveries_review",
            "Deliveries waiting for a person (several matching resources in the EHR).",
            labels=["kind", "target"],
        )
        circuit = GaugeMetricFamily(
            "fhir_gateway_circuit_state",
            "Circuit breaker state of a target (1 for the current state).",
            labels=["kind", "target", "state"],
        )
        rate = GaugeMetricFamily(
            "fhir_gateway_circuit_failure_rate",
            "Share of transient failures among a target's calls over the circuit breaker's "
            "window (0..1).",
            labels=["kind", "target"],
        )
        next_trial = GaugeMetricFamily(
            "fhir_gateway_circuit_next_trial_seconds",
            "Seconds until an open circuit's next trial, or a Retry-After pause ends "
            "(absent when nothing waits).",
            labels=["kind", "target"],
        )
        expires = GaugeMetricFamily(
            "fhir_gateway_oauth_token_expires_in_seconds",
            "Seconds until the shared access token expires (negative: expired).",
            labels=["target"],
        )
        auth_open = GaugeMetricFamily(
            "fhir_gateway_oauth_auth_circuit_open",
            "1 while the token endpoint is backed off and no valid token exists.",
            labels=["target"],
        )
        for s in self.snapshots:
            labels = [s.kind, s.target]
            depth.add_metric(labels, s.queue_depth)
            age.add_metric(labels, s.oldest_pending_age_s)
            dead.add_metric(labels, s.dead)
            review.add_metric(labels, s.review)
            for state in CIRCUIT_STATES:
                circuit.add_metric([*labels, state], 1.0 if s.circuit == state else 0.0)
            rate.add_metric(labels, s.failure_rate)
            if s.next_trial_in_s is not None:
                next_trial.add_metric(labels, max(0.0, s.next_trial_in_s))
            if s.token_expires_in_s is not None:
                expires.add_metric([s.target], s.token_expires_in_s)
            if s.auth_circuit_open is not None:
                auth_open.add_metric([s.target], 1.0 if s.auth_circuit_open else 0.0)
        yield from (depth, age, dead, review, circuit, rate, next_trial, expires, auth_open)


def render(snapshots: Iterable[TargetSnapshot]) -> bytes:
    """The exposition text of the process's metrics plus gauges for ``snapshots``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward(REGISTRY))
    registry.register(StateCollector(list(snapshots)))
    return generate_latest(registry)


@dataclass(eq=False)
class _Forward(Collector):
    registry: CollectorRegistry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
