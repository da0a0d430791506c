"""Bottleneck adapters: lorakit's Houlsby adapter against AdapterHub's `adapters` (double_seq_bn).

Optional, outside `make test`: `adapters` pins transformers 4.57, so its side runs in its own venv
(docs/methods.md):

    /tmp/ah/bin/python bench/adapterhub_parity.py export /tmp/ah.safetensors    # AdapterHub's venv
    .venv/bin/python bench/adapterhub_parity.py check /tmp/ah.safetensors       # ours

`export` builds a tiny Llama, adds AdapterHub's Houlsby adapter (`DoubleSeqBnConfig`: after the
attention block and after the MLP, on the sublayer's output before the skip connection) with random
weights, and saves the base weights, the adapter weights, the input ids and the logits. `check`
loads the same base weights into transformers' Llama here, puts the adapter weights into a
`BottleneckConfig(architecture="houlsby")` adapter, and prints the largest logit difference as JSON
(fp32; AdapterHub's `seq_bn` Pfeiffer adapter reads the residual stream x + MLP(x) instead of the MLP's
output, so it is not the same function as ours: docs/methods.md).
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
REDUCTION, ACTIVATION = 4, "relu"
PLACES = {"attention_adapters": "self_attn.o_proj", "output_adapters": "mlp.down_proj"}


def export(path: str) -> None:
    import adapters
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    base = {f"base.{k}": v.clone() for k, v in model.state_dict().items()}
    adapters.init(model)
    model.add_adapter("bn", config=adapters.DoubleSeqBnConfig(reduction_factor=REDUCTION, non_linearity=ACTIVATION))
    model.set_active_adapters("bn")
    tensors = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters.bn." in name:
                param.normal_(0, 0.3)
                tensors[f"adapter.{name}"] = param.detach().clone()
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 9))
        logits = model(input_ids=ids).logits
    save_file({**base, **tensors, "ids": ids, "logits": logits}, path)
    print(json.dumps({"exported": path, "adapter_tensors": sorted(tensors)[:4]}))


def check(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    saved = load_file(path)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    model.load_state_dict({k.removeprefix("base."): v for k, v in saved.items() if k.startswith("base.")})
    ours = lorakit.get_peft_model(model, lorakit.BottleneckConfig(architecture="houlsby", reduction_factor=REDUCTION,
                                                                  non_linearity=ACTIVATION))
    params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for key, value in saved.items():
            if not key.startswith("adapter."):
                continue
            # adapter.model.layers.0.attention_adapters.adapters.bn.adapter_down.0.weight → ours
            layer, rest = key.removeprefix("adapter.model.").split(".attention_adapters." if "attention_adapters" in key
                                                                   else ".output_adapters.")
            place = PLACES["attention_adapters" if "attention_adapters" in key else "output_adapters"]
            part = rest.removeprefix("adapters.bn.")
            ours_name = {"adapter_down.0.weight": "adapter_down.default.weight", "adapter_down.0.bias": "adapter_down_bias.default",
                         "adapter_up.weight": "adapter_up.default.weight", "adapter_up.bias": "adapter_up_bias.default"}[part]
            params[f"base_model.model.model.{layer}.{place}.{ours_name}"].copy_(value)
            copied += 1
        logits = ours(input_ids=saved["ids"]).logits
    difference = (logits - saved["logits"]).abs().max().item()
    print(json.dumps({"adapter_tensors_copied": copied, "max_abs_logit_difference": difference,
                      "equal_at_fp32_atol_1e-5": difference <= 1e-5}))
    if difference > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    {"export": export, "check": check}[sys.argv[1]](sys.argv[2])
