"""What a round hands back for one sequence, built from what the round already holds: the emitted
tokens' log-probabilities and where each token came from (their excess surprisal comes with the
verdict: verification.accept_batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adasd_core.sequence import TokenLogprob, TokenSource


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_n: int) -> list[TokenLogprob]:
    """Raw target log-probabilities (temperature 1) of emitted tokens, with the top-N alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None]).squeeze(-1).tolist()
    top_vals, top_ids = (logp.topk(top_n, dim=-1) if top_n else (logp[:, :0], logp[:, :0].long()))
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return [TokenLogprob(t, lp, list(zip(ids, vals))) for t, lp, ids, vals in zip(tokens, chosen, top_ids, top_vals)]


def token_sources(draft: Draft | None, verdict, round_no: int, forced: int = 0) -> list[TokenSource]:
    """Where each token a round emits came from, from what the round already holds on the host
    (`forced`: the round's forced tokens, before its candidates)."""
    n, k = verdict.n_accepted, len(draft.ids) if draft else 0

    def drafted(i: int, source: str, rejected: int | None = None) -> TokenSource:
        return TokenSource(source, round_no, draft.entropies[i], verdict.distances[i] if verdict.distances else None,
                           verdict.posteriors[i] if verdict.posteriors else None, rejected)

    out = [TokenSource("forced", round_no) for _ in range(forced)]
    out += [TokenSource("forced", round_no) if i in draft.forced else
            drafted(i, "standard" if verdict.standard[i] else "relaxed") for i in range(n)]
    if n < k:
        out.append(drafted(n, "correction", rejected=draft.ids[n]))
    else:
        out.append(TokenSource("bonus" if k else "ar", round_no))
    return out


@dataclass
class Draft:
    """One sequence's candidates in the current round."""

    ids: list[int]
    probs: list[torch.Tensor]  # [V] each
    entropies: list[float]
    masks: list[torch.Tensor] | None = None  # the grammar's bitmask [W] before each candidate (None: no grammar)
    forced: list[int] = field(default_factory=list)  # positions of candidates the grammar forced (no draft step)
