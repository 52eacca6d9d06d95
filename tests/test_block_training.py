"""Block-diffusion models through the product: trainer, precomputed reference, diagnose, loader."""

import pytest
from training_runs import configs, history, write_kto_mix
from transformers import DiffusionGemmaConfig

from elbokto.cli import main
from elbokto.models import ModelConfig, load_model
from elbokto.run import precompute_ref, train


def test_block_training_moves_the_margins(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    trainer = train(*configs(tmp_path, data, num_train_epochs=6, block_size=4))
    assert trainer.objective.mc.block_size == 4
    margins, losses = history(trainer, "rewards/margins"), history(trainer, "loss")
    assert sum(margins[-4:]) / 4 > 0.05
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_precomputed_reference_records_the_block_size(tmp_path):
    data = write_kto_mix(tmp_path / "data.jsonl")
    table = precompute_ref(*configs(tmp_path, data, block_size=4), str(tmp_path / "ref.pt"))
    assert table.meta["mc"]["block_size"] == 4
    with pytest.raises(ValueError, match="mc: file has"):  # whole-response training
        train(*configs(tmp_path / "bad", data, max_steps=1, ref_elbo_file=str(tmp_path / "ref.pt")))


def test_diagnose_with_block_draws(tmp_path, capsys):
    data = write_kto_mix(tmp_path / "data.jsonl")
    assert (
        main(
            [
                "diagnose",
                "--dataset",
                str(data),
                "--output_dir",
                str(tmp_path),
                "--block_size",
                "4",
                "--budgets",
                "2x1",
                "--redraws",
                "2",
                "--batch_size",
                "4",
                "--num_batches",
                "1",
                "--use_cpu",
                "--report_to",
                "none",
                "--max_length",
                "64",
                "--kernel_backend",
                "torch",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_uniform_noise_diffusion_is_refused(tmp_path):
    DiffusionGemmaConfig().save_pretrained(tmp_path / "dg")
    with pytest.raises(ValueError, match="uniform-noise diffusion.*no mask token"):
        load_model(str(tmp_path / "dg"), ModelConfig())
