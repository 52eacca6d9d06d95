"""Run by test_lm_head's FSDP2 test under torchrun (2 gloo ranks): ``fused_lm_head`` on a tied
head (F.linear on the embedding's weight) and on a LoRA head, both sharded by FSDP2, gives the
ELBO and gradients of the unsharded model's own logits."""

import copy
import os
import sys

import peft
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from elbokto_kernels import fused_elbo, fused_lm_head
from head_models import TinyLM, case, lora_tiny_lm

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
# FSDP2 averages gradients with an AVG reduce-scatter, which gloo computes as a sum before some
# torch release (2.7 does): the expected gradient follows what this gloo does.
probe = torch.empty(1)
dist.reduce_scatter_tensor(probe, torch.ones(world), op=dist.ReduceOp.AVG)
avg_scale = probe.item()

ok = True
for form, build in (("tied", lambda: TinyLM(tied=True, scale_logits=True)),
                    ("lora", lambda: lora_tiny_lm(peft, lora_bias=True))):
    plain = build()
    sharded = copy.deepcopy(plain)
    # FSDP2's recipe: the layers, then the root (the embedding and the head). The backward reaches
    # the units through the ELBO's graph: the layer's output feeds the head.
    fully_shard(sharded.get_submodule(f"{'base_model.model.' * (form == 'lora')}mix"))
    fully_shard(sharded)
    ids, targets, weights = case(seed=rank)
    with fused_lm_head(sharded, targets, weights=weights, backend="torch") as result:
        sharded(ids)
    result[0].sum().backward()
    want = fused_elbo(plain(ids), targets, weights=weights, backend="torch")
    want.sum().backward()
    if not torch.allclose(result[0], want, rtol=1e-5, atol=1e-6):
        ok = False
        print(f"rank {rank}: {form} ELBO differs", file=sys.stderr)
    trained = [(n, p) for n, p in sharded.named_parameters() if p.requires_grad]
    expected = [q for q in plain.parameters() if q.requires_grad]
    assert len(trained) == len(expected) > 0
    for (name, p), q in zip(trained, expected):
        mean_grad = q.grad.clone()
        dist.all_reduce(mean_grad)
        if not torch.allclose(p.grad.full_tensor(), mean_grad / world * avg_scale, rtol=1e-4,
                              atol=1e-6):
            ok = False
            print(f"rank {rank}: {form}: the gradient of {name} differs", file=sys.stderr)
print(f"rank {rank}: {'match' if ok else 'MISMATCH'}", flush=True)
dist.barrier()
# Skip interpreter teardown: gloo's threads under FSDP2 sometimes abort at exit after all the
# work is done, which would fail the run at random.
os._exit(0)
