"""Which process of a multi-process run this is, for the job's own side effects.

HF Trainer does the distributed training itself (DDP through accelerate: gloo on CPU, nccl on
GPU) when the job is launched by `torchrun` or `accelerate launch`; what it does not know is
the job around it. Rules (the distributed issue): every rank reads the config, the data and the
output folder and reaches the same verdict (so a refusal stops every rank, none waits forever);
only the main rank (global rank 0) deletes, writes files, prints, evaluates and pushes; the
ranks meet at a barrier after the output folder is prepared. A single process is rank 0 of 1.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def finish(self, trainer) -> None:
        """After training: every rank drops the DDP wrapper, waits for the others, then takes its process group
        down itself. Left to interpreter shutdown, gloo's threads were torn down in an order that aborted a rank
        now and then ("terminate called without an active exception"), and torchrun then killed the run at its
        last step. The wrapper goes first: its Reducer holds the group, and when the Reducer is the group's last
        holder its C++ destructor joins gloo's threads with the GIL held while a thread waits for the GIL to
        free a finished collective's tensors — a deadlock (seen: `py-spy dump` of a rank that never ended,
        ~ProcessGroupGloo under ~Reducer joining a thread stuck in decref). Freed while the group is still
        registered, the Reducer is not the last holder; destroy_process_group lets the GIL go."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            release_wrapper(trainer)
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def release_wrapper(trainer) -> None:
    """Drop every reference HF Trainer and accelerate keep to the DDP-wrapped model (the unwrapped one stays)."""
    wrapped = trainer.model_wrapped
    if wrapped is trainer.model:
        return
    gone = weakref.ref(wrapped)
    trainer.model_wrapped = trainer.model
    trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not wrapped]
    del wrapped
    gc.collect()
    if gone() is not None:
        warnings.warn("The DDP wrapper outlived training (something still holds it); if this process hangs at "
                      "exit, that is why.", RuntimeWarning, stacklevel=2)


SINGLE_PROCESS = Ranks()


def current_ranks() -> Ranks:
    """This process's place, from the launcher's environment (RANK, WORLD_SIZE, ...); the process
    group is set up by accelerate's PartialState, the same one HF Trainer then uses."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(state.process_index, state.num_processes)
