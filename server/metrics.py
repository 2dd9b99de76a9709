"""Prometheus export of the worker's per-request statistics (vLLM-style names, prefix adasd_)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

REQUEST_STATUSES = ("success", "cancelled", "error", "rejected")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
RATE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SPEEDUP_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 8.0)
DRAFT_LENGTH_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0)


class AdasdMetrics:
    """Prometheus metrics of one server, in a dedicated CollectorRegistry.

    The worker measures each request (GenerationStats) and sends the numbers with the request's
    final message; the front end adds them here and serves them at /metrics. Every series carries
    a `model_name` label (the served model name). Counters survive worker restarts.

    Derived rates (PromQL):

    Acceptance rate (accepted / drafted tokens, both checks):
        sum by (model_name) (rate(adasd_accepted_tokens_total[5m]))
          / sum by (model_name) (rate(adasd_draft_tokens_total[5m]))

    Share of accepted tokens that only the relaxed (JS / Bayes) check accepted:
        sum by (model_name) (rate(adasd_accepted_tokens_total{check="relaxed"}[5m]))
          / sum by (model_name) (rate(adasd_accepted_tokens_total[5m]))

    Generation throughput (tokens/s) and prompt throughput:
        sum by (model_name) (rate(adasd_generation_tokens_total[1m]))
        sum by (model_name) (rate(adasd_prompt_tokens_total[1m]))

    Mean estimated speedup over requests finished in the window:
        sum by (model_name) (rate(adasd_request_speedup_sum[5m]))
          / sum by (model_name) (rate(adasd_request_speedup_count[5m]))

    Mean draft length per round, and tokens per target forward pass:
        sum by (model_name) (rate(adasd_request_mean_draft_length_sum[5m]))
          / sum by (model_name) (rate(adasd_request_mean_draft_length_count[5m]))
        sum by (model_name) (rate(adasd_generation_tokens_total[5m]))
          / sum by (model_name) (rate(adasd_target_forwards_total[5m]))

    Request rate by outcome, and p95 time to first token:
        sum by (model_name, status) (rate(adasd_requests_total[1m]))
        histogram_quantile(0.95, sum by (le, model_name) (rate(adasd_time_to_first_token_seconds_bucket[5m])))
    """

    def __init__(self, model_name: str, default_method: str = "adasd"):
        disable_created_metrics()  # no *_created series (process-wide; the front end exports only these)
        self.model_name = model_name
        self.registry = registry = CollectorRegistry(auto_describe=True)
        label = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, label + list(extra), registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=registry).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, label, registry=registry).labels(model_name)

        def lazy_gauge(name: str, doc: str) -> Gauge:
            # NaN until a request reports a value, so the series exists for dashboards from the start
            g = Gauge(name, doc, label, registry=registry)
            g.labels(model_name).set(float("nan"))
            return g

        self.requests = counter("adasd_requests_total", "Finished generations by method and outcome "
                                "(success, cancelled, error, rejected).", ("method", "status"))
        self.prompt_tokens = counter("adasd_prompt_tokens_total", "Prompt tokens of started generations.").labels(model_name)
        self.generation_tokens = counter("adasd_generation_tokens_total", "Generated tokens.").labels(model_name)
        self.draft_tokens = counter("adasd_draft_tokens_total", "Candidate tokens proposed by the draft.").labels(model_name)
        accepted = counter("adasd_accepted_tokens_total", "Draft tokens accepted, by the check that accepted "
                           "them: standard (rejection sampling) or relaxed (JS / Bayes).", ("check",))
        self.accepted_standard = accepted.labels(model_name, "standard")
        self.accepted_relaxed = accepted.labels(model_name, "relaxed")
        self.target_forwards = counter("adasd_target_forwards_total", "Target model forward passes.").labels(model_name)
        self.draft_forwards = counter("adasd_draft_forwards_total", "Draft model forward passes.").labels(model_name)

        self.ttft = histogram("adasd_time_to_first_token_seconds", "Time from arrival to the first token.", LATENCY_BUCKETS)
        self.itl = histogram("adasd_inter_token_latency_seconds", "Time between tokens (a round's wait "
                             "divided over the tokens it produced).", LATENCY_BUCKETS)
        self.e2e = histogram("adasd_e2e_request_latency_seconds", "Arrival to last token of successful generations.", E2E_BUCKETS)
        self.queue_time = histogram("adasd_request_queue_time_seconds", "Time a generation waited for a worker slot.",
                                    E2E_BUCKETS)
        self.acceptance_rate = histogram("adasd_request_acceptance_rate", "Per-request accepted / drafted tokens.", RATE_BUCKETS)
        self.speedup = histogram("adasd_request_speedup", "Per-request estimated speedup over the target alone.", SPEEDUP_BUCKETS)
        self.mean_draft_length = histogram("adasd_request_mean_draft_length", "Per-request mean candidates per round.",
                                           DRAFT_LENGTH_BUCKETS)

        self.running = gauge("adasd_num_requests_running", "Generations the worker is interleaving.")
        self.waiting = gauge("adasd_num_requests_waiting", "Generations waiting for a worker slot.")
        self.worker_up = gauge("adasd_worker_up", "1 while the worker process is loaded and serving, else 0.")
        self.entropy_threshold = lazy_gauge("adasd_entropy_threshold", "T_G at the end of the most recently finished request.")
        self.js_threshold = lazy_gauge("adasd_js_threshold", "T_V at the end of the most recently finished request "
                                  "(threshold verification).")

        # the server's warm-start statistics (adasd_core.warm), per family "method/check/greedy|sampled": the
        # live state, which learns from every round; new requests start from its last published snapshot
        family = ["model_name", "family"]
        self.warm_entropy_threshold = Gauge("adasd_warm_entropy_threshold", "T_G of the server's warm-start "
                                            "statistics (mean entropy of every rejected candidate so far).", family,
                                            registry=registry)
        self.warm_js_threshold = Gauge("adasd_warm_js_threshold", "T_V of the server's warm-start statistics "
                                       "(threshold verification).", family, registry=registry)
        self.warm_kde_samples = Gauge("adasd_warm_kde_samples", "Distances in the server's warm-start KDEs "
                                      "(bayes verification), by group.", family + ["group"], registry=registry)
        self.warm_rounds = Gauge("adasd_warm_rounds", "Rounds the server's warm-start statistics have learned from.",
                                 family, registry=registry)
        self.warm_published_rounds = Gauge("adasd_warm_published_rounds", "Rounds in the published warm-start "
                                           "snapshot new requests start from (0: none yet; it changes only at "
                                           "publications, and so does system_fingerprint).", family, registry=registry)

        for status in REQUEST_STATUSES:  # make the common series exist at 0
            self.requests.labels(model_name, default_method, status)

    # ------------------------------------------------------------------ updates

    def observe_request(self, method: str, status: str, stats: dict[str, Any] | None) -> None:
        self.requests.labels(self.model_name, method, status).inc()
        if not stats:
            return
        self.prompt_tokens.inc(stats.get("prompt_tokens", 0))
        self.generation_tokens.inc(stats.get("generated_tokens", 0))
        self.draft_tokens.inc(stats.get("drafted_tokens", 0))
        self.accepted_standard.inc(stats.get("accepted_standard", 0))
        self.accepted_relaxed.inc(stats.get("accepted_relaxed", 0))
        self.target_forwards.inc(stats.get("target_forwards", 0))
        self.draft_forwards.inc(stats.get("draft_forwards", 0))
        if stats.get("drafted_tokens"):
            self.acceptance_rate.observe(stats["acceptance_rate"])
        if stats.get("rounds") and stats.get("method") != "ar":
            self.mean_draft_length.observe(stats["mean_draft_length"])
        if stats.get("estimated_speedup"):
            self.speedup.observe(stats["estimated_speedup"])
        if stats.get("entropy_threshold") is not None:
            self.entropy_threshold.labels(self.model_name).set(stats["entropy_threshold"])
        if stats.get("js_threshold") is not None:
            self.js_threshold.labels(self.model_name).set(stats["js_threshold"])

    def observe_warm_state(self, state: dict[str, dict] | None) -> None:
        """The worker's warm-start summary: {family: SharedStats.summary()}."""
        for family, s in (state or {}).items():
            labels = (self.model_name, family)
            self.warm_rounds.labels(*labels).set(s.get("rounds", 0))
            self.warm_published_rounds.labels(*labels).set(s.get("published_rounds", 0))
            if s.get("entropy_threshold") is not None:
                self.warm_entropy_threshold.labels(*labels).set(s["entropy_threshold"])
            if s.get("js_threshold") is not None:
                self.warm_js_threshold.labels(*labels).set(s["js_threshold"])
            for group in ("accepted", "rejected"):
                if s.get(f"kde_{group}") is not None:
                    self.warm_kde_samples.labels(*labels, group).set(s[f"kde_{group}"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
