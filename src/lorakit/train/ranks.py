"""Which process of a multi-process run this is, for the job's own side effects.

HF Trainer does the distributed training itself (DDP through accelerate: gloo on CPU, nccl on
GPU) when the job is launched by `torchrun` or `accelerate launch`; what it does not know is
the job around it. Rules (the distributed issue): every rank reads the config, the data and the
output folder and reaches the same verdict (so a refusal stops every rank, none waits forever);
only the main rank (global rank 0) deletes, writes files, prints, evaluates and pushes; the
ranks meet at a barrier after the output folder is prepared. A single process is rank 0 of 1.
"""

from __future__ import annotations

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

    def finish(self) -> None:
        """After training: every rank waits for the others, then takes its process group down itself. Left to
        interpreter shutdown, gloo's threads were torn down in an order that aborted a rank now and then
        ("terminate called without an active exception"), and torchrun then killed the run at its last step."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


SINGLE_PROCESS = Ranks()


def current_ranks() -> Ranks:
    """This process's place, from the launcher's environment (RANK, WORLD_SIZE, ...); the process
    group is set up by accelerate's PartialState, the same one HF Trainer then uses."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(state.process_index, state.num_processes)
