"""`lorakit train job.yaml --nproc N`: the same command under torchrun, N processes on this
machine (torchrun's own flags for several machines are in the README)."""

from __future__ import annotations

import os
import subprocess
import sys

from lorakit.errors import ConfigError


def torchrun(nproc: int, lorakit_args: list[str]) -> int:
    """Run `python -m lorakit ARGS` as `nproc` processes; returns torchrun's exit code. Each process
    gets an equal share of the cores as its thread count (torchrun's default is 1, with a warning)."""
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc inside a torchrun / accelerate launch: the launcher already started the processes.")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lorakit", *lorakit_args]
    return subprocess.run(command, env=env).returncode
