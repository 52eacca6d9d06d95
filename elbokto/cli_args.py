"""The command line's own arguments: every flag that fills no configuration of the library (the
others are the fields of ModelConfig, DataConfig, ELBOKTOConfig, SamplingConfig, OnlineConfig,
JudgeConfig and WinrateArgs, read by the same parser). One home, so that ``elbokto <command>
--help`` is the union of the dataclasses a command lists in :mod:`elbokto.cli`; and
:func:`parse_flags`, the one parser every command reads them with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from elbokto.presets import PresetArgs, preset_values
from elbokto_kernels.grad_filter import FilterEps


@dataclass
class GenerateArgs:
    """Prompts for `elbokto generate`."""

    prompt: list[str] = field(
        default_factory=list,
        metadata={"help": 'One or more user messages: --prompt "first" "second".'},
    )
    prompts_file: str | None = field(
        default=None, metadata={"help": "A text file with one user message per line."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per sampler batch."})
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Block-diffusion models: the model's block size (default: the model config's, "
            "SDAR; LLaDA2.0: 32). Such a model is sampled block by block over its own "
            "blocks with a KV cache of the finished ones; --block_length is set to it."
        },
    )


@dataclass
class MergeArgs:
    """Where `elbokto merge` writes the merged model."""

    output_dir: str = field(
        metadata={
            "help": "Folder for the merged full model and its tokenizer (not the adapter folder)."
        }
    )


@dataclass
class DiagnoseArgs:
    """What `elbokto diagnose` measures."""

    num_batches: int = field(default=2, metadata={"help": "Batches to average Psi over."})
    batch_size: int = field(default=8, metadata={"help": "Examples per batch (m)."})
    redraws: int = field(default=8, metadata={"help": "Independent redraws R per setting."})
    budgets: list[str] = field(
        default_factory=lambda: ["8x1", "1x8", "4x2", "2x1", "4x1"],
        metadata={"help": "n_t x n_yt settings to compare."},
    )
    gradient_noise: bool = field(
        default=False,
        metadata={
            "help": "Also measure the relative variance of the loss gradient over the redraws (one "
            "backward per redraw; holds the parameters' gradients plus one float32 copy of "
            "them). Unlike Psi it is informative when the policy is its own reference: it "
            "carries the noise of the policy ELBO's gradient (the budget)."
        },
    )

    def __post_init__(self) -> None:
        for name, low in (("num_batches", 1), ("batch_size", 2), ("redraws", 2)):
            if getattr(self, name) < low:
                raise ValueError(
                    f"--{name} {getattr(self, name)}: expected an integer >= {low} "
                    "(Psi compares the examples of a batch over redraws)"
                )
        self.settings  # noqa: B018 (parses --budgets now, before any model is loaded)

    @property
    def settings(self) -> list[tuple[int, int]]:
        """(n_t, n_yt) of every budget."""
        return [_budget(b) for b in self.budgets]


def _budget(text: str) -> tuple[int, int]:
    try:
        n_t, n_yt = (int(x) for x in text.split("x"))
    except ValueError:
        raise ValueError(f"--budgets {text!r} is not of the form n_t x n_yt, e.g. 8x1") from None
    return n_t, n_yt


@dataclass
class PrecomputeArgs:
    """Where `elbokto precompute-ref` writes, and for which training run."""

    output_file: str = field(
        default="ref_elbo.pt",
        metadata={
            "help": "Where to write the reference ELBOs (pass it to `train --ref_elbo_file`)."
        },
    )
    train_world_size: int = field(
        default=1,
        metadata={
            "help": "Data-parallel processes the training run will use (with --max_steps, the "
            "epochs it reaches depend on it)."
        },
    )


@dataclass
class DemoArgs:
    """How `elbokto demo` runs: where, which seeds, what else; the knobs it changes are
    DemoConfig's (None: DemoConfig's own default)."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where to write results."})
    ablate: bool = field(
        default=False,
        metadata={"help": "Also run the miniature of the paper's ablations (slower)."},
    )
    quick: bool = field(default=False, metadata={"help": "A seconds-long smoke run."})
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={
            "help": "Seeds to run (data, initial weights, draws, sampling); with more than one, "
            "each writes under <output_dir>/seed<k> and seeds.json gathers the rates with their "
            "mean and spread."
        },
    )
    filter_eps: str | None = field(
        default=None,
        metadata={
            "help": "Gradient filtering of the LM head's backward in SFT and ELBO-KTO (e.g. "
            "2**-12; default exact)."
        },
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "ELBO-KTO's beta (default: DemoConfig's; the paper's is 0.1)."},
    )
    kto_lr: float | None = field(
        default=None, metadata={"help": "ELBO-KTO's peak learning rate (default: DemoConfig's)."}
    )
    kto_epochs: int | None = field(
        default=None,
        metadata={"help": "Passes of ELBO-KTO over its examples (default: DemoConfig's)."},
    )
    sft_cache: str | None = field(
        default=None,
        metadata={
            "help": "A folder that keeps the SFT models, so that runs that change only the "
            "ELBO-KTO stage (--beta, --kto_lr, --kto_epochs, --ablate) skip SFT."
        },
    )
    online: bool = field(
        default=False,
        metadata={
            "help": "Also align online from the same SFT model: its own samples labelled by the "
            "demo's rule, as many labels and steps as the offline run; online.json and "
            "online.png compare the two (SFT models kept in --sft_cache, default "
            "<output_dir>/sft-cache)."
        },
    )


def filter_eps_flag(value: str | float | None, half: bool) -> FilterEps:
    """--filter_eps as the objective takes it: unset -> "auto" in half precision, else None;
    "auto" as it is; a number (a float, its text, or a power written ``2**-12`` / ``2^-12``) as a
    float."""
    if value is None:
        return "auto" if half else None
    if value == "auto":
        return "auto"
    power = re.fullmatch(r"\s*([0-9.]+)\s*(?:\*\*|\^)\s*([-+]?[0-9]+)\s*", str(value))
    try:
        eps = float(power[1]) ** int(power[2]) if power else float(value)
    except ValueError:
        eps = -1.0
    if not 0 <= eps < 1:
        raise ValueError(
            f"--filter_eps {value!r}: expected 'auto', 0 (exact) or a number in "
            "(0, 1) such as 2**-12 or 0.000244140625"
        )
    return eps


def parse_flags(prog: str, dataclasses: Sequence[type], argv: list[str]) -> tuple[Any, ...]:
    """One instance per dataclass, from argv, for ``elbokto <prog>``. With :class:`PresetArgs`
    among the dataclasses, ``--preset NAME`` makes the preset's values the defaults, so that
    explicit flags win."""
    from transformers import HfArgumentParser
    from transformers.hf_argparser import DataClassType

    # DataClassType is the parser's NewType for "a dataclass"; it wraps nothing at run time.
    parser = HfArgumentParser([DataClassType(d) for d in dataclasses], prog=f"elbokto {prog}")
    if PresetArgs in dataclasses:
        known, _ = HfArgumentParser([DataClassType(PresetArgs)], add_help=False).parse_known_args(
            argv
        )
        if known.preset is not None:
            parser.set_defaults(**preset_values(known.preset))
    return parser.parse_args_into_dataclasses(argv)
