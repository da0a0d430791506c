"""Sampling parameters per request, and the sampler: OpenAI's and vLLM's settings, honoured.

Each choice samples with its own `torch.Generator` (seeded by `seed` + the choice's index, or
from the OS), so a seeded request draws the same tokens whatever else shares its batch
(tested). In float32, in vLLM's order:

    allowed_token_ids → bad words → logit_bias → repetition / frequency / presence penalties →
    min_tokens (no EOS, no stop id before it) → greedy, or temperature → top-k → top-p → min-p →
    multinomial

Greedy when `temperature` is below 1e-5 (0 is the default, as in vLLM's offline API; vLLM also
treats a temperature that small as greedy: dividing by it overflows); top-p always keeps the
most likely token, however small `top_p` is. Logprobs are the model's log-softmax before any of
those transforms — what vLLM returns by default — with the `logprobs` most likely alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from lorakit.serve.structured import StructuredOutput

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a torch.long, as vLLM bounds `seed`
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1, le=128)  # choices; their prompt is computed once (engine.py)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> added to its logit (-100..100)
    min_tokens: int = Field(0, ge=0)
    stop: list[str] = Field(default_factory=list)  # stop strings (the text is cut before them)
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # how the text is decoded (slow tokenizers; fast ones ignore it)
    allowed_token_ids: list[int] | None = Field(None, min_length=1)  # sample only among these
    bad_words_ids: list[list[int]] = Field(default_factory=list)  # token sequences never completed
    structured: StructuredOutput | None = None  # a grammar the output must match (structured.py)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # per sampled token: its logprob and the top N
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # per prompt token (echo, vLLM's field)


@dataclass
class TokenLogprob:
    """One position's logprob of the chosen (or given) token, and the most likely tokens there."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int = 1  # 1 + how many tokens were more likely (vLLM's rank)


def greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def generator_for(params: SamplingParams, choice: int = 0) -> torch.Generator | None:
    if greedy(params):
        return None
    gen = torch.Generator()
    seed = params.seed + choice if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    gen.manual_seed(seed % 2**64)
    return gen


def logprob_of(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry in one row of log-softmaxed logits, with the `top` most likely tokens."""
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0].long())
    rank = int((logprobs > logprobs[token]).sum()) + 1
    return TokenLogprob(token, float(logprobs[token]), list(zip(ids.tolist(), values.tolist(), strict=True)), rank)


def processed(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
              stop_ids: set[int]) -> torch.Tensor:
    """The logits after bias, penalties and min_tokens (float32; the input is not changed)."""
    logits = logits.float().clone()
    if params.allowed_token_ids is not None:
        allowed = torch.full_like(logits, float("-inf"))
        allowed[torch.tensor(params.allowed_token_ids, dtype=torch.long)] = 0.0
        logits += allowed
    for words in params.bad_words_ids:  # a bad word's last token, once the output ends with the rest of it
        if len(words) == 1 or output[len(output) - len(words) + 1:] == words[:-1]:
            logits[words[-1]] = float("-inf")
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if output and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.shape[-1])[: logits.shape[-1]]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if len(output) < params.min_tokens and stop_ids:
        logits[torch.tensor(sorted(stop_ids), dtype=torch.long)] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of (processed) logits (vocab,)."""
    if greedy(params):
        return int(torch.argmax(logits).item())
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p  # the smallest set reaching top_p
        keep[0] = True  # a top_p that rounds to 0 in float32 still keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, prompt: list[int],
           output: list[int], stop_ids: set[int], allowed: torch.Tensor | None = None) -> tuple[int, TokenLogprob | None]:
    """The next token of a sequence (and, if asked, its logprob entry) from its row of logits; `allowed`: the
    tokens its grammar allows (structured.py), applied after every other transform."""
    scores = processed(logits, params, prompt, output, stop_ids)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    token = sample(scores, params, generator)
    if params.logprobs is None:
        return token, None
    return token, logprob_of(torch.log_softmax(logits.float(), dim=-1), token, params.logprobs)
