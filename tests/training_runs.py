"""Tiny training runs for the tests: data files in the layouts users bring (TRL's unpaired
kto-mix, UltraFeedback's pairs) and the configs of a seconds-long CPU run of the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from elbokto.data import DataConfig
from elbokto.models import ModelConfig
from elbokto.trainer import ELBOKTOConfig


def _strings(n, seed):
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefgh"
    return ["".join(letters[i] for i in torch.randint(0, 8, (5,), generator=g)) for _ in range(n)]


def write_kto_mix(path: Path, n=16, seed=0) -> Path:
    """TRL's unpaired layout with chat-message prompt and completion (as in kto-mix-14k)."""
    rows = []
    for i, s in enumerate(_strings(n, seed)):
        good = i % 2 == 0
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"reverse {s}"}],
                "completion": [{"role": "assistant", "content": s[::-1] if good else s}],
                "label": good,
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def write_ultrafeedback(path: Path, n=8, seed=1) -> Path:
    """Paired layout whose chosen / rejected message lists contain the prompt (train_prefs)."""
    rows = []
    for s in _strings(n, seed):
        user = {"role": "user", "content": f"reverse {s}"}
        rows.append(
            {
                "prompt": f"reverse {s}",
                "chosen": [user, {"role": "assistant", "content": s[::-1]}],
                "rejected": [user, {"role": "assistant", "content": s}],
            }
        )
    path.write_text(json.dumps(rows))
    return path


def configs(tmp_path, data_file, **train_kw):
    train_kw = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "beta": 1.0,
        "n_t": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": "none",
        "lr_scheduler_type": "constant",
        "kernel_backend": "torch",
        **train_kw,
    }
    return (
        ModelConfig(),
        DataConfig(dataset=str(data_file), max_length=64),
        ELBOKTOConfig(**train_kw),
    )


def history(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]
