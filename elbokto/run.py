"""The jobs behind the CLI: train, precompute-ref, generate, diagnose, merge.

Each takes the config dataclasses whose fields are its flags, and wires the library pieces in the
one order data flows: tokenizer -> dataset -> models -> objective / trainer.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import TypeVar, cast

import torch
from torch.utils.data import DataLoader
from transformers import IntervalStrategy, PreTrainedModel

from elbokto import durable
from elbokto.block import check_block_attention, resolve_block_size
from elbokto.block_sampling import sampler_for
from elbokto.cli_args import DiagnoseArgs, GenerateArgs, MergeArgs
from elbokto.data import (
    DataConfig,
    PreferenceCollator,
    build_dataset,
    check_class_balance,
    dataset_uids,
    load_source,
    prompt_token_ids,
)
from elbokto.models import (
    ADAPTER_CONFIG,
    TINY,
    ModelConfig,
    adapter_base,
    frozen_reference,
    load_model,
    load_tokenizer,
    local_or_hub,
    prepare_policy,
    resolve_mask_token_id,
    uses_shifted_logits,
)
from elbokto.objective import check_kl_reference
from elbokto.precompute import (
    ReferenceTable,
    data_fingerprint,
    model_identity,
    precompute_reference,
    reference_meta,
)
from elbokto.requires import pyplot
from elbokto.sampling import SamplingConfig, decode_responses
from elbokto.tiny import build_tiny_tokenizer
from elbokto.trainer import ELBOKTOConfig, ELBOKTOTrainer, resume_checkpoint

logger = logging.getLogger(__name__)

_Config = TypeVar("_Config", bound=ELBOKTOConfig)


def tokenizer_for(model_cfg: ModelConfig, data_cfg: DataConfig | None = None):
    """The model's tokenizer; for the tiny model one trained on the dataset's text."""
    if model_cfg.model_name_or_path != TINY:
        return load_tokenizer(model_cfg)
    if data_cfg is None:
        raise ValueError("the tiny model's tokenizer is trained on a dataset: pass --dataset")
    raw = load_source(data_cfg.dataset, data_cfg.dataset_split)
    return build_tiny_tokenizer([json.dumps(row) for row in raw])


def _fingerprint(tokenizer, data_cfg: DataConfig) -> str:
    return data_fingerprint(
        tokenizer,
        max_length=data_cfg.max_length,
        max_prompt_length=data_cfg.max_prompt_length,
        append_eos=data_cfg.append_eos,
        end_of_turn=data_cfg.end_of_turn(tokenizer),
        joined_tokenization=data_cfg.joined_tokenization,
    )


def check_draw_keys(data_cfg: DataConfig, train_cfg: ELBOKTOConfig) -> None:
    """The uids key the draws and a precomputed reference: the authors' draws need row uids
    (with content uids they would be other masks, silently), and row uids number each split from
    0, so a table of the training split cannot serve an evaluation split."""
    if train_cfg.draw_source == "authors" and data_cfg.uid_source != "row":
        raise ValueError(
            "--draw_source authors seeds each example by its row number in the "
            "source split, as the authors' precompute_bref.py does: add "
            f"--uid_source row (got {data_cfg.uid_source!r})"
        )
    evaluates = data_cfg.eval_dataset is not None or data_cfg.eval_split is not None
    if data_cfg.uid_source == "row" and train_cfg.ref_elbo_file and evaluates:
        raise ValueError(
            "--uid_source row numbers the evaluation split from 0 like the training "
            "split, so --ref_elbo_file (keyed by uid) would give evaluation examples "
            "the values of training ones: evaluate with a live reference (no "
            "--ref_elbo_file) or leave out --eval_dataset / --eval_split"
        )


def _settle_model_fields(train_cfg: _Config, model, tokenizer) -> _Config:
    """A copy of ``train_cfg`` with the mask token, logit shift and block size from the model
    where the flags leave them open; a block-diffusion model is checked end to end
    (:func:`check_block_attention`). The caller's config is left as it was."""
    train_cfg = copy.copy(train_cfg)  # a shallow copy: TrainingArguments' __post_init__ once
    train_cfg.mask_token_id = resolve_mask_token_id(
        model.config, tokenizer, train_cfg.mask_token_id
    )
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and not 0 <= train_cfg.mask_token_id < vocab:
        raise ValueError(
            f"--mask_token_id {train_cfg.mask_token_id} is outside the model's "
            f"vocabulary [0, {vocab})"
        )
    train_cfg.shift_logits = train_cfg.shift_logits or uses_shifted_logits(model.config)
    train_cfg.block_size = resolve_block_size(model.config, train_cfg.block_size)
    if train_cfg.block_size is not None:
        check_block_attention(model, train_cfg.block_size)
    return train_cfg


def train(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: ELBOKTOConfig,
    resume_from_checkpoint: str | bool | None = None,
) -> ELBOKTOTrainer:
    """`elbokto train`: ELBO-KTO on a preference dataset; saves the policy to output_dir.

    Everything that can be checked without the model is checked before it is loaded: the data,
    the class balance, a precomputed reference file (its settings, epochs and coverage) and the
    checkpoint to resume from ("last": the newest complete one). What a killed run left in
    output_dir is repaired first (:func:`elbokto.durable.recover`).
    """
    check_kl_reference(
        train_cfg.baseline,
        precomputed=bool(train_cfg.ref_elbo_file),
        can_score=model_cfg.lora_r > 0,
    )
    check_draw_keys(data_cfg, train_cfg)
    assert train_cfg.output_dir is not None  # TrainingArguments.__post_init__ sets it
    if train_cfg.should_save:
        durable.recover(train_cfg.output_dir)
    resume_from_checkpoint = resume_checkpoint(train_cfg.output_dir, resume_from_checkpoint)
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    dataset, stats = build_dataset(data_cfg, tokenizer, paired=train_cfg.loss.paired)
    logger.info("data: %s", stats)
    if not train_cfg.loss.paired:
        check_class_balance(
            stats.n_desirable, stats.n_undesirable, train_cfg.lambda_d, train_cfg.lambda_u
        )
    eval_dataset = _eval_dataset(data_cfg, train_cfg, tokenizer)
    if eval_dataset is not None and train_cfg.eval_strategy == IntervalStrategy.NO:
        # Held-out data and no --eval_strategy: the run evaluates ten times.
        train_cfg = copy.copy(train_cfg)
        train_cfg.eval_strategy, train_cfg.eval_steps = IntervalStrategy.STEPS, 0.1
    fingerprint = _fingerprint(tokenizer, data_cfg)
    epochs = epochs_to_cover(train_cfg, len(dataset), train_cfg.world_size)
    ref_table = reference = None
    if train_cfg.ref_elbo_file:
        ref_table = ReferenceTable.load(train_cfg.ref_elbo_file)
        ref_table.check(
            {
                k: v
                for k, v in reference_meta(train_cfg.objective(), fingerprint, epochs).items()
                if k not in _MODEL_KEYS
            }
        )
        ref_table.check_covers(dataset_uids(dataset))
        if eval_dataset is not None:
            ref_table.check_covers(dataset_uids(eval_dataset), what="evaluation")
    policy = load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer)
    train_cfg = _settle_model_fields(train_cfg, policy, tokenizer)
    if ref_table is not None:
        ref_table.check(
            reference_meta(
                train_cfg.objective(), fingerprint, epochs, _reference_identity(model_cfg, policy)
            )
        )
    else:
        reference = _reference(policy, model_cfg, train_cfg, tokenizer)
    policy = prepare_policy(policy, model_cfg)
    trainer = ELBOKTOTrainer(
        policy,
        train_cfg,
        ref_model=reference,
        ref_table=ref_table,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=PreferenceCollator.from_config(data_cfg, tokenizer),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    return trainer


def _reference(policy, model_cfg: ModelConfig, train_cfg: ELBOKTOConfig, tokenizer):
    """:func:`frozen_reference`; another model (``--ref_model_name_or_path``) scores the same
    block draws, so it is checked like the policy."""
    reference = frozen_reference(policy, model_cfg, tokenizer=tokenizer)
    if (
        reference is not None
        and model_cfg.ref_model_name_or_path
        and train_cfg.block_size is not None
    ):
        check_block_attention(reference, train_cfg.block_size)
    return reference


def _eval_dataset(data_cfg: DataConfig, train_cfg: ELBOKTOConfig, tokenizer):
    """Held-out preference data for the objective's metrics (``--eval_dataset`` /
    ``--eval_split``), or None."""
    if data_cfg.eval_dataset is None and data_cfg.eval_split is None:
        return None
    config = replace(
        data_cfg,
        dataset=data_cfg.eval_dataset or data_cfg.dataset,
        dataset_split=data_cfg.eval_split or data_cfg.dataset_split,
    )
    if (config.dataset, config.dataset_split) == (data_cfg.dataset, data_cfg.dataset_split):
        raise ValueError(
            f"--eval_dataset / --eval_split name the training data itself "
            f"({config.dataset}, split {config.dataset_split})"
        )
    dataset, stats = build_dataset(config, tokenizer, paired=train_cfg.loss.paired)
    logger.info("evaluation data: %s", stats)
    return dataset


# Meta entries that need the loaded model (checked after loading it).
_MODEL_KEYS = ("mask_token_id", "shift_logits", "reference_model")


def _reference_identity(model_cfg: ModelConfig, policy) -> dict:
    """The reference's identity as training sees it: the initial policy's weights (the default
    reference, and the base of LoRA), or the name of ``--ref_model_name_or_path`` (that model is
    not loaded when a precomputed file replaces it, so only its name is compared)."""
    if model_cfg.ref_model_name_or_path is None:
        return model_identity(model_cfg.model_name_or_path, policy)
    path = Path(model_cfg.ref_model_name_or_path).expanduser()
    return {"name": str(path.resolve()) if path.exists() else model_cfg.ref_model_name_or_path}


def epochs_to_cover(train_cfg: ELBOKTOConfig, num_examples: int, world_size: int) -> int:
    """How many epochs (draw indices) a run touches, as the Trainer counts them: ``max_steps``
    when set (optimizer steps of per_device_train_batch_size x world_size x accumulation
    examples), else ``num_train_epochs`` rounded up."""
    if train_cfg.max_steps > 0:
        batches = num_examples / (train_cfg.per_device_train_batch_size * world_size)
        batches = math.floor(batches) if train_cfg.dataloader_drop_last else math.ceil(batches)
        updates = max(batches // train_cfg.gradient_accumulation_steps, 1)
        return max(1, math.ceil(train_cfg.max_steps / updates))
    return max(1, math.ceil(train_cfg.num_train_epochs))


def precompute_ref(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: ELBOKTOConfig,
    output_file: str,
    train_world_size: int = 1,
) -> ReferenceTable:
    """`elbokto precompute-ref`: B_hat_ref of every example, for the draws training will use.

    ``train_world_size``: data-parallel processes of the training run (with max_steps, the
    number of epochs it touches depends on it)."""
    check_draw_keys(data_cfg, train_cfg)
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    dataset, _ = build_dataset(data_cfg, tokenizer, paired=train_cfg.loss.paired)
    name = model_cfg.ref_model_name_or_path or model_cfg.model_name_or_path
    reference = load_model(name, model_cfg, tokenizer=tokenizer).eval().to(train_cfg.device)
    train_cfg = _settle_model_fields(train_cfg, reference, tokenizer)
    objective = train_cfg.objective()
    meta = reference_meta(
        objective,
        _fingerprint(tokenizer, data_cfg),
        epochs_to_cover(train_cfg, len(dataset), train_world_size),
        model_identity(name, reference),
    )
    collate = PreferenceCollator.from_config(data_cfg, tokenizer)
    loader = DataLoader(
        dataset, batch_size=train_cfg.per_device_eval_batch_size, collate_fn=collate
    )
    batches = ({k: v.to(train_cfg.device) for k, v in batch.items()} for batch in loader)
    table = precompute_reference(reference, batches, objective, meta)
    table.save(output_file)
    return table


def generate_text(
    model_cfg: ModelConfig, gen_cfg: SamplingConfig, args: GenerateArgs, device: str | None = None
) -> list[tuple[str, str]]:
    """`elbokto generate`: chat-templated prompts through the reverse process.

    Returns (prompt, response) pairs, the response cut at the first EOS."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [
            line.rstrip("\n")
            for line in Path(args.prompts_file).read_text().splitlines()
            if line.strip()
        ]
    if not prompts:
        raise ValueError("no prompts: pass --prompt or --prompts_file")
    if model_cfg.model_name_or_path == TINY:
        raise ValueError("generate needs a trained model: pass --model_name_or_path")
    tokenizer = load_tokenizer(model_cfg)
    # load_model's models are transformers models (a typed config; save_pretrained).
    model = cast(
        PreTrainedModel, load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer)
    )
    model = model.eval().to(device)
    gen_cfg = copy.copy(gen_cfg)  # settled from the model below; the caller's stays as it was
    if gen_cfg.mask_token_id is None:
        gen_cfg.mask_token_id = model.config.mask_token_id
    gen_cfg.shift_logits = gen_cfg.shift_logits or uses_shifted_logits(model.config)
    gen_cfg, sampler = sampler_for(model, gen_cfg, args.block_size)
    texts = []
    for start in range(0, len(prompts), args.batch_size):
        ids = prompt_token_ids(
            tokenizer,
            [[{"role": "user", "content": p}] for p in prompts[start : start + args.batch_size]],
        )
        tokens = sampler(model, ids, gen_cfg, pad_token_id=tokenizer.pad_token_id or 0)
        texts += decode_responses(tokenizer, tokens)
    return list(zip(prompts, texts))


def merge(model_cfg: ModelConfig, args: MergeArgs) -> Path:
    """`elbokto merge`: the LoRA adapter folder of --model_name_or_path merged into its base
    model; writes the full model and the tokenizer to --output_dir (returned), which then loads
    like any model, without peft."""
    adapter = local_or_hub(model_cfg.model_name_or_path, "--model_name_or_path")
    if adapter_base(adapter) is None:
        raise ValueError(
            f"--model_name_or_path {model_cfg.model_name_or_path}: not a LoRA "
            f"adapter folder (no {ADAPTER_CONFIG})"
        )
    out = Path(args.output_dir).expanduser()
    if out.resolve() == Path(adapter).resolve():
        raise ValueError(
            f"--output_dir {args.output_dir} is the adapter folder itself: the "
            "merged model needs a folder of its own"
        )
    tokenizer = load_tokenizer(model_cfg)
    model = cast(PreTrainedModel, load_model(adapter, model_cfg, tokenizer=tokenizer))

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    durable.publish(out, write)
    return out


def diagnose(
    model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: ELBOKTOConfig, args: DiagnoseArgs
) -> list[dict]:
    """`elbokto diagnose`: Psi(S), v and c per MC setting, from R redraws of a few batches, and
    with ``--gradient_noise`` the gradient's relative variance (averaged over the batches).

    The policy is the model as loaded and the reference a frozen copy, so the margins are 0
    unless ``--ref_model_name_or_path`` names another model (e.g. the SFT base of a trained one).
    """
    check_draw_keys(data_cfg, train_cfg)
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    dataset, _ = build_dataset(data_cfg, tokenizer, paired=train_cfg.loss.paired)
    policy = load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer)
    policy = policy.eval().to(train_cfg.device)
    train_cfg = _settle_model_fields(train_cfg, policy, tokenizer)
    reference = _reference(policy, model_cfg, train_cfg, tokenizer).to(train_cfg.device)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        collate_fn=PreferenceCollator.from_config(data_cfg, tokenizer),
    )
    batches = [
        {k: v.to(train_cfg.device) for k, v in b.items()}
        for _, b in zip(range(args.num_batches), loader)
        if len(b["uid"]) == args.batch_size
    ]
    if not batches:
        raise ValueError(
            f"--dataset {data_cfg.dataset}: {len(dataset)} examples make no full "
            f"batch of --batch_size {args.batch_size} to diagnose"
        )
    rows = []
    for n_t, n_yt in args.settings:
        setting = copy.copy(train_cfg)
        setting.n_t, setting.n_yt = n_t, n_yt
        objective = setting.objective()
        estimates = [
            objective.psi(policy, b, reference=reference, redraws=args.redraws) for b in batches
        ]
        rows.append(
            {
                "n_t": n_t,
                "n_yt": n_yt,
                "estimator": objective.mc.estimator,
                **{
                    k: sum(getattr(e, k) for e in estimates) / len(estimates)
                    for k in ("psi", "v", "c")
                },
            }
        )
        if args.gradient_noise:
            rows[-1]["gradient_noise"] = sum(
                objective.gradient_noise(
                    policy, b, reference=reference, redraws=args.redraws
                ).relative_variance
                for b in batches
            ) / len(batches)
    assert train_cfg.output_dir is not None  # TrainingArguments.__post_init__ sets it
    out = Path(train_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    durable.atomic_write(out / "diagnose.json", json.dumps(rows, indent=1))
    plot_psi(rows, out / "diagnose.png")
    return rows


def plot_psi(rows: list[dict], path: Path) -> None:
    """Psi(S), v(S) and c(S) per Monte-Carlo setting, as one bar chart."""
    plt = pyplot("the diagnose chart")

    labels = [f"{r['n_t']}x{r['n_yt']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 3.2))
    width = 0.27
    for k, key in enumerate(("psi", "v", "c")):
        ax.bar(
            [i + (k - 1) * width for i in range(len(rows))],
            [r[key] for r in rows],
            width,
            label=key if key != "psi" else "Psi(S)",
        )
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("n_t x n_yt")
    ax.legend()
    fig.tight_layout()
    durable.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
