"""Run by test_estimate's FSDP test under torchrun (2 gloo ranks): the fused LM head under FSDP2
must give the loss and gradients of the unsharded model."""

import copy

import torch
import torch.distributed as dist
from distributed import fsdp2_gradients_differ, report_and_exit
from tiny_models import tiny_batch, tiny_gemma
from torch.distributed.fsdp import fully_shard

from elbokto import ELBOKTOObjective, MCConfig

dist.init_process_group("gloo")
rank = dist.get_rank()
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
report_and_exit(
    ok, [f"the gradient of {name} differs" for name in fsdp2_gradients_differ(sharded, plain)]
)
