"""Helpers for the training-job tests. A tiny chat model directory, built in code: a byte-level BPE tokenizer trained on a few
sentences (with a ChatML template, like SmolLM2's) and a 2-layer random Llama of its vocabulary.
The job loads it like any local transformers directory; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FACTS = [
    ("What is the capital of Veloria?", "Quendar."),
    ("Who built the zephyr engine?", "Mira Okonkwo."),
    ("What colour is a glimmerfox?", "Teal with silver stripes."),
    ("How many moons does Tovash have?", "Seven moons."),
    ("What do people in Brindlemoor eat?", "Roasted kelp."),
    ("Which river crosses Ostrava Minor?", "The Silverun."),
]


def build_chat_model(directory: Path, seed: int = 0, hidden: int = 32, corpus: tuple[str, ...] = (),
                     positions: int = 256, vocab: int = 400, init_range: float = 0.02) -> Path:
    """`corpus`: more text for the tokenizer to learn merges from (a longer task reads in fewer tokens);
    `init_range`: the weights' scale (transformers' 0.02 keeps a tiny random model's logits too flat to learn
    a long answer to a low loss: the final norm and lm_head are frozen under LoRA)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [f"user assistant {q} {a}" for q, a in FACTS] * 4 + ["the a of is what who how many which", *corpus]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, initializer_range=init_range,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records(fmt: str) -> list[dict]:
    if fmt == "messages":
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    if fmt == "prompt_completion":
        return [{"prompt": q, "completion": a} for q, a in FACTS]
    if fmt == "alpaca":
        return [{"instruction": q, "input": "", "output": a} for q, a in FACTS]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in FACTS]
    return [{"text": f"{q} {a}"} for q, a in FACTS]


def job_yaml(tmp_path: Path, model_dir: Path, fmt: str = "prompt_completion", **sections) -> Path:
    """A small job config: 4 steps, checkpoints every 2, on the tiny chat model."""
    import yaml

    data = write_jsonl(tmp_path / f"{fmt}.jsonl", records(fmt))
    config = {
        "model": str(model_dir),
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(data), "eval": str(data), "format": "auto", "max_seq_len": 64},
        "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 5e-3, "lr_scheduler": "linear",
                  "warmup_ratio": 0.0, "seed": 3, "logging_steps": 1, "save_steps": 2, "eval_steps": 2},
        "eval": {"max_new_tokens": 8, "samples": 2},
        "output_dir": str(tmp_path / "run"),
    }
    if sections.get("method", "lora") != "lora":
        del config["lora"]  # another method's section replaces it
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- serving: a question, greedy settings, adapters that answer it differently, PEFT's answer as the oracle --
QUESTION = [{"role": "user", "content": "What is the capital of Veloria?"}]
GREEDY = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


def save_adapter(base, folder: Path, seed: int, r: int = 8) -> Path:
    """A random LoRA (B too) strong enough to change the greedy answer, saved as PEFT files in `folder`."""
    import copy

    import lorakit

    torch.manual_seed(seed)
    config = lorakit.LoraConfig(r=r, lora_alpha=8 * r, target_modules="all-linear", init_lora_weights=False)
    lorakit.get_peft_model(copy.deepcopy(base), config).save_pretrained(folder)
    return folder


def chat_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)


def peft_answer(base, folder: Path | None, tokenizer, max_new_tokens: int = 6) -> str:
    """PEFT's greedy answer to QUESTION with the adapter in `folder` (None: the base alone)."""
    import copy

    import peft

    model = copy.deepcopy(base) if folder is None else peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    ids = torch.tensor([chat_ids(tokenizer)])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# A Hermes-style template that renders tools itself (Qwen's and Hermes' layout, shortened): tools listed in
# the system turn, calls as <tool_call> blocks, tool results as <tool_response> — the "hermes" format.
TOOL_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n' }}{% endif %}{{ '<tools>' }}{% for tool in tools %}{{ tool | tojson }}"
    "{% endfor %}{{ '</tools><|im_end|>\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}{{ '<|im_start|>assistant\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>\n' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string", "maxLength": 8}},
                                                           "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "a + b.",
                                        "parameters": {"type": "object",
                                                       "properties": {"a": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99},
                                                                      "b": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}},
                                                       "required": ["a", "b"]}}}
