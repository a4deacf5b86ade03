"""How stages cut data into batches, the same way everywhere.

Data order is a pure function of (seed, step): a seeded permutation per epoch that any step can recompute,
so a resumed run reads exactly the batches an uninterrupted one would, with no sampler state to save.
Prompts for generation are left-padded, so every prompt ends where generation starts."""

from __future__ import annotations

import torch

from pipeline.config.parsing import ConfigError


def epoch_order(step: int, global_batch: int, num_items: int, seed: int, field: str, unit: str
                ) -> tuple[torch.Tensor, int]:
    """The permutation of the epoch that `step` falls in, and where in it the step's global batch starts.

    Every epoch reads each item at most once; the few an uneven split leaves over wait for a later epoch's
    order. `field` and `unit` name the setting and the items in the error for a batch larger than the data."""
    steps_per_epoch = num_items // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{field}: a global batch of {global_batch} {unit} exceeds the {num_items} {unit} available")
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
    return order, step_in_epoch * global_batch
