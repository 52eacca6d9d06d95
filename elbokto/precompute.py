"""Precomputed reference ELBOs: one offline pass of the frozen reference, looked up by uid.

The draws are a pure function of (seed, uid, epoch, copy, position), so B_hat_ref of an example in a
given epoch can be computed once, offline, and matched exactly during training. The file stores the
values with everything they depend on; training refuses a file whose MC config, seed, mask token or
data fingerprint (tokenizer + chat template + length policy) differ, and says which.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from elbokto.objective import ELBOKTOObjective


@dataclass
class ReferenceTable:
    """uids: int64 [N], sorted; elbo: float32 [N, epochs]; meta: what the values depend on."""

    uids: Tensor
    elbo: Tensor
    meta: dict

    def save(self, path: str | Path) -> None:
        torch.save({"uids": self.uids.cpu(), "elbo": self.elbo.cpu(), "meta": self.meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceTable":
        if not Path(path).is_file():
            raise FileNotFoundError(f"reference ELBO file {path} does not exist (write it with "
                                    "`elbokto precompute-ref`)")
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["uids"], data["elbo"], data["meta"])

    def check(self, expected: dict) -> None:
        """Raises ValueError naming every entry of ``expected`` that the file disagrees with."""
        wrong = [f"{k}: file has {self.meta.get(k)!r}, training uses {v!r}"
                 for k, v in expected.items() if k != "epochs" and self.meta.get(k) != v]
        if self.meta.get("epochs", 0) < expected.get("epochs", 0):
            wrong.append(f"epochs: file covers {self.meta.get('epochs')}, training runs "
                         f"{expected['epochs']}")
        if wrong:
            raise ValueError("the precomputed reference does not match this run:\n  "
                             + "\n  ".join(wrong))

    def check_covers(self, uids: Tensor) -> None:
        """Raises ValueError when some training uid has no precomputed value (checked once)."""
        missing = ~torch.isin(uids.cpu(), self.uids)
        if missing.any():
            raise ValueError(f"{int(missing.sum())} training examples have no precomputed "
                             f"reference ELBO (first uid {int(uids[missing][0])})")

    def to(self, device: torch.device) -> "ReferenceTable":
        return ReferenceTable(self.uids.to(device), self.elbo.to(device), self.meta)

    def lookup(self, uids: Tensor, epoch: int) -> Tensor:
        """float32 [B] values of ``uids`` (all covered: see check_covers) in ``epoch``."""
        return self.elbo[torch.searchsorted(self.uids, uids), epoch]


def data_fingerprint(tokenizer, **length_policy) -> str:
    """sha256 of what turns text into token ids: vocabulary, chat template and length policy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                    sort_keys=True)
    blob = json.dumps({"vocab": vocab, "template": tokenizer.chat_template,
                       "policy": length_policy}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def reference_meta(objective: ELBOKTOObjective, fingerprint: str, epochs: int) -> dict:
    """What the reference values depend on (compared by :meth:`ReferenceTable.check`)."""
    if objective.mc.share_across_batch:
        raise ValueError("share_across_batch draws depend on the batch, so a precomputed "
                         "reference cannot match them: use an online reference")
    return {"mc": asdict(objective.mc), "seed": objective.seed,
            "mask_token_id": objective.mask_token_id, "shift_logits": objective.shift_logits,
            # Paired losses key the draws by pair, so their values differ from unpaired ones.
            "paired_draws": objective.loss.paired,
            "data_fingerprint": fingerprint, "epochs": epochs}


@torch.no_grad()
def precompute_reference(reference: torch.nn.Module, batches, objective: ELBOKTOObjective,
                         meta: dict) -> ReferenceTable:
    """B_hat_ref of every example for epochs 0..meta["epochs"]-1, the draws training will use.

    Args:
        reference: the frozen reference model (eval mode).
        batches: an iterable of collated batch dicts (see :mod:`elbokto.objective`; pairs with
            their ``pair_uid``), on the reference's device; every example once.
    """
    uids, values = [], []
    for batch in tqdm(batches, desc="reference ELBO", unit="batch"):
        per_epoch = [objective.reference_elbo(reference, batch, objective.draws(batch, epoch),
                                              reference) for epoch in range(meta["epochs"])]
        uids.append(batch["uid"].cpu())
        values.append(torch.stack(per_epoch, dim=1).float().cpu())
    uids_all, elbo = torch.cat(uids), torch.cat(values)
    order = torch.argsort(uids_all)
    uids_all, elbo = uids_all[order], elbo[order]
    if uids_all.numel() > 1 and (uids_all[1:] == uids_all[:-1]).any():
        raise ValueError("duplicate uids in the dataset: identical examples must be deduplicated")
    return ReferenceTable(uids_all, elbo, meta)
