"""Each rank's share of the training data, with no example twice in an epoch.

HF Trainer under DDP hands sharding to accelerate, which, when the global batch does not divide
the data, fills the last global batch by repeating the first examples (`even_batches`; turned
off, ranks end up with different step counts and DDP waits forever). Here every rank takes
`perm[rank::world]` of the same seeded permutation, cut to n // world, so all ranks have the
same number of examples and of batches, none is seen twice, and at most world - 1 examples sit
out an epoch (a different few each epoch). The permutation is the one HF Trainer draws on one
process (`torch.randperm` seeded with data_seed + epoch, accelerate's SeedableRandomSampler),
so a global batch of world x B here holds the examples one process's batch of world x B holds.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class RankShard(Sampler[int]):
    def __init__(self, size: int, rank: int, world_size: int, seed: int):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter(order[self.rank::self.world_size][: len(self)])


def sharded_train_dataloader(trainer) -> DataLoader:
    """The train DataLoader of `trainer` (an HF Trainer under DDP) over this rank's RankShard,
    wrapped by accelerate for one process (device placement, set_epoch, resume skipping) so
    that it is not sharded a second time."""
    from accelerate.data_loader import prepare_data_loader

    args = trainer.args
    if len(trainer.train_dataset) < args.world_size:
        raise ValueError(f"{len(trainer.train_dataset)} training examples for {args.world_size} processes: every "
                         "process needs at least one; use fewer processes or more data.")
    sampler = RankShard(len(trainer.train_dataset), args.process_index, args.world_size,
                        args.data_seed if args.data_seed is not None else args.seed)
    loader = DataLoader(trainer.train_dataset, batch_size=trainer._train_batch_size, sampler=sampler,
                        collate_fn=trainer.data_collator, num_workers=args.dataloader_num_workers,
                        drop_last=args.dataloader_drop_last)
    return prepare_data_loader(loader, trainer.accelerator.device, num_processes=1, process_index=0, put_on_device=True)
