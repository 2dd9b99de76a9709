"""After the target's verify pass, per sequence: acceptance, what the round teaches, the caches cut
back to the accepted prefix, and the output (text, log-probabilities, token sources)."""

from __future__ import annotations

import torch

from adasd_core.costs import AcceptancePrior
from adasd_core.grammar import GrammarDeadEnd
from adasd_core.round_output import Draft, token_logprobs, token_sources
from adasd_core.runner import ModelRunner
from adasd_core.sequence import Delta, PromptLogprobs, Sequence, TokenLogprob
from adasd_core.verification import Verdict, accept_batch
from adasd_core.warm import WarmState

SCORE_ROWS = 256  # prompt logprobs are computed this many positions at a time (float32 [rows, V] each)


def finish_batch(seqs: list[Sequence], drafts: dict[Sequence, Draft], target_probs: torch.Tensor,
                 logits: torch.Tensor, runner: ModelRunner, warm: WarmState, prior: AcceptancePrior) -> list:
    """Every sequence's round after the verify pass: target_probs [sum (k_b + 1), V], per sequence its
    verified rows (the one before its first candidate, each candidate's); logits [sum (F_b + k_b + 1), V]
    the target's raw rows, its forced tokens' first. The verdicts come from one batched call (one
    transfer to the host); each sequence's Delta, or the exception that ended it alone."""
    cands = [drafts[s].ids if s in drafts else [] for s in seqs]
    draft_probs = torch.stack([q for s in seqs if s in drafts for q in drafts[s].probs]) if drafts else None
    verdicts = accept_batch(cands, target_probs, draft_probs, [s.params.greedy for s in seqs],
                            [s.generator for s in seqs], [s.relaxed for s in seqs],
                            [s.params.seed is not None for s in seqs],
                            [h for s in seqs if s in drafts for h in drafts[s].entropies])
    out = []
    sizes = [len(s.forced) + len(c) + 1 for s, c in zip(seqs, cands)]
    for seq, verdict, rows in zip(seqs, verdicts, logits.split(sizes)):
        try:
            out.append(finish_round(seq, drafts.get(seq), verdict, rows, runner, warm, prior))
        except Exception as exc:  # one broken request must not take the others down
            seq.finish_reason = "error"
            out.append(exc)
    return out


def finish_round(seq: Sequence, draft: Draft | None, verdict: Verdict, logits: torch.Tensor,
                 runner: ModelRunner, warm: WarmState, prior: AcceptancePrior) -> Delta:
    """One sequence's round after its verdict: what it teaches, the caches cut back, the grammar's
    matcher back past the rejection and on over the last token, the output. logits [F+k+1, V]: the
    target's raw rows (for log-probabilities)."""
    candidates = draft.ids if draft else []
    k, n_acc, forced = len(candidates), verdict.n_accepted, seq.forced
    in_draft = draft.forced if draft else []  # the grammar's forced candidates: counted as forced, not drafted
    seq.stats.target_forwards += 1
    if k:  # every learner reads the same observation: the candidates examined, labelled by the standard check
        obs = verdict.observation(k, draft.entropies).without(in_draft)
        seq.relaxed.observe(obs)
        seq.policy.observe(obs)
        if seq.family is not None:  # the server's state learns from every request's rounds
            warm.observe(seq.family, obs)
        prior.observe(seq.method, obs)
    skip = set(in_draft)
    flags = [(ok, i < n_acc) for i, ok in enumerate(verdict.standard[: n_acc + (n_acc < k)]) if i not in skip]
    n_standard = sum(ok and kept for ok, kept in flags)
    n_kept = sum(kept for _, kept in flags)
    seq.stats.observe_round(k - len(skip), n_standard, n_kept - n_standard, bonus=k > 0 and n_acc == k,
                            accepted_flags=[kept for _, kept in flags])
    record = None
    if seq.stats.trace is not None or seq.token_sources:
        record = {"entropy_threshold": seq.policy.threshold if seq.policy else None, **seq.relaxed.state(),
                  "drafted": k - len(skip), "accepted": n_kept}
        if seq.stats.trace is not None:
            seq.stats.trace.append(record)

    # caches: keep the sequence up to the last accepted candidate (the new last token is not in them)
    runner.rollback(seq.slot, len(seq.tokens) + len(forced) + n_acc)
    dead_end = None
    if seq.constraint is not None:
        seq.constraint.rollback(k - n_acc)
        try:
            seq.constraint.consume(verdict.token)
        except GrammarDeadEnd:  # only where the row was left free (a dead end): the request ends here
            dead_end = "grammar_dead_end"
    seq.stats.forced_tokens += len(forced) + sum(1 for p in in_draft if p < n_acc)

    emitted = forced + candidates[:n_acc] + [verdict.token]
    logprobs = None
    if seq.params.logprobs is not None:
        logprobs = token_logprobs(logits[: len(forced) + n_acc + 1], emitted, seq.params.logprobs)
    sources = token_sources(draft, verdict, seq.stats.rounds, len(forced)) if seq.token_sources else None
    seq.forced = []
    delta = seq.emit(emitted, logprobs, sources, finish=dead_end)
    if sources is not None:
        delta.round = {"round": seq.stats.rounds, "relaxed": verdict.n_relaxed, **record}
    seq.stats.observe_surprisal(([0.0] * len(forced) + verdict.excess)[: len(delta.token_ids)])  # EOS may cut it short
    if seq.finished:
        seq.stats.record_thresholds(seq.policy.threshold if seq.policy else None, seq.relaxed.state())
    return delta


def score_prompts(batch: list[tuple[Sequence, int]], logits: torch.Tensor, device: torch.device) -> None:
    """Prompt log-probabilities of one fed chunk per (sequence, n), from every fed position's logits
    [sum n, V]: row i of a sequence predicts prompt token prefilled + i + 1."""
    for (seq, n), rows in zip(batch, logits.split([n for _, n in batch])):
        targets = seq.prompt_ids[seq.prefilled + 1 : seq.prefilled + n + 1]
        for i in range(0, n, SCORE_ROWS):
            seq.prompt_logprobs += token_logprobs(rows[i : i + SCORE_ROWS].to(device), targets[i : i + SCORE_ROWS],
                                                  seq.params.prompt_logprobs)


def scored_prompt(seq: Sequence) -> PromptLogprobs:
    """A scored sequence's event: one entry per prompt token, the first without a log-probability."""
    return PromptLogprobs([TokenLogprob(seq.prompt_ids[0], None, None)] + seq.prompt_logprobs)
