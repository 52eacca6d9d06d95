"""lm-evaluation-harness model ``elbokto``: masked diffusion LMs scored by their ELBO.

Registered with lm-eval (>= 0.4.13) when this module is imported, so
``elbokto eval lm-eval --model elbokto --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,...``
(or ``lm_eval`` in a script that imports :mod:`elbokto.eval.harness`) runs any lm-eval task.

- ``loglikelihood(context, continuation)``: the Monte-Carlo ELBO of the continuation given the
  context, a lower bound on log p(continuation | context). ``mc_num`` noisy copies per request,
  drawn by :func:`elbokto.sample_draws` (a pure function of the request's tokens and ``seed``):
  the fixed-count estimator with antithetic levels, i.e. copy j masks l_j = floor((j + u) L /
  mc_num) + 1 of the L continuation tokens, counts stratified across the copies as in LLaDA's
  evaluation (the Bernoulli estimator for models with shifted logits, as Dream's). The copies go
  through :func:`elbokto.elbo_estimate` (the fused LM head: only masked rows are scored, no
  [copies, T, V] logits), ``mc_chunk_size`` copies per forward, copies of several requests sharing
  a forward. With one continuation token every copy masks it with weight 1: the value is the exact
  log-probability. ``is_greedy`` (``is_greedy_mode``): "argmax" (default), every continuation
  token is the argmax of the model's prediction at its position when ALL continuation tokens are
  masked (one extra forward); "llada", LLaDA's definition (``suffix_greedy_prediction`` of its
  eval_llada.py): the continuation is decoded from all-masked one token per step, each step
  unmasking the masked position whose argmax is the most probable, and must come out as the
  continuation (one forward per continuation token).
- ``loglikelihood_rolling(text)``: the ELBO of the whole text after the prefix token, in disjoint
  windows of at most ``max_length`` tokens (each window conditioned on the tokens before it).
- ``generate_until``: :func:`elbokto.generate` (semi-autoregressive blocks, optionally
  confidence-threshold parallel decoding; :func:`elbokto.block_generate` over the model's own
  blocks for a block-diffusion model), at most ``max_gen_toks`` tokens, cut at EOS and at the
  first ``until`` string; greedy unless the task asks ``do_sample`` with a temperature.
- ``cfg_scale`` > 0: classifier-free guidance for the likelihoods (LLaDA's): logits =
  u + (cfg_scale + 1)(c - u), u with the context masked. It needs the full logits of the copies
  (2x the forward, [copies, T, V] memory): the fused head is then not used.
- Several GPUs: under ``accelerate launch`` (or torchrun) each process takes its share of the
  requests; rank, world size and the gather / barrier hooks that lm-eval calls go through
  accelerate.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections import defaultdict
from dataclasses import replace
from typing import Literal

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import Tensor, nn
from tqdm.auto import tqdm

from elbokto.block import resolve_block_size
from elbokto.block_sampling import sampler_for
from elbokto.draws import Draws, MCConfig, sample_draws
from elbokto.estimate import elbo_estimate
from elbokto.models import (
    ModelConfig,
    load_model,
    load_tokenizer,
    resolve_mask_token_id,
    uses_shifted_logits,
)
from elbokto.renames import warn_renamed
from elbokto.sampling import SamplingConfig, decode_responses
from elbokto_kernels.backends import Backend

logger = logging.getLogger(__name__)

__all__ = ["DiffusionLM"]

GREEDY_MODES = ("argmax", "llada")


@register_model("elbokto")
class DiffusionLM(TemplateLM):
    """A masked diffusion LM for lm-eval. Every constructor argument is a ``--model_args`` key.

    Args:
        pretrained: model name or folder (loaded as training loads it:
            :func:`elbokto.models.load_model`), or a loaded module (then pass ``tokenizer``).
        tokenizer: a tokenizer, or a name / folder; default: ``pretrained``'s.
        trust_remote_code, dtype: as ``--trust_remote_code`` / ``--torch_dtype`` of training.
        device: default cuda if available, else cpu (the process's GPU under accelerate).
        batch_size: prompts per sampler batch in ``generate_until`` and requests per is_greedy
            forward (lm-eval's ``--batch_size``).
        mc_num: noisy copies per likelihood request (LLaDA's evaluation uses 128).
        mc_chunk_size: copies per forward: the memory knob (``mc_batch_size``: its old name).
        estimator: "fixed_count" or "bernoulli"; default: bernoulli for shifted-logit models
            (Dream), else fixed_count.
        cfg_scale: classifier-free guidance for likelihoods; 0 = none.
        seed: seed of the MC draws and of the sampler.
        max_length: most tokens per sequence (contexts are cut on the left); default: the
            model config's maximum positions, else 4096.
        mask_token_id: default: the model's (LLaDA 126336, Dream 151666).
        add_bos_token: add the tokenizer's special tokens when encoding (None: its default,
            skipped for text that already starts with BOS).
        max_gen_toks: response budget when a task gives none.
        gen_length: sampler canvas; default: the task's max_gen_toks rounded up to a multiple
            of block_length.
        block_length, steps, threshold, remasking, temperature: the sampler's
            :class:`elbokto.SamplingConfig` (steps default: gen_length, one token per step;
            a task's temperature with ``do_sample`` overrides ``temperature``).
        kernel_backend: backend of the fused kernels ("auto", "triton", "cpu", "torch").
        is_greedy_mode: "argmax" (one forward with the whole continuation masked) or "llada"
            (LLaDA's: one token per step, most confident first); see the module docstring.
    """

    def __init__(
        self,
        pretrained: str | nn.Module,
        tokenizer=None,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 8,
        mc_num: int = 128,
        mc_chunk_size: int = 32,
        estimator: Literal["fixed_count", "bernoulli"] | None = None,
        cfg_scale: float = 0.0,
        seed: int = 0,
        max_length: int | None = None,
        mask_token_id: int | None = None,
        add_bos_token: bool | None = None,
        max_gen_toks: int = 256,
        gen_length: int | None = None,
        block_length: int = 32,
        steps: int | None = None,
        threshold: float | None = None,
        remasking: Literal["low_confidence", "random"] = "low_confidence",
        temperature: float = 0.0,
        kernel_backend: Backend = "auto",
        is_greedy_mode: str = "argmax",
        mc_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if mc_batch_size is not None:  # the old name, for one release (DESIGN §8, "copy chunk")
            warn_renamed("the lm-eval model arg mc_batch_size", "mc_chunk_size")
            mc_chunk_size = mc_batch_size
        if is_greedy_mode not in GREEDY_MODES:
            raise ValueError(f"is_greedy_mode={is_greedy_mode!r}; expected one of {GREEDY_MODES}")
        self.is_greedy_mode = is_greedy_mode
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._device = self.accelerator.device
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        else:
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes --device cuda:0 unless told otherwise.
                logger.warning("device %s requested but CUDA is not available: using cpu", device)
                device = "cpu"
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for name, value in (
            ("mc_num", mc_num),
            ("mc_chunk_size", mc_chunk_size),
            ("max_gen_toks", max_gen_toks),
            ("block_length", block_length),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an integer >= 1")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(
                f"batch_size={batch_size!r}; expected an integer ('auto' is not "
                f"supported: mc_chunk_size sets the memory use)"
            )
        self.batch_size = int(batch_size)
        if isinstance(pretrained, str):
            model_cfg = ModelConfig(
                model_name_or_path=pretrained,
                trust_remote_code=trust_remote_code,
                torch_dtype=dtype,
            )
            if tokenizer is None or isinstance(tokenizer, str):
                tokenizer = load_tokenizer(
                    replace(model_cfg, model_name_or_path=tokenizer or pretrained)
                )
            model = load_model(pretrained, model_cfg, tokenizer=tokenizer)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("a loaded model needs its tokenizer object: pass tokenizer=")
        else:
            model = pretrained
        self.tokenizer = tokenizer
        self.model = model.eval().to(self._device)
        self.mask_token_id = resolve_mask_token_id(self.model.config, tokenizer, mask_token_id)
        self.shift_logits = uses_shifted_logits(self.model.config)
        self.mc = MCConfig(
            estimator=estimator or ("bernoulli" if self.shift_logits else "fixed_count"),
            n_t=mc_num,
            n_yt=1,
            antithetic=True,
        )
        self.mc_chunk_size, self.cfg_scale, self.seed = mc_chunk_size, float(cfg_scale), seed
        self._max_length = max_length or _config_max_length(self.model.config)
        self.add_bos_token = add_bos_token
        self.max_gen_toks, self.gen_length, self.block_length = (
            max_gen_toks,
            gen_length,
            block_length,
        )
        self.sampler = SamplingConfig(
            gen_length=block_length,
            steps=block_length,
            block_length=block_length,
            temperature=temperature,
            remasking=remasking,
            threshold=threshold,
            seed=seed,
            mask_token_id=self.mask_token_id,
            shift_logits=self.shift_logits,
        )
        self.steps, self.kernel_backend = steps, kernel_backend
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    # --- what lm-eval asks of a model ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs,
    ) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add = False
        ids = self.tokenizer.encode(string, **({} if add is None else {"add_special_tokens": add}))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # --- likelihoods -----------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(ELBO, is_greedy) of ``((context, continuation), context_ids, continuation_ids)``."""
        pairs = [self._fit(context, continuation) for _, context, continuation in requests]
        elbos = self.elbo(pairs, disable_tqdm=disable_tqdm)
        greedy = self.is_greedy(pairs)
        results = list(zip(elbos, greedy))
        for (args, _, _), result in zip(requests, results):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        owners, pairs = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,
                    context_len=1,
                ),
            ):
                owners.append(i)
                pairs.append((context, continuation))
        totals = [0.0] * len(requests)
        for owner, value in zip(owners, self.elbo(pairs, disable_tqdm=disable_tqdm)):
            totals[owner] += value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Context cut on the left so that context + continuation fit in max_length."""
        if not continuation:
            raise ValueError("empty continuation: nothing to score")
        if len(continuation) >= self.max_length:
            raise ValueError(
                f"continuation of {len(continuation)} tokens does not fit "
                f"max_length={self.max_length} with a context token"
            )
        return context[-(self.max_length - len(continuation)) :], continuation

    @torch.no_grad()
    def elbo(
        self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True
    ) -> list[float]:
        """MC ELBO of each continuation given its context, float: ``mc_num`` copies per pair.

        Pairs are taken longest first and their copies cut into forwards of ``mc_chunk_size``
        copies (a forward may hold the copies of several pairs, right-padded)."""
        if resolve_block_size(self.model.config, None) is not None:
            # Its ELBO needs the per-block draws and [x_t ; x_0] forward of training; scoring it
            # like a plain masked diffusion model would give a silently wrong likelihood.
            raise NotImplementedError(
                f"{type(self.model).__name__} is a block-diffusion model: the lm-eval model "
                "scores likelihoods of plain masked diffusion models only (generate_until "
                "tasks work, block by block)"
            )
        order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
        draws = {}
        copies = [(i, k) for i in order for k in range(self.mc.num_copies)]
        totals = [0.0] * len(pairs)
        chunks = [
            copies[s : s + self.mc_chunk_size] for s in range(0, len(copies), self.mc_chunk_size)
        ]
        for chunk in tqdm(chunks, desc="ELBO", disable=disable_tqdm or self.rank != 0):
            owners = list(dict.fromkeys(i for i, _ in chunk))
            for i in owners:
                if i not in draws:
                    draws[i] = self._draws(*pairs[i])
            local = {i: j for j, i in enumerate(owners)}
            rows = [pairs[i][0] + pairs[i][1] for i in owners]
            width = max(map(len, rows))
            input_ids, attention = _pad(rows, width, self.tokenizer.pad_token_id or 0, self._device)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool, device=self._device)
            weight = torch.empty(len(chunk), dtype=torch.float32, device=self._device)
            for c, (i, k) in enumerate(chunk):
                mask[c, : draws[i].mask.shape[1]] = draws[i].mask[k]
                weight[c] = draws[i].weight[k]
            index = torch.tensor([local[i] for i, _ in chunk], device=self._device)
            chunk_draws = Draws(
                mask=mask, weight=weight, sample_index=index, t=torch.zeros_like(weight)
            )
            model = self.model
            if self.cfg_scale:
                lengths = torch.tensor([len(pairs[i][0]) for i, _ in chunk], device=self._device)
                prompt = torch.arange(width, device=self._device) < lengths[:, None]
                model = _Guided(self.model, self.cfg_scale, prompt, self.mask_token_id)
            values = elbo_estimate(
                model,
                input_ids,
                chunk_draws,
                mask_token_id=self.mask_token_id,
                attention_mask=attention,
                shift_logits=self.shift_logits,
                backend=self.kernel_backend,
            )
            for i, value in zip(owners, values.tolist()):
                totals[i] += value
            for i in owners[:-1]:  # finished: only the last pair may go on in the next chunk
                del draws[i]
        return totals

    def _draws(self, context: list[int], continuation: list[int]) -> Draws:
        """The pair's copies on the device: a pure function of its tokens and the seed."""
        digest = hashlib.blake2b(json.dumps([context, continuation]).encode(), digest_size=8)
        uid = int.from_bytes(digest.digest(), "big") >> 1
        return sample_draws(
            self.mc,
            torch.tensor([len(context)], device=self._device),
            torch.tensor([len(continuation)], device=self._device),
            len(context) + len(continuation),
            uids=torch.tensor([uid], device=self._device),
            seed=self.seed,
        )

    @torch.no_grad()
    def is_greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether greedy decoding from the context, with the continuation's positions masked,
        yields the continuation (``is_greedy_mode``: one argmax pass, or LLaDA's one token per
        step). ``batch_size`` pairs at a time, left-padded so that continuations end at the last
        column."""
        decode = self._decode_llada if self.is_greedy_mode == "llada" else self._decode_argmax
        result = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            rows = [ctx + [self.mask_token_id] * len(cont) for ctx, cont in batch]
            width, tail = max(map(len, rows)), max(len(cont) for _, cont in batch)
            input_ids, attention = _pad(
                rows, width, self.tokenizer.pad_token_id or 0, self._device, left=True
            )
            lengths = torch.tensor([len(cont) for _, cont in batch], device=self._device)
            # [B, tail]: the columns of the last ``tail`` that hold each row's continuation.
            open_ = torch.arange(tail, device=self._device) >= tail - lengths[:, None]
            predict = self._tail_predictor(batch, attention, width, tail)
            predicted = decode(predict, input_ids, open_).tolist()
            result += [
                predicted[b][tail - len(cont) :] == cont for b, (_, cont) in enumerate(batch)
            ]
        return result

    def _tail_predictor(self, batch, attention: Tensor | None, width: int, tail: int):
        """A function of input_ids [B, width] giving the logits [B, tail, V] that predict the
        last ``tail`` columns (classifier-free guided when cfg_scale is set)."""
        kwargs: dict[str, Tensor | int] = {} if attention is None else {"attention_mask": attention}
        shift = int(self.shift_logits)
        if self._keeps_logits and not self.cfg_scale:
            kwargs["logits_to_keep"] = tail + shift
        model = self.model
        if self.cfg_scale:
            columns = torch.arange(width, device=self._device)
            ends = torch.tensor([width - len(cont) for _, cont in batch], device=self._device)
            starts = ends - torch.tensor([len(ctx) for ctx, _ in batch], device=self._device)
            prompt = (columns >= starts[:, None]) & (columns < ends[:, None])
            model = _Guided(self.model, self.cfg_scale, prompt, self.mask_token_id)

        def predict(input_ids: Tensor) -> Tensor:
            out = model(input_ids=input_ids, **kwargs)
            full = out if isinstance(out, Tensor) else out.logits
            # Position p is predicted at p (or at p - 1 with shifted logits).
            end = full.shape[1] - shift
            return full[:, end - tail : end]

        return predict

    @staticmethod
    def _decode_argmax(predict, input_ids: Tensor, open_: Tensor) -> Tensor:
        """int64 [B, tail]: the argmax at every continuation position, all masked at once."""
        return predict(input_ids).argmax(-1)

    @staticmethod
    def _decode_llada(predict, input_ids: Tensor, open_: Tensor) -> Tensor:
        """int64 [B, tail]: LLaDA's suffix decoding. Each step predicts every still-masked
        position and unmasks, per row, the one whose argmax has the highest probability (float32
        softmax), with that argmax; a row is done after as many steps as its continuation has
        tokens."""
        ids, open_ = input_ids.clone(), open_.clone()
        tail = open_.shape[1]
        rows = torch.arange(ids.shape[0], device=ids.device)
        for _ in range(tail):
            confidence, token = predict(ids).float().softmax(-1).max(-1)
            pick = confidence.masked_fill(~open_, -1.0).argmax(-1)  # [B]
            active = open_[rows, pick]  # rows whose continuation is not decoded yet
            column = ids.shape[1] - tail + pick
            ids[rows, column] = torch.where(active, token[rows, pick], ids[rows, column])
            open_[rows, pick] = False
        return ids[:, -tail:]

    # --- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(i)
        results = [""] * len(requests)  # every request is in one group: each is filled below
        progress = tqdm(
            total=len(requests), desc="generate_until", disable=disable_tqdm or self.rank != 0
        )
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.get("until"), self._eos_text())
            temperature = (
                kwargs.get("temperature", 0.0)
                if kwargs.get("do_sample")
                else self.sampler.temperature
            )
            config, sampler = sampler_for(
                self.model, self._sampler_config(kwargs["max_gen_toks"], temperature)
            )
            budget = self.max_length - config.gen_length
            contexts = {
                i: (
                    self.tok_encode(requests[i].args[0], left_truncate_len=budget)
                    or [self.prefix_token_id]
                )
                for i in indices
            }
            ordered = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start : start + self.batch_size]
                tokens = sampler(
                    self.model,
                    [contexts[i] for i in batch],
                    config,
                    pad_token_id=self.tokenizer.pad_token_id or 0,
                )
                texts = decode_responses(self.tokenizer, tokens[:, : kwargs["max_gen_toks"]])
                for i, text in zip(batch, texts):
                    results[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                progress.update(len(batch))
        progress.close()
        return results

    def _eos_text(self) -> str | None:
        return None if self.eot_token_id is None else self.tokenizer.decode([self.eot_token_id])

    def _sampler_config(self, max_gen_toks: int, temperature: float) -> SamplingConfig:
        """The sampler for a task's budget: a canvas of whole blocks covering max_gen_toks."""
        block = min(self.block_length, max_gen_toks)
        length = self.gen_length or -(-max_gen_toks // block) * block
        if length >= self.max_length:
            raise ValueError(
                f"gen_length {length} leaves no room for a prompt in max_length={self.max_length}"
            )
        return replace(
            self.sampler,
            gen_length=length,
            block_length=block,
            steps=self.steps or length,
            temperature=float(temperature),
        )


class _Guided(nn.Module):
    """Classifier-free guidance around a model: float32 logits [C, T, V] = u + (scale + 1)(c - u),
    c the model's logits and u those with the ``prompt`` positions (bool [C, T]) masked."""

    def __init__(self, model: nn.Module, scale: float, prompt: Tensor, mask_token_id: int) -> None:
        super().__init__()
        self.model, self.scale, self.prompt, self.mask_token_id = (
            model,
            scale,
            prompt,
            mask_token_id,
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        both = torch.cat([input_ids, input_ids.masked_fill(self.prompt, self.mask_token_id)])
        mask = None if attention_mask is None else attention_mask.repeat(2, 1)
        out = self.model(input_ids=both, attention_mask=mask, **kwargs)
        cond, uncond = (out if isinstance(out, Tensor) else out.logits).float().chunk(2)
        return uncond + (self.scale + 1) * (cond - uncond)


def _pad(
    rows: list[list[int]], width: int, pad_id: int, device: torch.device, left: bool = False
) -> tuple[Tensor, Tensor | None]:
    """int64 [B, width] padded rows and their attention mask (None when nothing is padded)."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    attention = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span] = torch.tensor(row)
        attention[b, span] = 1
    if bool(attention.all()):
        return ids.to(device), None
    return ids.to(device), attention.to(device)


def _config_max_length(config) -> int:
    for name in ("max_sequence_length", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096
