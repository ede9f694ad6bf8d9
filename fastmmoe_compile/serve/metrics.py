"""The server's Prometheus metrics (prometheus-client), one registry per server.

fastmmoe_requests_total{endpoint, status}        finished requests by HTTP status (200, 400, 429, 499 cancelled, 500)
fastmmoe_time_to_first_token_seconds             arrival -> first token (queueing + prefill)
fastmmoe_time_per_output_token_seconds           per request: (last token - first token) / (tokens - 1)
fastmmoe_queue_depth                             requests waiting for a decode-batch slot
fastmmoe_decode_batch_size                       samples in the running decode batch (gauge, and a histogram per step)
fastmmoe_prompt_tokens_total / _generation_tokens_total
fastmmoe_vision_tokens_total{stage="before"|"after"}  image tokens in prompts, and those that reached the
                                                 last layer after token reduction
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fastmmoe_requests", "Finished requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("fastmmoe_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY,
                              registry=r)
        self.tpot = Histogram("fastmmoe_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY, registry=r)
        self.queue_depth = Gauge("fastmmoe_queue_depth", "Requests waiting for a decode-batch slot", registry=r)
        self.batch_size = Gauge("fastmmoe_decode_batch_size", "Samples in the running decode batch", registry=r)
        self.step_batch = Histogram("fastmmoe_decode_step_batch_size", "Samples per decode step", buckets=BATCH,
                                    registry=r)
        self.prompt_tokens = Counter("fastmmoe_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("fastmmoe_generation_tokens", "Tokens generated", registry=r)
        self.vision_tokens = Counter("fastmmoe_vision_tokens", "Image tokens in prompts (before) and reaching the "
                                     "last layer after token reduction (after)", ["stage"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
