"""Named presets: the flag values that turn elbokto's defaults into a reference setup.

``elbokto train --preset official`` (or ``precompute-ref`` / ``diagnose``) reproduces the
authors' ELBO-KTO run (github.com/vaibhavjindal/elbo-kto: ``train.py``, ``precompute_bref.py``,
``data_utils.py`` and the command of its README). A preset lists only the fields whose values
differ from elbokto's defaults; flags given on the command line win over it. docs/training.md,
"The official preset", tabulates every difference, including those no flag removes.

Library use: :func:`apply_preset` returns new configs and leaves the caller's untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = ["PRESETS", "PresetArgs", "apply_preset", "preset_values"]

PRESETS: dict[str, dict[str, Any]] = {
    "official": {
        # ModelConfig: the authors load the weights in bfloat16.
        "torch_dtype": "bfloat16",
        # DataConfig (data_utils.py): the templated prompt and the completion tokenised as one
        # text; the response follows the template with no end-of-turn token, every row is padded
        # with EOS to MAX_LENGTH = 4096, no attention mask. The uid is the row number, the index
        # precompute_bref.py seeds the draws by.
        "joined_tokenization": True,
        "uid_source": "row",
        "append_eos": False,
        "llada_padding": True,
        "max_length": 4096,
        "pad_to_multiple_of": 4096,
        # MCConfig (precompute_bref.py, train.py): their random calls (each level l_j drawn on its
        # own, the masks from a torch.Generator seeded by the row), the same in every epoch.
        "draw_source": "authors",
        "antithetic": False,
        "fixed_draws": True,
        # The LM head's gradient in full (the authors take cross-entropy of the full logits);
        # elbokto filters it by default under --bf16.
        "filter_eps": "0",
        # TrainingArguments (train.py's create_training_args and CLI defaults, transformers
        # 4.54's default optimizer); lr 1e-6 and beta 0.1 (the README's command) are defaults.
        "bf16": True,
        "optim": "adamw_torch",
        "weight_decay": 0.01,
        "adam_beta2": 0.95,
        "warmup_steps": 0.03,
        "lr_scheduler_type": "cosine",
    },
}


@dataclass
class PresetArgs:
    """The ``--preset`` flag of the commands that train or score with ELBOKTOConfig."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": f"Start from a named set of flag values: {sorted(PRESETS)}. 'official': the "
            "authors' run (their draws seeded by the row number, fixed across epochs; the "
            "prompt and completion tokenised as one text, no end-of-turn token, LLaDA padding "
            "to 4096 without an attention mask, exact LM-head gradient, their optimiser and "
            "schedule; docs/training.md, 'The official preset'). Flags given explicitly win."
        },
    )

    def __post_init__(self) -> None:
        if self.preset is not None:
            preset_values(self.preset)


def preset_values(name: str) -> dict[str, Any]:
    """field name -> value of the preset ``name`` (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def apply_preset(name: str, *configs):
    """The configs with the preset's values, as new objects (the arguments are not changed).

    Every field the preset sets must belong to one of ``configs`` (e.g. pass ModelConfig,
    DataConfig and ELBOKTOConfig for "official"), so that no part of it is silently dropped.
    Each config is rebuilt with ``dataclasses.replace``, which validates it again."""
    values = preset_values(name)
    names = [{f.name for f in fields(config) if f.init} for config in configs]
    unclaimed = sorted(set(values).difference(*names))
    if unclaimed:
        raise ValueError(
            f"preset {name!r} sets {unclaimed}, fields of none of the given configs "
            f"({', '.join(type(c).__name__ for c in configs)})"
        )
    return tuple(
        replace(config, **{k: v for k, v in values.items() if k in own})
        for config, own in zip(configs, names)
    )
