"""Run by test_lm_head's FSDP2 test under torchrun (2 gloo ranks): ``fused_lm_head`` on a tied
head (F.linear on the embedding's weight) and on a LoRA head, both sharded by FSDP2, gives the
ELBO and gradients of the unsharded model's own logits."""

import copy

import peft
import torch
import torch.distributed as dist
from distributed import fsdp2_gradients_differ, report_and_exit
from head_models import TinyLM, case, lora_tiny_lm
from torch.distributed.fsdp import fully_shard

from elbokto_kernels import fused_elbo, fused_lm_head

dist.init_process_group("gloo")
rank = dist.get_rank()
problems = []
for form, build in (
    ("tied", lambda: TinyLM(tied=True, scale_logits=True)),
    ("lora", lambda: lora_tiny_lm(peft, lora_bias=True)),
):
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
        problems.append(f"{form}: the ELBO differs")
    problems += [
        f"{form}: the gradient of {name} differs" for name in fsdp2_gradients_differ(sharded, plain)
    ]
report_and_exit(True, problems)
