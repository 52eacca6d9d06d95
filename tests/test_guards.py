"""Non-finite numbers never reach the weights: the objective's check, the trainer's stop / skip,
the gradient guard and the refusal to save non-finite weights."""

import math

import pytest
import torch
from tiny_models import tiny_batch, tiny_gemma
from training_runs import configs, history, write_kto_mix

from elbokto import LossConfig, MCConfig
from elbokto.guards import NonFiniteError, all_finite, check_step_values
from elbokto.models import TINY, ModelConfig, load_model
from elbokto.objective import ELBOKTOObjective
from elbokto.run import train


def test_check_step_values_names_uids_and_source():
    uids = torch.tensor([10, 11, 12])
    check_step_values(uids, loss=torch.tensor(1.0), policy=torch.zeros(3), reference=torch.ones(3))
    with pytest.raises(NonFiniteError, match=r"reference ELBO of uids \[11\]"):
        check_step_values(
            uids,
            loss=torch.tensor(1.0),
            policy=torch.zeros(3),
            reference=torch.tensor([0.0, math.nan, 1.0]),
        )
    with pytest.raises(NonFiniteError, match=r"policy ELBO of uids \[10, 12\].*inf"):
        check_step_values(
            uids,
            loss=torch.tensor(1.0),
            reference=torch.zeros(3),
            policy=torch.tensor([math.inf, 0.0, -math.inf]),
        )
    with pytest.raises(NonFiniteError, match="the loss"):
        check_step_values(uids, loss=torch.tensor(math.nan), policy=torch.zeros(3))
    assert all_finite([]) and not all_finite([torch.tensor([1.0, math.nan])])


def test_objective_stops_a_nonfinite_precomputed_reference():
    policy = tiny_gemma()
    batch = tiny_batch()
    ref = torch.zeros(4)
    ref[2] = math.nan
    for chunk in (None, 2):
        objective = ELBOKTOObjective(
            mc=MCConfig(n_t=2), mc_chunk_size=chunk, loss=LossConfig(baseline="none")
        )
        with pytest.raises(
            NonFiniteError,
            match=rf"precomputed reference ELBO of uids "
            rf"\[{int(batch['uid'][2])}\]",
        ):
            objective(policy, batch, ref_elbo=ref)


def _poisoned_reference(tmp_path, data, bad_uid_index=0):
    """A precomputed file whose value for one example is NaN."""
    from elbokto.precompute import ReferenceTable
    from elbokto.run import precompute_ref

    model_cfg, data_cfg, train_cfg = configs(tmp_path, data, max_steps=4)
    table = precompute_ref(model_cfg, data_cfg, train_cfg, str(tmp_path / "ref.pt"))
    table.elbo[bad_uid_index] = math.nan
    ReferenceTable(table.uids, table.elbo, table.meta).save(tmp_path / "ref.pt")
    return tmp_path / "ref.pt", int(table.uids[bad_uid_index])


def test_training_stops_before_the_weights_see_a_nan(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    ref, uid = _poisoned_reference(tmp_path, data)
    with pytest.raises(NonFiniteError, match=rf"uids \[{uid}\].*{ref}.*skip_nonfinite_batches"):
        train(*configs(tmp_path / "run", data, max_steps=4, ref_elbo_file=str(ref)))


def test_skip_nonfinite_batches_keeps_the_weights_finite(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    ref, _ = _poisoned_reference(tmp_path, data)
    trainer = train(
        *configs(
            tmp_path / "run", data, max_steps=4, ref_elbo_file=str(ref), skip_nonfinite_batches=True
        )
    )
    assert history(trainer, "skipped_nonfinite")[-1] == 1  # 16 examples, batches of 4
    assert all(math.isfinite(x) for x in history(trainer, "loss"))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_gradient_guard_stops_or_skips_a_nonfinite_gradient(tmp_path, monkeypatch):
    import elbokto.objective

    data = write_kto_mix(tmp_path / "data.jsonl")
    real = elbokto.objective.compute_loss

    def overflowing(config, policy_elbo, ref_elbo, desirable, kl=None):
        loss, metrics = real(config, policy_elbo, ref_elbo, desirable, kl)
        # Finite value, infinite gradient: the overflow only the backward sees.
        return loss + _InfGrad.apply(loss), metrics

    monkeypatch.setattr(elbokto.objective, "compute_loss", overflowing)
    with pytest.raises(NonFiniteError, match="optimizer step 0: non-finite gradients"):
        train(*configs(tmp_path / "a", data, max_steps=2))
    trainer = train(*configs(tmp_path / "b", data, max_steps=2, skip_nonfinite_batches=True))
    assert history(trainer, "skipped_nonfinite")[-1] == 2
    initial = load_model(TINY, ModelConfig(), tokenizer=trainer.processing_class)
    for p, q in zip(trainer.model.parameters(), initial.parameters()):
        assert torch.equal(p, q)  # no step was applied


class _InfGrad(torch.autograd.Function):
    """0 forward; an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_save_refuses_nonfinite_weights(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    trainer = train(*configs(tmp_path, data, max_steps=1))
    with torch.no_grad():
        next(trainer.model.parameters())[0] = math.nan
    with pytest.raises(NonFiniteError, match="refusing to save"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()
