"""The trainer end to end on CPU: learning, resume, precomputed reference, errors, two ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elbokto.data import DataConfig
from elbokto.models import ModelConfig
from elbokto.run import precompute_ref, train
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
        rows.append({"prompt": [{"role": "user", "content": f"reverse {s}"}],
                     "completion": [{"role": "assistant", "content": s[::-1] if good else s}],
                     "label": good})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def write_ultrafeedback(path: Path, n=8, seed=1) -> Path:
    """Paired layout whose chosen / rejected message lists contain the prompt (train_prefs)."""
    rows = []
    for s in _strings(n, seed):
        user = {"role": "user", "content": f"reverse {s}"}
        rows.append({"prompt": f"reverse {s}",
                     "chosen": [user, {"role": "assistant", "content": s[::-1]}],
                     "rejected": [user, {"role": "assistant", "content": s}]})
    path.write_text(json.dumps(rows))
    return path


def configs(tmp_path, data_file, **train_kw):
    train_kw = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4,
                "learning_rate": 3e-3, "beta": 1.0, "n_t": 2, "logging_steps": 1,
                "save_strategy": "no", "use_cpu": True, "report_to": "none",
                "lr_scheduler_type": "constant", "kernel_backend": "torch", **train_kw}
    return (ModelConfig(), DataConfig(dataset=str(data_file), max_length=64),
            ELBOKTOConfig(**train_kw))


def history(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("writer", [write_kto_mix, write_ultrafeedback], ids=["kto-mix", "ufb"])
def test_training_moves_the_margins(tmp_path, writer):
    data = writer(tmp_path / "data.jsonl" if writer is write_kto_mix else tmp_path / "data.json")
    trainer = train(*configs(tmp_path, data, num_train_epochs=6))
    margins = history(trainer, "rewards/margins")
    losses = history(trainer, "loss")
    assert len(margins) >= 12
    # Early steps start at margin 0 (policy == reference); the desirable margin must pull ahead.
    assert sum(margins[-4:]) / 4 > 0.05
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert (tmp_path / "out" / "config.json").exists()


def test_resume_replays_the_same_next_step(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    straight = train(*configs(tmp_path / "a", data, max_steps=4))
    first = train(*configs(tmp_path / "b", data, max_steps=2, save_strategy="steps",
                           save_steps=2))
    assert (tmp_path / "b" / "out" / "checkpoint-2").is_dir()
    resumed = train(*configs(tmp_path / "b", data, max_steps=4),
                    resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    torch.testing.assert_close(history(resumed, "loss")[-2:], history(straight, "loss")[-2:],
                               rtol=1e-4, atol=1e-6)
    assert history(first, "loss") == history(straight, "loss")[:2]


def test_precomputed_reference_equals_online(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    model_cfg, data_cfg, train_cfg = configs(tmp_path, data, max_steps=3)
    table = precompute_ref(model_cfg, data_cfg, train_cfg, str(tmp_path / "ref.pt"))
    assert table.uids.numel() == 16 and table.meta["epochs"] == 1
    online = train(*configs(tmp_path / "online", data, max_steps=3))
    offline = train(*configs(tmp_path / "offline", data, max_steps=3,
                             ref_elbo_file=str(tmp_path / "ref.pt")))
    for key in ("loss", "elbo/reference", "rewards/margins"):
        torch.testing.assert_close(history(offline, key), history(online, key), rtol=1e-4,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="mc: file has"):
        train(*configs(tmp_path / "bad", data, max_steps=1, n_t=4,
                       ref_elbo_file=str(tmp_path / "ref.pt")))


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        train(*configs(tmp_path, tmp_path / "missing.jsonl", max_steps=1))
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(ValueError, match="column"):
        train(*configs(tmp_path, odd, max_steps=1))


def test_two_ranks_share_the_baseline(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    script = tmp_path / "rank.py"
    # Each rank records the b0 its loss used and its local mean margin, before any logging
    # reduction: b0 must be the same global mean on both ranks, the local means differ.
    script.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import torch.distributed as dist
import elbokto.objective
from test_trainer import configs
from elbokto.run import train
seen = []
def recording_loss(policy_elbo, ref_elbo, *args, **kwargs):
    loss, metrics = elbokto.loss.elbo_kto_loss(policy_elbo, ref_elbo, *args, **kwargs)
    seen.append([float(metrics["kl"]), float((policy_elbo - ref_elbo).mean())])
    return loss, metrics
elbokto.objective.elbo_kto_loss = recording_loss
train(*configs(Path({str(tmp_path)!r}), Path({str(data)!r}), max_steps=3,
               per_device_train_batch_size=2))
Path({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json").write_text(json.dumps(seen))
dist.barrier()
os._exit(0)  # skip teardown: gloo's threads sometimes abort at interpreter exit
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(rank0) == len(rank1) == 3
    for (b0, local0), (b1, local1) in zip(rank0, rank1):
        assert b0 == pytest.approx(b1, abs=1e-7)
        assert b0 == pytest.approx((local0 + local1) / 2, abs=1e-6)
    assert any(abs(a[1] - b[1]) > 1e-6 for a, b in zip(rank0, rank1))
