"""Precomputed reference ELBOs: one offline pass of the frozen reference, looked up by uid.

The draws are a pure function of (seed, uid, epoch, copy, position), so B_hat_ref of an example in a
given epoch can be computed once, offline, and matched exactly during training. The file stores the
values with everything they depend on; training refuses a file whose MC config, seed, mask token,
data fingerprint (tokenizer + chat template + length policy), reference model (a fingerprint of its
weights) or number of epochs differ, and says which.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from elbokto.durable import atomic_write
from elbokto.guards import NonFiniteError
from elbokto.objective import ELBOKTOObjective


@dataclass
class ReferenceTable:
    """uids: int64 [N], sorted; elbo: float32 [N, epochs]; meta: what the values depend on."""

    uids: Tensor
    elbo: Tensor
    meta: dict

    def save(self, path: str | Path) -> None:
        """Writes the table to ``path`` atomically: a kill leaves the previous file whole."""
        table = {"uids": self.uids.cpu(), "elbo": self.elbo.cpu(), "meta": self.meta}
        atomic_write(path, lambda f: torch.save(table, f))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceTable":
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"reference ELBO file {path} does not exist (write it with "
                "`elbokto precompute-ref`)"
            )
        foreign = f"{path} is not a reference ELBO file written by `elbokto precompute-ref`"
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # empty, truncated, or another format altogether
            raise ValueError(f"{foreign} ({type(err).__name__})") from None
        if not isinstance(data, dict) or not {"uids", "elbo", "meta"} <= set(data):
            raise ValueError(f"{foreign} (no uids / elbo / meta entries)")
        uids, elbo = data["uids"], data["elbo"]
        if uids.dim() != 1 or elbo.dim() != 2 or elbo.shape[0] != uids.numel():
            raise ValueError(
                f"{foreign} (uids {list(uids.shape)} and elbo {list(elbo.shape)} do not fit)"
            )
        return cls(uids, elbo, data["meta"])

    def check(self, expected: dict) -> None:
        """Raises ValueError naming every entry of ``expected`` that the file disagrees with.

        The reference model is compared by the fingerprint of its weights when both sides have
        one, else by name; the file may cover more epochs than training runs."""
        wrong = [
            f"{k}: file has {self.meta.get(k)!r}, training uses {v!r}"
            for k, v in expected.items()
            if k not in ("epochs", "reference_model") and self.meta.get(k) != v
        ]
        if self.meta.get("epochs", 0) < expected.get("epochs", 0):
            wrong.append(
                f"epochs: file covers {self.meta.get('epochs')}, training runs "
                f"{expected['epochs']} (precompute with the run's --max_steps or "
                "--num_train_epochs, batch size and --train_world_size)"
            )
        if "reference_model" in expected:
            ours, theirs = expected["reference_model"], self.meta.get("reference_model") or {}
            key = "fingerprint" if ours.get("fingerprint") and theirs.get("fingerprint") else "name"
            if ours.get(key) != theirs.get(key):
                wrong.append(
                    f"reference model: file was written by {theirs.get('name')!r} "
                    f"({key} {theirs.get(key)}), training's reference is "
                    f"{ours.get('name')!r} ({key} {ours.get(key)})"
                )
        if wrong:
            raise ValueError(
                "the precomputed reference does not match this run:\n  " + "\n  ".join(wrong)
            )

    def check_covers(self, uids: Tensor, what: str = "training") -> None:
        """Raises ValueError when some uid of the ``what`` data has no precomputed value."""
        missing = ~torch.isin(uids.cpu(), self.uids)
        if missing.any():
            raise ValueError(
                f"{int(missing.sum())} {what} examples have no precomputed "
                f"reference ELBO (first uid {int(uids[missing][0])}): precompute "
                "the file from the same data"
            )

    def to(self, device: torch.device) -> "ReferenceTable":
        return ReferenceTable(self.uids.to(device), self.elbo.to(device), self.meta)

    def lookup(self, uids: Tensor, epoch: int) -> Tensor:
        """float32 [B] values of ``uids`` (all covered: see check_covers) in ``epoch``."""
        return self.elbo[torch.searchsorted(self.uids, uids), epoch]


def data_fingerprint(tokenizer, **length_policy) -> str:
    """sha256 of what turns text into token ids: vocabulary, chat template and length policy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    blob = json.dumps(
        {"vocab": vocab, "template": tokenizer.chat_template, "policy": length_policy},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def reference_meta(
    objective: ELBOKTOObjective, fingerprint: str, epochs: int, reference_model: dict | None = None
) -> dict:
    """What the reference values depend on (compared by :meth:`ReferenceTable.check`).

    reference_model: :func:`model_identity` of the reference (left out: not compared)."""
    if objective.mc.share_across_batch:
        raise ValueError(
            "share_across_batch draws are shared by the examples of a training "
            "batch, so the draws of an example depend on the step it lands in, "
            "which precomputing cannot know: use an online reference"
        )
    meta = {
        "mc": asdict(objective.mc),
        "seed": objective.seed,
        "mask_token_id": objective.mask_token_id,
        "shift_logits": objective.shift_logits,
        # Paired losses key the draws by pair, so their values differ from unpaired ones.
        "paired_draws": objective.loss.paired,
        "data_fingerprint": fingerprint,
        "epochs": epochs,
    }
    if reference_model is not None:
        meta["reference_model"] = reference_model
    return meta


@torch.no_grad()
def model_identity(name: str, model: torch.nn.Module, samples: int = 64) -> dict:
    """{"name", "fingerprint"}: sha256 over every state-dict entry's name, shape, dtype and
    ``samples`` evenly spaced values, so that another model (or a fine-tuned one) is told apart
    without reading every weight. Local paths are made absolute."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if flat.numel():
            index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long()
            digest.update(flat[index.to(flat.device)].double().cpu().numpy().tobytes())
    path = Path(name).expanduser()
    return {
        "name": str(path.resolve()) if path.exists() else name,
        "fingerprint": digest.hexdigest()[:16],
    }


@torch.no_grad()
def precompute_reference(
    reference: torch.nn.Module, batches, objective: ELBOKTOObjective, meta: dict
) -> ReferenceTable:
    """B_hat_ref of every example for epochs 0..meta["epochs"]-1, the draws training will use.

    Args:
        reference: the frozen reference model (eval mode).
        batches: an iterable of collated batch dicts (see :mod:`elbokto.objective`; pairs with
            their ``pair_uid``), on the reference's device; every example once.
    """
    uids, values = [], []
    for batch in tqdm(batches, desc="reference ELBO", unit="batch"):
        per_epoch = [
            objective.reference_elbo(reference, batch, objective.draws(batch, epoch), reference)
            for epoch in range(meta["epochs"])
        ]
        uids.append(batch["uid"].cpu())
        values.append(torch.stack(per_epoch, dim=1).float().cpu())
    uids_all, elbo = torch.cat(uids), torch.cat(values)
    bad = ~torch.isfinite(elbo).all(1)
    if bad.any():
        raise NonFiniteError(
            f"the reference gave non-finite ELBOs for uids "
            f"{uids_all[bad].tolist()[:8]}: no file written"
        )
    # Identical examples share a uid, hence their draws and values: one entry serves them all.
    order = torch.argsort(uids_all)
    uids_all, elbo = uids_all[order], elbo[order]
    first = torch.ones_like(uids_all, dtype=torch.bool)
    first[1:] = uids_all[1:] != uids_all[:-1]
    return ReferenceTable(uids_all[first], elbo[first], meta)
