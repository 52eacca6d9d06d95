"""The jobs behind the CLI: train, precompute-ref, generate, diagnose.

Each takes the config dataclasses whose fields are its flags, and wires the library pieces in the
one order data flows: tokenizer -> dataset -> models -> objective / trainer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from elbokto.block import check_block_attention, resolve_block_size
from elbokto.data import (DataConfig, PreferenceCollator, build_dataset, check_class_balance,
                          load_source, prompt_token_ids)
from elbokto.generate import GenerationConfig, decode_responses, generate
from elbokto.models import (TINY, ModelConfig, frozen_reference, load_model, load_tokenizer,
                            prepare_policy, resolve_mask_token_id, uses_shifted_logits)
from elbokto.reference import ReferenceTable, data_fingerprint, precompute_reference, \
    reference_meta
from elbokto.tiny import build_tiny_tokenizer
from elbokto.trainer import ELBOKTOConfig, ELBOKTOTrainer

logger = logging.getLogger(__name__)


def tokenizer_for(model_cfg: ModelConfig, data_cfg: DataConfig | None = None):
    """The model's tokenizer; for the tiny model one trained on the dataset's text."""
    if model_cfg.model_name_or_path != TINY:
        return load_tokenizer(model_cfg)
    if data_cfg is None:
        raise ValueError("the tiny model's tokenizer is trained on a dataset: pass --dataset")
    raw = load_source(data_cfg.dataset, data_cfg.dataset_split)
    return build_tiny_tokenizer([json.dumps(row) for row in raw])


def _fingerprint(tokenizer, data_cfg: DataConfig) -> str:
    return data_fingerprint(tokenizer, max_length=data_cfg.max_length,
                            max_prompt_length=data_cfg.max_prompt_length,
                            append_eos=data_cfg.append_eos,
                            end_of_turn=data_cfg.end_of_turn(tokenizer))


def _settle_model_fields(train_cfg: ELBOKTOConfig, model, tokenizer) -> None:
    """Mask token, logit shift and block size from the model when the flags leave them open;
    a block-diffusion model is checked end to end (:func:`check_block_attention`)."""
    train_cfg.mask_token_id = resolve_mask_token_id(model.config, tokenizer,
                                                    train_cfg.mask_token_id)
    train_cfg.shift_logits = train_cfg.shift_logits or uses_shifted_logits(model.config)
    train_cfg.block_size = resolve_block_size(model.config, train_cfg.block_size)
    if train_cfg.block_size is not None:
        check_block_attention(model, train_cfg.block_size)


def train(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: ELBOKTOConfig,
          resume_from_checkpoint: str | bool | None = None) -> ELBOKTOTrainer:
    """`elbokto train`: ELBO-KTO on a preference dataset; saves the policy to output_dir."""
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    dataset, stats = build_dataset(data_cfg, tokenizer)
    logger.info("data: %s", stats)
    check_class_balance(stats.n_desirable, stats.n_undesirable, train_cfg.lambda_d,
                        train_cfg.lambda_u)
    policy = load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer)
    _settle_model_fields(train_cfg, policy, tokenizer)
    ref_table = reference = None
    if train_cfg.ref_elbo_file:
        ref_table = ReferenceTable.load(train_cfg.ref_elbo_file)
        ref_table.check(reference_meta(train_cfg.objective(), _fingerprint(tokenizer, data_cfg),
                                       _epochs(train_cfg)))
    else:
        reference = _reference(policy, model_cfg, train_cfg, tokenizer)
    policy = prepare_policy(policy, model_cfg)
    trainer = ELBOKTOTrainer(policy, train_cfg, ref_model=reference, ref_table=ref_table,
                             train_dataset=dataset,
                             data_collator=PreferenceCollator.from_config(data_cfg, tokenizer),
                             processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    return trainer


def _reference(policy, model_cfg: ModelConfig, train_cfg: ELBOKTOConfig, tokenizer):
    """:func:`frozen_reference`; another model (``--ref_model_name_or_path``) scores the same
    block draws, so it is checked like the policy."""
    reference = frozen_reference(policy, model_cfg, tokenizer=tokenizer)
    if (reference is not None and model_cfg.ref_model_name_or_path
            and train_cfg.block_size is not None):
        check_block_attention(reference, train_cfg.block_size)
    return reference


def _epochs(train_cfg: ELBOKTOConfig) -> int:
    return max(1, int(-(-train_cfg.num_train_epochs // 1)))


def precompute_ref(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: ELBOKTOConfig,
                   output_file: str) -> ReferenceTable:
    """`elbokto precompute-ref`: B_hat_ref of every example, for the draws training will use."""
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    dataset, _ = build_dataset(data_cfg, tokenizer)
    name = model_cfg.ref_model_name_or_path or model_cfg.model_name_or_path
    reference = load_model(name, model_cfg, tokenizer=tokenizer).eval().to(train_cfg.device)
    _settle_model_fields(train_cfg, reference, tokenizer)
    objective = train_cfg.objective()
    meta = reference_meta(objective, _fingerprint(tokenizer, data_cfg), _epochs(train_cfg))
    collate = PreferenceCollator.from_config(data_cfg, tokenizer)
    loader = DataLoader(dataset, batch_size=train_cfg.per_device_eval_batch_size,
                        collate_fn=collate)
    batches = ({k: v.to(train_cfg.device) for k, v in batch.items()} for batch in loader)
    table = precompute_reference(reference, batches, objective, meta)
    table.save(output_file)
    return table


@dataclass
class GenerateArgs:
    """Prompts for `elbokto generate`."""

    prompt: list[str] = field(default_factory=list, metadata={
        "help": "One or more user messages: --prompt \"first\" \"second\"."})
    prompts_file: str | None = field(default=None, metadata={
        "help": "A text file with one user message per line."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per sampler batch."})


def generate_text(model_cfg: ModelConfig, gen_cfg: GenerationConfig, args: GenerateArgs,
                  device: str | None = None) -> list[tuple[str, str]]:
    """`elbokto generate`: chat-templated prompts through the reverse process.

    Returns (prompt, response) pairs, the response cut at the first EOS."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines()
                    if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt or --prompts_file")
    if model_cfg.model_name_or_path == TINY:
        raise ValueError("generate needs a trained model: pass --model_name_or_path")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer)
    model = model.eval().to(device)
    if gen_cfg.mask_token_id is None:
        gen_cfg.mask_token_id = model.config.mask_token_id
    gen_cfg.shift_logits = gen_cfg.shift_logits or uses_shifted_logits(model.config)
    texts = []
    for start in range(0, len(prompts), args.batch_size):
        ids = prompt_token_ids(tokenizer, [[{"role": "user", "content": p}]
                                           for p in prompts[start:start + args.batch_size]])
        tokens = generate(model, ids, gen_cfg, pad_token_id=tokenizer.pad_token_id or 0)
        texts += decode_responses(tokenizer, tokens)
    return list(zip(prompts, texts))


@dataclass
class DiagnoseArgs:
    """What `elbokto diagnose` measures."""

    num_batches: int = field(default=2, metadata={"help": "Batches to average Psi over."})
    batch_size: int = field(default=8, metadata={"help": "Examples per batch (m)."})
    redraws: int = field(default=8, metadata={"help": "Independent redraws R per setting."})
    budgets: list[str] = field(default_factory=lambda: ["8x1", "1x8", "4x2", "2x1", "4x1"],
                               metadata={"help": "n_t x n_yt settings to compare."})


def diagnose(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: ELBOKTOConfig,
             args: DiagnoseArgs) -> list[dict]:
    """`elbokto diagnose`: Psi(S), v and c per MC setting, from R redraws of a few batches.

    The policy is the model as loaded and the reference a frozen copy, so the margins are 0
    unless ``--ref_model_name_or_path`` names another model (e.g. the SFT base of a trained one).
    """
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    dataset, _ = build_dataset(data_cfg, tokenizer)
    policy = load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer)
    policy = policy.eval().to(train_cfg.device)
    _settle_model_fields(train_cfg, policy, tokenizer)
    reference = _reference(policy, model_cfg, train_cfg, tokenizer).to(train_cfg.device)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                        collate_fn=PreferenceCollator.from_config(data_cfg, tokenizer))
    batches = [{k: v.to(train_cfg.device) for k, v in b.items()}
               for _, b in zip(range(args.num_batches), loader)]
    rows = []
    for budget in args.budgets:
        try:
            train_cfg.n_t, train_cfg.n_yt = (int(x) for x in budget.split("x"))
        except ValueError:
            raise ValueError(f"budget {budget!r} is not of the form n_t x n_yt, e.g. 8x1")
        objective = train_cfg.objective()
        estimates = [objective.psi(policy, b, reference=reference, redraws=args.redraws)
                     for b in batches]
        rows.append({"n_t": train_cfg.n_t, "n_yt": train_cfg.n_yt,
                     "estimator": objective.mc.estimator,
                     **{k: sum(getattr(e, k) for e in estimates) / len(estimates)
                        for k in ("psi", "v", "c")}})
    return rows
