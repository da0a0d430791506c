"""`Engine`: continuous batching on one base model, a different adapter per request.

    engine = Engine(model, tokenizer, max_model_len=512)
    engine.adapters.register("support", "adapters/support")
    outputs = engine.generate(["Hi", "Hello"], adapters=["support", None], sampling=SamplingParams(max_tokens=32))

Every step (`step()`), in this order and nowhere else:
1. requests that arrived and aborts from other threads are taken in;
2. waiting requests whose adapter is resident now are bound to its version (residency is the adapter
   cache's answer, an input to the scheduler — adapter_cache.py);
3. the scheduler plans (scheduler.py): which sequences run and how many tokens each;
4. the plan becomes one `Step` (step.py): all their new tokens packed into one row `[1, T]` — decode
   tokens and prefill chunks alike, whatever adapter each uses — with per-token routing and the paged
   KV plan; the runner (runner.py) runs the forward and samples. If the step raises, its chunks run
   again one by one, so only the one that caused it fails;
5. the scheduler applies the result (`update`); new tokens are settled into text (outputs.py) and
   streamed; finished requests give back their blocks and their adapter.

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

from lorakit.errors import ContextLengthError, RequestError
from lorakit.routing import BASE_ADAPTER
from lorakit.serve.adapter_cache import AdapterCache
from lorakit.serve.kv_cache import PagedKVCache
from lorakit.serve.outputs import RequestOutput, output_of, settle
from lorakit.serve.request_handle import RequestHandle
from lorakit.serve.runner import ModelRunner, StepResult
from lorakit.serve.sampling import SamplingParams, generator_for
from lorakit.serve.scheduler import Plan, Scheduler, Sequence
from lorakit.serve.step import build_step
from lorakit.serve.structured import Grammars
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
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, max_loras)
        self.runner = ModelRunner(model, self.eos_ids)
        self.grammars = Grammars(tokenizer, self.vocab_size)  # structured output (structured.py)
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
        if sampling.structured is not None:  # compiled here, in the caller's thread: a RequestError for a bad one
            seq.constraint = self.grammars.constraint(sampling.structured)
        seq.forks = [self._sequence(ids, sampling, adapter, choice) for choice in range(1, sampling.n)]
        for fork in seq.forks:  # one prompt, one list of its logprobs; each choice its own grammar state
            fork.prompt_logprobs = seq.prompt_logprobs
            fork.constraint = seq.constraint.copy() if seq.constraint is not None else None
        if adapter is None:
            self.scheduler.bind(seq, BASE_ADAPTER)
        else:  # unknown names and failed loads raise here, before the request is queued
            version = self.adapters.acquire(adapter, waiter=seq.id)
            if version is not None:
                try:
                    self._bind(seq, version)
                except ContextLengthError:
                    self._release(seq)
                    raise
        self._arrivals.append(seq)
        self._wake.set()
        handle = RequestHandle(self, seq)
        handle.choices += [RequestHandle(self, fork) for fork in seq.forks]
        return handle

    def _sequence(self, ids: list[int], sampling: SamplingParams, adapter: str | None, choice: int) -> Sequence:
        seq = Sequence(ids, sampling, adapter, generator_for(sampling, choice), choice=choice)
        if sampling.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # the first prompt token has none
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

    def _bind(self, seq: Sequence, version: str) -> None:
        """`seq` and its waiting choices run with `version` (acquired once for `seq`; each choice holds it too).
        Raises ContextLengthError if its adapter's slots leave no room (the version is still bound: release it)."""
        for _ in seq.forks:
            self.adapters.retain(version)
        self.scheduler.bind(seq, version, self.virtual.count(version))  # slots: 0 for the base and layer adapters
        if seq.adapter_slots:
            self.check_length(seq.adapter_slots + len(seq.prompt_ids), seq.params.max_tokens)

    def _bind_waiting(self) -> None:
        """Bind every waiting request whose adapter is resident now; one whose adapter failed to load, or whose
        adapter's slots do not fit, ends with the reason (that request only)."""
        for seq in [s for s in self.scheduler.waiting if not s.bound]:
            try:
                version = self.adapters.acquire(seq.adapter, waiter=seq.id)
                if version is not None:
                    self._bind(seq, version)
            except ContextLengthError as error:
                self._fail(seq, str(error))
            except Exception as error:  # noqa: BLE001 - the loader's error ends this request only
                seq.error_kind = "adapter"
                self._fail(seq, str(error))

    # -- the step loop ---------------------------------------------------------------------------
    def step(self) -> int:
        """Run one step (see the module's docstring); returns the number of sequences that ran."""
        with self._step_lock:
            self._take_inbox()
            self._bind_waiting()
            plan = self.scheduler.schedule()
            if not plan:
                return 0
            result = self._run(plan)
            for seq, message in result.failed.items():
                self._fail(seq, message)
            now = time.perf_counter()
            for seq, entries in result.prompt_logprobs.items():
                for t, entry in entries:
                    if t == len(seq.prompt_logprobs):
                        seq.prompt_logprobs.append(entry)
            grown = self.scheduler.update(plan, {s: t for s, t in result.sampled.items() if not s.finished})
            for seq in grown:
                self._emit(seq, result.logprobs.get(seq), now)
            self.steps += 1
            self._recent.append((now, len(grown)))
            while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
                self._recent.popleft()
            return len(plan)

    def _run(self, plan: Plan) -> StepResult:
        """The plan as one step. If it raises, its chunks run again one by one, so only the one that caused it fails
        (its request gets the error); the others' cache writes are simply redone."""
        try:
            return self.runner.execute(build_step(plan, self.cache, self.virtual))
        except Exception as error:  # a bug or a bad input must not take the step's other requests with it
            if len(plan) == 1:
                seq = plan.scheduled[0].seq
                _log.exception("engine step failed for request %d", seq.id)
                return StepResult(failed={seq: f"internal error in the engine step: {type(error).__name__}: {error}"})
            _log.warning("engine step of %d requests failed (%s: %s); running them one by one", len(plan),
                         type(error).__name__, error)
            result = StepResult()
            for item in plan:
                result.merge(self._run(Plan([item])))
            return result

    def _emit(self, seq: Sequence, logprob, now: float) -> None:
        """A new token of `seq`: its logprob, its settled text streamed, and the end if it ends here."""
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.token_times.append(now)
        self.tokens_out += 1
        try:
            if seq.constraint is not None:
                seq.constraint.consume(seq.output_ids[-1])
            complete = seq.constraint is not None and seq.constraint.done
            reason, delta = settle(seq, seq.output_ids[-1], self.tokenizer, self.eos_ids, complete)
        except Exception as error:  # noqa: BLE001 - decoding one request's tokens never takes the step down
            self._fail(seq, f"decoding failed: {type(error).__name__}: {error}")
            return
        seq.events.put((seq.output_ids[-1], delta))
        if reason:
            self._finish(seq, reason)

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.error = message
        self._finish(seq, "error")

    def _take_inbox(self) -> None:
        while self._arrivals:
            seq = self._arrivals.popleft()
            self.prompt_tokens += len(seq.prompt_ids)
            if not seq.finished:
                self.scheduler.add(seq)
        while self._aborts:
            seq = self._aborts.popleft()
            if not seq.finished:
                self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        for ended in self.scheduler.finish(seq, reason):
            self._release(ended)
            ended.events.put(None)

    def _release(self, seq: Sequence) -> None:
        """Give back what `seq` holds of the adapter cache: its version, or its place among a load's waiters."""
        if seq.version not in (None, BASE_ADAPTER):
            self.adapters.release(seq.version)
        elif seq.adapter is not None:
            self.adapters.forget(seq.adapter, seq.id)

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
            for one in (seq, *seq.forks):  # the scheduler may be what broke: no bookkeeping, just an end
                if not one.finished:
                    one.error = message
                    one.finish_reason = "error"
                    one.events.put(None)

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
