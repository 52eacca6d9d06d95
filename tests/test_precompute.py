"""The precomputed reference table: one column per epoch, each epoch's own draws, found by uid."""

import dataclasses

import pytest
import torch
from kill_points import Killed, armed, torn_torch_save
from tiny_models import tiny_batch, tiny_gemma

from elbokto import MCConfig
from elbokto.objective import ELBOKTOObjective
from elbokto.precompute import ReferenceTable, precompute_reference, reference_meta


def online_reference(objective, reference, batch, epoch):
    """What training computes online for this batch in this epoch."""
    return objective.reference_elbo(reference, batch, objective.draws(batch, epoch), reference)


def test_table_holds_each_epochs_values_looked_up_by_uid(tmp_path):
    reference = tiny_gemma(seed=2)
    objective = ELBOKTOObjective(mc=MCConfig(n_t=2), seed=11, backend="torch")
    first, second = tiny_batch(seed=1), tiny_batch(seed=0)  # uids 1, 7920, ... then 0, 7919, ...
    meta = reference_meta(objective, "fingerprint", epochs=3)
    # The second batch repeats the first: identical examples share a uid and one entry.
    table = precompute_reference(reference, [first, second, first], objective, meta)
    uids = torch.cat([first["uid"], second["uid"]])
    assert torch.equal(table.uids, uids.sort().values)  # sorted, duplicates merged
    assert table.elbo.shape == (8, 3) and table.elbo.dtype == torch.float32

    per_epoch = []
    for epoch in range(3):
        expected = torch.cat(
            [online_reference(objective, reference, b, epoch) for b in (first, second)]
        )
        per_epoch.append(expected)
        torch.testing.assert_close(table.lookup(uids, epoch), expected, rtol=1e-6, atol=1e-6)
        perm = torch.tensor([5, 0, 7, 2, 3, 6, 1, 4])  # any order, any batch composition
        torch.testing.assert_close(
            table.lookup(uids[perm], epoch), expected[perm], rtol=1e-6, atol=1e-6
        )
    # Epochs draw afresh, so a lookup in the wrong epoch would be visibly wrong.
    assert (per_epoch[0] - per_epoch[1]).abs().min() > 1e-3
    assert (per_epoch[1] - per_epoch[2]).abs().min() > 1e-3

    table.save(tmp_path / "ref.pt")
    loaded = ReferenceTable.load(tmp_path / "ref.pt")
    assert torch.equal(loaded.uids, table.uids) and torch.equal(loaded.elbo, table.elbo)
    assert loaded.meta == meta


def test_check_names_what_differs_and_accepts_more_epochs():
    objective = ELBOKTOObjective(mc=MCConfig(n_t=2), seed=11, backend="torch")
    meta = reference_meta(objective, "fingerprint", epochs=3)
    table = ReferenceTable(torch.tensor([1, 2]), torch.zeros(2, 3), meta)
    table.check(meta)
    table.check({**meta, "epochs": 2})  # the file may cover more epochs than training runs
    with pytest.raises(ValueError, match="epochs: file covers 3, training runs 4"):
        table.check({**meta, "epochs": 4})
    other = reference_meta(dataclasses.replace(objective, mc=MCConfig(n_t=4)), "fingerprint", 3)
    with pytest.raises(ValueError, match="mc: file has") as err:
        table.check(other)
    assert "seed" not in str(err.value)  # only what differs is named
    with pytest.raises(ValueError, match="seed: file has 11, training uses 12"):
        table.check(reference_meta(dataclasses.replace(objective, seed=12), "fingerprint", 3))
    with pytest.raises(ValueError, match="data_fingerprint"):
        table.check(reference_meta(objective, "another tokenizer", 3))
    with pytest.raises(ValueError, match="first uid 3"):
        table.check_covers(torch.tensor([2, 3]))
    table.check_covers(torch.tensor([2, 1, 2]))


def test_save_stopped_at_any_point_keeps_the_previous_file(tmp_path):
    """A kill in the middle of the write or at any write point of the save leaves the previous
    table loadable (precompute-ref once truncated it first); after the rename, the new one."""
    old = ReferenceTable(torch.tensor([1, 2]), torch.zeros(2, 3), {"epochs": 3})
    new = ReferenceTable(torch.tensor([1, 2, 5]), torch.ones(3, 3), {"epochs": 3})
    path = tmp_path / "ref.pt"
    old.save(path)
    with torn_torch_save(), pytest.raises(Killed):
        new.save(path)
    assert torch.equal(ReferenceTable.load(path).elbo, old.elbo)
    with armed(None) as seen:
        new.save(path)
    renamed = [name for name, _ in seen].index("replace") + 1
    for n in range(1, len(seen) + 1):
        old.save(path)
        with armed(n), pytest.raises(Killed):
            new.save(path)
        expected = old if n <= renamed else new
        assert torch.equal(ReferenceTable.load(path).elbo, expected.elbo), (n, seen[n - 1])
    assert [p.name for p in tmp_path.iterdir()] == ["ref.pt"]
