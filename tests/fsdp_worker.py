"""Run by test_estimate's FSDP test under torchrun (2 gloo ranks): the fused LM head under FSDP2
must give the loss and gradients of the unsharded model."""

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from elbokto import ELBOKTOObjective, MCConfig
from tiny_models import tiny_batch, tiny_gemma

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
# FSDP2 averages the gradients with an AVG reduce-scatter, which gloo computes as a sum before
# some torch release (2.7 does): the expected gradient follows what this gloo does.
probe = torch.empty(1)
dist.reduce_scatter_tensor(probe, torch.ones(world), op=dist.ReduceOp.AVG)
avg_scale = probe.item()  # 1 where gloo averages, world where it sums
reference = tiny_gemma(seed=0).requires_grad_(False)
plain = copy.deepcopy(reference).requires_grad_(True)
with torch.no_grad():
    noise = torch.Generator().manual_seed(1)
    for p in plain.parameters():
        p.add_(torch.randn(p.shape, generator=noise) * 0.05)
sharded = copy.deepcopy(plain)
for layer in sharded.model.layers:
    fully_shard(layer)
fully_shard(sharded)  # the root unit holds the embeddings and the LM head

batch = tiny_batch(seed=rank)
objective = ELBOKTOObjective(mc=MCConfig(n_t=2), backend="torch")
loss = objective(sharded, batch, reference=reference).loss
loss.backward()
expected = objective(plain, batch, reference=reference).loss
expected.backward()
ok = torch.allclose(loss, expected, rtol=1e-6, atol=1e-7)
for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
    mean_grad = q.grad.clone()
    dist.all_reduce(mean_grad)
    if not torch.allclose(p.grad.full_tensor(), mean_grad / world * avg_scale, rtol=1e-4,
                          atol=1e-6):
        ok = False
        print(f"rank {rank}: gradient of {name} differs", file=sys.stderr)
print(f"rank {rank}: {'match' if ok else 'MISMATCH'}", flush=True)
dist.barrier()
# Skip interpreter teardown: gloo's threads under FSDP2 sometimes abort at exit ("terminate called
# without an active exception") after all the work is done, which would fail the run at random.
os._exit(0)
