"""Prometheus metrics for the server, named after Triton's ``nv_inference_*`` family.

Triton counts requests, inferences (samples) and executions (batches) separately and
accumulates each latency component in microseconds; we do the same under the
``splitnet_`` prefix, with the cut as a label next to the model, and add histograms
(request latency, batch size) so percentiles can be read without a summary per server:

==============================================  =============================================
``splitnet_inference_request_success_total``    requests answered OK {model, cut}
``splitnet_inference_request_failure_total``    requests refused {model, cut, status}
``splitnet_inference_count_total``              samples inferred {model, cut}
``splitnet_inference_exec_count_total``         tail executions (batches) {model, cut}
``splitnet_inference_request_duration_us_total`` receipt to response, cumulative
``splitnet_inference_queue_duration_us_total``  waiting in the batcher, cumulative
``splitnet_inference_compute_input_duration_us_total``   decoding the frontier
``splitnet_inference_compute_infer_duration_us_total``   the tail (its batch's run)
``splitnet_inference_compute_output_duration_us_total``  encoding the outputs
``splitnet_inference_request_duration_seconds`` histogram of the above request duration
``splitnet_inference_batch_size``               histogram of samples per execution
``splitnet_inference_request_bytes_total``      frontier payload bytes received
``splitnet_inference_response_bytes_total``     output payload bytes sent
``splitnet_inference_pending_request_count``    requests admitted and not yet answered
==============================================  =============================================

Labels come only from what the server serves: a request naming an unknown model or cut
is counted under ``model=""`` / ``cut=""``, so hostile names cannot grow the label set.
Failures refused before any parsing (authentication, a broken stream) are counted with
both labels empty. Process metrics (``process_resident_memory_bytes``, CPU seconds,
open files) come from prometheus_client's process collector. The endpoint that serves
them is cloud/scrape.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

__all__ = ["Metrics"]

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class _Children:
    """The labelled series of one (model, cut), resolved once: labels() costs a lock."""

    success: Counter
    count: Counter
    request_us: Counter
    queue_us: Counter
    input_us: Counter
    infer_us: Counter
    output_us: Counter
    duration: Histogram
    bytes_in: Counter
    bytes_out: Counter
    exec_count: Counter
    batch_size: Histogram


class Metrics:
    """The server's metrics in a registry of its own (several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        mc = ("model", "cut")
        p = "splitnet_inference_"
        self.success = Counter(p + "request_success", "Requests answered OK.", mc, registry=r)
        self.failure = Counter(
            p + "request_failure",
            "Requests refused or failed, by gRPC status.",
            (*mc, "status"),
            registry=r,
        )
        self.count = Counter(p + "count", "Samples inferred (batch rows).", mc, registry=r)
        self.exec_count = Counter(
            p + "exec_count", "Tail executions (one per batch).", mc, registry=r
        )
        self.request_us = Counter(
            p + "request_duration_us",
            "Cumulative receipt-to-response time of successful requests, microseconds.",
            mc,
            registry=r,
        )
        self.queue_us = Counter(
            p + "queue_duration_us", "Cumulative batcher wait, microseconds.", mc, registry=r
        )
        self.input_us = Counter(
            p + "compute_input_duration_us",
            "Cumulative frontier decoding time, microseconds.",
            mc,
            registry=r,
        )
        self.infer_us = Counter(
            p + "compute_infer_duration_us",
            "Cumulative tail time (each request counts its batch's run), microseconds.",
            mc,
            registry=r,
        )
        self.output_us = Counter(
            p + "compute_output_duration_us",
            "Cumulative output encoding time, microseconds.",
            mc,
            registry=r,
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Receipt-to-response time of successful requests.",
            mc,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            p + "batch_size", "Samples per tail execution.", mc, buckets=BATCH_BUCKETS, registry=r
        )
        self.bytes_in = Counter(
            p + "request_bytes", "Frontier payload bytes received.", mc, registry=r
        )
        self.bytes_out = Counter(p + "response_bytes", "Output payload bytes sent.", mc, registry=r)
        self.pending = Gauge(
            p + "pending_request_count",
            "Requests admitted and not yet answered.",
            registry=r,
        )
        ProcessCollector(registry=r)
        self._children: dict[tuple[str, str], _Children] = {}
        self._lock = threading.Lock()

    def _of(self, model: str, cut: str) -> _Children:
        key = (model, cut)
        c = self._children.get(key)
        if c is None:
            with self._lock:
                c = self._children.get(key)
                if c is None:
                    c = self._children[key] = _Children(
                        success=self.success.labels(model, cut),
                        count=self.count.labels(model, cut),
                        request_us=self.request_us.labels(model, cut),
                        queue_us=self.queue_us.labels(model, cut),
                        input_us=self.input_us.labels(model, cut),
                        infer_us=self.infer_us.labels(model, cut),
                        output_us=self.output_us.labels(model, cut),
                        duration=self.duration.labels(model, cut),
                        bytes_in=self.bytes_in.labels(model, cut),
                        bytes_out=self.bytes_out.labels(model, cut),
                        exec_count=self.exec_count.labels(model, cut),
                        batch_size=self.batch_size.labels(model, cut),
                    )
        return c

    # ------------------------------------------------------------ record
    def ok(
        self,
        model: str,
        cut: str,
        *,
        samples: int,
        total_s: float,
        queue_s: float,
        decode_s: float,
        compute_s: float,
        encode_s: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """One request answered OK."""
        c = self._of(model, cut)
        c.success.inc()
        c.count.inc(samples)
        c.request_us.inc(total_s * 1e6)
        c.queue_us.inc(queue_s * 1e6)
        c.input_us.inc(decode_s * 1e6)
        c.infer_us.inc(compute_s * 1e6)
        c.output_us.inc(encode_s * 1e6)
        c.duration.observe(total_s)
        c.bytes_in.inc(bytes_in)
        c.bytes_out.inc(bytes_out)

    def failed(self, model: str, cut: str, status: str) -> None:
        """One request refused or failed with gRPC ``status`` (e.g. ``INVALID_ARGUMENT``)."""
        self.failure.labels(model, cut, status).inc()

    def executed(self, model: str, cut: str, samples: int) -> None:
        """One tail execution over ``samples`` rows."""
        c = self._of(model, cut)
        c.exec_count.inc()
        c.batch_size.observe(samples)
