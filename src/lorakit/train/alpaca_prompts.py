"""Axolotl's Alpaca prompts (`type: alpaca`, `alpaca:chat`), for a run that must train what Axolotl trains.

Axolotl does not render an Alpaca record with the model's chat template: it writes the Stanford
Alpaca prose prompt and tokenizes prompt and response apart — the prompt with the tokenizer's own
special tokens and no EOS, the response without BOS and with EOS — masking the prompt unless
`train_on_inputs`. An adapter trained one way expects that prompt at inference, so lorakit
reproduces it exactly (`data.prompt_style: alpaca | alpaca_chat`; Axolotl's prompters.py,
AlpacaPrompter with PromptStyle.INSTRUCT / CHAT).
"""

from __future__ import annotations

SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.")
SYSTEM_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
STYLES = {
    # style: (system format, turn with input, turn without input)
    "alpaca": ("{system}\n\n", "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
               "### Instruction:\n{instruction}\n\n### Response:\n"),
    "alpaca_chat": ("SYSTEM: {system}\n", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"),
}


def alpaca_prompt(style: str, instruction: str, input_text: str | None) -> str:
    system_format, turn, turn_no_input = STYLES[style]
    if input_text:
        return system_format.format(system=SYSTEM) + turn.format(instruction=instruction, input=input_text)
    return system_format.format(system=SYSTEM_NO_INPUT) + turn_no_input.format(instruction=instruction)


def alpaca_ids(tokenizer, style: str, instruction: str, input_text: str | None,
               output: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) as Axolotl's InstructionPromptTokenizingStrategy builds them."""
    prompt = tokenizer(alpaca_prompt(style, instruction, input_text))["input_ids"]
    response = tokenizer(output, add_special_tokens=True)["input_ids"] if output else []
    if response and tokenizer.bos_token_id is not None and response[0] == tokenizer.bos_token_id:
        response = response[1:]
    if tokenizer.eos_token_id is not None and (not response or response[-1] != tokenizer.eos_token_id):
        response = response + [tokenizer.eos_token_id]
    return prompt, response
