"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("t2i_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("t2i_request_seconds", "HTTP request latency by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_images = Histogram("t2i_batch_images", "Images per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_requests = Histogram("t2i_batch_requests", "Requests per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.queue_images = Gauge("t2i_queue_images", "Images waiting for the model", registry=self.registry)
        self.queue_bytes = Gauge("t2i_queue_bytes", "Bytes held by admitted requests (bodies, tensors, prepared pixels)", registry=self.registry)
        self.expert_seconds = Histogram("t2i_expert_seconds", "Inference time per expert or backbone pass", ["expert"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.expert_failures = Counter("t2i_expert_failures", "Pairs an expert failed to score (its component null), by expert",
                                       ["expert"], registry=self.registry)
        self.rejected = Counter("t2i_rejected", "Requests refused because the queue was full", registry=self.registry)
