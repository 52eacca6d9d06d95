"""ELBOKTOObjective: draws -> policy and reference ELBOs on the same noisy copies -> loss.

One call is one training step's loss for a batch dict:

    input_ids        int64 [B, T]   prompt then response, padded
    attention_mask   [B, T]         optional (1 = real token)
    prompt_lengths   int64 [B]      the response starts there
    response_lengths int64 [B]      only these tokens are ever masked
    desirable        bool [B]
    uid              int64 [B]      stable example id: the draws are a function of it
    pair_uid         int64 [B]      optional: the draws' key instead of uid, so that the chosen
                                    and rejected rows of a pair share their draws (paired losses;
                                    :class:`elbokto.PreferenceCollator` sets it for pairs)

The loss is the one ``loss.loss_type`` names in :data:`elbokto.loss.LOSSES` (ELBO-KTO by default).
The draws are a pure function of the seed, each row's uid and the call's ``draw_index`` (the
trainer passes the epoch, so that a revisited example draws afresh).

The reference sees exactly the policy's noisy copies (common random numbers, unless ``crn`` is
turned off for an ablation), without gradients. It is a frozen model, the policy itself with its
PEFT adapters disabled, or a precomputed ``ref_elbo``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from elbokto.diagnostics import GradientNoise, PsiEstimate, estimate_gradient_noise, estimate_psi
from elbokto.draws import Draws, MCConfig, pair_uid, sample_draws
from elbokto.estimate import elbo_estimate
from elbokto.guards import check_step_values
from elbokto.loss import LossConfig, compute_loss, kl_baseline
from elbokto.renames import renamed_keywords
from elbokto_kernels.backends import Backend
from elbokto_kernels.grad_filter import FilterEps

logger = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "prompt_lengths", "response_lengths", "desirable", "uid")
# Seed offset of the reference's own draws when common random numbers are off.
_INDEPENDENT_SEED = 7919


@dataclass
class ObjectiveOutput:
    """What one objective call returns.

    loss: scalar float32; call ``backward()`` on it once, as usual (with mc_chunk_size, that
        backward re-runs the policy chunk by chunk). A non-finite loss or ELBO raises
        :class:`elbokto.guards.NonFiniteError` (naming the uids and the source) instead: one host
        sync per call.
    metrics: detached scalars named like TRL's KTO / DPO trainers (see the loss functions).
    policy_elbo, ref_elbo: float32 [B], detached.
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    policy_elbo: Tensor
    ref_elbo: Tensor


@dataclass
class ELBOKTOObjective:
    """A preference loss on ELBO estimates for a batch, DESIGN.md §2. Paper defaults: ELBO-KTO,
    beta 0.1, n_t 8, n_yt 1, batch_mean.

    Attributes:
        mc: how the Monte-Carlo copies are drawn.
        loss: which loss (``loss_type``) and its beta, lambda_d, lambda_u, baseline.
        seed: seed of the draws (with uid and draw index they fix every mask).
        mc_chunk_size: copies per forward. None: all B*K copies in one pass with the graph kept
            for backward. An int: memory stays flat in K. The forward is a no-grad pass giving B_hat
            and dLoss/dB_hat; ``loss.backward()`` then re-runs each chunk of copies forward and
            backward with that per-sample scale (times the incoming gradient, so gradient
            accumulation's loss scaling still applies), like reentrant activation checkpointing.
            The policy forward must be deterministic (no dropout), as it must for CRN anyway.
        mask_token_id: None reads ``policy.config.mask_token_id``.
        shift_logits: the model's logits at p predict token p + 1 (Dream).
        pad_token_id: fills the mismatched pairs of baseline="kl" (attention-masked when the batch
            has an attention mask).
        crn: common random numbers: the reference scores the policy's very copies. False (an
            ablation of the paper's) draws the reference's copies with another seed.
        keep_logits: keep the masked rows' float32 logits of the fused LM head from forward to
            backward (4 * masked rows * V bytes) instead of recomputing them: a quarter fewer
            LM-head FLOPs.
        filter_eps: gradient filtering of the fused LM head's backward: None (exact), a float,
            or "auto" (``finfo(dtype).eps / 32`` of the head's compute dtype); see
            :func:`elbokto_kernels.fused_linear_elbo`.
        backend: kernel backend ("auto", "triton", "cpu", "torch").
    """

    mc: MCConfig = field(default_factory=MCConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    mc_chunk_size: int | None = None
    mask_token_id: int | None = None
    shift_logits: bool = False
    pad_token_id: int = 0
    crn: bool = True
    keep_logits: bool = False
    filter_eps: FilterEps = None
    backend: Backend = "auto"
    _warned_self_pairs: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mc_chunk_size is not None and self.mc_chunk_size < 1:
            raise ValueError(
                f"mc_chunk_size must be a positive int or None, got {self.mc_chunk_size}"
            )

    @renamed_keywords(step="draw_index")
    def __call__(
        self,
        policy: nn.Module,
        batch: Mapping[str, Tensor],
        *,
        reference: nn.Module | None = None,
        ref_elbo: Tensor | None = None,
        draw_index: int = 0,
    ) -> ObjectiveOutput:
        _check_batch(batch)
        draws = self.draws(batch, draw_index)
        ref_source = "reference" if ref_elbo is None else "precomputed reference"
        check_kl_reference(
            self.loss.baseline,
            precomputed=ref_elbo is not None,
            can_score=reference is not None or hasattr(policy, "disable_adapter"),
        )
        if ref_elbo is None:
            ref_elbo = self.reference_elbo(
                policy, batch, self._reference_draws(batch, draw_index, draws), reference
            )
        elif reference is not None:
            raise ValueError("pass either reference or ref_elbo, not both")
        ref_elbo = ref_elbo.detach().float()
        kl = self._kl(policy, reference, batch, draw_index) if self.loss.baseline == "kl" else None
        chunk_size = self.mc_chunk_size
        if chunk_size is None:
            policy_elbo = self.elbo(policy, batch, draws)
            loss, metrics = self._loss(policy_elbo, ref_elbo, batch, kl)
            check_step_values(batch["uid"], loss=loss, policy=policy_elbo, **{ref_source: ref_elbo})
            return ObjectiveOutput(loss, metrics, policy_elbo.detach(), ref_elbo)
        with torch.no_grad():
            policy_elbo = self.elbo(policy, batch, draws)
        leaf = policy_elbo.requires_grad_()
        with torch.enable_grad():
            loss, metrics = self._loss(leaf, ref_elbo, batch, kl)
            (scale,) = torch.autograd.grad(loss, leaf)
        check_step_values(batch["uid"], loss=loss, policy=policy_elbo, **{ref_source: ref_elbo})

        def backward(grad: Tensor) -> None:
            for chunk in _copy_chunks(draws, chunk_size):
                part = self._estimate(policy, batch, chunk)
                torch.autograd.backward((part * (scale * grad)).sum())

        # A throwaway leaf makes the output require grad without tying it to the spent graph.
        anchor = torch.zeros((), device=loss.device, requires_grad=True)
        loss = _DeferredBackward.apply(loss.detach(), anchor, backward)
        return ObjectiveOutput(loss, metrics, policy_elbo.detach(), ref_elbo)

    @renamed_keywords(step="draw_index")
    def draws(self, batch: Mapping[str, Tensor], draw_index: int = 0) -> Draws:
        """The B*K copies of the batch: a pure function of seed, the draw index (0 with
        ``mc.fixed_draws``) and each row's pair_uid (when the batch has one) or uid."""
        return sample_draws(
            self.mc,
            batch["prompt_lengths"],
            batch["response_lengths"],
            batch["input_ids"].shape[1],
            uids=batch.get("pair_uid", batch["uid"]),
            seed=self.seed,
            draw_index=0 if self.mc.fixed_draws else draw_index,
        )

    def elbo(self, model: nn.Module, batch: Mapping[str, Tensor], draws: Draws) -> Tensor:
        """B_hat float32 [B] of ``model``, in chunks of mc_chunk_size copies when set."""
        if self.mc_chunk_size is None:
            return self._estimate(model, batch, draws)
        total: Tensor | None = None
        for chunk in _copy_chunks(draws, self.mc_chunk_size):
            part = self._estimate(model, batch, chunk)
            total = part if total is None else total + part
        if total is None:
            raise ValueError("the batch has no examples: no ELBO to estimate")
        return total

    def _reference_draws(self, batch: Mapping[str, Tensor], draw_index: int, draws: Draws) -> Draws:
        if self.crn:
            return draws
        return replace(self, seed=self.seed + _INDEPENDENT_SEED).draws(batch, draw_index)

    @torch.no_grad()
    def reference_elbo(
        self,
        policy: nn.Module,
        batch: Mapping[str, Tensor],
        draws: Draws,
        reference: nn.Module | None,
    ) -> Tensor:
        """B_hat_ref [B] on the policy's draws: ``reference``, or the adapter-free policy."""
        if reference is not None:
            return self.elbo(reference, batch, draws)
        disable_adapter = getattr(policy, "disable_adapter", None)
        if disable_adapter is None:
            raise ValueError(
                "no reference: pass reference= (a frozen model), ref_elbo= "
                "(precomputed), or a PEFT policy whose adapters can be disabled"
            )
        with disable_adapter():
            return self.elbo(policy, batch, draws)

    @torch.no_grad()
    @renamed_keywords(step="draw_index")
    def margins(
        self,
        policy: nn.Module,
        batch: Mapping[str, Tensor],
        *,
        reference: nn.Module | None = None,
        redraws: int = 4,
        draw_index: int = 0,
    ) -> Tensor:
        """float32 [redraws, B]: r = B_hat_policy - B_hat_ref under independent redraws (seed + k).

        The reference must be a model (or the adapter-free policy): a precomputed ref_elbo is
        drawn once and would not share the redrawn copies.
        """
        rows = []
        for k in range(redraws):
            redraw = replace(self, seed=self.seed + k)
            draws = redraw.draws(batch, draw_index)
            rows.append(
                redraw.elbo(policy, batch, draws)
                - redraw.reference_elbo(
                    policy, batch, redraw._reference_draws(batch, draw_index, draws), reference
                )
            )
        return torch.stack(rows)

    @renamed_keywords(step="draw_index")
    def psi(
        self,
        policy: nn.Module,
        batch: Mapping[str, Tensor],
        *,
        reference: nn.Module | None = None,
        redraws: int = 4,
        draw_index: int = 0,
    ) -> PsiEstimate:
        """Psi(S), v(S), c(S) of this objective's MC setting on one batch (DESIGN.md §2), with
        psi_baseline for the baseline this objective uses (batch_mean: equal to psi)."""
        _check_batch(batch)
        margins = self.margins(
            policy, batch, reference=reference, redraws=redraws, draw_index=draw_index
        )
        baselines: dict[str, Tensor | float] = {"batch_mean": margins.mean(1), "none": 0.0}
        baseline = baselines.get(self.loss.baseline)
        if baseline is None:  # kl: the KL estimate redrawn alongside the margins
            baseline = torch.stack(
                [
                    replace(self, seed=self.seed + k)._kl(policy, reference, batch, draw_index)
                    for k in range(redraws)
                ]
            )
        return estimate_psi(margins, baseline)

    @renamed_keywords(step="draw_index")
    def gradient_noise(
        self,
        policy: nn.Module,
        batch: Mapping[str, Tensor],
        *,
        reference: nn.Module | None = None,
        redraws: int = 4,
        draw_index: int = 0,
    ) -> GradientNoise:
        """Spread of this objective's gradient (over the policy's trainable parameters) under
        independent redraws (seed + k) of one batch: what n_t, n_yt, CRN and the baseline leave
        of the training signal. One forward and backward per redraw; the parameters' ``.grad``
        are restored afterwards."""
        _check_batch(batch)
        params = [p for p in policy.parameters() if p.requires_grad]
        saved = [p.grad for p in params]

        def redraw(k: int) -> list[Tensor]:
            for p in params:
                p.grad = None
            replace(self, seed=self.seed + k)(
                policy, batch, reference=reference, draw_index=draw_index
            ).loss.backward()
            return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

        try:
            return estimate_gradient_noise(redraw(k) for k in range(redraws))
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad

    def _estimate(self, model: nn.Module, batch: Mapping[str, Tensor], draws: Draws) -> Tensor:
        return elbo_estimate(
            model,
            batch["input_ids"],
            draws,
            mask_token_id=self._mask_token_id(model),
            attention_mask=batch.get("attention_mask"),
            shift_logits=self.shift_logits,
            keep_logits=self.keep_logits,
            filter_eps=self.filter_eps,
            backend=self.backend,
        )

    def _mask_token_id(self, model: nn.Module) -> int:
        if self.mask_token_id is not None:
            return self.mask_token_id
        config = getattr(extract_model_from_parallel(model), "config", None)
        mask_id = getattr(config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError(
                f"{type(model).__name__} has no config.mask_token_id: pass "
                "mask_token_id (LLaDA 126336, Dream 151666)"
            )
        return mask_id

    def _loss(self, policy_elbo, ref_elbo, batch, kl):
        return compute_loss(self.loss, policy_elbo, ref_elbo, batch["desirable"], kl)

    @torch.no_grad()
    def _kl(self, policy, reference, batch, draw_index) -> Tensor:
        """KTO's z0: detached ELBO margin of mismatched pairs (prompt i, response of i + 1)."""
        if batch["input_ids"].shape[0] == 1 and not self._warned_self_pairs:
            # A last partial batch may hold one example: go on, but say so once.
            self._warned_self_pairs = True
            logger.warning(
                "baseline='kl' on a batch of one example pairs its prompt with its "
                "own response: the KL estimate is then the example's own margin "
                "(raise --per_device_train_batch_size, or drop the last partial "
                "batch with --dataloader_drop_last)"
            )
        mismatched = mismatched_batch(batch, self.pad_token_id)
        draws = self.draws(mismatched, draw_index)
        policy_elbo = self.elbo(policy, mismatched, draws)
        return kl_baseline(policy_elbo, self.reference_elbo(policy, mismatched, draws, reference))


def check_kl_reference(baseline: str, *, precomputed: bool, can_score: bool) -> None:
    """Refuses the KL baseline with a precomputed reference when no model can score the
    mismatched pairs: those pairs are made from the training batch (prompt i, response i + 1), so
    no file written before training can hold their reference ELBOs.

    can_score: a reference model is given, or the policy is a PEFT model (adapters disabled)."""
    if baseline == "kl" and precomputed and not can_score:
        raise ValueError(
            "--baseline kl with a precomputed reference (--ref_elbo_file): the KL "
            "estimate needs the reference ELBO of mismatched (prompt, response) "
            "pairs that are formed in each training batch, which no precomputed "
            "file holds; use an online reference (no --ref_elbo_file), LoRA "
            "(--lora_r: the policy without adapters scores them), or --baseline "
            "batch_mean"
        )


def mismatched_batch(batch: Mapping[str, Tensor], pad_token_id: int) -> dict[str, Tensor]:
    """Each prompt i with the response of example (i + 1) mod B, right-padded with pad_token_id.

    One host sync (the new padded length). The uid of a pair mixes both uids, so its draws differ
    from either example's.
    """
    ids, prompt, response = batch["input_ids"], batch["prompt_lengths"], batch["response_lengths"]
    donor = torch.roll(torch.arange(ids.shape[0], device=ids.device), -1)
    new_response = response[donor]
    lengths = prompt + new_response
    pos = torch.arange(int(lengths.max()) if ids.shape[0] else 0, device=ids.device)
    in_prompt = pos < prompt[:, None]
    in_response = ~in_prompt & (pos < lengths[:, None])
    donor_pos = (prompt[donor][:, None] + pos - prompt[:, None]).clamp(0, ids.shape[1] - 1)
    from_prompt = ids.gather(1, pos.clamp(max=ids.shape[1] - 1).expand(ids.shape[0], -1))
    from_donor = ids[donor].gather(1, donor_pos)
    new_ids = torch.where(
        in_prompt, from_prompt, torch.where(in_response, from_donor, pad_token_id)
    )
    out = {
        "input_ids": new_ids,
        "prompt_lengths": prompt,
        "response_lengths": new_response,
        "desirable": batch["desirable"],
        "uid": pair_uid(batch["uid"], batch["uid"][donor]),
    }
    if "attention_mask" in batch:
        out["attention_mask"] = (in_prompt | in_response).to(batch["attention_mask"].dtype)
    return out


def _copy_chunks(draws: Draws, size: int) -> Iterator[Draws]:
    for start in range(0, draws.mask.shape[0], size):
        part = slice(start, start + size)
        yield replace(
            draws,
            mask=draws.mask[part],
            weight=draws.weight[part],
            sample_index=draws.sample_index[part],
            t=draws.t[part],
        )


def _check_batch(batch: Mapping[str, Tensor]) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(
            f"batch lacks {missing}; expected keys {list(BATCH_KEYS)} (+ optional attention_mask)"
        )


class _DeferredBackward(torch.autograd.Function):
    """Returns the (already computed) loss; its backward runs ``backward(grad_output)``, which
    re-computes the policy's graph piece by piece and backpropagates through it (reentrant, as
    in activation checkpointing). Data-parallel engines see ordinary parameter gradients."""

    @staticmethod
    def forward(ctx, loss: Tensor, anchor: Tensor, backward) -> Tensor:
        ctx.run_backward = backward
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        with torch.enable_grad():
            ctx.run_backward(grad)
        return None, None, None
