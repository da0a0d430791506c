"""Mixed-adapter batches from the slot banks: a fresh routing per step, per-token routing, hot-swap.

The banked path (one bmm pair per rank bucket, from the bank, no reuse needed) must equal the
plain reference path (a GEMM pair per adapter group) and each row run alone (fp32, atol 1e-5),
for per-row and per-token routings, mixed ranks, `__base__` rows and tokens.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

import lorakit
from conftest import assert_rows_equal_alone, inputs_for, output_of, tiny_gpt2, tiny_llama
from lorakit.methods import AdapterLayer
from lorakit.methods.lora.layer import LoraLinear
from lorakit.routing import Routing, adapter_routing

ATOL = 1e-5


def _model(builder=tiny_llama, count: int = 5):
    base = builder()
    targets = [["q_proj", "v_proj", "down_proj"], ["k_proj", "up_proj"], "all-linear", ["q_proj"], ["o_proj", "v_proj"]]
    if builder is tiny_gpt2:
        targets = [["c_attn", "c_fc"], ["c_proj"], "all-linear", ["c_attn"], ["c_fc", "c_proj"]]
    model = None
    for i in range(count):
        config = lorakit.LoraConfig(r=(2, 8, 4, 3, 5)[i % 5], lora_alpha=(4, 3, 8, 1, 10)[i % 5], use_rslora=i % 2 == 1,
                                    target_modules=targets[i % 5], init_lora_weights=False)
        if model is None:
            model = lorakit.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", config)
    return model.eval(), base


def _run(model, inputs, routing):
    with torch.no_grad(), adapter_routing(routing):
        return output_of(model, inputs)


def _alone(model, inputs, name):
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return output_of(model, inputs)
        model.set_adapter(name)
        return output_of(model, inputs)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("seq", [1, 3, 9])  # decode-like and prefill-like
def test_a_fresh_routing_takes_the_banked_path_and_equals_the_reference(builder, seq):
    model, base = _model(builder)
    names = ["a3", "__base__", "a0", "a4", "a1", "a3", "a2", "__base__", "a0"]
    inputs = inputs_for(base, batch=len(names), seq=seq)
    reference = _run(model, inputs, Routing(names, reference=True))
    fresh = Routing(names)
    banked = _run(model, inputs, fresh)
    assert any(key[0] == "bank" for key in fresh._cache)  # the banked path ran
    torch.testing.assert_close(banked, reference, atol=ATOL, rtol=0)
    for row in (0, 1, 4):  # and each row equals its adapter alone
        alone = _alone(model, {k: v[row:row + 1] for k, v in inputs.items()}, names[row])
        torch.testing.assert_close(banked[row:row + 1], alone, atol=ATOL, rtol=0)


def test_a_freed_row_between_used_rows_is_skipped_by_the_banked_path():
    """Delete an adapter between two of the same rank, as a server's unload does: the dense span over the
    bank's rows now has a free row, which gets no tokens (it raised a KeyError before)."""
    base = tiny_llama()
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = lorakit.get_peft_model(copy.deepcopy(base), config, adapter_name="x0").eval()
    for name in ("x1", "x2"):
        model.add_adapter(name, config)
    model.delete_adapter("x1")
    names = ["x2", "x0", "__base__", "x2"]
    assert_rows_equal_alone(model, base, inputs_for(model, batch=len(names), seq=3), names)


def test_with_gradients_the_plain_path_runs_and_gradients_reach_the_parameters():
    model, base = _model()
    inputs = inputs_for(base, batch=3, seq=2)
    routing = Routing(["a2", "a0", "__base__"])
    with adapter_routing(routing):
        output_of(model, inputs).sum().backward()
    assert not any(key[0] == "bank" for key in routing._cache)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    a, b = layer.factors("a0")
    assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0


def test_per_token_routing_equals_per_row_and_each_token_alone():
    model, base = _model()
    names = ["a1", "a4", "__base__"]
    inputs = inputs_for(base, batch=3, seq=4)
    per_row = _run(model, inputs, Routing(names))
    per_token = _run(model, inputs, Routing([n for n in names for _ in range(4)], per_token=True))
    torch.testing.assert_close(per_token, per_row, atol=ATOL, rtol=0)
    # one layer, a packed [1, T] batch with a different adapter per token, mixed ranks and __base__
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear) and len(m.r) >= 3)
    tokens = ["a0", "a2", "__base__", "a2", "a4", "a0", "a1", "__base__"]
    tokens = [t if t == "__base__" or layer.holds(t) else "a2" for t in tokens]
    x = torch.randn(1, len(tokens), layer.in_features)
    for routing in (Routing(tokens, per_token=True), Routing(tokens, per_token=True, reference=True)):
        with torch.no_grad(), adapter_routing(routing):
            packed = layer(x)
        for t, name in enumerate(tokens):
            with torch.no_grad():
                if name == "__base__":
                    alone = layer.base_layer(x[:, t])
                else:
                    model.set_adapter(name)
                    alone = layer(x[:, t])
            torch.testing.assert_close(packed[:, t], alone, atol=ATOL, rtol=0)


def test_routing_errors_name_the_mismatch():
    model, base = _model()
    inputs = inputs_for(base, batch=2, seq=3)
    with pytest.raises(lorakit.errors.RoutingError, match="3 entries but the batch has 2 rows"):
        output_of(model, inputs, adapter_names=["a0", "a1", "a2"])
    with pytest.raises(lorakit.errors.RoutingError, match="packed batch has 6 tokens"):
        output_of(model, inputs, adapter_names=Routing(["a0"] * 5, per_token=True))


def _banked_equals_reference(model, inputs, names, atol=ATOL):
    banked = _run(model, inputs, Routing(names))
    torch.testing.assert_close(banked, _run(model, inputs, Routing(names, reference=True)), atol=atol, rtol=0)
    return banked


def test_mixed_batches_stay_exact_when_parameters_get_new_storage_or_new_values():
    """A training model's factors are plain Parameters; its bank rows are copies re-made when a parameter is no
    longer the tensor or the version it was copied from. So nothing that gives parameters new storage — a deepcopy,
    an in-place step, load_state_dict(assign=True), a dtype move — can leave the banked path reading old rows."""
    model, base = _model()
    names = ["a2", "a0", "a4", "a1"]
    inputs = inputs_for(base, batch=4, seq=2)
    before = _banked_equals_reference(model, inputs, names)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # a step on the copy's parameters: its banked path sees it, the original is untouched
        for param in _factors(twin, "a0"):
            param.mul_(2)
    torch.testing.assert_close(_run(model, inputs, Routing(names)), before, atol=0, rtol=0)
    stepped = _banked_equals_reference(twin, inputs, names)
    assert not torch.allclose(stepped, before)
    state = {k: v.clone() * (1.5 if ".a1." in k else 1.0) for k, v in twin.state_dict().items() if "lora_" in k}
    twin.load_state_dict(state, strict=False, assign=True)  # the given tensors become the parameters
    given = {v.data_ptr() for k, v in state.items() if ".a1." in k}
    assert {p.data_ptr() for p in _factors(twin, "a1")} == given  # assign honoured: no copy into old storage
    assigned = _banked_equals_reference(twin, inputs, names)
    assert not torch.allclose(assigned, stepped)
    twin.to(torch.float64)
    wide = _banked_equals_reference(twin, {k: v for k, v in inputs.items()}, names)
    torch.testing.assert_close(wide.float(), assigned, atol=1e-4, rtol=0)
    layers = [m for m in twin.modules() if isinstance(m, LoraLinear) and m.bank.buckets]
    assert layers and all(b.a.dtype == torch.float64 for layer in layers for b in layer.bank.buckets.values())


def test_mixed_batches_stay_exact_under_torch_compile():
    model, base = _model(count=3)
    names = ["a2", "a0", "__base__", "a1"]
    inputs = inputs_for(base, batch=4, seq=3)
    eager = _banked_equals_reference(model, inputs, names)
    compiled = copy.deepcopy(model)
    compiled.base_model.model = torch.compile(compiled.base_model.model, backend="eager")
    torch.testing.assert_close(_run(compiled, inputs, Routing(names)), eager, atol=ATOL, rtol=0)
    with torch.no_grad():
        for param in _factors(compiled, "a2"):
            param.mul_(2)  # an optimizer step's in-place write: Δ ×4
    changed = _run(compiled, inputs, Routing(names))
    torch.testing.assert_close(changed, _run(compiled, inputs, Routing(names, reference=True)), atol=ATOL, rtol=0)
    assert not torch.allclose(changed[0], eager[0])


def test_a_serving_model_keeps_lora_factors_in_its_banks_only_and_moves_them_with_it():
    base = tiny_llama()
    serving = lorakit.PeftModel.for_serving(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules="all-linear"))
    training = lorakit.get_peft_model(copy.deepcopy(base), _swap_config(2), adapter_name="s0")
    training.add_adapter("s1", _swap_config(3))
    for name in ("s0", "s1"):
        serving.add_adapter(name, _swap_config(2 + int(name[1])))
        with torch.no_grad():
            for mine, theirs in zip(_factors(serving, name), _factors(training, name), strict=True):
                mine.copy_(theirs)  # a bank row: written in place
    assert not any("lora_" in n for n, _ in serving.named_parameters())  # one copy: the bank rows
    names = ["s1", "__base__", "s0"]
    inputs = inputs_for(base, batch=3, seq=2)
    expected = _banked_equals_reference(training.eval(), inputs, names)
    torch.testing.assert_close(_banked_equals_reference(serving, inputs, names), expected, atol=ATOL, rtol=0)
    serving.to(torch.float64)
    torch.testing.assert_close(_banked_equals_reference(serving, inputs, names).float(), expected, atol=1e-4, rtol=0)


def test_a_bank_of_200_adapters_costs_their_weights_plus_little_slack():
    base = tiny_llama()
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules=["q_proj", "v_proj"]),
                                   adapter_name="t0")
    tree = [(name, type(m)) for name, m in model.named_modules()]
    for i in range(1, 200):
        model.add_adapter(f"t{i}", lorakit.LoraConfig(r=(1, 2, 4)[i % 3], target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    assert [(name, type(m)) for name, m in model.named_modules()] == tree  # no module added
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    expected = sum(4 * (1, 2, 4)[i % 3] * (32 + 32 + 32 + 16) * 2 for i in range(1, 200)) + 4 * 1 * (64 + 48) * 2
    assert adapter_bytes == expected  # exactly A and B of every adapter, nothing duplicated
    assert len(model.state_dict()) == len(base.state_dict()) + 2 * 200 * len(layers)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == base_bytes + adapter_bytes
    serving = lorakit.PeftModel.for_serving(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules=["q_proj",
                                                                                                     "v_proj"]))
    for i in range(200):
        serving.add_adapter(f"t{i}", lorakit.LoraConfig(r=(1, 2, 4)[i % 3] if i else 1, target_modules=["q_proj",
                                                                                                   "v_proj"]))
    bank_bytes = sum(layer.bank.bytes() for layer in serving.base_model.adapter_layers())
    assert adapter_bytes <= bank_bytes <= 1.10 * adapter_bytes  # a serving model's banks: the storage, ≤10% unused

    names = [f"t{i}" for i in range(200)]
    inputs = inputs_for(base, batch=200, seq=2)
    mixed = model.generate(**inputs, adapter_names=names, max_new_tokens=2, do_sample=False, pad_token_id=0)
    for row in (0, 57, 199):
        model.set_adapter(names[row])
        alone = model.generate(**{k: v[row:row + 1] for k, v in inputs.items()}, max_new_tokens=2, do_sample=False,
                               pad_token_id=0)
        width = alone.shape[1]  # a row that hit EOS alone stops; in the batch it is padded with 0
        assert torch.equal(mixed[row:row + 1, :width], alone) and not mixed[row, width:].any()
    model.delete_adapter("t57")
    assert [(name, type(m)) for name, m in model.named_modules()] == tree
    assert not any(".t57." in n for n, _ in model.named_parameters())


def _factors(model, name):
    return [p for layer in model.base_model.adapter_layers() if name in layer.r for p in layer.factors(name)]


def _swap_config(seed: int) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=(2, 4, 8)[seed % 3], lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def test_hot_swap_under_load():
    """One thread runs mixed forwards in a loop while another loads, replaces and deletes adapters.
    No exception; every forward's rows equal their adapters alone, as they were when it started
    (rebuilt from a snapshot taken under the same read lock); the module tree never changes."""
    base = tiny_llama()
    model = lorakit.get_peft_model(copy.deepcopy(base), _swap_config(0), adapter_name="keep").eval()
    model.add_adapter("swap", _swap_config(1))
    tree = [(name, id(m)) for name, m in model.named_modules()]
    inputs = inputs_for(base, batch=4, seq=3)
    seen, errors, stop = [], [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                with model.adapter_set.lock.reading():  # the forward below nests in this read
                    names = ["keep", "swap" if "swap" in model.peft_config else "__base__", "__base__", "keep"]
                    snapshot = {n: [t.clone() for t in _factors(model, n)] for n in set(names) - {"__base__"}}
                    with torch.no_grad():
                        seen.append((names, snapshot, output_of(model, inputs, adapter_names=names)))
            except Exception as error:  # noqa: BLE001 - any exception fails the test below
                errors.append(error)

    def swap():
        seed = 1
        while not stop.is_set():
            seed += 1
            try:
                model.delete_adapter("swap")
                model.add_adapter("swap", _swap_config(seed))
                model.add_adapter("other", _swap_config(seed + 1))
                model.delete_adapter("other")
            except Exception as error:  # noqa: BLE001
                errors.append(error)

    threads = [threading.Thread(target=serve), threading.Thread(target=swap)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(seen) >= 5
    assert [(name, id(m)) for name, m in model.named_modules()] == tree
    versions = {tuple(snap["swap"][0].flatten()[:4].tolist()) for _, snap, _ in seen if "swap" in snap}
    assert len(versions) >= 2  # the forwards really ran across replacements
    for names, snapshot, mixed in seen[:: max(1, len(seen) // 6)]:
        check = lorakit.get_peft_model(copy.deepcopy(base), _swap_config(0), adapter_name="keep").eval()
        for name, tensors in snapshot.items():  # the adapters as they were, rebuilt
            if name == "swap":
                check.add_adapter("swap", _swap_config({2: 3, 4: 4, 8: 5}[tensors[0].shape[0]]))
            with torch.no_grad():
                for param, saved in zip(_factors(check, name), tensors, strict=True):
                    param.copy_(saved)
        for row, name in enumerate(names):
            alone = _alone(check, {k: v[row:row + 1] for k, v in inputs.items()}, name)
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=ATOL, rtol=0)


def test_adapters_of_one_rank_in_two_dtypes_share_a_bucket_after_a_dtype_change():
    layer = LoraLinear(torch.nn.Linear(8, 6))
    layer.update_layer("a", r=2, lora_alpha=2, init_lora_weights=False)
    layer.update_layer("b", r=2, lora_alpha=2, weights=(torch.randn(2, 8, dtype=torch.float64),
                                                        torch.randn(6, 2, dtype=torch.float64)))
    x = torch.randn(2, 8)
    with torch.no_grad(), adapter_routing(Routing(["a", "b"])):
        banked = layer(x)
    assert len(layer.bank.buckets) == 2  # (2, fp32) and (2, fp64)
    with torch.no_grad(), adapter_routing(Routing(["a", "b"], reference=True)):
        torch.testing.assert_close(banked, layer(x), atol=ATOL, rtol=0)
    layer.double()
    x = torch.randn(3, 8, dtype=torch.float64)
    for routing in (Routing(["a", "b", "__base__"]), Routing(["a", "b", "__base__"], reference=True)):
        with torch.no_grad(), adapter_routing(routing):
            mixed = layer(x)
        assert len(layer.bank.buckets) == 1
        for row, name in enumerate(["a", "b"]):
            layer.set_adapter([name], trainable=False)
            with torch.no_grad():
                torch.testing.assert_close(mixed[row], layer(x[row:row + 1])[0], atol=ATOL, rtol=0)
