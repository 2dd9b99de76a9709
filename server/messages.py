"""The worker protocol: what the front end and the worker send each other over their pipe.

Every message is one small frozen dataclass, pickled by multiprocessing; fields hold plain Python
values (and the engine's SamplingParams / SpecConfig in a Submit), never tensors. Both sides match
on the class. Every submitted rid ends with exactly one Done or Error.

`epoch` pins a request to the published warm-start state the front end stamped its
system_fingerprint from (Ready.info["epoch"], then each Published); the worker keeps the recent
ones, so a publication racing with a submit cannot change what the request reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------- front end -> worker


@dataclass(frozen=True)
class Submit:
    """Queue one generation."""

    rid: str
    prompt_ids: list[int]
    params: Any  # adasd_core.sampling.SamplingParams
    spec: Any  # adasd_core.engine.SpecConfig
    submitted_at: float  # time.monotonic() in the front end (one clock per host)
    epoch: int | None = None  # the published warm-start state it reads (None: the latest)


@dataclass(frozen=True)
class Cancel:
    """Stop a generation (waiting or running); an unknown rid has already ended."""

    rid: str


@dataclass(frozen=True)
class Shutdown:
    """Cancel everything in flight, save the warm-start state and exit."""


ToWorker = Submit | Cancel | Shutdown

# ---------------------------------------------------------------------------- worker -> front end


@dataclass(frozen=True)
class Ready:
    """The models are loaded; info has pid, context_length, vocab_size, device, slots, kv_blocks, block_size,
    epoch, fingerprints..."""

    info: dict


@dataclass(frozen=True)
class Fatal:
    """The worker cannot serve and exits: it could not load, or its device failed beyond recovery."""

    message: str  # what happened, for the log, /ready and /health


@dataclass(frozen=True)
class Started:
    """A generation was admitted to the running set (again, after a preemption: `resumed`)."""

    rid: str
    queue_s: float  # time from submit to admission
    resumed: bool = False


@dataclass(frozen=True)
class Preempted:
    """A running generation was preempted: it waits again to recompute its tokens (its output so far stands)."""

    rid: str


@dataclass(frozen=True)
class PromptScored:
    """A scored prompt (echo with logprobs), before the generation's first Delta."""

    rid: str
    logprobs: list  # [(token, logprob, [(token, logprob), ...]), ...]; None, None for the first token


@dataclass(frozen=True)
class Delta:
    """The tokens one round added to a generation."""

    rid: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # set on the generation's last Delta
    logprobs: list | None  # [(token, logprob, [(token, logprob), ...]), ...] when asked for
    adasd: dict | None  # {"token_sources": [...], "rounds": [...]} when asked for


@dataclass(frozen=True)
class Done:
    """A generation ended without error."""

    rid: str
    status: str  # success | cancelled
    stats: dict | None  # GenerationStats.to_dict() (with "warm_state" on success); None if it never started


@dataclass(frozen=True)
class Error:
    """A generation failed; the fields are those of the OpenAI error the client gets."""

    rid: str
    status_code: int  # 4xx: the request's fault; 500: a bug; 503: the worker is going away
    message: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class KVUsage:
    """The KV pools' state, engine.kv_report() less the sizes Ready already gave (sent when it
    changes, throttled). The prefix and preemption counts are cumulative since the worker started."""

    target_tokens: int = 0  # tokens resident in the target's pool
    draft_tokens: int = 0
    blocks_used: int = 0  # target pool blocks held by sequences
    blocks_cached: int = 0  # free blocks that still hold a reusable prefix
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens found
    preemptions: int = 0

    @property
    def empty(self) -> bool:
        return self.target_tokens == self.draft_tokens == self.blocks_used == 0


@dataclass(frozen=True)
class Published:
    """New warm-start snapshots: responses from now on carry these fingerprints."""

    epoch: int
    fingerprints: dict[str, str]  # {warm.fingerprint_key: fingerprint}


FromWorker = Ready | Fatal | Started | Preempted | PromptScored | Delta | Done | Error | KVUsage | Published
