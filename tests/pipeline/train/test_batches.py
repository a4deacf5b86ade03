import pytest
import torch

from pipeline.config.parsing import ConfigError
from pipeline.train.batches import epoch_order


def test_epoch_order_is_a_seeded_permutation_per_epoch_recomputable_from_the_step():
    # 10 items, batches of 3: 3 steps an epoch, one item left over each epoch
    first = [epoch_order(step, 3, 10, seed=7, field="f", unit="items") for step in range(3)]
    assert [start for _, start in first] == [0, 3, 6]
    assert all(torch.equal(order, first[0][0]) for order, _ in first)
    assert sorted(first[0][0].tolist()) == list(range(10))
    order, start = epoch_order(3, 3, 10, seed=7, field="f", unit="items")  # the next epoch, a new order
    assert start == 0 and not torch.equal(order, first[0][0])
    again, _ = epoch_order(3, 3, 10, seed=7, field="f", unit="items")
    assert torch.equal(order, again)


def test_a_batch_larger_than_the_data_names_the_field():
    with pytest.raises(ConfigError, match="^ppo.per_device_train_batch_size: a global batch of 8 prompts exceeds the 5"):
        epoch_order(0, 8, 5, seed=0, field="ppo.per_device_train_batch_size", unit="prompts")
