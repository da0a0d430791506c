"""`Engine`: continuous batching on one base model, a different adapter per request.

    engine = Engine(model, tokenizer, max_model_len=512)
    engine.adapters.register("support", "adapters/support")
    outputs = engine.generate(["Hi", "Hello"], adapters=["support", None], sampling=SamplingParams(max_tokens=32))

Every step (`step()`), the scheduler (scheduler.py) picks the sequences to run and how many
tokens each; the engine packs all their new tokens into one row `[1, T]` — decode tokens and
prefill chunks alike, whatever adapter each uses — and runs one forward with per-token
adapter routing (routing.py, methods/lora/mixed.py) and the paged attention (attention.py,
kv_cache.py). Only the last token of each sequence that completes goes through the LM head.

Why packed and not padded per step: a step that mixes one 256-token prefill chunk with 15
decodes costs 271 tokens packed, 16 × 256 padded; and per-token routing costs the same as
per-row routing (one bmm pair per rank bucket). transformers' own continuous batching
(`generate_batch`) packs too, but takes no per-token adapters, so the cache and the attention
here are ours (~150 lines), plugged in through transformers' attention interface.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence as Seq

import torch

from lorakit.errors import ContextLengthError, RequestError
from lorakit.routing import BASE_ADAPTER, Routing
from lorakit.serve import attention
from lorakit.serve.adapter_cache import AdapterCache
from lorakit.serve.kv_cache import PagedKVCache
from lorakit.serve.outputs import RequestOutput, output_of, settle
from lorakit.serve.packing import pack, wants_prompt_logprobs
from lorakit.serve.request_handle import RequestHandle
from lorakit.serve.sampling import SamplingParams, choose, generator_for, logprob_of
from lorakit.serve.scheduler import Scheduled, Scheduler, Sequence
from lorakit.serve.virtual import VirtualTokens

_log = logging.getLogger(__name__)
_RATE_WINDOW_S = 10.0  # tokens_per_s in stats(): over the steps of the last 10 s


class Engine:
    def __init__(self, model, tokenizer=None, *, max_model_len: int = 2048, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, kv_cache_memory: int = 2 << 30, block_size: int = 16,
                 max_loras: int = 8, max_cpu_loras: int = 8):
        self.model, self.tokenizer = model.eval(), tokenizer
        base = model.get_base_model()
        config = base.config
        base.config._attn_implementation = attention.register()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dtype = next(p for p in base.parameters() if p.dtype.is_floating_point).dtype
        per_block = PagedKVCache.bytes_per_block(config.num_hidden_layers, kv_heads, head_dim, block_size, dtype)
        num_blocks = kv_cache_memory // per_block
        if num_blocks * block_size < max_model_len:
            raise RequestError(f"kv_cache_memory={kv_cache_memory} holds {num_blocks * block_size} tokens, fewer than "
                               f"max_model_len={max_model_len}; raise the memory or lower max_model_len.")
        self.cache = PagedKVCache(config.num_hidden_layers, kv_heads, head_dim, num_blocks, block_size, dtype,
                                  next(base.parameters()).device)
        self.max_model_len = max_model_len
        self.eos_ids = set(_as_list(getattr(getattr(base, "generation_config", None), "eos_token_id", None)))
        self.adapters = AdapterCache(model, max_cpu_loras)
        self.virtual = VirtualTokens(model)  # soft prompts and prefixes of the loaded adapters (serve/virtual.py)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, max_loras, self._bind)
        self.steps = 0
        self.tokens_out = 0
        self.prompt_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens sampled) of the last steps: tok/s
        # Requests and aborts from other threads wait here for the next step, so a caller (a server's
        # event loop) never blocks on a step in progress; deque appends are atomic.
        self._arrivals: deque[Sequence] = deque()
        self._aborts: deque[Sequence] = deque()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by a new request: the idle background loop starts a step
        self.dead: str | None = None  # why the background loop died (a server's /health reports it)

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | list[dict], adapter: str | None = None,
                    sampling: SamplingParams | None = None) -> RequestHandle:
        """Queue a request (text, token ids, or chat messages); refused before any compute if it cannot fit.

        A resident adapter is bound now: the request runs with the version loaded at this moment,
        whatever replaces or unloads it later. A cold one is bound when its load completes. With
        `sampling.n` > 1 the handle's `choices` are n sequences; the first computes the prompt, and the
        others start from its KV blocks (shared, not recomputed) when it samples its first token."""
        if self.dead is not None:
            raise RequestError(f"The engine has stopped ({self.dead}); restart the server.")
        sampling = sampling or SamplingParams()
        ids = self._tokenize(prompt)
        if not ids:
            raise RequestError("The prompt is empty.")
        self.check_tokens(ids)
        self.check_sampling(sampling)
        self.check_length(len(ids), sampling.max_tokens)
        seq = self._sequence(ids, sampling, adapter, 0)
        if adapter is not None:  # unknown names and failed loads raise here, before the request is queued
            seq.version = self.adapters.acquire(adapter, waiter=seq.id) or BASE_ADAPTER
            seq.virtual = self.virtual.count(seq.version)  # 0 for the base and layer adapters
            if seq.virtual:
                self.check_length(seq.virtual + len(ids), sampling.max_tokens)
        seq.forks = [self._sequence(ids, sampling, adapter, choice) for choice in range(1, sampling.n)]
        self._arrivals.append(seq)
        self._wake.set()
        handle = RequestHandle(self, seq)
        handle.choices += [RequestHandle(self, fork) for fork in seq.forks]
        return handle

    def _sequence(self, ids: list[int], sampling: SamplingParams, adapter: str | None, choice: int) -> Sequence:
        seq = Sequence(ids, sampling, adapter, generator_for(sampling, choice), choice=choice)
        if sampling.prompt_logprobs is not None:
            seq.prompt_logprobs = []
        return seq

    def check_tokens(self, ids: list[int], what: str = "Token id", param: str | None = None) -> None:
        """Token ids the model can embed and score (an id past the vocabulary would fail the whole step it ran in,
        or its request's sampling). An adapter cannot resize the vocabulary (files/tensors.py refuses a resized
        embedding), so the base's is every adapter's."""
        vocab = self.vocab_size
        wrong = next((t for t in ids if not 0 <= t < vocab), None)
        if wrong is not None:
            raise RequestError(f"{what} {wrong} is outside this model's vocabulary (ids 0 to {vocab - 1}).", param)

    def check_sampling(self, sampling: SamplingParams) -> None:
        """The token ids a request's sampling settings name index the logits: in range, or a 400 naming them."""
        self.check_tokens(list(sampling.logit_bias), "logit_bias: token id", "logit_bias")
        self.check_tokens(sampling.allowed_token_ids or [], "allowed_token_ids: token id", "allowed_token_ids")
        self.check_tokens([t for words in sampling.bad_words_ids for t in words], "bad_words: token id", "bad_words")

    @property
    def vocab_size(self) -> int:
        embedding_rows = self.model.get_input_embeddings().weight.shape[0]
        head = self.model.get_output_embeddings()
        return min(embedding_rows, head.weight.shape[0]) if head is not None else embedding_rows

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(prompt_tokens, max_tokens, self.max_model_len)

    def abort(self, handle: RequestHandle, reason: str | None = None) -> None:
        """Stop a request — every one of its choices — and free its KV blocks (at once, or before the next step of
        a background loop). `reason`: why the server stopped it (a shutdown), kept as its error; None: its
        client went away."""
        for choice in handle.choices:
            if reason is not None and choice.seq.error is None:
                choice.seq.error = reason
            self._aborts.append(choice.seq)
        if not self.running_in_background:
            with self._step_lock:
                self._take_inbox()

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._arrivals)

    def generate(self, prompts: Seq[str | list[int] | list[dict]], adapters: Seq[str | None] | None = None,
                 sampling: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """vLLM's offline `LLM.generate`: all requests at once, run to completion, outputs in order."""
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        handles = [self.add_request(p, a, s) for p, a, s in zip(prompts, adapters, samplings, strict=True)]
        while not all(h.seq.finished for h in handles):
            if not self.running_in_background:
                self.step()
            else:
                time.sleep(0.001)
        return [self.output_of(h.seq) for h in handles]

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("Text prompts need a tokenizer: Engine(model, tokenizer).")
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [int(t) for t in prompt]

    def _bind(self, seq: Sequence) -> bool:
        """Bind a waiting request to its adapter's current version (False while that version loads)."""
        try:
            version = self.adapters.acquire(seq.adapter, waiter=seq.id)
        except Exception as error:  # noqa: BLE001 - the loader's error ends this request only
            seq.error_kind = "adapter"
            self._fail(seq, str(error))
            return False
        if version is None:
            return False
        seq.version, seq.virtual = version, self.virtual.count(version)
        if seq.virtual + len(seq.prompt_ids) + seq.params.max_tokens > self.max_model_len:
            self._fail(seq, str(ContextLengthError(seq.virtual + len(seq.prompt_ids), seq.params.max_tokens,
                                                   self.max_model_len)))
            return False
        return True

    # -- the step loop ---------------------------------------------------------------------------
    def step(self) -> int:
        """Schedule and run one forward; returns the number of sequences that ran."""
        with self._step_lock:
            self._take_inbox()
            batch = self.scheduler.schedule()
            if not batch:
                return 0
            now, sampled = time.perf_counter(), 0
            for item, rows in self._run(batch):
                if rows is None:  # failed alone: its error is set, the others go on
                    continue
                seq = item.seq
                seq.computed += item.count
                self._record_prompt_logprobs(item, rows)
                if item.samples:
                    self._sample_into(seq, rows[-1], now)
                    sampled += 1
                    if seq.forks:
                        sampled += self._start_forks(seq, rows[-1], now)
            self.steps += 1
            self._recent.append((now, sampled))
            while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
                self._recent.popleft()
            return len(batch)

    def _run(self, batch: list[Scheduled]) -> list[tuple[Scheduled, torch.Tensor | None]]:
        """Each chunk with its rows of logits. If the step raises, its chunks run again one by one, so only the
        one that caused it fails (its request gets the error); the others' cache writes are simply redone."""
        try:
            logits, spans = self._forward(batch)
            return [(item, logits[first:first + count]) for item, (first, count) in zip(batch, spans, strict=True)]
        except Exception as error:  # a bug or a bad input must not take the step's other requests with it
            if len(batch) == 1:
                _log.exception("engine step failed for request %d", batch[0].seq.id)
                self._fail(batch[0].seq, f"internal error in the engine step: {type(error).__name__}: {error}")
                return [(batch[0], None)]
            _log.warning("engine step of %d requests failed (%s: %s); running them one by one", len(batch),
                         type(error).__name__, error)
            return [outcome for item in batch for outcome in self._run([item])]

    def _record_prompt_logprobs(self, item: Scheduled, rows: torch.Tensor) -> None:
        """Prompt token t's logprob comes from the logits of the position before it (the first token has none)."""
        seq = item.seq
        if not wants_prompt_logprobs(item):
            return
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        logprobs = torch.log_softmax(rows.float(), dim=-1)
        for row, position in enumerate(range(item.start, item.start + item.count)):
            t = position + 1 - seq.virtual  # the prompt token this position predicts
            if t == len(seq.prompt_logprobs) and t < len(seq.prompt_ids):
                seq.prompt_logprobs.append(logprob_of(logprobs[row], seq.prompt_ids[t], seq.params.prompt_logprobs))

    def _start_forks(self, seq: Sequence, logits: torch.Tensor, now: float) -> int:
        """Choices 1..n-1 of `seq`'s request start from its prompt: its KV blocks shared (the last, partly filled
        one copied), their first token sampled from the same logits with their own generator."""
        started = 0
        for fork in seq.forks:
            blocks = self.cache.fork(seq.blocks, seq.computed)
            if blocks is None:  # no block free for the copy: it computes its prompt itself, later
                fork.version, fork.virtual = BASE_ADAPTER, 0
                self.scheduler.waiting.appendleft(fork)
                continue
            fork.blocks, fork.computed, fork.virtual = blocks, seq.computed, seq.virtual
            fork.version = seq.version
            if fork.version != BASE_ADAPTER:
                self.adapters.retain(fork.version)
            fork.prompt_logprobs, fork.first_scheduled = seq.prompt_logprobs, seq.first_scheduled
            self.scheduler.running.append(fork)
            self._sample_into(fork, logits, now)
            started += 1
        seq.forks = []
        return started

    def _sample_into(self, seq: Sequence, logits: torch.Tensor, now: float) -> None:
        """Sample `seq`'s next token and settle its text; a failure (its settings, its logits, decoding)
        fails that request alone."""
        try:
            token, logprob = choose(logits, seq.params, seq.generator, seq.prompt_ids, seq.output_ids,
                                    self._stop_ids(seq))
            if logprob is not None:
                seq.logprobs.append(logprob)
            self._append(seq, token, now)
        except Exception as error:  # noqa: BLE001 - one request's sampling never takes the step down
            _log.warning("sampling failed for request %d: %s", seq.id, error)
            if not seq.finished:
                self._fail(seq, f"sampling failed: {type(error).__name__}: {error}")

    def _stop_ids(self, seq: Sequence) -> set[int]:
        """What min_tokens holds back: EOS (unless ignored) and the request's stop token ids."""
        return set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else self.eos_ids)

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.error = message
        self._finish(seq, "error")

    def _take_inbox(self) -> None:
        while self._arrivals:
            seq = self._arrivals.popleft()
            self.prompt_tokens += len(seq.prompt_ids)
            if not seq.finished:
                self.scheduler.waiting.append(seq)
        while self._aborts:
            seq = self._aborts.popleft()
            if not seq.finished:
                self._finish(seq, "abort")

    def _forward(self, batch: list[Scheduled]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """One forward over the packed step (packing.py): the logits of the positions it keeps, and each chunk's
        rows among them."""
        step = pack(batch, self.cache)
        device = self.cache.k[0].device
        virtual = self.virtual.plan(batch, self.cache.block_size, device)
        step.plan.fixed = virtual.fixed
        routing = Routing(step.names, per_token=True, virtual_placed=True)
        inputs = {"input_ids": torch.tensor([step.ids], device=device)}
        with torch.no_grad(), attention.step_plan(step.plan):
            if virtual.embed_rows:  # soft prompts: their embeddings in their slots (under the step's routing)
                with self.model.base_model.running(routing):
                    embeds = self.model.get_input_embeddings()(inputs.pop("input_ids"))
                rows = torch.tensor(virtual.embed_rows, device=device)
                inputs["inputs_embeds"] = embeds.index_copy(1, rows, torch.stack(virtual.embeds)[None].to(embeds.dtype))
            out = self.model(**inputs, position_ids=torch.tensor([step.positions], device=device), use_cache=False,
                             adapter_names=routing, logits_to_keep=torch.tensor(step.keep, dtype=torch.long, device=device))
        return out.logits[0], step.spans

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        seq.output_ids.append(token)
        seq.token_times.append(now)
        self.tokens_out += 1
        reason, delta = settle(seq, token, self.tokenizer, self.eos_ids)
        seq.events.put((token, delta))
        if reason:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        if seq.version != BASE_ADAPTER:
            self.adapters.release(seq.version)
        elif seq.adapter is not None:  # ended while it waited for its adapter
            self.adapters.forget(seq.adapter, seq.id)
        seq.events.put(None)
        for fork in seq.forks:  # choices that never started end as their prompt's sequence did
            fork.error = fork.error or seq.error
            fork.finish_reason = reason
            fork.events.put(None)
        seq.forks = []

    # -- background loop (servers) ---------------------------------------------------------------------
    @property
    def running_in_background(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Run steps in a background thread (request handles then stream without driving the loop)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                if not self.step():
                    self._wake.wait(0.05)  # idle (or waiting for an adapter to load): sleep until a request comes
        except BaseException as error:  # outside any one request (the scheduler, the inbox): the engine is dead
            _log.exception("the engine loop died")
            self.dead = f"{type(error).__name__}: {error}"
            self._fail_everything(f"the engine stopped: {self.dead}")

    def _fail_everything(self, message: str) -> None:
        """Every request still queued or running ends with `message`, so no client waits forever."""
        for seq in [*self._arrivals, *self.scheduler.waiting, *self.scheduler.running]:
            if not seq.finished:
                seq.error = message
                seq.finish_reason = "error"
                seq.events.put(None)

    def stop(self) -> None:
        """Stop the background loop (requests still queued stay queued; `start()` resumes)."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop the loop and the adapter loader: the engine is done."""
        self.stop()
        self.adapters.close()

    # -- results and statistics ----------------------------------------------------------------------------
    def output_of(self, seq: Sequence) -> RequestOutput:
        return output_of(seq)

    def stats(self) -> dict:
        """Counters and gauges a server exports (serve/metrics.py); latencies are per request (`output_of`)."""
        cache = self.adapters.stats
        recent = list(self._recent)
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        return {"running": len(self.scheduler.running), "waiting": self.waiting,
                "kv_blocks_used": self.cache.used_blocks, "kv_blocks_total": self.cache.num_blocks,
                "steps": self.steps, "tokens_out": self.tokens_out, "prompt_tokens": self.prompt_tokens,
                "tokens_per_s": round(sum(n for _, n in recent[1:]) / span, 2) if span else 0.0,
                "adapters_resident": self.adapters.resident_count(),
                "adapter_hits": cache.hits, "adapter_misses": cache.misses, "adapter_evictions": cache.evictions,
                "adapter_loads": cache.loads, "adapter_load_s": round(cache.load_seconds, 4)}


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
