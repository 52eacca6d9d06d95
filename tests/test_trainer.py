"""The trainer end to end on CPU: learning, resume, precomputed reference, errors, two ranks."""

import json
import re
from pathlib import Path

import pytest
import torch
from distributed import torchrun
from training_runs import configs, history, write_kto_mix, write_ultrafeedback

from elbokto.models import ModelConfig
from elbokto.run import precompute_ref, train
from elbokto.trainer import ELBOKTOConfig


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


def test_elbo_dpo_trains_on_pairs(tmp_path):
    data = write_ultrafeedback(tmp_path / "data.json")
    trainer = train(*configs(tmp_path, data, num_train_epochs=6, loss_type="elbo_dpo"))
    margins = history(trainer, "rewards/margins")
    losses = history(trainer, "loss")
    assert len(margins) >= 12 and "rewards/accuracies" in trainer.state.log_history[0]
    assert "kl" not in trainer.state.log_history[0]
    # Chosen minus rejected starts at 0 (policy == reference) and must rise.
    assert abs(margins[0]) < 1e-4 and sum(margins[-4:]) / 4 > 0.05
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    logps = history(trainer, "logps/chosen")
    assert len(logps) == len(margins) and all(v < 0 for v in logps)


def test_elbo_dpo_precomputed_reference_equals_online(tmp_path):
    data = write_ultrafeedback(tmp_path / "data.json")
    model_cfg, data_cfg, train_cfg = configs(tmp_path, data, max_steps=2, loss_type="elbo_dpo")
    table = precompute_ref(model_cfg, data_cfg, train_cfg, str(tmp_path / "ref.pt"))
    assert table.uids.numel() == 16 and table.meta["paired_draws"] is True
    online = train(*configs(tmp_path / "online", data, max_steps=2, loss_type="elbo_dpo"))
    offline = train(
        *configs(
            tmp_path / "offline",
            data,
            max_steps=2,
            loss_type="elbo_dpo",
            ref_elbo_file=str(tmp_path / "ref.pt"),
        )
    )
    for key in ("loss", "rewards/margins"):
        torch.testing.assert_close(
            history(offline, key), history(online, key), rtol=1e-4, atol=1e-5
        )
    # Unpaired training keys its draws by example: the paired file does not match it.
    with pytest.raises(ValueError, match="paired_draws"):
        train(*configs(tmp_path / "bad", data, max_steps=1, ref_elbo_file=str(tmp_path / "ref.pt")))


def test_resume_replays_the_same_next_step(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    straight = train(*configs(tmp_path / "a", data, max_steps=4))
    first = train(*configs(tmp_path / "b", data, max_steps=2, save_strategy="steps", save_steps=2))
    assert (tmp_path / "b" / "out" / "checkpoint-2").is_dir()
    resumed = train(
        *configs(tmp_path / "b", data, max_steps=4),
        resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"),
    )
    torch.testing.assert_close(
        history(resumed, "loss")[-2:], history(straight, "loss")[-2:], rtol=1e-4, atol=1e-6
    )
    assert history(first, "loss") == history(straight, "loss")[:2]


def test_precomputed_reference_equals_online(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    model_cfg, data_cfg, train_cfg = configs(tmp_path, data, max_steps=3)
    table = precompute_ref(model_cfg, data_cfg, train_cfg, str(tmp_path / "ref.pt"))
    assert table.uids.numel() == 16 and table.meta["epochs"] == 1
    online = train(*configs(tmp_path / "online", data, max_steps=3))
    offline = train(
        *configs(tmp_path / "offline", data, max_steps=3, ref_elbo_file=str(tmp_path / "ref.pt"))
    )
    for key in ("loss", "elbo/reference", "rewards/margins"):
        torch.testing.assert_close(
            history(offline, key), history(online, key), rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError, match="mc: file has"):
        train(
            *configs(
                tmp_path / "bad", data, max_steps=1, n_t=4, ref_elbo_file=str(tmp_path / "ref.pt")
            )
        )


def test_kl_baseline_with_a_precomputed_reference(tmp_path):
    """The KL estimate scores mismatched pairs that only exist in the training batch, so a file
    cannot hold their reference: without a model that can score them (LoRA: the policy without
    its adapters) the run is refused before it starts, naming the two flags."""
    data = write_kto_mix(tmp_path / "data.jsonl")
    model_cfg, data_cfg, train_cfg = configs(tmp_path, data, max_steps=1)
    precompute_ref(model_cfg, data_cfg, train_cfg, str(tmp_path / "ref.pt"))
    with pytest.raises(ValueError, match="--baseline kl.*--ref_elbo_file"):
        train(
            *configs(
                tmp_path / "full",
                data,
                max_steps=1,
                baseline="kl",
                ref_elbo_file=str(tmp_path / "ref.pt"),
            )
        )
    assert not (tmp_path / "full" / "out").exists()  # refused at start-up, not at a step
    model_cfg, data_cfg, train_cfg = configs(
        tmp_path / "lora", data, max_steps=1, baseline="kl", ref_elbo_file=str(tmp_path / "ref.pt")
    )
    model_cfg.lora_r = 4
    trainer = train(model_cfg, data_cfg, train_cfg)
    assert history(trainer, "kl")


def test_logs_pool_classes_by_count(tmp_path):
    """Batches of one hold one class: a log line over one step has no mean for the absent class
    and no margin (not 0); over two steps each class mean is its example's own value."""
    data = write_kto_mix(tmp_path / "data.jsonl")
    kw = {"max_steps": 4, "per_device_train_batch_size": 1, "seed": 3}
    single = train(*configs(tmp_path / "one", data, **kw)).state.log_history
    steps = [entry for entry in single if "loss" in entry]
    assert len(steps) == 4 and all("rewards/margins" not in entry for entry in steps)
    assert all(("rewards/chosen" in entry) != ("rewards/rejected" in entry) for entry in steps)
    paired = [
        entry
        for entry in train(
            *configs(tmp_path / "two", data, logging_steps=2, **kw)
        ).state.log_history
        if "loss" in entry
    ]
    for window, entry in zip((steps[:2], steps[2:]), paired):
        for side in ("chosen", "rejected"):
            own = [e[f"rewards/{side}"] for e in window if f"rewards/{side}" in e]
            if own:
                assert entry[f"rewards/{side}"] == pytest.approx(sum(own) / len(own), rel=1e-5)
            else:
                assert f"rewards/{side}" not in entry


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        train(*configs(tmp_path, tmp_path / "missing.jsonl", max_steps=1))
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(ValueError, match="column"):
        train(*configs(tmp_path, odd, max_steps=1))
    unpaired = write_kto_mix(tmp_path / "kto.jsonl")
    with pytest.raises(ValueError, match="unpaired layout"):
        train(*configs(tmp_path, unpaired, max_steps=1, loss_type="elbo_dpo"))
    with pytest.raises(ValueError, match="loss_type='dpo'"):
        configs(tmp_path, unpaired, loss_type="dpo")
    with pytest.raises(ValueError, match="do not apply"):
        configs(tmp_path, unpaired, loss_type="elbo_dpo", baseline="kl")


def test_kl_baseline_refuses_a_batch_of_one(tmp_path):
    """The KL baseline pairs each prompt with the next example's response: in a batch of one
    that is the example itself, and the estimate is the example's own margin (TRL refuses it)."""
    data = write_kto_mix(tmp_path / "kto.jsonl")
    with pytest.raises(ValueError, match="--per_device_train_batch_size 1"):
        configs(tmp_path, data, baseline="kl", per_device_train_batch_size=1)
    configs(tmp_path, data, baseline="batch_mean", per_device_train_batch_size=1)
    configs(tmp_path, data, baseline="kl", per_device_train_batch_size=2)


@pytest.mark.slow
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
import elbokto.loss
from training_runs import configs
from elbokto.run import train
seen = []
global_mean = elbokto.loss._global_mean
def recording_mean(r):  # the batch_mean baseline's b0, computed once per loss call
    b0 = global_mean(r)
    seen.append([float(b0), float(r.mean())])
    return b0
elbokto.loss._global_mean = recording_mean
train(*configs(Path({str(tmp_path)!r}), Path({str(data)!r}), max_steps=3,
               per_device_train_batch_size=2))
Path({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json").write_text(json.dumps(seen))
dist.barrier()
os._exit(0)  # skip teardown: gloo's threads sometimes abort at interpreter exit
""")
    torchrun(script)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(rank0) == len(rank1) == 3
    for (b0, local0), (b1, local1) in zip(rank0, rank1):
        assert b0 == pytest.approx(b1, abs=1e-7)
        assert b0 == pytest.approx((local0 + local1) / 2, abs=1e-6)
    assert any(abs(a[1] - b[1]) > 1e-6 for a, b in zip(rank0, rank1))


def test_precompute_follows_max_steps_and_refuses_a_short_file(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")  # 16 examples: 4 steps of 4 per epoch
    model_cfg, data_cfg, train_cfg = configs(tmp_path, data, max_steps=6)
    table = precompute_ref(model_cfg, data_cfg, train_cfg, str(tmp_path / "two.pt"))
    assert table.meta["epochs"] == 2
    short = precompute_ref(*configs(tmp_path, data, max_steps=4), str(tmp_path / "one.pt"))
    assert short.meta["epochs"] == 1
    # Refused at start-up, before any step: a 6-step run reaches epoch 1, which the file lacks.
    with pytest.raises(ValueError, match="epochs: file covers 1, training runs 2"):
        train(*configs(tmp_path / "run", data, max_steps=6, ref_elbo_file=str(tmp_path / "one.pt")))
    trainer = train(
        *configs(tmp_path / "ok", data, max_steps=6, ref_elbo_file=str(tmp_path / "two.pt"))
    )
    assert trainer.state.global_step == 6


def test_precomputed_file_from_another_model_is_refused(tmp_path):
    from elbokto.models import build_tiny_model
    from elbokto.run import tokenizer_for

    data = write_kto_mix(tmp_path / "data.jsonl")
    model_cfg, data_cfg, train_cfg = configs(tmp_path, data, max_steps=2)
    other = tmp_path / "other"
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    build_tiny_model(len(tokenizer), tokenizer.mask_token_id, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    model_cfg.ref_model_name_or_path = str(other)
    precompute_ref(model_cfg, data_cfg, train_cfg, str(tmp_path / "ref.pt"))
    with pytest.raises(ValueError, match=r"reference model: file was written by .*other"):
        train(*configs(tmp_path / "run", data, max_steps=2, ref_elbo_file=str(tmp_path / "ref.pt")))


def test_resume_last_skips_a_half_written_checkpoint(tmp_path, caplog):
    data = write_kto_mix(tmp_path / "data.jsonl")
    train(*configs(tmp_path, data, max_steps=2, save_strategy="steps", save_steps=1))
    out = tmp_path / "out"
    broken = out / "checkpoint-3"  # a kill during its save: no trainer_state.json yet
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    trainer = train(*configs(tmp_path, data, max_steps=3), resume_from_checkpoint="last")
    assert trainer.state.global_step == 3
    assert "skipping" in caplog.text and "checkpoint-3" in caplog.text
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(*configs(tmp_path / "empty", data, max_steps=1), resume_from_checkpoint="last")


def test_evaluation_split_during_training(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    held_out = write_kto_mix(tmp_path / "eval.jsonl", n=8, seed=5)
    model_cfg, data_cfg, train_cfg = configs(tmp_path, data, max_steps=4)
    data_cfg.eval_dataset = str(held_out)
    given = (vars(model_cfg).copy(), vars(data_cfg).copy(), vars(train_cfg).copy())
    trainer = train(model_cfg, data_cfg, train_cfg)
    # The run settled the mask token and the evaluation schedule in copies: the caller's configs
    # are as they were.
    assert (vars(model_cfg), vars(data_cfg), vars(train_cfg)) == given
    assert train_cfg.mask_token_id is None and trainer.args.mask_token_id is not None
    evals = history(trainer, "eval_rewards/margins")
    assert len(evals) >= 2 and len(history(trainer, "eval_loss")) == len(evals)
    with pytest.raises(ValueError, match="training data itself"):
        _, same, cfg = configs(tmp_path, data, max_steps=1)
        same.eval_split = same.dataset_split
        train(ModelConfig(), same, cfg)


def test_filter_eps_default_follows_the_precision(tmp_path):
    """--filter_eps unset: "auto" when training in bf16 / fp16, exact in fp32; '0' is exact; the
    objective receives the resolved value; a malformed value raises at once."""

    def config(**kw):
        return ELBOKTOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    assert config().objective().filter_eps is None
    assert config(bf16=True).objective().filter_eps == "auto"
    assert config(bf16=True, filter_eps="0").objective().filter_eps == 0.0
    assert config(filter_eps="0.000244140625").objective().filter_eps == 2.0**-12
    assert config(filter_eps="auto").objective().filter_eps == "auto"
    assert config(filter_eps="2**-12").objective().filter_eps == 2.0**-12
    assert config(filter_eps="2^-15").objective().filter_eps == 2.0**-15
    for bad in ("2**x", "-0.1", "tiny", "1", "inf", "nan"):
        with pytest.raises(ValueError, match=f"--filter_eps '{re.escape(bad)}'"):
            config(filter_eps=bad)
