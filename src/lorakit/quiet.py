"""What our commands keep out of the terminal: third-party lines that are noise, not warnings.

Each filter names one message and why it is noise here; everything else a library logs or
warns still shows. `lorakit --verbose` installs none of them.

- bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from
  kernels-community" on import on every AVX512-BF16 CPU without the optional `kernels`
  package (a Hub download we never make: no internet at run time). Its fallback kernel is
  the one our 4-bit path is tested on; the line reads like a failure and is not one.
- bitsandbytes' 8-bit matmul logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16
  during quantization" on every call of every int8 layer (6,090 lines in a 3-step run): it is
  shown once.
- transformers' "Loading weights" bar: our own status line says what is loading.
- HF Trainer's PrinterCallback (the raw `{'loss': ...}` dicts) is removed where the trainer
  is built (`lorakit.train.job`), unless --verbose: our progress display shows the same numbers.
"""

from __future__ import annotations

import logging
import os

BNB_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"
BNB_MATMUL_MESSAGE = "MatMul8bitLt: inputs will be cast"


class OnceMessage(logging.Filter):
    """Lets the first record whose message starts with a given text through, drops the repeats."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with a given text."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_verbose = False


def is_verbose() -> bool:
    """`lorakit --verbose`: the job then keeps HF Trainer's own log lines too."""
    return _verbose


def quiet_third_party(verbose: bool = False) -> None:
    """Install the filters above (once; before bitsandbytes is imported, as the commands do)."""
    global _verbose
    _verbose = verbose
    if verbose:
        import transformers

        transformers.logging.set_verbosity_info()
        return
    bnb = logging.getLogger(BNB_KERNELS_LOGGER)
    if not any(isinstance(f, DropMessage) for f in bnb.filters):
        bnb.addFilter(DropMessage(BNB_KERNELS_MESSAGE))
    matmul = logging.getLogger(BNB_MATMUL_LOGGER)
    if not any(isinstance(f, OnceMessage) for f in matmul.filters):
        matmul.addFilter(OnceMessage(BNB_MATMUL_MESSAGE))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported (cheaper)
