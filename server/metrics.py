"""Prometheus export of the worker's per-request statistics (vLLM-style names, prefix adasd_), and
the load gauges an inference gateway's endpoint picker reads (queue, running, KV-pool usage).

The text exposition is built here, from values kept in memory, rather than by prometheus_client's
collectors: an endpoint picker scrapes every 50 ms, and generate_latest costs milliseconds of the
event loop for our ~200 samples. Each family keeps its rendered text until one of its values
changes, and a sample line is a cached prefix plus a number. All updates and scrapes run on the
event loop (the engine client's worker messages arrive through call_soon_threadsafe), so values
are plain floats, without locks.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString as fmt

REQUEST_STATUSES = ("success", "cancelled", "error", "rejected")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
RATE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SPEEDUP_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 8.0)
DRAFT_LENGTH_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0)


# ---------------------------------------------------------------------------- exposition


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def label_text(pairs: dict[str, str]) -> str:
    """{a="x",b="y"} with the names sorted (as prometheus_client writes them), or "" for none."""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(pairs.items())) + "}" if pairs else ""


def family_header(name: str, doc: str, kind: str) -> str:
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


class Family:
    """One metric family: its children by label values, and its text until a value changes."""

    kind = ""

    def __init__(self, registry: list, name: str, doc: str, labelnames: list[str] | tuple[str, ...] = (),
                 **child_args):
        self.name, self.labelnames, self.child_args = name, tuple(labelnames), child_args
        self.header = family_header(name, doc, self.kind)
        self.children: dict[tuple[str, ...], Any] = {}
        self.text: str | None = None
        registry.append(self)

    def labels(self, *values):
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
            child = self.children[key] = self.child_class(self, dict(zip(self.labelnames, key)), **self.child_args)
            self.text = None
        return child

    def render(self) -> str:
        if self.text is None:
            self.text = self.header + "".join(c.render() for c in self.children.values())
        return self.text


def _count(n: int) -> str:
    """An integer count as floatToGoString writes it ("3.0"), without its float checks (half the cost)."""
    return f"{n}.0" if n < 1_000_000 else fmt(n)  # from 1e6 on, Go (and fmt) write an exponent


class _Value:
    def __init__(self, family: Family, labels: dict[str, str]):
        self.family, self.value = family, 0.0
        self.line = family.name + label_text(labels) + " "

    def render(self) -> str:
        return self.line + fmt(self.value) + "\n"


class _CounterChild(_Value):
    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self.family.name}: counters only go up (inc({amount}))")
        self.value += amount
        self.family.text = None


class _GaugeChild(_Value):
    def set(self, value: float) -> None:
        self.value = float(value)
        self.family.text = None


class _HistogramChild:
    def __init__(self, family: Family, labels: dict[str, str], buckets: tuple[float, ...]):
        self.family = family
        self.bounds = tuple(float(b) for b in buckets) + (float("inf"),)
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.sum = 0.0
        self.bucket_lines = [f"{family.name}_bucket{label_text({**labels, 'le': fmt(b)})} " for b in self.bounds]
        tail = label_text(labels) + " "
        self.count_line, self.sum_line = f"{family.name}_count{tail}", f"{family.name}_sum{tail}"

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value
        self.family.text = None

    def render(self) -> str:
        out, total = [], 0
        for line, n in zip(self.bucket_lines, self.counts):
            total += n
            out.append(f"{line}{_count(total)}\n")
        out.append(f"{self.count_line}{_count(total)}\n{self.sum_line}{fmt(self.sum)}\n")
        return "".join(out)


class Counter(Family):
    kind, child_class = "counter", _CounterChild


class Gauge(Family):
    kind, child_class = "gauge", _GaugeChild


class Histogram(Family):
    kind, child_class = "histogram", _HistogramChild


# ---------------------------------------------------------------------------- the KV pool


@dataclass
class PoolState:
    """The KV pools as the front end knows them: sizes from the worker's "ready" message, blocks and
    resident tokens from its "kv" reports, running / waiting from the engine client. Read at each scrape.
    The target's and the draft's pools have the same blocks, one table per sequence indexing both."""

    running: int = 0
    waiting: int = 0
    blocks_total: int = 0  # blocks in each pool; 0 until a worker is ready
    block_size: int = 0  # positions per block
    prefix_caching: bool = False
    blocks_used: int = 0  # held by sequences
    blocks_cached: int = 0  # free, still holding a reusable prefix
    target_bytes_per_token: int = 0
    draft_bytes_per_token: int = 0
    target_tokens: int = 0  # tokens resident in the target's pool, all sequences
    draft_tokens: int = 0
    dtype: str = ""

    def usage_fraction(self) -> float:
        """Share of the pool held by sequences: blocks used / blocks. A request holds the blocks its
        tokens fill so far (the last one partly), not a whole context; cached blocks count as free,
        since a new request may take them. At 1 a new request waits, or the newest one is preempted."""
        return min(self.blocks_used, self.blocks_total) / self.blocks_total if self.blocks_total else 0.0

    def token_fraction(self) -> float:
        """Share of the pool's KV memory that holds tokens: resident tokens over capacity, the two
        pools weighted by their bytes per token (the draft's cache is the smaller one). Below
        usage_fraction by the unfilled tails of the sequences' last blocks."""
        per_token = self.target_bytes_per_token + self.draft_bytes_per_token
        capacity = self.blocks_total * self.block_size * per_token
        used = self.target_tokens * self.target_bytes_per_token + self.draft_tokens * self.draft_bytes_per_token
        return min(1.0, used / capacity) if capacity else 0.0


class PoolExport:
    """The pool gauges, written from PoolState at every scrape (a few lines, nothing cached).

    The endpoint picker (Gateway API Inference Extension / llm-d-router) reads, per pod: queued
    requests, running requests, KV-cache usage 0-1 and, optionally, an info series whose labels give
    the block size, the block count and whether prefix caching is on. With `vllm_names` the queue,
    running and usage gauges and the info series are also published under vLLM's names, which the
    picker reads from pods without an `llm-d.ai/engine-type` label."""

    USAGE = ("adasd_kv_cache_usage_perc", "KV pool usage 0-1: blocks held by sequences / blocks (cached prefix "
             "blocks count as free).")
    TOKENS = ("adasd_kv_cache_tokens_perc", "KV pool fill 0-1: resident tokens / capacity, the target's "
              "and the draft's pools weighted by bytes per token.")
    BLOCKS = (("adasd_kv_blocks_total", "KV blocks in each pool (the target's and the draft's).", "blocks_total"),
              ("adasd_kv_blocks_used", "KV blocks held by sequences.", "blocks_used"),
              ("adasd_kv_blocks_cached", "Free KV blocks that still hold a reusable prompt prefix.", "blocks_cached"))
    INFO_DOC = "KV pool configuration (value 1): block_size = positions per block, num_gpu_blocks = blocks per pool."
    VLLM = (("vllm:num_requests_waiting", "adasd_num_requests_waiting under vLLM's name.", "waiting"),
            ("vllm:num_requests_running", "adasd_num_requests_running under vLLM's name.", "running"),
            ("vllm:kv_cache_usage_perc", "adasd_kv_cache_usage_perc under vLLM's name.", "usage"))

    def __init__(self, model_name: str, pool: PoolState, vllm_names: bool = False):
        self.pool, self.labels = pool, label_text({"model_name": model_name})
        self.model_name = model_name
        rows = [(*self.USAGE, "usage"), (*self.TOKENS, "tokens"), *self.BLOCKS, *(self.VLLM if vllm_names else ())]
        self.rows = [(family_header(name, doc, "gauge") + name + self.labels + " ", what) for name, doc, what in rows]
        self.info_names = ["adasd_cache_config_info"] + (["vllm:cache_config_info"] if vllm_names else [])
        self.info_text = ""

    def set_info(self) -> None:
        pool = self.pool
        if not pool.blocks_total:
            self.info_text = ""
            return
        # str(bool), as vLLM writes its config values: "True" / "False"
        labels = label_text({"model_name": self.model_name, "block_size": str(pool.block_size),
                             "num_gpu_blocks": str(pool.blocks_total), "cache_dtype": pool.dtype,
                             "enable_prefix_caching": str(pool.prefix_caching)})
        self.info_text = "".join(family_header(name, self.INFO_DOC, "gauge") + f"{name}{labels} 1.0\n"
                                 for name in self.info_names)

    def render(self) -> str:
        pool = self.pool
        values = {"usage": pool.usage_fraction(), "tokens": pool.token_fraction(), "waiting": pool.waiting,
                  "running": pool.running, "blocks_total": pool.blocks_total, "blocks_used": pool.blocks_used,
                  "blocks_cached": pool.blocks_cached}
        return "".join(f"{prefix}{fmt(values[what])}\n" for prefix, what in self.rows) + self.info_text


# KVUsage's cumulative counts -> (adasd counter, vLLM's name for it, help)
KV_COUNTERS = {
    "prefix_queries": ("adasd_prefix_cache_queries_total", "vllm:prefix_cache_queries_total",
                       "Prompt tokens looked up in the prefix cache."),
    "prefix_hits": ("adasd_prefix_cache_hits_total", "vllm:prefix_cache_hits_total",
                    "Prompt tokens found in the prefix cache (their KV blocks reused, not computed)."),
    "preemptions": ("adasd_num_preemptions_total", "vllm:num_preemptions_total",
                    "Requests preempted (their blocks freed, to be recomputed) when KV blocks ran out."),
}


class AdasdMetrics:
    """Prometheus metrics of one server; `registry` is the list of families it renders.

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

    Prefix-cache hit rate (prompt tokens found / looked up), and preemptions per second:
        sum by (model_name) (rate(adasd_prefix_cache_hits_total[5m]))
          / sum by (model_name) (rate(adasd_prefix_cache_queries_total[5m]))
        sum by (model_name) (rate(adasd_num_preemptions_total[5m]))

    Request rate by outcome, and p95 time to first token:
        sum by (model_name, status) (rate(adasd_requests_total[1m]))
        histogram_quantile(0.95, sum by (le, model_name) (rate(adasd_time_to_first_token_seconds_bucket[5m])))
    """

    def __init__(self, model_name: str, default_method: str = "adasd", vllm_names: bool = False):
        self.model_name = model_name
        self.registry: list[Family] = []
        registry, label = self.registry, ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(registry, name, doc, label + list(extra))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(registry, name, doc, label, buckets=buckets).labels(model_name)

        def gauge(name: str, doc: str):
            return Gauge(registry, name, doc, label).labels(model_name)

        def lazy_gauge(name: str, doc: str) -> Gauge:
            # NaN until a request reports a value, so the series exists for dashboards from the start
            g = Gauge(registry, name, doc, label)
            g.labels(model_name).set(float("nan"))
            return g

        self.requests = counter("adasd_requests_total", "Finished generations by method and outcome "
                                "(success, cancelled, error, rejected).", ("method", "status"))
        self.prompt_tokens = counter("adasd_prompt_tokens_total",
                                     "Prompt tokens of started generations.").labels(model_name)
        self.generation_tokens = counter("adasd_generation_tokens_total", "Generated tokens.").labels(model_name)
        self.draft_tokens = counter("adasd_draft_tokens_total",
                                    "Candidate tokens proposed by the draft.").labels(model_name)
        accepted = counter("adasd_accepted_tokens_total", "Draft tokens accepted, by the check that accepted "
                           "them: standard (rejection sampling) or relaxed (JS / Bayes).", ("check",))
        self.accepted_standard = accepted.labels(model_name, "standard")
        self.accepted_relaxed = accepted.labels(model_name, "relaxed")
        self.target_forwards = counter("adasd_target_forwards_total", "Target model forward passes.").labels(model_name)
        self.draft_forwards = counter("adasd_draft_forwards_total", "Draft model forward passes.").labels(model_name)

        self.ttft = histogram("adasd_time_to_first_token_seconds", "Time from arrival to the first token.",
                              LATENCY_BUCKETS)
        self.itl = histogram("adasd_inter_token_latency_seconds", "Time between tokens (a round's wait "
                             "divided over the tokens it produced).", LATENCY_BUCKETS)
        self.e2e = histogram("adasd_e2e_request_latency_seconds", "Arrival to last token of successful generations.",
                             E2E_BUCKETS)
        self.queue_time = histogram("adasd_request_queue_time_seconds",
                                    "Time a generation waited before the worker admitted it.", E2E_BUCKETS)
        self.acceptance_rate = histogram("adasd_request_acceptance_rate", "Per-request accepted / drafted tokens.",
                                         RATE_BUCKETS)
        self.speedup = histogram("adasd_request_speedup", "Per-request estimated speedup over the target alone.",
                                 SPEEDUP_BUCKETS)
        self.mean_draft_length = histogram("adasd_request_mean_draft_length", "Per-request mean candidates per round.",
                                           DRAFT_LENGTH_BUCKETS)

        self.running = gauge("adasd_num_requests_running", "Generations the worker is interleaving.")
        self.waiting = gauge("adasd_num_requests_waiting", "Generations waiting for the worker to admit them.")
        self.worker_up = gauge("adasd_worker_up", "1 while the worker process is loaded and serving, else 0.")
        self.entropy_threshold = lazy_gauge("adasd_entropy_threshold",
                                            "T_G at the end of the most recently finished request.")
        self.js_threshold = lazy_gauge("adasd_js_threshold", "T_V at the end of the most recently finished request "
                                  "(threshold verification).")

        # the server's warm-start statistics (adasd_core.warm), per family "method/check/greedy|sampled": the
        # live state, which learns from every round; new requests start from its last published snapshot
        family = ["model_name", "family"]
        self.warm_entropy_threshold = Gauge(registry, "adasd_warm_entropy_threshold", "T_G of the server's "
                                            "warm-start statistics (mean entropy of every rejected candidate so far).",
                                            family)
        self.warm_js_threshold = Gauge(registry, "adasd_warm_js_threshold", "T_V of the server's warm-start "
                                       "statistics (threshold verification).", family)
        self.warm_kde_samples = Gauge(registry, "adasd_warm_kde_samples", "Distances in the server's warm-start "
                                      "KDEs (bayes verification), by group.", family + ["group"])
        self.warm_rounds = Gauge(registry, "adasd_warm_rounds", "Rounds the server's warm-start statistics have "
                                 "learned from.", family)
        self.warm_published_rounds = Gauge(registry, "adasd_warm_published_rounds", "Rounds in the published "
                                           "warm-start snapshot new requests start from (0: none yet; it changes only "
                                           "at publications, and so does system_fingerprint).", family)

        for status in REQUEST_STATUSES:  # make the common series exist at 0
            self.requests.labels(model_name, default_method, status)

        # the worker reports totals since it started; these count on across its restarts
        self.kv_counters = {field: [counter(name, doc).labels(model_name)]
                            + ([counter(vllm_name, f"{name} under vLLM's name.").labels(model_name)]
                               if vllm_names else [])
                            for field, (name, vllm_name, doc) in KV_COUNTERS.items()}
        self.kv_baseline = dict.fromkeys(KV_COUNTERS, 0)

        self.pool = PoolState()
        self.pool_export = PoolExport(model_name, self.pool, vllm_names)

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

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.pool.running, self.pool.waiting = running, waiting

    def set_pool(self, info: dict | None) -> None:
        """The worker's "ready" info (None: no worker): pool sizes; resident tokens and blocks restart at 0,
        and so do the worker's totals the counters' increments are taken from."""
        pool = self.pool
        pool.target_tokens = pool.draft_tokens = pool.blocks_used = pool.blocks_cached = 0
        self.kv_baseline = dict.fromkeys(KV_COUNTERS, 0)
        if info is None:
            return
        pool.blocks_total = int(info.get("kv_blocks") or 0)
        pool.block_size = int(info.get("block_size") or 0)
        pool.prefix_caching = bool(info.get("prefix_caching"))
        per_token = info.get("kv_bytes_per_token") or {}
        pool.target_bytes_per_token = int(per_token.get("target") or 0)
        pool.draft_bytes_per_token = int(per_token.get("draft") or 0)
        pool.dtype = str(info.get("dtype") or "")
        self.pool_export.set_info()

    def observe_kv(self, usage) -> None:
        """A worker's KVUsage report: the pool's state, and its totals since it started as increments."""
        pool = self.pool
        pool.target_tokens, pool.draft_tokens = usage.target_tokens, usage.draft_tokens
        pool.blocks_used, pool.blocks_cached = usage.blocks_used, usage.blocks_cached
        for field, children in self.kv_counters.items():
            total = getattr(usage, field)
            step, self.kv_baseline[field] = total - self.kv_baseline[field], total
            if step > 0:
                for child in children:
                    child.inc(step)

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
        text = "".join([f.render() for f in self.registry] + [self.pool_export.render()])
        return text.encode(), CONTENT_TYPE_LATEST
