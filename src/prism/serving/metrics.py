"""Prometheus metrics of `prism serve` and the sidecar (prometheus-client): traffic by model name, route
taken and status, the gate's probabilities, latency, tokens and batch sizes. Each app has its own registry,
so two servers in one process (the tests) never share counts."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PROBABILITY_BUCKETS = tuple(i / 10 for i in range(1, 11))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServingMetrics:
    def __init__(self, *, sidecar: bool = False):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("prism_requests", "Requests answered, by endpoint (chat, route), model name, route "
                                "taken (none when the request failed before routing) and HTTP status",
                                ["endpoint", "model", "route", "status"], registry=registry)
        self.gate_probability = Histogram("prism_gate_probability", "The gate's P(persona) for each request it "
                                          "decided (forced routes excluded), by endpoint", ["endpoint"],
                                          buckets=PROBABILITY_BUCKETS, registry=registry)
        self.latency = Histogram("prism_request_latency_seconds", "Request latency to the last byte, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("prism_time_to_first_token_seconds", "Time from a chat request's arrival to "
                                     "its first token", buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("prism_prompt_tokens", "Prompt tokens of completed chat requests, by route",
                                     ["route"], registry=registry)
        self.completion_tokens = Counter("prism_completion_tokens", "Completion tokens of completed chat requests, "
                                         "by route", ["route"], registry=registry)
        self.threshold = Gauge("prism_gate_threshold", "The gate threshold in force", registry=registry)
        self.reloads = Counter("prism_reloads", "Run reloads, by outcome (ok, failed)", ["outcome"],
                               registry=registry)
        if sidecar:
            self.upstream_errors = Counter("prism_upstream_errors", "Upstream failures, by kind (unreachable, or "
                                           "the HTTP status the upstream answered)", ["kind"], registry=registry)
        else:
            self.running = Gauge("prism_requests_running", "Requests in the batch being generated",
                                 registry=registry)
            self.waiting = Gauge("prism_requests_waiting", "Requests held waiting for a place in the batch (the "
                                 "queue depth; the server refuses more than --max-waiting)", registry=registry)
            self.refused = Counter("prism_requests_refused", "Chat requests refused for load, by reason: "
                                   "at_capacity (429) or timeout (503, aborted past --request-timeout)",
                                   ["reason"], registry=registry)
            self.batch_size = Histogram("prism_batch_size", "Requests decoded together per decode step",
                                        buckets=BATCH_BUCKETS, registry=registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
