"""Requests and the continuous-batching scheduler: who runs in the next step, and how many tokens.

The scheduler only plans and keeps the books: `schedule()` returns a `Plan` and changes nothing
but queue membership and KV blocks; `update(plan, sampled)` applies what the step computed;
`finish(seq, reason)` ends a request. Every change of a sequence's scheduling state goes through
these three, so the scheduler is tested with no model at all (tests/serve/test_scheduler.py).
Which adapter version a request runs with is an input: the engine binds a waiting sequence
(`bind`) once its adapter is resident; an unbound one is passed over.

Every step, under a token budget (`max_num_batched_tokens`):
1. every running sequence that has all its tokens in the cache decodes one token — decodes
   go first, so a long prompt never stalls them;
2. running sequences still in prefill continue with their next chunk;
3. waiting requests are admitted in arrival order while there is a free sequence slot
   (`max_num_seqs`), budget, KV blocks for their first chunk, and room among the adapters of
   this step (`max_loras`). Admission is strictly FIFO: when the oldest waiting request does
   not fit, no later one jumps ahead — so a request for a rare adapter waits at most until the
   running requests of other adapters finish (no starvation). Requests not bound yet (their
   adapter is loading) are passed over until they are.
When a running sequence needs a KV block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed
(prompt + what it generated so far) — slower, never wrong.

A request with `n` choices is one sequence that computes the prompt, holding the other choices
as `forks`; when it samples its first token they start from its KV blocks (shared, the partly
filled last one copied: kv_cache.fork), or, if no block is free for the copy, from the queue.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from lorakit.routing import BASE_ADAPTER
from lorakit.serve.kv_cache import PagedKVCache
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.stream import TokenStream

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None  # the name asked for (None: the base model)
    generator: torch.Generator | None
    id: int = field(default_factory=lambda: next(_ids))
    version: str | None = None  # the adapter version it runs with (BASE_ADAPTER: none); None until bound
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    computed: int = 0  # tokens whose K/V are in the cache
    adapter_slots: int = 0  # leading positions its adapter fills (a soft prompt, a prefix), before the prompt
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_kind: str | None = None  # "adapter": its adapter failed to load (the request's 400, not a 500)
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0
    emitted: int = 0  # characters of `text` already streamed
    events: TokenStream = field(default_factory=TokenStream)  # streamed to the request's handle
    choice: int = 0  # its index among its request's `n` choices
    forks: list[Sequence] = field(default_factory=list)  # choices 1..n-1, waiting for this one's prompt
    logprobs: list = field(default_factory=list)  # a TokenLogprob per output token, when asked for
    prompt_logprobs: list | None = None  # a TokenLogprob per prompt token (None for the first), when asked for
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    constraint: object | None = None  # its grammar's state, when its output must match one (structured.py)

    @property
    def tokens(self) -> list[int]:
        """What occupies the sequence's positions: its adapter's slots (placeholder id 0; the engine puts the
        adapter's embeddings or keys and values there), the prompt, the output."""
        return [0] * self.adapter_slots + self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def bound(self) -> bool:
        return self.version is not None


@dataclass
class Scheduled:
    seq: Sequence
    start: int  # first token (sequence position) computed this step
    count: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so its last logits give the next token."""
        return self.start + self.count == len(self.seq.tokens)


@dataclass
class Plan:
    """One step: the chunks to compute, decodes first; a sequence appears at most once."""

    scheduled: list[Scheduled] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scheduled)

    def __iter__(self):
        return iter(self.scheduled)


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int, max_loras: int):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- requests in and out ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def bind(self, seq: Sequence, version: str, adapter_slots: int = 0) -> None:
        """`seq` (and its choices waiting on it) runs with adapter `version`, resident now."""
        for one in (seq, *seq.forks):
            one.version, one.adapter_slots = version, adapter_slots

    def finish(self, seq: Sequence, reason: str) -> list[Sequence]:
        """End `seq` (and its choices that never started) with `reason`; frees its blocks. The sequences ended."""
        ended = [seq, *seq.forks]
        for one in ended:
            one.finish_reason = reason
            if one is not seq:
                one.error = one.error or seq.error
            self.cache.release(one.blocks)
            if one in self.running:
                self.running.remove(one)
            if one in self.waiting:
                self.waiting.remove(one)
        seq.forks = []
        return ended

    # -- planning ------------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        budget, batch = self.max_num_batched_tokens, []
        reserved = sum(len(s.forks) for s in self.running)  # choices that join when their prompt is done
        for seq in list(self.running):  # 1 and 2: decodes first, then prefill chunks
            if seq not in self.running:  # preempted below for an older sequence
                continue
            if len(seq.tokens) - seq.computed == 1:
                if self._make_room(seq, seq.computed + 1):
                    batch.append(Scheduled(seq, seq.computed, 1))
                    budget -= 1
        for seq in list(self.running):
            remaining = len(seq.tokens) - seq.computed
            if seq in self.running and remaining > 1 and budget > 0:
                count = min(remaining, budget)
                if self._make_room(seq, seq.computed + count):
                    batch.append(Scheduled(seq, seq.computed, count))
                    budget -= count
        adapters = {s.version for s in self.running} - {BASE_ADAPTER}
        for seq in list(self.waiting):  # 3: admission, strictly in order
            seats = len(self.running) + reserved + 1 + len(seq.forks)
            if budget <= 0 or seats > max(self.max_num_seqs, 1 + len(seq.forks)):
                break
            if not seq.bound:
                continue  # its adapter is loading: the others go on
            if seq.version != BASE_ADAPTER and seq.version not in adapters and len(adapters) >= self.max_loras:
                break
            count = min(len(seq.tokens) - seq.computed, budget)
            if not self.cache.grow(seq.blocks, seq.computed + count):
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            reserved += len(seq.forks)
            adapters.add(seq.version)
            adapters.discard(BASE_ADAPTER)
            seq.first_scheduled = seq.first_scheduled or time.perf_counter()
            batch.append(Scheduled(seq, seq.computed, count))
            budget -= count
        return Plan([s for s in batch if s.seq in self.running])  # a prefill chunk may have preempted a decode

    def _make_room(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for `tokens` tokens of `seq`, preempting the newest running sequences if needed;
        False if `seq` itself had to be preempted."""
        while not self.cache.grow(seq.blocks, tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.cache.release(seq.blocks)
        seq.computed = 0
        seq.preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    # -- applying a step -------------------------------------------------------------------------------
    def update(self, plan: Plan, sampled: dict[Sequence, int]) -> list[Sequence]:
        """Apply one step: each chunk's tokens are in the cache now, each sequence that sampled gets its token,
        and the choices waiting on a prompt start. `sampled` also holds the first token of each such choice
        (sampled from its prompt's logits). Sequences that ended during the step (their chunk failed) are
        skipped. Returns the sequences that got a token, in plan order."""
        grown = []
        for item in plan:
            seq = item.seq
            if seq.finished:
                continue
            seq.computed += item.count
            if item.samples and seq in sampled:
                seq.output_ids.append(sampled[seq])
                grown.append(seq)
                grown += self._start_forks(seq, sampled)
        return grown

    def _start_forks(self, seq: Sequence, sampled: dict[Sequence, int]) -> list[Sequence]:
        """Choices 1..n-1 of `seq`'s request, from its prompt: its KV blocks shared (the last, partly filled one
        copied), each with its own first token; one that gets no block for the copy computes its prompt later."""
        started = []
        for fork in seq.forks:
            if fork not in sampled:
                continue
            fork.output_ids.append(sampled[fork])
            fork.first_scheduled = seq.first_scheduled
            blocks = self.cache.fork(seq.blocks, seq.computed)  # the prompt (seq's new token is not computed yet)
            if blocks is None:
                self.waiting.appendleft(fork)
            else:
                fork.blocks, fork.computed = blocks, seq.computed
                self.running.append(fork)
            started.append(fork)
        seq.forks = [f for f in seq.forks if f not in sampled]
        return started
