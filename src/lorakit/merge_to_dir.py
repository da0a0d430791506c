"""`lorakit merge`: the faithful way to bake an adapter into a model, including QLoRA adapters.

Merging into 4-bit weights adds the quantization error of the result on top of the
adapter (the update is small next to NF4's step size, so much of it is lost). Instead:
load the base in full precision, merge W + s·BA there, save a standard transformers model
directory, and only then quantize again if wanted (`--requantize nf4`), through
transformers + bitsandbytes, so the file loads anywhere.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from lorakit.base_models import check_replaceable, load_base, load_tokenizer, write_model_dir
from lorakit.errors import MergeError
from lorakit.model import PeftModel
from lorakit.quant import QUANTIZE_CHOICES, is_quantized

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def merge_to_dir(
    base: str, adapter: str | Path, out: str | Path, dtype: str = "fp32", requantize: str | None = None,
    verify_base: bool = True, overwrite: bool = False,
) -> dict:
    """Merge `adapter` into the full-precision `base`; write the merged model to `out`."""
    if dtype not in DTYPES:
        raise MergeError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    if requantize is not None and requantize not in QUANTIZE_CHOICES:
        raise MergeError(f"--requantize must be one of {QUANTIZE_CHOICES}, got {requantize!r}.")
    try:  # before the slow part; write_model_dir checks again before it renames
        check_replaceable(Path(out), overwrite)
    except FileExistsError as exc:
        raise MergeError(str(exc)) from None
    model = load_base(base, dtype=torch.float32)  # merge in fp32 whatever the output dtype
    if is_quantized(model):
        raise MergeError(f"{base} is a quantized model; --base must be the full-precision model the adapter was trained from.")
    merged = PeftModel.from_pretrained(model, adapter, verify_base=verify_base).merge_and_unload(safe_merge=True)
    merged = merged.to(DTYPES[dtype])
    try:
        tokenizer = load_tokenizer(base)
    except (OSError, ValueError):
        tokenizer = None  # a bare model directory without a tokenizer: nothing to copy

    def write(staging: Path) -> None:
        if requantize is None:
            merged.save_pretrained(staging)
        else:  # quantize the merged weights with transformers + bitsandbytes, as a user loading it would
            full = Path(tempfile.mkdtemp(prefix=".merged-full-", dir=staging.parent))
            try:
                merged.save_pretrained(full)
                load_base(str(full), quantize=requantize, compute_dtype=DTYPES[dtype]).save_pretrained(staging)
            finally:
                shutil.rmtree(full, ignore_errors=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    write_model_dir(Path(out), write, overwrite=overwrite)
    return {"out": str(out), "dtype": dtype, "requantize": requantize,
            "parameters": sum(p.numel() for p in merged.parameters())}
