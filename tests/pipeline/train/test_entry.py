"""pipeline/train/entry.py: what every stage process does the same way."""

import torch.distributed as dist

from pipeline.train.entry import leave_process_group


def test_leaving_the_process_group_is_a_no_op_in_a_lone_process():
    leave_process_group()
    assert not dist.is_initialized()
