"""The scheduler with no model (as vLLM tests its v1 scheduler): it only plans (`schedule`), applies a
step's tokens (`update`) and ends requests (`finish`); adapter residency is an input (`bind`).
A fake "step" here samples token 7 for every sequence that reaches its end."""

from __future__ import annotations

import pytest
import torch

from lorakit.routing import BASE_ADAPTER
from lorakit.serve.kv_cache import PagedKVCache
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.scheduler import Plan, Scheduler, Sequence


def _cache(blocks: int = 64, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(1, 1, 1, blocks, block_size, torch.float32)


def _seq(prompt: int, version: str | None = BASE_ADAPTER, max_tokens: int = 4, n: int = 1) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, n=n)
    seq = Sequence(list(range(1, prompt + 1)), params, None if version == BASE_ADAPTER else "a", None)
    seq.forks = [Sequence(list(seq.prompt_ids), params, seq.adapter, None, choice=j) for j in range(1, n)]
    seq.version = version
    for fork in seq.forks:
        fork.version = version
    return seq


def _step(scheduler: Scheduler, plan: Plan) -> list[Sequence]:
    """What the engine does after its forward: every sequence (and waiting choice) at its end samples 7."""
    sampled = {s: 7 for item in plan if item.samples for s in (item.seq, *item.seq.forks)}
    return scheduler.update(plan, sampled)


def test_decodes_go_first_then_prefill_chunks_then_admission_in_order():
    scheduler = Scheduler(_cache(), max_num_seqs=8, max_num_batched_tokens=10, max_loras=4)
    first, second = _seq(6), _seq(12)
    scheduler.add(first)
    plan = scheduler.schedule()
    assert [(i.seq, i.start, i.count) for i in plan] == [(first, 0, 6)] and plan.scheduled[0].samples
    _step(scheduler, plan)
    scheduler.add(second)
    plan = scheduler.schedule()  # first decodes (1 token), second's prompt is chunked to the rest of the budget
    assert [(i.seq, i.start, i.count) for i in plan] == [(first, 6, 1), (second, 0, 9)]
    assert not plan.scheduled[1].samples
    _step(scheduler, plan)
    plan = scheduler.schedule()
    assert [(i.seq, i.start, i.count) for i in plan] == [(first, 7, 1), (second, 9, 3)]
    assert first.output_ids == [7, 7] and second.output_ids == []


def test_admission_is_fifo_and_unbound_sequences_are_passed_over_until_bound():
    scheduler = Scheduler(_cache(), max_num_seqs=2, max_num_batched_tokens=64, max_loras=4)
    loading, ready, later = _seq(3, version=None), _seq(3), _seq(3)
    for seq in (loading, ready, later):
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert [i.seq for i in plan] == [ready, later]  # the one whose adapter loads waits; no error, no callback
    assert list(scheduler.waiting) == [loading]
    _step(scheduler, plan)
    scheduler.bind(loading, "a@1")
    assert [i.seq for i in scheduler.schedule()] == [ready, later]  # seats are full: it waits its turn
    scheduler.finish(ready, "stop")
    assert [(i.seq, i.start) for i in scheduler.schedule()] == [(later, 3), (loading, 0)]


def test_max_loras_blocks_the_head_of_the_queue_and_nothing_jumps_ahead():
    scheduler = Scheduler(_cache(), max_num_seqs=8, max_num_batched_tokens=64, max_loras=1)
    a, b, base = _seq(3, "a@1"), _seq(3, "b@1"), _seq(3)
    for seq in (a, b, base):
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert [i.seq for i in plan] == [a]  # b needs a second adapter in the step; the base request behind it waits
    scheduler.finish(a, "stop")
    assert [i.seq for i in scheduler.schedule()] == [b, base]


def test_the_newest_running_sequence_is_preempted_for_blocks_and_recomputed_later():
    scheduler = Scheduler(_cache(blocks=4, block_size=4), max_num_seqs=8, max_num_batched_tokens=64, max_loras=4)
    old, new = _seq(8), _seq(8)  # 2 blocks each: the cache is full after both prompts
    scheduler.add(old)
    scheduler.add(new)
    _step(scheduler, scheduler.schedule())
    assert old.computed == new.computed == 8 and scheduler.cache.free_blocks == 0
    plan = scheduler.schedule()  # old's decode needs a 3rd block: new gives its blocks back
    assert [i.seq for i in plan] == [old] and new.preemptions == 1 and new.computed == 0
    assert list(scheduler.waiting) == [new] and new.output_ids == [7]  # kept: recomputed with its output
    _step(scheduler, plan)
    scheduler.finish(old, "stop")
    plan = scheduler.schedule()
    assert [(i.seq, i.start, i.count) for i in plan] == [(new, 0, 9)]  # prompt + its token, in one chunk


def test_finish_frees_blocks_and_ends_choices_that_never_started():
    cache = _cache()
    scheduler = Scheduler(cache, max_num_seqs=8, max_num_batched_tokens=64, max_loras=4)
    seq = _seq(6, n=3)
    scheduler.add(seq)
    scheduler.schedule()
    assert cache.used_blocks == 2
    seq.error = "aborted by test"
    ended = scheduler.finish(seq, "abort")
    assert ended == [seq, *ended[1:]] and len(ended) == 3 and all(s.finish_reason == "abort" for s in ended)
    assert all(s.error == "aborted by test" for s in ended) and cache.used_blocks == 0
    assert not scheduler.running and not scheduler.waiting


def test_choices_start_from_the_prompt_blocks_shared_when_the_prompt_samples():
    cache = _cache()
    scheduler = Scheduler(cache, max_num_seqs=8, max_num_batched_tokens=64, max_loras=4)
    seq = _seq(6, n=3)  # 6 tokens: one full block of 4 and a partial one
    scheduler.add(seq)
    grown = _step(scheduler, scheduler.schedule())
    forks = grown[1:]
    assert grown[0] is seq and len(forks) == 2 and not seq.forks
    assert all(f.output_ids == [7] and f.computed == 6 and f in scheduler.running for f in forks)
    assert all(f.blocks[0] == seq.blocks[0] and f.blocks[1] != seq.blocks[1] for f in forks)  # full block shared
    assert cache.used_blocks == 2 + 2  # seq's two, plus one copied partial block per choice
    for one in (seq, *forks):
        scheduler.finish(one, "stop")
    assert cache.used_blocks == 0


def test_a_choice_with_no_block_for_its_copy_computes_its_prompt_later():
    cache = _cache(blocks=2, block_size=4)
    scheduler = Scheduler(cache, max_num_seqs=8, max_num_batched_tokens=64, max_loras=4)
    seq = _seq(6, n=2)
    scheduler.add(seq)
    fork = _step(scheduler, scheduler.schedule())[1]
    assert fork in scheduler.waiting and fork.computed == 0 and fork.output_ids == [7]


def test_a_sequence_that_failed_during_the_step_gets_no_token():
    scheduler = Scheduler(_cache(), max_num_seqs=8, max_num_batched_tokens=64, max_loras=4)
    ok, broken = _seq(3), _seq(3)
    scheduler.add(ok)
    scheduler.add(broken)
    plan = scheduler.schedule()
    scheduler.finish(broken, "error")  # the engine ends it from the step's result
    assert scheduler.update(plan, {ok: 7, broken: 7}) == [ok] and broken.output_ids == []


@pytest.mark.parametrize("budget", [1, 3, 5])
def test_a_long_prompt_is_chunked_to_the_budget_and_samples_only_at_its_end(budget):
    scheduler = Scheduler(_cache(), max_num_seqs=8, max_num_batched_tokens=budget, max_loras=4)
    seq = _seq(11)
    scheduler.add(seq)
    chunks = []
    while not seq.output_ids:
        plan = scheduler.schedule()
        chunks.append((plan.scheduled[0].count, plan.scheduled[0].samples))
        _step(scheduler, plan)
    assert sum(count for count, _ in chunks) == 11 and all(count <= budget for count, _ in chunks)
    assert [samples for _, samples in chunks] == [False] * (len(chunks) - 1) + [True]
