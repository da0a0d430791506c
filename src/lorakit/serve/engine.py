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
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from lorakit.errors import ContextLengthError, RequestError
from lorakit.routing import BASE_ADAPTER, Routing
from lorakit.serve import attention
from lorakit.serve.adapter_cache import AdapterCache
from lorakit.serve.kv_cache import PagedKVCache
from lorakit.serve.outputs import RequestOutput, output_of, settle
from lorakit.serve.packing import pack
from lorakit.serve.sampling import SamplingParams, generator_for, sample
from lorakit.serve.scheduler import Scheduled, Scheduler, Sequence
from lorakit.serve.virtual import VirtualTokens

_log = logging.getLogger(__name__)
_RATE_WINDOW_S = 10.0  # tokens_per_s in stats(): over the steps of the last 10 s


class RequestHandle:
    """Streams one request's tokens: `for token_id, text_delta in handle`, or `async for`; `result()` waits."""

    def __init__(self, engine: Engine, seq: Sequence):
        self.engine, self.seq = engine, seq

    @property
    def request_id(self) -> int:
        return self.seq.id

    def __iter__(self) -> Iterator[tuple[int, str]]:
        while True:
            if not self.engine.running_in_background:
                while self.seq.events.empty():
                    self.engine.step()
            event = self.seq.events.get()
            if event is None:
                return
            yield event

    async def __aiter__(self):
        while True:
            event = await self.seq.events.aget()
            if event is None:
                return
            yield event

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        return self.engine.output_of(self.seq)


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
        whatever replaces or unloads it later. A cold one is bound when its load completes."""
        if self.dead is not None:
            raise RequestError(f"The engine has stopped ({self.dead}); restart the server.")
        sampling = sampling or SamplingParams()
        ids = self._tokenize(prompt)
        if not ids:
            raise RequestError("The prompt is empty.")
        self.check_length(len(ids), sampling.max_tokens)
        seq = Sequence(ids, sampling, adapter, generator_for(sampling))
        if adapter is not None:  # unknown names and failed loads raise here, before the request is queued
            seq.version = self.adapters.acquire(adapter) or BASE_ADAPTER
            seq.virtual = self.virtual.count(seq.version)  # 0 for the base and layer adapters
            if seq.virtual:
                self.check_length(seq.virtual + len(ids), sampling.max_tokens)
        self._arrivals.append(seq)
        self._wake.set()
        return RequestHandle(self, seq)

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(prompt_tokens, max_tokens, self.max_model_len)

    def abort(self, handle: RequestHandle, reason: str | None = None) -> None:
        """Stop a request and free its KV blocks (at once, or before the next step of a background loop).
        `reason`: why the server stopped it (a shutdown), kept as its error; None: its client went away."""
        if reason is not None and handle.seq.error is None:
            handle.seq.error = reason
        self._aborts.append(handle.seq)
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
            version = self.adapters.acquire(seq.adapter)
        except Exception as error:  # noqa: BLE001 - the loader's error ends this request only
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
            try:
                logits = self._forward(batch)
            except Exception as error:  # a bug must not stop the loop: this step's requests fail, others go on
                _log.exception("engine step failed; failing its %d requests", len(batch))
                for item in batch:
                    self._fail(item.seq, f"internal error in the engine step: {type(error).__name__}: {error}")
                return len(batch)
            now = time.perf_counter()
            row = 0
            for item in batch:
                item.seq.computed += item.count
                if item.samples:
                    self._sample_into(item.seq, logits[row], now)
                    row += 1
            self.steps += 1
            self._recent.append((now, row))
            while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
                self._recent.popleft()
            return len(batch)

    def _sample_into(self, seq: Sequence, logits: torch.Tensor, now: float) -> None:
        """Sample `seq`'s next token and settle its text; a failure (its settings, its logits, decoding)
        fails that request alone."""
        try:
            self._append(seq, sample(logits, seq.params, seq.generator), now)
        except Exception as error:  # noqa: BLE001 - one request's sampling never takes the step down
            _log.warning("sampling failed for request %d: %s", seq.id, error)
            if not seq.finished:
                self._fail(seq, f"sampling failed: {type(error).__name__}: {error}")

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

    def _forward(self, batch: list[Scheduled]) -> torch.Tensor:
        """One forward over the packed step (packing.py); the logits of the positions that sample."""
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
        return out.logits[0]

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
        seq.events.put(None)

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
