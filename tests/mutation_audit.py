"""Mutation audit: plant one meaningful bug at a time in the core and check that the tests fail.

Not collected by pytest (no ``test_`` prefix). Each mutant is an exact snippet of a source file
and its replacement; the runner applies ONE mutant in place, runs the test files that should catch
it (``pytest -x -q``), restores the file (try/finally, and a check that the tree is clean again)
and records caught / survived:

    python tests/mutation_audit.py                 # every mutant
    python tests/mutation_audit.py --only NAME ... # some mutants (or prefixes: --only loss_)
    python tests/mutation_audit.py --list          # the table without running anything
    python tests/mutation_audit.py --table         # markdown table of the recorded results

Results accumulate in ``tests/mutation_results.json`` (name -> status, seconds, date); the table
in ``tests/README.md`` is ``--table``'s output. A mutant marked ``equivalent`` is not run: its
note says why no test can observe it; it is left out of the share caught.

Run from the repository root with the project's Python; the C++ backend builds into
``TORCH_EXTENSIONS_DIR`` (default here: /tmp/mut_ext, private to the audit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "mutation_results.json"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, or "-k EXPR"
    what: str
    equivalent: str = ""  # why no test can observe it (then it is not run)


M = Mutant
MUTANTS: list[Mutant] = [
    # --- draws ------------------------------------------------------------------------------
    M(
        "draws_stratum_without_u",
        "elbokto/draws.py",
        "a = (stratum + u) / strata",
        "a = (stratum + 0.5) / strata",
        ("tests/test_draws.py",),
        "draws: fixed_count level uses the stratum's midpoint, not (j + u)",
    ),
    M(
        "draws_weight_not_over_K",
        "elbokto/draws.py",
        "denominator = count.clamp(min=1).to(torch.float64) * num_copies",
        "denominator = count.clamp(min=1).to(torch.float64)",
        ("tests/test_draws.py",),
        "draws: fixed_count weight L/l not divided by K",
    ),
    M(
        "draws_count_off_by_one",
        "elbokto/draws.py",
        "torch.floor(a * n).to(torch.int64) + 1, n)",
        "torch.floor(a * n).to(torch.int64), n)",
        ("tests/test_draws.py",),
        "draws: l = floor(a L) instead of floor(a L) + 1 (l can be 0)",
    ),
    M(
        "draws_bernoulli_no_stratum",
        "elbokto/draws.py",
        "t = (stratum + 1.0 - u) / strata",
        "t = (1.0 - u) / strata",
        ("tests/test_draws.py",),
        "draws: bernoulli t ignores the level's stratum j",
    ),
    M(
        "draws_eps_weight_no_L",
        "elbokto/draws.py",
        "weight = torch.where(small, n / (size * num_copies), weight)",
        "weight = torch.where(small, 1.0 / (size * num_copies), weight)",
        ("tests/test_draws.py",),
        "draws: size-biased eps branch weight 1/|S| instead of L/|S|",
    ),
    M(
        "draws_window_one_past",
        "elbokto/draws.py",
        "((relative >= 0) & (relative < n))",
        "((relative >= 0) & (relative <= n))",
        ("tests/test_draws.py",),
        "draws: response window includes the token after the response",
    ),
    M(
        "draws_uid_ignored",
        "elbokto/draws.py",
        "h = _combine(_host_key(seed, tag, draw_index), uids)[:, None]",
        "h = _combine(_host_key(seed, tag, draw_index), uids * 0)[:, None]",
        ("tests/test_draws.py",),
        "draws: the example uid is left out of the hash",
    ),
    M(
        "draws_draw_index_ignored",
        "elbokto/draws.py",
        "h = _combine(_host_key(seed, tag, draw_index), uids)[:, None]",
        "h = _combine(_host_key(seed, tag, 0), uids)[:, None]",
        ("tests/test_draws.py",),
        "draws: the draw index is left out of the hash (epochs replay draws)",
    ),
    M(
        "draws_level_per_copy",
        "elbokto/draws.py",
        "level = copy // n_yt  # [K]",
        "level = copy % n_t  # [K]",
        ("tests/test_draws.py",),
        "draws: the n_yt masks of a level do not share the level",
    ),
    M(
        "draws_sample_index_tiled",
        "elbokto/draws.py",
        "return torch.arange(batch, device=device).repeat_interleave(num_copies)",
        "return torch.arange(batch, device=device).repeat(num_copies)",
        ("tests/test_draws.py",),
        "draws: sample_index tiled (copy c -> c % B) instead of c // K",
    ),
    # --- estimate ---------------------------------------------------------------------------
    M(
        "estimate_noisy_not_masked",
        "elbokto/estimate.py",
        "return clean.masked_fill(draws.mask, mask_token_id)",
        "return clean",
        (
            "tests/test_estimate.py::test_the_model_sees_exactly_the_drawn_copies",
            "tests/test_estimate.py::test_fused_head_matches_full_logits",
        ),
        "estimate: the model sees the clean tokens (nothing masked)",
    ),
    M(
        "estimate_shift_wrong_way",
        "elbokto/estimate.py",
        "targets = torch.cat([targets[:, 1:], targets[:, :1]], dim=1)",
        "targets = torch.cat([targets[:, -1:], targets[:, :-1]], dim=1)",
        ("tests/test_estimate.py::test_shift_logits_and_logits_path",),
        "estimate: shift_logits moves targets right, not left",
    ),
    M(
        "estimate_shift_mask_kept",
        "elbokto/estimate.py",
        "mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)",
        "mask = mask",
        ("tests/test_estimate.py::test_shift_logits_and_logits_path",),
        "estimate: shift_logits shifts the targets but not the mask",
    ),
    M(
        "estimate_attention_dropped",
        "elbokto/estimate.py",
        "copy_attention = None if attention_mask is None else attention_mask[draws.sample_index]",
        "copy_attention = None",
        (
            "tests/test_estimate.py::test_the_model_sees_exactly_the_drawn_copies",
            "tests/test_estimate.py::test_fused_head_matches_full_logits",
        ),
        "estimate: the attention mask is not passed to the model",
    ),
    M(
        "lm_head_softcap_dropped",
        "elbokto_kernels/lm_head.py",
        'softcap = getattr(config, "final_logit_softcapping", None)',
        "softcap = None",
        ("tests/test_estimate.py::test_fused_head_matches_full_logits",),
        "lm_head: the fused head ignores the config's final_logit_softcapping",
    ),
    # --- loss -------------------------------------------------------------------------------
    M(
        "loss_sign_flipped",
        "elbokto/loss.py",
        "sign = desirable.to(dtype) * 2 - 1",
        "sign = 1 - desirable.to(dtype) * 2",
        ("tests/test_loss.py", "-k", "not ranks"),
        "loss: sign of s flipped (undesirable examples pushed up)",
    ),
    M(
        "loss_baseline_ignored",
        "elbokto/loss.py",
        "z = beta * sign * (r - b0)",
        "z = beta * sign * r",
        ("tests/test_loss.py", "-k", "not ranks"),
        "loss: the reference point b0 is not subtracted",
    ),
    M(
        "loss_mean_off_by_one",
        "elbokto/loss.py",
        "loss = (lam * torch.sigmoid(-z)).sum() / max(r.numel(), 1)",
        "loss = (lam * torch.sigmoid(-z)).sum() / max(r.numel() - 1, 1)",
        ("tests/test_loss.py", "-k", "not ranks"),
        "loss: mean over m - 1 examples",
    ),
    M(
        "loss_ref_not_detached",
        "elbokto/loss.py",
        "ref = ref_elbo.detach().to(dtype)",
        "ref = ref_elbo.to(dtype)",
        ("tests/test_loss.py", "-k", "not ranks"),
        "loss: KTO reference ELBO not detached",
    ),
    M(
        "loss_kl_not_clamped",
        "elbokto/loss.py",
        "b0 = kl.detach().reshape(()).to(device=r.device, dtype=dtype).clamp(min=0)",
        "b0 = kl.detach().reshape(()).to(device=r.device, dtype=dtype)",
        ("tests/test_loss.py", "-k", "not ranks"),
        "loss: a negative KL estimate is used as b0 unclamped",
    ),
    M(
        "loss_saturation_without_beta",
        "elbokto/loss.py",
        "_mean((beta * (r - b0)).abs().gt(_SATURATION)",
        "_mean((r - b0).abs().gt(_SATURATION)",
        ("tests/test_loss.py", "-k", "not ranks"),
        "loss: saturated_fraction measured on r - b0, not beta (r - b0)",
    ),
    M(
        "loss_dpo_refs_crossed",
        "elbokto/loss.py",
        "policy_elbo[0::2], ref_elbo[0::2], policy_elbo[1::2], ref_elbo[1::2]",
        "policy_elbo[0::2], ref_elbo[1::2], policy_elbo[1::2], ref_elbo[0::2]",
        ("tests/test_loss.py", "tests/test_objective.py"),
        "loss: DPO pairs each policy ELBO with the other row's reference",
    ),
    M(
        "loss_global_mean_local_count",
        "elbokto/loss.py",
        "return (stats[0] / stats[1].clamp(min=1)).to(x.dtype)",
        "return (stats[0] / max(x.numel(), 1)).to(x.dtype)",
        ("tests/test_loss.py::test_batch_mean_baseline_is_global_across_ranks",),
        "loss: batch_mean divides the global sum by the LOCAL count",
    ),
    # --- objective --------------------------------------------------------------------------
    M(
        "objective_crn_flag_ignored",
        "elbokto/objective.py",
        "        if self.crn:\n            return draws",
        "        if True:\n            return draws",
        ("tests/test_objective.py::test_pairs_share_their_draws_and_crn_off_does_not",),
        "objective: crn=False still reuses the policy's copies",
    ),
    M(
        "objective_pair_uid_ignored",
        "elbokto/objective.py",
        'uids=batch.get("pair_uid", batch["uid"])',
        'uids=batch["uid"]',
        ("tests/test_objective.py::test_pairs_share_their_draws_and_crn_off_does_not",),
        "objective: the rows of a pair do not share their draws",
    ),
    M(
        "objective_kl_donor_previous",
        "elbokto/objective.py",
        "donor = torch.roll(torch.arange(ids.shape[0], device=ids.device), -1)",
        "donor = torch.roll(torch.arange(ids.shape[0], device=ids.device), 1)",
        ("tests/test_objective.py::test_mismatched_batch_pairs_prompt_with_next_response",),
        "objective: KL pairs prompt i with response i - 1, not i + 1",
    ),
    M(
        "objective_chunk_upstream_dropped",
        "elbokto/objective.py",
        "torch.autograd.backward((part * (scale * grad)).sum())",
        "torch.autograd.backward((part * scale).sum())",
        ("tests/test_objective.py::test_mc_chunk_size_equals_one_pass",),
        "objective: chunked backward drops the incoming gradient",
    ),
    M(
        "objective_first_chunk_dropped",
        "elbokto/objective.py",
        "for start in range(0, draws.mask.shape[0], size):",
        "for start in range(size, draws.mask.shape[0], size):",
        ("tests/test_objective.py::test_mc_chunk_size_equals_one_pass",),
        "objective: mc_chunk_size drops the first chunk of copies",
    ),
    M(
        "objective_redraws_not_redrawn",
        "elbokto/objective.py",
        "redraw = replace(self, seed=self.seed + k)",
        "redraw = replace(self, seed=self.seed)",
        ("tests/test_objective.py::test_psi_of_a_model_setting",),
        "objective: psi's redraws all reuse one seed",
    ),
    # --- precompute -------------------------------------------------------------------------
    M(
        "precompute_lookup_epoch0",
        "elbokto/precompute.py",
        "return self.elbo[torch.searchsorted(self.uids, uids), epoch]",
        "return self.elbo[torch.searchsorted(self.uids, uids), 0]",
        (
            "tests/test_precompute.py",
            "tests/test_trainer.py::test_precomputed_reference_equals_online",
        ),
        "precompute: lookup ignores the epoch",
    ),
    M(
        "precompute_draws_epoch0",
        "elbokto/precompute.py",
        "objective.draws(batch, epoch)",
        "objective.draws(batch, 0)",
        (
            "tests/test_precompute.py",
            "tests/test_trainer.py::test_precomputed_reference_equals_online",
        ),
        "precompute: every epoch's column uses the draws of epoch 0",
    ),
    M(
        "precompute_unsorted",
        "elbokto/precompute.py",
        "order = torch.argsort(uids_all)",
        "order = torch.arange(uids_all.numel())",
        (
            "tests/test_precompute.py",
            "tests/test_trainer.py::test_precomputed_reference_equals_online",
        ),
        "precompute: table not sorted by uid (searchsorted finds wrong rows)",
    ),
    M(
        "precompute_epochs_check_inverted",
        "elbokto/precompute.py",
        'if self.meta.get("epochs", 0) < expected.get("epochs", 0):',
        'if self.meta.get("epochs", 0) > expected.get("epochs", 0):',
        ("tests/test_trainer.py::test_precompute_follows_max_steps_and_refuses_a_short_file",),
        "precompute: a file covering too few epochs is accepted",
    ),
    # --- data -------------------------------------------------------------------------------
    M(
        "data_eot_not_appended",
        "elbokto/data.py",
        "response = response + ([] if eot is None else [eot])",
        "response = response",
        ("tests/test_data.py::test_length_policy",),
        "data: the end-of-turn token is not appended to responses",
    ),
    M(
        "data_truncate_off_by_one",
        "elbokto/data.py",
        "status, response = _TRUNCATED, response[:room]",
        "status, response = _TRUNCATED, response[:room - 1]",
        ("tests/test_data.py::test_length_policy",),
        "data: a cut response is one token shorter than max_length allows",
    ),
    M(
        "data_long_prompt_inclusive",
        "elbokto/data.py",
        "len(prompt) > max_prompt_length",
        "len(prompt) >= max_prompt_length",
        ("tests/test_data.py::test_length_policy",),
        "data: a prompt of exactly max_prompt_length tokens is dropped",
    ),
    M(
        "data_attention_one_past",
        "elbokto/data.py",
        "(torch.arange(width) < lengths[:, None]).long()",
        "(torch.arange(width) <= lengths[:, None]).long()",
        ("tests/test_data.py::test_collator_padding",),
        "data: the collator's attention mask covers one padding token",
    ),
    M(
        "data_pair_uid_not_shared",
        "elbokto/data.py",
        'out["pair_uid"] = [key for key in keys for _ in range(2)]',
        'out["pair_uid"] = list(out["uid"])',
        (
            "tests/test_data.py::test_paired_layouts_unpair_into_two_rows",
            "tests/test_data.py::test_pairs_stay_together",
        ),
        "data: the two rows of a source pair get different pair_uids",
    ),
    # --- models / families ------------------------------------------------------------------
    M(
        "models_shift_for_every_family",
        "elbokto/models.py",
        "return family is not None and family.shifted_logits",
        "return family is not None",
        ("tests/test_models.py::test_only_dream_shifts_logits",),
        "models: shift_logits for every known family, not Dream's only",
    ),
    M(
        "models_mask_token_order",
        "elbokto/models.py",
        "for candidate in (\n        override,\n"
        '        getattr(model_config, "mask_token_id", None),',
        "for candidate in (\n"
        '        getattr(model_config, "mask_token_id", None),\n        override,',
        ("tests/test_models.py::test_mask_token_resolution_order",),
        "models: the config's mask token wins over the flag",
    ),
    M(
        "models_dropout_kept",
        "elbokto/models.py",
        "            module.p = 0.0\n",
        "            pass\n",
        ("tests/test_models.py::test_disable_dropout_zeroes_modules_attention_and_config",),
        "models: dropout modules keep their p",
    ),
    M(
        "models_reference_trainable",
        "elbokto/models.py",
        "return reference.eval().requires_grad_(False)",
        "return reference.eval()",
        (
            "tests/test_models.py::test_reference_is_a_frozen_copy_none_with_lora_or_the_named_model",
        ),
        "models: the frozen reference still requires grad",
    ),
    M(
        "models_lora_head_adapted",
        "elbokto/models.py",
        'exclude_modules=None if config.lora_target_modules else ["lm_head"],',
        "exclude_modules=None,",
        (
            "tests/test_models.py::test_prepare_policy_adapts_all_linear_layers_but_the_head_by_default",
            "tests/test_models.py::test_all_linear_lora_leaves_an_undeclared_head_alone",
        ),
        "models: all-linear LoRA adapts the LM head too",
    ),
    # --- kernels: masked rows, ops ----------------------------------------------------------
    M(
        "masked_rows_position_weight_per_copy",
        "elbokto_kernels/masked_rows.py",
        "scale = weights.reshape(-1).float()[index]",
        "scale = weights[:, 0].float()[copy]",
        (
            "tests/test_kernels.py",
            "-k",
            "torch and (elbo_random or linear_random or linear_target)",
        ),
        "masked_rows: per-position weights taken per copy (column 0)",
    ),
    M(
        "masked_rows_sample_is_copy",
        "elbokto_kernels/masked_rows.py",
        "sample=sample_index.long()[copy],",
        "sample=copy.clamp(max=sample_index.numel() - 1),",
        (
            "tests/test_kernels.py",
            "-k",
            "torch and (elbo_random or linear_random or linear_target)",
        ),
        "masked_rows: a row adds to sample c (its copy) instead of sample_index[c]",
    ),
    M(
        "masked_rows_scale_dropped",
        "elbokto_kernels/masked_rows.py",
        "out.index_add_(0, rows.sample, rows.scale * (target_logit - lse))",
        "out.index_add_(0, rows.sample, target_logit - lse)",
        (
            "tests/test_kernels.py",
            "-k",
            "torch and (elbo_random or linear_random or linear_target)",
        ),
        "masked_rows: ELBO weights dropped",
    ),
    M(
        "elbo_backward_upstream_dropped",
        "elbokto_kernels/elbo.py",
        "scale = grad_out.float()[rows.sample] * rows.scale",
        "scale = rows.scale",
        (
            "tests/test_kernels.py",
            "-k",
            "torch and (elbo_random or linear_random or linear_target)",
        ),
        "fused_elbo: backward ignores the upstream gradient",
    ),
    M(
        "linear_lse_max_not_logaddexp",
        "elbokto_kernels/linear_elbo.py",
        "lse = torch.logaddexp(lse, chunk_lse)",
        "lse = torch.maximum(lse, chunk_lse)",
        (
            "tests/test_kernels.py",
            "-k",
            "torch and (elbo_random or linear_random or linear_target)",
        ),
        "linear_elbo: chunk LSEs combined with max instead of logaddexp",
    ),
    M(
        "linear_backward_target_not_shifted",
        "elbokto_kernels/linear_elbo.py",
        "ops.row_grad(z, None, pick(target) - chunk.start, "
        "pick(row_lse), pick(scale), softcap, dz)",
        "ops.row_grad(z, None, pick(target), pick(row_lse), pick(scale), softcap, dz)",
        (
            "tests/test_kernels.py",
            "-k",
            "torch and (elbo_random or linear_random or linear_target)",
        ),
        "linear_elbo: backward's targets not shifted to the chunk",
    ),
    M(
        "linear_bias_grad_mean",
        "elbokto_kernels/linear_elbo.py",
        "return out.copy_(dz.float().sum(0))",
        "return out.copy_(dz.float().mean(0))",
        (
            "tests/test_kernels.py",
            "-k",
            "torch and (elbo_random or linear_random or linear_target)",
        ),
        "linear_elbo: bias gradient averaged over rows",
    ),
    M(
        "torch_row_grad_softcap_derivative",
        "elbokto_kernels/backends/torch.py",
        "grad.mul_(1.0 - th * th)",
        "grad.mul_(1.0)",
        ("tests/test_row_ops.py", "-k", "test_row_ops and torch"),
        "row_grad (torch): softcap derivative dropped",
    ),
    M(
        "torch_row_lse_target_outside",
        "elbokto_kernels/backends/torch.py",
        "torch.where(inside, z.gather(1, col).squeeze(1), 0.0)",
        "z.gather(1, col).squeeze(1)",
        ("tests/test_kernels.py", "-k", "torch and linear_target"),
        "row_lse (torch): a target outside the chunk reads the clamped column",
    ),
    M(
        "triton_row_grad_softcap_derivative",
        "elbokto_kernels/backends/triton.py",
        "grad = grad * (1.0 - th * th)",
        "grad = grad * 1.0",
        ("tests/test_row_ops.py", "-k", "test_row_ops and triton and float32"),
        "row_grad (triton): softcap derivative dropped",
    ),
    M(
        "triton_row_lse_padding_target",
        "elbokto_kernels/backends/triton.py",
        "t_acc += tl.where(valid & (cols == target), z, 0.0)",
        "t_acc += tl.where(cols == target, z, 0.0)",
        ("tests/test_kernels.py", "-k", "triton and linear_target"),
        "row_lse (triton): a target in the block's padding reads -inf",
    ),
    M(
        "triton_row_lse_sum_not_rescaled",
        "elbokto_kernels/backends/triton.py",
        "s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)",
        "s = s + tl.sum(tl.exp(z - m_new), axis=0)",
        ("tests/test_row_ops.py", "-k", "several_vocabulary_blocks and triton"),
        "row_lse (triton): the running sum is not rescaled when a later block raises the max",
    ),
    M(
        "cpu_row_lse_sum_not_rescaled",
        "csrc/elbo_cpu.cpp",
        "s = s * (m - m_new).exp_u20() + block_sum;",
        "s = s + block_sum;",
        ("tests/test_row_ops.py", "-k", "several_vocabulary_blocks and cpu"),
        "row_lse (C++): the running sum is not rescaled when a later block raises the max",
    ),
    M(
        "cpu_row_grad_softcap_derivative",
        "csrc/elbo_cpu.cpp",
        "((th * cap - vlse).exp_u20() * neg_scale * (one - th * th)).store(g + i, k);",
        "((th * cap - vlse).exp_u20() * neg_scale).store(g + i, k);",
        ("tests/test_row_ops.py", "-k", "test_row_ops and cpu"),
        "row_grad (C++): softcap derivative dropped",
    ),
    # --- durability -------------------------------------------------------------------------
    M(
        "durable_no_fsync_before_rename",
        "elbokto/durable.py",
        "            f.flush()\n            os.fsync(f.fileno())\n        os.replace",
        "            f.flush()\n        os.replace",
        ("tests/test_durable.py",),
        "durable: a file renamed into place before its bytes are fsynced",
    ),
    M(
        "durable_seal_without_fsync",
        "elbokto/durable.py",
        "            os.fsync(f.fileno())\n    for sub",
        "            pass\n    for sub",
        ("tests/test_durable.py",),
        "durable: the marker written before the folder's files are fsynced",
    ),
    M(
        "durable_sizes_unchecked",
        "elbokto/durable.py",
        "        if path.stat().st_size != size:",
        "        if False:",
        ("tests/test_durable.py",),
        "durable: a truncated file of a sealed folder passes the check",
    ),
    M(
        "durable_weights_in_first",
        "elbokto/durable.py",
        "    return weights or index, index, name",
        "    return False, index, name",
        ("tests/test_durable.py",),
        "durable: publish moves the new weights in before the rest",
    ),
    M(
        "durable_old_weights_last_out",
        "elbokto/durable.py",
        "key=_install_order, reverse=True",
        "key=_install_order",
        ("tests/test_durable.py",),
        "durable: publish removes the old weights after the old config",
    ),
    M(
        "durable_torn_append_glued",
        "elbokto/durable.py",
        '                text = "\\n" + text',
        "                pass",
        ("tests/test_durable.py", "tests/test_eval_judge.py"),
        "durable: an append after a torn line is glued onto it",
    ),
    M(
        "trainer_last_trusts_trainer_state",
        "elbokto/trainer.py",
        "        problem = durable.check_complete(folder)\n        if problem is None:",
        "        problem = None if (folder / 'trainer_state.json').exists() else 'x'\n"
        "        if problem is None:",
        ("tests/test_durable_training.py", "-k", "damaged"),
        "trainer: `last` trusts any folder with a trainer_state.json",
    ),
    M(
        "trainer_rotate_before_seal",
        "elbokto/trainer.py",
        "        self.args.save_total_limit = None  # the Trainer would rotate before the seal",
        "        pass",
        ("tests/test_durable_training.py", "-k", "write_points"),
        "trainer: old checkpoints rotated out before the new one is sealed",
    ),
    M(
        "trainer_resave_keeps_old_marker",
        "elbokto/trainer.py",
        "            durable.discard(folder)",
        "            pass",
        ("tests/test_durable_training.py", "-k", "damaged"),
        "trainer: a checkpoint saved over a skipped one keeps its old marker while rewritten",
    ),
    M(
        "trainer_final_save_in_place",
        "elbokto/trainer.py",
        "        if _internal_call:\n            super().save_model(output_dir, _internal_call)",
        "        if True:\n            super().save_model(output_dir, _internal_call)",
        ("tests/test_durable_training.py", "-k", "write_points"),
        "trainer: the final model written in place, not staged",
    ),
    M(
        "precompute_save_in_place",
        "elbokto/precompute.py",
        "        atomic_write(path, lambda f: torch.save(table, f))",
        "        torch.save(table, path)",
        ("tests/test_precompute.py",),
        "precompute: the reference file truncated, then written",
    ),
    M(
        "demo_cache_unreadable_raises",
        "elbokto/demo/training.py",
        "    except Exception as err:  # empty, truncated",
        "    except KeyError as err:  # empty, truncated",
        ("tests/test_demo.py", "-k", "cache_cut"),
        "demo: an unreadable SFT cache raises",
    ),
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale bytecode of a mutant, ever
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/mut_ext")
    env.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before triton is imported
    return env


def _git_clean(path: Path) -> bool:
    """No uncommitted change (outside a git checkout, e.g. a copy for a parallel run: True)."""
    if not (ROOT / ".git").exists():
        return True
    return subprocess.run(["git", "diff", "--quiet", "--", str(path)], cwd=ROOT).returncode == 0


def _preimport() -> None:
    """Imports the heavy third-party libraries once, in the parent: each mutant's test run is a
    fork that inherits them and imports only elbokto (fresh, so it sees the mutant) and the
    tests. On a loaded machine the imports cost far more than most test files."""
    os.environ.update({k: v for k, v in _env().items() if k != "PYTHONPATH"})
    sys.dont_write_bytecode = True  # no stale bytecode of a mutant, ever
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import triton  # noqa: F401
    from transformers import GemmaForCausalLM, LlamaForCausalLM  # noqa: F401

    assert not any(name.split(".")[0] in ("elbokto", "elbokto_kernels") for name in sys.modules)


def _run_pytest(args: list[str], timeout: int) -> tuple[int | None, str]:
    """pytest.main(args) in a forked child; (exit code or None on timeout, its output)."""
    out = Path(f"/tmp/mutation_audit_{os.getpid()}.log")
    pid = os.fork()
    if pid == 0:  # child
        rc = 3
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(ROOT)
            sys.path.insert(0, str(ROOT))
            import pytest

            rc = int(pytest.main(args))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), out.read_text(errors="replace")
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None, out.read_text(errors="replace")
        time.sleep(0.2)


def run_mutant(m: Mutant, timeout: int) -> tuple[str, float, str]:
    path = ROOT / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return "bad-snippet", 0.0, f"snippet occurs {original.count(m.old)} times in {m.file}"
    if not _git_clean(path):
        return "dirty", 0.0, f"{m.file} has uncommitted changes: refusing to mutate it"
    start = time.time()
    try:
        path.write_text(original.replace(m.old, m.new))
        rc, output = _run_pytest(["-x", "-q", "-p", "no:cacheprovider", *m.tests], timeout)
    finally:
        path.write_text(original)
    if rc is None:
        return "timeout", time.time() - start, ""
    lines = output.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    tail = (failed or lines[-1:] or [""])[:1]
    # pytest: 0 all passed, 1 some failed, 2 interrupted (e.g. a collection error), 5 none ran.
    status = {0: "survived", 1: "caught", 2: "caught"}.get(rc, f"rc{rc}")
    return status, time.time() - start, tail[0]


def _head() -> str:
    """The commit the mutants are planted in (short hash), or "unknown" outside git."""
    done = subprocess.run(
        ["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def table(results: dict) -> str:
    """The markdown table of tests/README.md: each mutant's result and the commit it ran at."""
    lines = [
        "| # | mutant | file | planted bug | tests run | result | at |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, m in enumerate(MUTANTS, 1):
        r = results.get(m.name, {})
        status = "equivalent" if m.equivalent else r.get("status", "not run")
        if r.get("before"):
            status += f" (before the new tests: {r['before']})"
        note = f" ({m.equivalent})" if m.equivalent else ""
        tests = " ".join(t.replace("tests/", "") for t in m.tests)
        at = f"`{r['commit']}`" if r.get("commit") else ""
        lines.append(
            f"| {i} | `{m.name}` | `{m.file}` | {m.what}{note} | `{tests}` | {status} | {at} |"
        )
    # A timeout (the shared machine was too loaded) decides nothing: left out like "not run".
    run = [
        results[m.name]
        for m in MUTANTS
        if not m.equivalent and results.get(m.name, {}).get("status") in ("caught", "survived")
    ]
    caught = sum(r["status"] == "caught" for r in run)
    before = sum(r.get("before", r["status"]) == "caught" for r in run)
    share = lambda k: f"{100 * k / max(len(run), 1):.0f} %"  # noqa: E731
    equivalent = sum(bool(m.equivalent) for m in MUTANTS)
    undecided = len(MUTANTS) - len(run) - equivalent
    lines += [
        "",
        f"{len(MUTANTS)} mutants, {len(run)} decided"
        f"{f' ({undecided} not run or timed out)' if undecided else ''}, "
        f"{equivalent} equivalent. Caught {caught} of "
        f"{len(run)} ({share(caught)}); before the tests added with the audit: {before} "
        f"({share(before)}).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant names or name prefixes")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    parser.add_argument("--table", action="store_true", help="markdown table of recorded results")
    parser.add_argument(
        "--claims",
        type=Path,
        help="folder of claim files: parallel workers skip the mutants another one took",
    )
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="run the table bottom up (a second worker on the same claims)",
    )
    parser.add_argument("--pending", action="store_true", help="skip mutants with a result")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    parser.add_argument(
        "--root",
        type=Path,
        help="a copy of the repository to mutate (parallel "
        "runs each take their own copy); results still go to this checkout",
    )
    args = parser.parse_args()
    if args.root:
        global ROOT
        ROOT = args.root.resolve()
    names = {m.name for m in MUTANTS}
    assert len(names) == len(MUTANTS), "duplicate mutant names"
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.table:
        print(table(results))
        return
    chosen = [m for m in MUTANTS if not args.only or any(m.name.startswith(o) for o in args.only)]
    if args.reverse:
        chosen = chosen[::-1]
    if args.pending:
        chosen = [m for m in chosen if m.name not in results]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file:38s} {m.what}")
        return
    _preimport()
    # After the imports (a library may install its own): a kill still restores the file.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    for m in chosen:
        if m.equivalent:
            print(f"{m.name:40s} equivalent: {m.equivalent}", flush=True)
            continue
        if args.claims:  # parallel workers (each with its own --root) share one queue
            args.claims.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(args.claims / m.name, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
        status, seconds, tail = run_mutant(m, args.timeout)
        print(f"{m.name:40s} {status:10s} {seconds:6.0f}s  {tail}", flush=True)
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}  # parallel runs
        previous = results.get(m.name, {})
        before = previous.get("before", previous.get("status"))
        results[m.name] = {
            "status": status,
            "seconds": round(seconds),
            "commit": _head(),
            "date": datetime.date.today().isoformat(),
            "evidence": tail[:160],
        }
        if before and before != status:  # the result before the tests were strengthened
            results[m.name]["before"] = before
        results = {name: r for name, r in results.items() if name in names}  # retired mutants
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        assert _git_clean(ROOT / m.file), f"{m.file} was not restored"
    print(table(results))


if __name__ == "__main__":
    main()
