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

from lorakit.errors import DataError


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
        raise DataError(f"{len(trainer.train_dataset)} training examples for {args.world_size} processes: every "
                         "process needs at least one; use fewer processes or more data.")
    sampler = RankShard(len(trainer.train_dataset), args.process_index, args.world_size,
                        args.data_seed if args.data_seed is not None else args.seed)
    loader = DataLoader(trainer.train_dataset, batch_size=trainer._train_batch_size, sampler=sampler,
                        collate_fn=trainer.data_collator, num_workers=args.dataloader_num_workers,
                        drop_last=args.dataloader_drop_last)
    return prepare_data_loader(loader, trainer.accelerator.device, num_processes=1, process_index=0, put_on_device=True)


@torch.no_grad()
def main_rank_eval_loss(trainer) -> float:
    """The eval loss HF Trainer reports on one process — the mean over examples of their batch's
    loss, batches of `per_device_eval_batch_size` in order — computed by the main rank alone on
    the unwrapped model. Under DDP, Trainer's own evaluation repeats examples to even out the
    ranks' last batches and its loss then drifts from the one-process value (seen: 5.85 vs 6.04
    on 7 eval examples and 2 ranks); the other ranks meanwhile wait at the next step's all-reduce."""
    model, size = trainer.model, trainer.args.per_device_eval_batch_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(trainer.eval_dataset), size):
            rows = [trainer.eval_dataset[i] for i in range(start, min(start + size, len(trainer.eval_dataset)))]
            batch = {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v
                     for k, v in trainer.data_collator(rows).items()}
            with trainer.autocast_smart_context_manager():
                loss = model(**batch).loss
            total += loss.item() * len(rows)
            count += len(rows)
    finally:
        model.train(was_training)
    return total / count
