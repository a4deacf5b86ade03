"""pipeline/train/sharding.py: whole weights for generation where FSDP2 shards them, over two real processes."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

import pipeline.train.sharding as sharding
from pipeline.config.parsing import ConfigError
from pipeline.train.sharding import fsdp2_unsharded
from tests.pipeline.train.test_engines import batch, tiny_policy_and_value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fsdp2_generation_worker(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from pipeline.generation.sampling import decode_from_pi

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        whole = tiny_policy_and_value(seed=0).eval()
        model = tiny_policy_and_value(seed=0).eval()
        mesh = init_device_mesh("cpu", (world_size,))
        # As accelerate's fsdp2_prepare_model shards a PolicyAndValue: each decoder layer, then the root.
        for module in list(model.modules()):
            if type(module).__name__ == "LlamaDecoderLayer":
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        queries = torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(rank))
        query_mask = torch.ones_like(queries)
        steps = 3 if rank == 0 else 9  # decoding stops at different steps on different ranks: must not hang
        with fsdp2_unsharded(model):
            gathered = not any(isinstance(p, DTensor) for p in model.policy.parameters())
            torch.manual_seed(5)
            tokens = decode_from_pi(model.policy, queries, query_mask, 1.0, steps, eos_token_id=99, pad_token_id=0)
        torch.manual_seed(5)
        expected = decode_from_pi(whole.policy, queries, query_mask, 1.0, steps, eos_token_id=99, pad_token_id=0)
        resharded = all(isinstance(p, DTensor) for p in model.parameters())
        # Training after generation: a root forward and backward with the layers resharding after forward again.
        model.train()
        ids, mask, positions = batch()
        logits, values = model(ids, mask, positions, logits_to_keep=2)
        layers_sharded_after_forward = all(isinstance(p, DTensor) for p in model.policy.model.layers[0].parameters())
        (logits.float().mean() + values.mean()).backward()
        with torch.no_grad():
            whole_logits, _ = whole(ids, mask, positions, logits_to_keep=2)
        results.put((rank, gathered, torch.equal(tokens, expected), tokens.shape[1], resharded,
                     layers_sharded_after_forward, all(p.grad is not None for p in model.parameters()),
                     torch.allclose(logits, whole_logits, atol=1e-6)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_fsdp2_generation_gathers_the_policy_and_ranks_may_decode_different_lengths():
    """Real FSDP2 (fully_shard over two gloo processes): inside fsdp2_unsharded the policy's weights are whole and
    its forwards local, so ranks decoding 3 and 9 steps do not deadlock and sample what the unsharded policy
    samples; afterwards every unit is sharded again and training forwards/backwards run as before."""
    import torch.multiprocessing as multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=fsdp2_generation_worker, args=(rank, 2, free_port_once, results))
                 for free_port_once in [free_port()] for rank in range(2)]
    for process in processes:
        process.start()
    deadline = time.time() + 240
    for process in processes:
        process.join(max(1.0, deadline - time.time()))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "FSDP2 processes hung (a collective ran on one rank only)"
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    outcomes = sorted(results.get(timeout=5) for _ in processes)
    assert outcomes == [(0, True, True, 3, True, True, True, True), (1, True, True, 9, True, True, True, True)]


def test_this_torch_has_the_fsdp2_internals_generation_uses(monkeypatch):
    sharding.require_fsdp2_internals()
    from torch.distributed.fsdp import FSDPModule

    monkeypatch.delattr(FSDPModule, "_get_fsdp_state")
    with pytest.raises(ConfigError, match="FSDP2 generation needs torch internals"):
        sharding.require_fsdp2_internals()
