"""`ModelRunner`: runs one `Step` — the forward over its packed row, then each sequence's sampling.

The forward goes through the model's `forward_packed` (per-token routing, virtual-token slots placed
by the step) with the paged attention named for that forward only (attention.paged): the model is
the caller's, and between steps it is as they left it. Only the kept positions reach the LM head.

Sampling is per sequence and fails per sequence: a sequence whose settings or logits make sampling
raise gets an error, the others their tokens. A choice waiting on its prompt (`Sequence.forks`)
samples its first token from the same logits with its own generator. Logprobs are the model's
log-softmax before any sampling transform (sampling.py); a chunk that computes prompt positions a
request wants logprobs for gives them too (prompt token t from position t - 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lorakit.serve import attention
from lorakit.serve.sampling import TokenLogprob, choose, logprob_of
from lorakit.serve.scheduler import Scheduled, Sequence
from lorakit.serve.step import Step, wants_prompt_logprobs

_log = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: dict[Sequence, int] = field(default_factory=dict)  # the next token of each sequence that sampled
    logprobs: dict[Sequence, TokenLogprob] = field(default_factory=dict)  # its entry, when its request asks
    prompt_logprobs: dict[Sequence, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)  # (t, entry)
    failed: dict[Sequence, str] = field(default_factory=dict)  # sequences whose sampling raised, and why

    def merge(self, other: StepResult) -> None:
        for mine, theirs in ((self.sampled, other.sampled), (self.logprobs, other.logprobs),
                             (self.prompt_logprobs, other.prompt_logprobs), (self.failed, other.failed)):
            mine.update(theirs)


class ModelRunner:
    def __init__(self, model, eos_ids: set[int]):
        self.model, self.eos_ids = model, eos_ids
        self.config = model.get_base_model().config

    def forward(self, step: Step) -> torch.Tensor:
        """The logits of the step's kept positions (rows in `step.spans` order)."""
        placed = (step.embed_rows, step.embeds) if step.embed_rows is not None else None
        with torch.no_grad(), attention.paged(self.config, step.kv):
            out = self.model.forward_packed(step.input_ids, step.positions, step.routing, logits_to_keep=step.keep,
                                            placed_embeddings=placed)
        return out.logits[0]

    def execute(self, step: Step) -> StepResult:
        """Forward, then sample (raises only if the forward does: the caller re-runs the chunks alone)."""
        logits, result = self.forward(step), StepResult()
        for item, (first, count) in zip(step.plan, step.spans, strict=True):
            rows = logits[first:first + count]
            if wants_prompt_logprobs(item):
                result.prompt_logprobs[item.seq] = self._prompt_logprobs(item, rows)
            if item.samples:
                for seq in (item.seq, *item.seq.forks):
                    self._sample(seq, rows[-1], result)
        return result

    def _sample(self, seq: Sequence, logits: torch.Tensor, result: StepResult) -> None:
        stop_ids = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else self.eos_ids)
        try:  # its settings, its logits, its grammar: one request's sampling never takes the step down
            allowed = seq.constraint.allowed(logits.device) if seq.constraint is not None else None
            token, logprob = choose(logits, seq.params, seq.generator, seq.prompt_ids, seq.output_ids, stop_ids,
                                    allowed)
        except Exception as error:  # noqa: BLE001
            _log.warning("sampling failed for request %d: %s", seq.id, error)
            result.failed[seq] = f"sampling failed: {type(error).__name__}: {error}"
            return
        result.sampled[seq] = token
        if logprob is not None:
            result.logprobs[seq] = logprob

    @staticmethod
    def _prompt_logprobs(item: Scheduled, rows: torch.Tensor) -> list[tuple[int, TokenLogprob]]:
        seq, found = item.seq, []
        logprobs = torch.log_softmax(rows.float(), dim=-1)
        for row, position in enumerate(range(item.start, item.start + item.count)):
            t = position + 1 - seq.adapter_slots  # the prompt token this position predicts
            if 0 < t < len(seq.prompt_ids):
                found.append((t, logprob_of(logprobs[row], seq.prompt_ids[t], seq.params.prompt_logprobs)))
        return found
