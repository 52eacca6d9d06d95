"""Judge-free demonstration on CPU: ELBO-KTO turns a 50/50 model into a reverser.

Task: the prompt is a short random string (``min_letters``..``max_letters`` letters of
``alphabet``, never a palindrome); an answer is either the string copied or the string reversed,
then EOS tokens up to a fixed width (LLaDA's SFT convention), so that the sampler's fixed
``gen_length`` covers every answer. A rule classifies a sample: ``reverse`` (desirable), ``copy``
(undesirable) or ``other`` (malformed).

1. SFT: a tiny bidirectional Gemma learns both styles, 50/50, by minimising the masked-diffusion
   loss -ELBO(response | prompt) / response length on a stream of fresh examples.
2. The SFT model is sampled on held-out prompts: about half of its answers are reversals.
3. ELBO-KTO, unpaired: each training prompt comes with ONE answer, a reversal labelled desirable
   or a copy labelled undesirable, against the frozen SFT model as reference.
4. The aligned model is sampled on the same held-out prompts: most answers are now reversals.

:func:`run_demo` writes ``summary.json`` (rates, wall times, the configuration) and ``curves.png``
(SFT loss, KTO loss, reward margins, desirable rate at checkpoints) under ``output_dir``.
``ablate=True`` adds a miniature of the paper's ablations (baseline, common random numbers, n_t,
n_t x n_yt at a fixed budget, class imbalance, and CRN and the baseline at one copy per example),
each with its class rates, its Monte-Carlo noise (Psi(S) and the gradient noise, at the start and
the end of ELBO-KTO), its saturation and its reward drift.

Nothing is downloaded: the model has random initial weights and the tokenizer is built offline
(:func:`elbokto.tiny.build_tiny_tokenizer` without merges: one token per ASCII character).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from elbokto.data import PreferenceCollator, example_uid, prompt_token_ids
from elbokto.draws import MCConfig, sample_draws
from elbokto.durable import atomic_write
from elbokto.estimate import elbo_estimate
from elbokto.loss import LossConfig
from elbokto.models import build_tiny_model
from elbokto.objective import ELBOKTOObjective
from elbokto.requires import pyplot
from elbokto.sampling import GenerationConfig, decode_responses, generate
from elbokto.tiny import SPECIAL_TOKENS, build_tiny_tokenizer

__all__ = ["DemoConfig", "classify", "run_demo", "run_seeds", "write_ablations"]

logger = logging.getLogger(__name__)

DESIRABLE, UNDESIRABLE, OTHER = "reverse", "copy", "other"


@dataclass
class DemoConfig:
    """Every knob of the demo. The defaults are the tuned ``make demo`` setting."""

    seed: int = 0
    # Task.
    alphabet: str = "abcdefgh"
    min_letters: int = 3
    max_letters: int = 6
    upper: bool = True
    # Model: GemmaForCausalLM, bidirectional.
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    # SFT: fresh random examples every step, AdamW with warmup and cosine decay.
    sft_steps: int = 2000
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    sft_mc: MCConfig = field(default_factory=lambda: MCConfig(n_t=1))
    # ELBO-KTO: unpaired examples, half reversals (desirable) and half copies (undesirable).
    kto_examples: int = 512
    kto_batch_size: int = 32
    kto_epochs: int = 1
    kto_lr: float = 2e-4
    loss: LossConfig = field(default_factory=lambda: LossConfig(beta=1.0))
    mc: MCConfig = field(default_factory=lambda: MCConfig(n_t=8, n_yt=1))
    crn: bool = True  # False: the reference is scored on independent draws (another seed)
    desirable_fraction: float = 1.0
    undesirable_fraction: float = 1.0
    # Evaluation: LLaDA sampler, one token per step in a random order at temperature 1, i.e. a
    # sample from the model's own law. (Low-confidence remasking commits first the tokens that
    # the model likes most, which turns a slight preference for one style into a large one.)
    eval_prompts: int = 512
    temperature: float = 1.0
    remasking: str = "random"
    eval_checkpoints: int = 4  # desirable rate measured this many times during KTO (0: none)
    psi_batch_size: int = 64
    psi_redraws: int = 8
    backend: str = "torch"  # the tiny vocabulary needs no compiled kernel
    filter_eps: float | str | None = None  # gradient filtering of the LM head, SFT and ELBO-KTO

    def __post_init__(self) -> None:
        for name in ("sft_lr", "kto_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: a learning rate must be > 0")
        for name in ("sft_steps", "kto_epochs", "kto_batch_size", "kto_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")

    @property
    def gen_length(self) -> int:
        """Response width: the longest answer plus at least one EOS."""
        return self.max_letters + 1


QUICK = dict(sft_steps=30, sft_batch_size=16, kto_examples=64, kto_batch_size=16,
             eval_prompts=32, eval_checkpoints=1, psi_batch_size=8, psi_redraws=2,
             mc=MCConfig(n_t=2), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


# --- task -----------------------------------------------------------------------------------------

def classify(prompt: str, text: str, upper: bool = True) -> str:
    """The rule: ``"reverse"`` (desirable), ``"copy"`` (undesirable) or ``"other"``."""
    if text == answer(prompt, True, upper):
        return DESIRABLE
    return UNDESIRABLE if text == answer(prompt, False, upper) else OTHER


def answer(prompt: str, desirable: bool, upper: bool = True) -> str:
    if not desirable:
        return prompt
    return prompt[::-1].upper() if upper else prompt[::-1]


def sample_prompts(rng: np.random.Generator, n: int, config: DemoConfig,
                   exclude: set[str] = frozenset(), unique: bool = True) -> list[str]:
    """``n`` random non-palindromic strings, none in ``exclude`` (distinct when ``unique``)."""
    prompts: list[str] = []
    seen = set(exclude)
    letters = np.array(list(config.alphabet))
    while len(prompts) < n:
        length = int(rng.integers(config.min_letters, config.max_letters + 1))
        text = "".join(rng.choice(letters, length))
        if text == text[::-1] or text in seen:
            continue
        prompts.append(text)
        if unique:
            seen.add(text)
    return prompts


# --- tokens ---------------------------------------------------------------------------------------

class Encoder:
    """Token rows of the task: chat-templated prompt, answer letters, EOS up to ``gen_length``."""

    def __init__(self, config: DemoConfig) -> None:
        # No merges: every character is one token, which is what copying and reversing need.
        self.tokenizer = build_tiny_tokenizer([], vocab_size=256 + len(SPECIAL_TOKENS))
        self.gen_length = config.gen_length
        self.upper = config.upper
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return prompt_token_ids(self.tokenizer, [[_user(p)] for p in prompts])

    def rows(self, prompts: list[str], desirable: list[bool]) -> list[dict]:
        """Token rows (see :class:`elbokto.data.PreferenceCollator`); uid from the content."""
        answers = [answer(p, d, self.upper) for p, d in zip(prompts, desirable)]
        eos = self.tokenizer.eos_token_id
        rows = []
        for prompt, ids, text, label in zip(prompts, self.prompt_ids(prompts),
                                            self.tokenizer(answers, add_special_tokens=False)
                                            ["input_ids"], desirable):
            response = text + [eos] * (self.gen_length - len(text))
            rows.append({"input_ids": ids + response, "prompt_length": len(ids),
                         "response_length": len(response), "desirable": label,
                         "uid": example_uid([_user(prompt)], answer(prompt, label, self.upper),
                                           label)})
        return rows

    def batch(self, rows: list[dict]) -> dict[str, Tensor]:
        return self.collator(rows)


def _user(prompt: str) -> dict[str, str]:
    return {"role": "user", "content": prompt}


# --- model ----------------------------------------------------------------------------------------

def build_model(config: DemoConfig, tokenizer) -> nn.Module:
    """A randomly initialised bidirectional GemmaForCausalLM (float32, no dropout)."""
    return build_tiny_model(len(tokenizer), tokenizer.mask_token_id, hidden_size=config.hidden_size,
                            intermediate_size=config.intermediate_size,
                            num_layers=config.num_layers, num_heads=config.num_heads,
                            num_kv_heads=config.num_heads, max_position_embeddings=64,
                            pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, seed=config.seed)


# --- training -------------------------------------------------------------------------------------

def _optimizer(model: nn.Module, lr: float, steps: int, warmup: float = 0.05):
    """AdamW with linear warmup and cosine decay to 0 over ``steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_sft(model: nn.Module, encoder: Encoder, config: DemoConfig,
              rng: np.random.Generator) -> list[float]:
    """Masked-diffusion SFT on fresh 50/50 examples: minimise -ELBO / response length.

    Returns the loss (nats per response token) of every step."""
    mask_id = encoder.tokenizer.mask_token_id
    optimizer, schedule = _optimizer(model, config.sft_lr, config.sft_steps)
    losses = []
    model.train()
    for step in range(config.sft_steps):
        prompts = sample_prompts(rng, config.sft_batch_size, config, unique=False)
        styles = (rng.random(len(prompts)) < 0.5).tolist()
        batch = encoder.batch(encoder.rows(prompts, styles))
        draws = sample_draws(config.sft_mc, batch["prompt_lengths"], batch["response_lengths"],
                             batch["input_ids"].shape[1], uids=batch["uid"], seed=config.seed,
                             step=step)
        elbo = elbo_estimate(model, batch["input_ids"], draws, mask_token_id=mask_id,
                             attention_mask=batch["attention_mask"], backend=config.backend,
                             filter_eps=config.filter_eps)
        loss = -(elbo / batch["response_lengths"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


# What the SFT model depends on: a cached one is reused only when all of these match.
SFT_FIELDS = ("seed", "alphabet", "min_letters", "max_letters", "upper", "hidden_size",
              "intermediate_size", "num_layers", "num_heads", "sft_steps", "sft_batch_size",
              "sft_lr", "sft_mc", "backend", "filter_eps", "eval_prompts", "kto_examples")


def sft_model(model: nn.Module, encoder: Encoder, config: DemoConfig, rng: np.random.Generator,
              cache: str | None = None) -> tuple[list[float], float]:
    """Train ``model`` with :func:`train_sft`, or load it from ``cache``.

    The cache file is named by a hash of the configuration's :data:`SFT_FIELDS` (the prompts
    sampled before SFT depend on eval_prompts and kto_examples, and SFT draws its examples from
    the same generator) and holds the weights, the loss curve and the training time. The key
    does not cover the code: empty the folder after changing how SFT trains.

    Returns (the SFT loss of every step, the seconds SFT took when it was trained)."""
    path = None
    if cache is not None:
        fields = {name: getattr(config, name) for name in SFT_FIELDS}
        key = hashlib.sha256(json.dumps(_jsonable_value(fields), sort_keys=True).encode())
        path = Path(cache) / f"sft-{key.hexdigest()[:16]}.pt"
        saved = _read_sft_cache(path, model)
        if saved is not None:
            model.load_state_dict(saved["state"])
            logger.info("SFT model loaded from %s", path)
            model.eval()
            return saved["losses"], saved["seconds"]
    tick = time.perf_counter()
    losses = train_sft(model, encoder, config, rng)
    seconds = time.perf_counter() - tick
    if path is not None:
        saved = {"state": model.state_dict(), "losses": losses, "seconds": seconds}
        atomic_write(path, lambda f: torch.save(saved, f))
    return losses, seconds


def _read_sft_cache(path: Path, model: nn.Module) -> dict | None:
    """The cached SFT model at ``path``, or None when there is none or it cannot be read (then it
    is trained again and the file replaced, with a warning): a broken cache is a missing one."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        expected = {"state", "losses", "seconds"}
        if not expected <= saved.keys() or saved["state"].keys() != model.state_dict().keys():
            raise ValueError("not the entries of this model's SFT cache")
    except Exception as err:  # empty, truncated, foreign: anything torch.load or the keys reject
        logger.warning("unreadable SFT cache %s (%s: %s); training SFT again", path,
                       type(err).__name__, err)
        return None
    return saved


def kto_rows(encoder: Encoder, config: DemoConfig, prompts: list[str]) -> list[dict]:
    """One answer per prompt, reversal (desirable) or copy with probability 1/2 (seeded), then
    the first ``fraction`` of each class kept (the imbalance ablation: the same labels, fewer
    rows)."""
    labels = (np.random.default_rng([config.seed, 1]).random(len(prompts)) < 0.5).tolist()
    keep = []
    for cls, fraction in ((True, config.desirable_fraction), (False, config.undesirable_fraction)):
        members = [i for i, label in enumerate(labels) if label == cls]
        keep += members[:round(fraction * len(members))]
    keep = sorted(keep)
    return encoder.rows([prompts[i] for i in keep], [labels[i] for i in keep])


def kto_objective(config: DemoConfig) -> ELBOKTOObjective:
    return ELBOKTOObjective(mc=config.mc, loss=config.loss, seed=config.seed, crn=config.crn,
                            filter_eps=config.filter_eps, backend=config.backend)


def train_kto(policy: nn.Module, reference: nn.Module, encoder: Encoder, rows: list[dict],
              config: DemoConfig, evaluate_fn: Callable[[nn.Module], dict] | None = None) -> dict:
    """ELBO-KTO with AdamW, ``kto_epochs`` passes over ``rows`` in seeded random batches.

    The draws of step s use ``step=s``. With ``crn=False`` the reference scores independent
    noisy copies (see :class:`ELBOKTOObjective`).

    Returns per-step ``loss``, ``margins`` (rewards/chosen - rewards/rejected, i.e.
    beta * (mean r over desirable - mean r over undesirable)), ``saturated`` (the share of the
    batch's examples in the flat tails of the value function, ``saturated_fraction``) and
    ``mean_reward`` (beta * the batch mean of r, the batch-mean baseline's b0 scaled), and
    ``checkpoints``: [step, desirable rate] pairs from ``evaluate_fn``.
    """
    objective = kto_objective(config)
    order_rng = np.random.default_rng([config.seed, 2])
    batches = [rows_idx for _ in range(config.kto_epochs)
               for rows_idx in _batches(order_rng.permutation(len(rows)), config.kto_batch_size)]
    optimizer, schedule = _optimizer(policy, config.kto_lr, len(batches), warmup=0.1)
    every = len(batches) // config.eval_checkpoints if config.eval_checkpoints else 0
    history: dict = {"loss": [], "margins": [], "saturated": [], "mean_reward": [],
                     "checkpoints": []}
    policy.train()
    for step, index in enumerate(batches):
        batch = encoder.batch([rows[i] for i in index])
        out = objective(policy, batch, reference=reference, step=step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        mean_reward = config.loss.beta * (out.policy_elbo - out.ref_elbo).mean()
        figures = torch.stack([out.loss.detach(), out.metrics["rewards/margins"],
                               out.metrics["saturated_fraction"], mean_reward]).tolist()
        for key, value in zip(("loss", "margins", "saturated", "mean_reward"), figures):
            history[key].append(value)
        if evaluate_fn is not None and every and (step + 1) % every == 0 \
                and step + 1 < len(batches):
            policy.eval()
            history["checkpoints"].append([step + 1, evaluate_fn(policy)[DESIRABLE]])
            policy.train()
    policy.eval()
    return history


def _batches(order: np.ndarray, size: int) -> list[list[int]]:
    """Full batches only: the batch-mean baseline wants equal batch sizes."""
    return [order[i:i + size].tolist() for i in range(0, len(order) - size + 1, size)]


# --- evaluation -----------------------------------------------------------------------------------

def evaluate(model: nn.Module, encoder: Encoder, prompts: list[str], config: DemoConfig) -> dict:
    """Rates of the three classes over ``prompts``, one sample each (seeded)."""
    gen = GenerationConfig(gen_length=config.gen_length, steps=config.gen_length,
                           block_length=config.gen_length, temperature=config.temperature,
                           remasking=config.remasking, seed=config.seed)
    tokens = generate(model, encoder.prompt_ids(prompts), gen,
                      pad_token_id=encoder.tokenizer.pad_token_id)
    answers = decode_responses(encoder.tokenizer, tokens)
    counts = {DESIRABLE: 0, UNDESIRABLE: 0, OTHER: 0}
    for prompt, text in zip(prompts, answers):
        counts[classify(prompt, text, config.upper)] += 1
    return {k: v / len(prompts) for k, v in counts.items()}


def mc_noise(policy: nn.Module, reference: nn.Module, batch: dict[str, Tensor],
             config: DemoConfig) -> dict:
    """The Monte-Carlo noise of the config's setting (MC budget, CRN, baseline) on ``batch``, over
    ``psi_redraws`` redraws: Psi(S), v, c of the margins (DESIGN.md §2) and the relative variance
    of the loss gradient (:meth:`ELBOKTOObjective.gradient_noise`)."""
    objective = kto_objective(config)
    estimate = objective.psi(policy, batch, reference=reference, redraws=config.psi_redraws)
    gradient = objective.gradient_noise(policy, batch, reference=reference,
                                        redraws=config.psi_redraws)
    return {"psi": estimate.psi, "psi_baseline": estimate.psi_baseline, "v": estimate.v,
            "c": estimate.c, "gradient_noise": gradient.relative_variance}


# --- the demo -------------------------------------------------------------------------------------

def run_demo(output_dir: str = "runs/demo", ablate: bool = False, quick: bool = False,
             config: DemoConfig | None = None, sft_cache: str | None = None) -> dict:
    """Run SFT, sample, ELBO-KTO, sample again; write summary.json and curves.png.

    Args:
        output_dir: created if missing.
        ablate: also run the ablations (several more KTO runs from the same SFT model).
        quick: a seconds-long smoke version (tiny model, few steps; the rates mean nothing).
        config: overrides the defaults (``quick`` then applies on top of it).
        sft_cache: a folder where SFT models are kept (:func:`sft_model`), so that runs which
            change only the ELBO-KTO stage skip SFT.

    Returns:
        The summary dict written to ``summary.json``.
    """
    start = time.perf_counter()
    torch.set_num_threads(2)
    config = config or DemoConfig()
    if quick:
        config = replace(config, **QUICK)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    encoder = Encoder(config)
    rng = np.random.default_rng(config.seed)
    eval_prompts = sample_prompts(rng, config.eval_prompts, config)
    train_prompts = sample_prompts(rng, config.kto_examples, config, exclude=set(eval_prompts))
    rows = kto_rows(encoder, config, train_prompts)
    psi_batch = encoder.batch(encoder.rows(*_psi_examples(config, eval_prompts)))

    model = build_model(config, encoder.tokenizer)
    sft_loss, sft_seconds = sft_model(model, encoder, config, rng, sft_cache)
    reference = copy.deepcopy(model).requires_grad_(False)
    sft_state = copy.deepcopy(model.state_dict())

    tick = time.perf_counter()
    base = evaluate(model, encoder, eval_prompts, config)
    sample_seconds = time.perf_counter() - tick
    logger.info("SFT model: %s", _rates(base))

    def rate(policy):
        return evaluate(policy, encoder, eval_prompts, config)

    tick = time.perf_counter()
    history = train_kto(model, reference, encoder, rows, config, rate)
    kto_seconds = time.perf_counter() - tick
    aligned = rate(model)
    logger.info("aligned model: %s", _rates(aligned))
    history["checkpoints"] = [[0, base[DESIRABLE]], *history["checkpoints"],
                              [len(history["loss"]), aligned[DESIRABLE]]]

    summary = {
        "base_desirable_rate": base[DESIRABLE],
        "aligned_desirable_rate": aligned[DESIRABLE],
        "base_rates": base,
        "aligned_rates": aligned,
        "train_seconds": sft_seconds + kto_seconds,
        "sft_seconds": sft_seconds,
        "kto_seconds": kto_seconds,
        "sample_seconds": sample_seconds,
        "kto_examples": {"desirable": sum(r["desirable"] for r in rows),
                         "undesirable": sum(not r["desirable"] for r in rows)},
        "noise": mc_noise(model, reference, psi_batch, config),
        "config": _jsonable(config),
        "quick": quick,
        "curves": {"sft_loss": sft_loss, **history},
    }
    if ablate:
        summary["ablations"] = run_ablations(config, encoder, sft_state, reference,
                                             train_prompts, eval_prompts, psi_batch, model,
                                             summary)
    from elbokto.eval.demo import demo_winrate  # here: elbokto.eval imports this module

    summary["winrate"] = demo_winrate(model, reference, encoder, eval_prompts, config, out)
    summary["total_seconds"] = time.perf_counter() - start
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    plot_curves(summary, out / "curves.png")
    logger.info("base desirable rate %.3f -> aligned %.3f (train %.0f s, total %.0f s); "
                "wrote %s", base[DESIRABLE], aligned[DESIRABLE], summary["train_seconds"],
                summary["total_seconds"], out)
    logger.info("win rate of the aligned model against the SFT model (rule judge, both orders): "
                "%.3f, 95%% CI [%.3f, %.3f]", summary["winrate"]["awr"],
                summary["winrate"]["ci_low"], summary["winrate"]["ci_high"])
    return summary


def run_seeds(output_dir: str, seeds: list[int], ablate: bool = False, quick: bool = False,
              config: DemoConfig | None = None, sft_cache: str | None = None) -> dict:
    """:func:`run_demo` once per seed; with more than one seed, each writes under
    ``output_dir/seed<k>`` and ``output_dir/seeds.json`` gathers the base and aligned desirable
    rates per seed with their spread (:func:`spread`). With ``ablate``,
    ``output_dir/ablations.json`` and ``ablations.png`` gather the ablations of every seed
    (:func:`write_ablations`).

    Returns the summary of the single seed, or the content of ``seeds.json``."""
    config = config or DemoConfig()
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: each seed once")
    out = Path(output_dir)
    if len(seeds) == 1:
        runs = {seeds[0]: run_demo(output_dir, ablate, quick, replace(config, seed=seeds[0]),
                                   sft_cache)}
        result = runs[seeds[0]]
    else:
        runs = {seed: run_demo(str(out / f"seed{seed}"), ablate, quick, replace(config, seed=seed),
                               sft_cache)
                for seed in seeds}
        result = {"seeds": {seed: {"base": r["base_desirable_rate"],
                                   "aligned": r["aligned_desirable_rate"]}
                            for seed, r in runs.items()},
                  "filter_eps": config.filter_eps, "quick": quick}
        for key in ("base", "aligned"):
            result[key] = spread([r[key] for r in result["seeds"].values()])
        atomic_write(out / "seeds.json", json.dumps(result, indent=1))
        logger.info("seeds %s: aligned desirable rate %.3f +- %.3f (min %.3f, max %.3f), base "
                    "%.3f", seeds, *(result["aligned"][k] for k in ("mean", "std", "min", "max")),
                    result["base"]["mean"])
    if ablate:
        write_ablations(out, {seed: r["ablations"] for seed, r in runs.items()})
    return result


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), minimum and maximum."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


# What ablations.json summarises over the seeds, per setting.
ABLATION_FIGURES = ("desirable_rate", "undesirable_rate", "other_rate", "psi", "v", "c",
                    "gradient_noise", "start_psi", "start_gradient_noise", "late_saturation",
                    "reward_drift", "kto_seconds")


def write_ablations(out: Path, per_seed: dict[int, dict]) -> None:
    """``out/ablations.json``: per setting, each seed's results (:func:`run_ablations`), the
    spread of each of ``ABLATION_FIGURES`` over the seeds, its ``control`` (:data:`CONTROLS`)
    and ``desirable_rate_change``: the spread of the per-seed differences from the control's
    desirable rate (paired: each seed's settings start from one SFT model, so the paired spread
    is the one that tells a setting's effect from the seed's); ``out/ablations.png``: the rates of
    every setting, seed by seed, with their mean and standard deviation."""
    settings = list(next(iter(per_seed.values())))
    table = {"seeds": list(per_seed),
             "settings": {name: {"per_seed": {seed: results[name]
                                              for seed, results in per_seed.items()},
                                 **{key: spread([results[name][key]
                                                 for results in per_seed.values()])
                                    for key in ABLATION_FIGURES},
                                 "control": CONTROLS.get(name, "default"),
                                 "desirable_rate_change": spread(
                                     [results[name]["desirable_rate"]
                                      - results[CONTROLS.get(name, "default")]["desirable_rate"]
                                      for results in per_seed.values()])}
                          for name in settings}}
    atomic_write(out / "ablations.json", json.dumps(table, indent=1))
    plot_ablations(table, out / "ablations.png")


def _psi_examples(config: DemoConfig, prompts: list[str]) -> tuple[list[str], list[bool]]:
    """A fixed, balanced batch for Psi(S): held-out prompts, alternating labels."""
    chosen = prompts[:config.psi_batch_size]
    return chosen, [i % 2 == 0 for i in range(len(chosen))]


ABLATIONS: dict[str, Callable[[DemoConfig], DemoConfig]] = {
    "baseline=none": lambda c: replace(c, loss=replace(c.loss, baseline="none")),
    "crn=off": lambda c: replace(c, crn=False),
    "n_t=2": lambda c: replace(c, mc=MCConfig(n_t=2)),
    "n_t=4": lambda c: replace(c, mc=MCConfig(n_t=4)),
    "n_t=1,n_yt=8": lambda c: replace(c, mc=MCConfig(n_t=1, n_yt=8)),
    "n_t=2,n_yt=4": lambda c: replace(c, mc=MCConfig(n_t=2, n_yt=4)),
    # One copy per example: the budget at which the margins' MC noise is material at the start
    # of ELBO-KTO (docs/demo-and-ablations.md), so that CRN and the baseline have noise to act on.
    "n_t=1": lambda c: replace(c, mc=MCConfig(n_t=1)),
    "n_t=1,crn=off": lambda c: replace(c, mc=MCConfig(n_t=1), crn=False),
    "n_t=1,crn=off,baseline=none": lambda c: replace(c, mc=MCConfig(n_t=1), crn=False,
                                                     loss=replace(c.loss, baseline="none")),
    "fewer desirable (1/4)": lambda c: replace(c, desirable_fraction=0.25),
    "fewer undesirable (1/4)": lambda c: replace(c, undesirable_fraction=0.25),
}


# The setting an ablation is compared with, when it is not the default: the one that differs from
# it in that ablation's choice only.
CONTROLS = {"n_t=1,crn=off": "n_t=1", "n_t=1,crn=off,baseline=none": "n_t=1,crn=off"}


def run_ablations(config: DemoConfig, encoder: Encoder, sft_state: dict, reference: nn.Module,
                  train_prompts: list[str], eval_prompts: list[str],
                  psi_batch: dict[str, Tensor],
                  aligned: nn.Module, main: dict) -> dict:
    """Each variant: KTO from the same SFT weights, its class rates, how its training went
    (:func:`_training_figures`), and the Monte-Carlo noise of its setting (:func:`mc_noise`)
    measured on fixed policies and one fixed batch, so that the noise columns compare
    estimators, not training outcomes: at the start of ELBO-KTO (``start_``: the SFT model, which
    is also the reference) and at the end (the main run's aligned model)."""
    start = build_model(config, encoder.tokenizer)
    start.load_state_dict(sft_state)

    def noise(variant: DemoConfig) -> dict:
        return {**mc_noise(aligned, reference, psi_batch, variant),
                **{f"start_{k}": v for k, v in mc_noise(start, reference, psi_batch, variant)
                   .items() if k in ("psi", "gradient_noise")}}

    results = {"default": {**_class_rates(main["aligned_rates"]),
                           "kto_seconds": main["kto_seconds"],
                           "kto_examples": sum(main["kto_examples"].values()),
                           **_training_figures(main["curves"]), **noise(config)}}
    for name, change in ABLATIONS.items():
        variant = change(config)
        variant_rows = kto_rows(encoder, variant, train_prompts)
        policy = build_model(variant, encoder.tokenizer)
        policy.load_state_dict(sft_state)
        tick = time.perf_counter()
        history = train_kto(policy, reference, encoder, variant_rows,
                            replace(variant, eval_checkpoints=0))
        seconds = time.perf_counter() - tick
        results[name] = {**_class_rates(evaluate(policy, encoder, eval_prompts, variant)),
                         "kto_seconds": seconds, "kto_examples": len(variant_rows),
                         **_training_figures(history), **noise(variant)}
        logger.info("ablation %s: %s", name, results[name])
    return results


def _training_figures(history: dict) -> dict:
    """late_saturation: the mean share of saturated examples over the last quarter of the KTO
    steps (how much of the batch still drives the gradient once training has run);
    reward_drift: the mean over the steps of |beta * mean_i r_i|, how far the batch-mean
    baseline moves the value function's argument (the sigmoid's scale is 1)."""
    late = history["saturated"][-max(1, len(history["saturated"]) // 4):]
    return {"late_saturation": float(np.mean(late)),
            "reward_drift": float(np.mean(np.abs(history["mean_reward"])))}


def _class_rates(rates: dict) -> dict:
    """The rates of :func:`evaluate` under the names ablations.json uses."""
    return {"desirable_rate": rates[DESIRABLE], "undesirable_rate": rates[UNDESIRABLE],
            "other_rate": rates[OTHER]}


def _rates(rates: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in rates.items())


def _jsonable(config: DemoConfig) -> dict:
    return {**asdict(config), "gen_length": config.gen_length}


def _jsonable_value(value):
    """Dataclasses (MCConfig) as dicts, for hashing."""
    if isinstance(value, dict):
        return {k: _jsonable_value(v) for k, v in value.items()}
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


# --- plot -----------------------------------------------------------------------------------------

def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a warning) without it."""
    try:
        return pyplot("the demo's plots")
    except ModuleNotFoundError as error:
        logger.warning("%s (no plot)", error)
        return None


def plot_curves(summary: dict, path: Path) -> bool:
    """SFT loss, KTO loss, reward margins and the desirable rate at checkpoints, as one PNG.

    Returns False (and writes nothing) when matplotlib is not importable."""
    plt = _pyplot()
    if plt is None:
        return False
    curves = summary["curves"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [("SFT loss (nats / token)", curves["sft_loss"]),
              ("ELBO-KTO loss", curves["loss"]),
              ("rewards/margins (chosen - rejected)", curves["margins"])]
    for ax, (title, values) in zip(axes, panels):
        ax.plot(values, lw=0.6, alpha=0.5)
        ax.plot(_smooth(values), lw=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    steps, rates = zip(*curves["checkpoints"])
    axes[3].plot(steps, rates, "o-")
    axes[3].set_ylim(0, 1)
    axes[3].set_title("desirable (reverse) rate", fontsize=10)
    axes[3].set_xlabel("KTO step")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def plot_ablations(table: dict, path: Path) -> bool:
    """Desirable, undesirable and malformed rates of every setting of ``table``
    (:func:`write_ablations`): one dot per seed, the mean with one standard deviation.

    Returns False (and writes nothing) when matplotlib is not importable."""
    plt = _pyplot()
    if plt is None:
        return False
    names = list(table["settings"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(names) + 1.5), sharey=True)
    for ax, (key, title) in zip(axes, [("desirable_rate", "desirable (reverse) rate"),
                                       ("undesirable_rate", "undesirable (copy) rate"),
                                       ("other_rate", "malformed rate")]):
        for y, name in enumerate(names):
            entry = table["settings"][name]
            seeds = [r[key] for r in entry["per_seed"].values()]
            ax.plot(seeds, [y] * len(seeds), "o", color="0.6", ms=4)
            ax.errorbar(entry[key]["mean"], y, xerr=entry[key]["std"], fmt="D", color="C0",
                        capsize=3)
        ax.set_title(f"{title}, seeds {table['seeds']}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def _smooth(values: list[float], width: int = 25) -> np.ndarray:
    width = max(1, min(width, len(values) // 5 or 1))
    return np.convolve(values, np.ones(width) / width, mode="valid")
