"""QLoRA training step: lorakit vs PEFT + bitsandbytes, SmolLM2-135M in NF4, r16 all-linear, batch 4 x 128.

    python bench/qlora_step.py        (= python bench/train_step.py --batch 4 --seq 128 --quantize nf4)
"""

from train_step import main

if __name__ == "__main__":
    main(["--batch", "4", "--seq", "128", "--quantize", "nf4"])
