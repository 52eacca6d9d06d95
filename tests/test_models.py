"""elbokto.models and elbokto.families: the family table, loading (with the transformers 5 fix-ups
of the families' published code, through stand-ins), mask tokens, LoRA, dropout, the tiny model
and the reference. Nothing is downloaded."""

from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from remote_standins import HEADS, WIDTH, standard_inv_freq, write_standin
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    modeling_rope_utils,
)

from elbokto import families, fixups, models
from elbokto.families import FAMILIES, family_of
from elbokto.models import (
    ModelConfig,
    _outside_table,
    build_tiny_model,
    disable_dropout,
    frozen_reference,
    load_model,
    load_tokenizer,
    local_or_hub,
    lora_targets,
    prepare_policy,
    resolve_mask_token_id,
    uses_shifted_logits,
)
from elbokto.tiny import build_tiny_tokenizer
from elbokto_kernels import fused_elbo, lm_head_unsupported


def standin_config(model_type: str, **attributes) -> PretrainedConfig:
    """A config of the given model_type, as a family's own config class would give it."""
    config_class = type("StandInConfig", (PretrainedConfig,), {"model_type": model_type})
    return config_class(**attributes)


# --- the table ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, family",
    [
        (standin_config("llada", architectures=["LLaDAModelLM"]), "llada"),
        (standin_config("llada"), "llada"),
        # The published LLaDA-MoE config says model_type "llada": the architecture decides.
        (standin_config("llada", architectures=["LLaDAMoEModelLM"]), "llada_moe"),
        (standin_config("lladamoe"), "llada_moe"),
        (standin_config("Dream", architectures=["DreamModel"]), "dream"),  # Dream's spelling
        (standin_config("dream"), "dream"),
        (GemmaConfig(use_bidirectional_attention=True), "bidirectional"),
        (GemmaConfig(), None),
        (LlamaConfig(), None),
    ],
)
def test_family_of(config, family):
    found = family_of(config)
    assert (found.name if found else None) == family


def test_every_record_is_found_by_each_of_its_keys():
    for family in FAMILIES:
        for model_type in family.model_types:
            assert family_of(standin_config(model_type)) is family
        for architecture in family.architectures:
            assert family_of(standin_config("unknown", architectures=[architecture])) is family
        if family.flag:
            assert family_of(standin_config("unknown", **{family.flag: True})) is family


def test_mask_token_resolution_order():
    llada = standin_config("llada")
    tokenizer = SimpleNamespace(mask_token_id=7)
    assert resolve_mask_token_id(llada) == 126336  # the family's
    assert resolve_mask_token_id(llada, tokenizer) == 7  # the tokenizer before the family
    llada.mask_token_id = 5
    assert resolve_mask_token_id(llada, tokenizer) == 5  # the config before the tokenizer
    assert resolve_mask_token_id(llada, tokenizer, override=3) == 3  # the flag first
    published_moe = standin_config("llada", architectures=["LLaDAMoEModelLM"])
    assert resolve_mask_token_id(published_moe) == 156895
    assert resolve_mask_token_id(standin_config("Dream")) == 151666
    with pytest.raises(ValueError, match="mask_token_id"):
        resolve_mask_token_id(GemmaConfig(use_bidirectional_attention=True), tokenizer=None)


def test_only_dream_shifts_logits():
    assert uses_shifted_logits(standin_config("Dream"))
    for config in (
        standin_config("llada"),
        standin_config("lladamoe"),
        GemmaConfig(use_bidirectional_attention=True),
        LlamaConfig(),
    ):
        assert not uses_shifted_logits(config)


def test_lora_targets_default_per_family_and_override():
    assert lora_targets(standin_config("llada")) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "attn_out",
        "ff_proj",
        "up_proj",
    ]
    assert lora_targets(standin_config("lladamoe")) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_targets(standin_config("dream")) == "all-linear"
    assert lora_targets(GemmaConfig(use_bidirectional_attention=True)) == "all-linear"
    assert lora_targets(standin_config("llada"), "q_proj,v_proj") == ["q_proj", "v_proj"]


def lora_adapted(model) -> set[str]:
    """Names of the modules that carry a LoRA adapter, without the peft prefix."""
    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A")
    }


def test_prepare_policy_adapts_all_linear_layers_but_the_head_by_default():
    policy = prepare_policy(build_tiny_model(40, 2, num_layers=1), ModelConfig(lora_r=2))
    assert lora_adapted(policy) == {
        f"model.layers.0.{name}"
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    override = prepare_policy(
        build_tiny_model(40, 2, num_layers=1), ModelConfig(lora_r=2, lora_target_modules="q_proj")
    )
    assert lora_adapted(override) == {"model.layers.0.self_attn.q_proj"}


def test_all_linear_lora_leaves_an_undeclared_head_alone(monkeypatch):
    """peft's "all-linear" spares only the layer get_output_embeddings() returns; published code
    that does not declare its head (None) must still keep lm_head out of the adapters."""
    model = build_tiny_model(40, 2, num_layers=1)
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    adapted = lora_adapted(prepare_policy(model, ModelConfig(lora_r=2)))
    assert "lm_head" not in adapted and "model.layers.0.mlp.down_proj" in adapted


# --- accepting and refusing models ----------------------------------------------------------------


def test_causal_model_is_refused_unless_assumed_bidirectional(tmp_path):
    causal = tmp_path / "causal"
    GemmaForCausalLM(
        GemmaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            mask_token_id=3,
        )
    ).save_pretrained(causal)
    with pytest.raises(ValueError, match="causal"):
        load_model(str(causal), ModelConfig())
    assert isinstance(
        load_model(str(causal), ModelConfig(assume_bidirectional=True)), GemmaForCausalLM
    )


def test_outside_the_table_the_auto_map_chooses_the_loader():
    masked = standin_config("mdlm", auto_map={"AutoModelForMaskedLM": "m.M", "AutoModel": "m.B"})
    assert _outside_table(masked).auto_class == "AutoModelForMaskedLM"
    assert (
        _outside_table(standin_config("x", auto_map={"AutoModel": "m.B"})).auto_class == "AutoModel"
    )
    assert _outside_table(standin_config("x")).auto_class == "AutoModelForCausalLM"


def test_bidirectional_model_loads_from_a_folder(tmp_path):
    """A Gemma-style checkpoint that only sets use_bidirectional_attention (transformers 5 then
    attends causally whenever an attention mask is passed): loaded bidirectional."""
    GemmaForCausalLM(
        GemmaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            mask_token_id=2,
            use_bidirectional_attention=True,
        )
    ).save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), ModelConfig())
    assert family_of(model.config).name == "bidirectional"
    assert model.config.mask_token_id == 2
    assert model.config.is_causal is False
    assert_bidirectional(model)


@pytest.fixture
def no_hub(monkeypatch):
    """transformers' loaders fail the test if called: a missing local path must not reach them
    (the hub would retry for a minute)."""

    def reached(name, *args, **kwargs):
        raise AssertionError(f"{name} reached transformers")

    for loader in (models.AutoConfig, models.AutoTokenizer):
        monkeypatch.setattr(loader, "from_pretrained", reached)


@pytest.mark.parametrize(
    "name", ["./nope", "/no/such/model", "~/no-such-model-here", "runs/nope", "a/b/c"]
)
def test_a_missing_local_model_fails_at_once_naming_the_flag(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/nope exists in part: a path, not the hub id runs/nope
    missing = rf"--model_name_or_path {re.escape(name)}: no such local model folder"
    with pytest.raises(FileNotFoundError, match=missing):
        load_model(name, ModelConfig(model_name_or_path=name))
    with pytest.raises(FileNotFoundError, match=missing):
        load_tokenizer(ModelConfig(model_name_or_path=name))
    with pytest.raises(FileNotFoundError, match="--ref_model_name_or_path"):
        frozen_reference(
            build_tiny_model(40, 2, num_layers=1), ModelConfig(ref_model_name_or_path=name)
        )


def test_hub_ids_stay_hub_ids_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("GSAI-ML/LLaDA-8B-Instruct", "gpt2", "tiny"):
        assert local_or_hub(name, "--model_name_or_path") == name
    (tmp_path / "runs" / "m").mkdir(parents=True)
    for name in ("runs/m", "./runs/m"):
        assert local_or_hub(name, "--model_name_or_path") == str((tmp_path / "runs/m").resolve())


def test_an_adapter_folder_needs_its_base(tmp_path, no_hub):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="adapter_config.json: base_model_name_or_path"):
        load_model(str(tmp_path), ModelConfig())
    config.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="names no base_model_name_or_path"):
        load_model(str(tmp_path), ModelConfig())


def assert_bidirectional(model):
    """Position 0's logits depend on a later token, with a padding mask passed."""
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits[0, 0]
        after = model(
            input_ids=ids.index_fill(1, torch.tensor([3]), 9), attention_mask=mask
        ).logits[0, 0]
    assert not torch.allclose(before, after)


# --- dropout, tiny model, reference ---------------------------------------------------------------


def test_disable_dropout_zeroes_modules_attention_and_config():
    model = build_tiny_model(40, 2, num_layers=1)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    model.model.extra = nn.Dropout(0.5)
    kept = prepare_policy(model, ModelConfig(keep_dropout=True))
    assert kept.model.extra.p == 0.5 and kept.model.layers[0].self_attn.attention_dropout == 0.3
    disable_dropout(model)
    assert model.model.extra.p == 0.0
    assert model.model.layers[0].self_attn.attention_dropout == 0.0
    assert model.config.attention_dropout == 0.0
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_tiny_model_builds_the_demo_model():
    """The demo's recipe (elbokto.demo.build_model), spelled out: build_tiny_model gives the same
    config and, from the same seed, the same weights."""
    tokenizer = build_tiny_tokenizer(["abcdefgh" * 4])
    hidden, intermediate, layers, heads, seed = 32, 48, 2, 4, 3
    torch.manual_seed(seed)
    expected = GemmaForCausalLM(
        GemmaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=64,
            use_bidirectional_attention=True,
            is_causal=False,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            mask_token_id=tokenizer.mask_token_id,
        )
    ).float()
    built = build_tiny_model(
        len(tokenizer),
        tokenizer.mask_token_id,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
    )
    torch.manual_seed(11)
    state = torch.get_rng_state()
    build_tiny_model(len(tokenizer), tokenizer.mask_token_id, hidden_size=hidden)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched
    assert built.config.to_dict() == expected.config.to_dict()
    for (name, a), (_, b) in zip(built.state_dict().items(), expected.state_dict().items()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name


def test_tiny_model_defaults_and_arguments():
    model = build_tiny_model(40, 2)
    c = model.config
    assert (
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.pad_token_id,
    ) == (64, 256, 2, 4, 2, 16, 0)
    assert c.vocab_size == 40 and c.mask_token_id == 2 and c.is_causal is False
    assert_bidirectional(model)
    other = build_tiny_model(
        40,
        2,
        hidden_size=24,
        num_heads=3,
        num_kv_heads=1,
        max_position_embeddings=32,
        pad_token_id=5,
        eos_token_id=6,
    )
    c = other.config
    assert (
        c.intermediate_size,
        c.head_dim,
        c.num_key_value_heads,
        c.max_position_embeddings,
        c.pad_token_id,
        c.eos_token_id,
    ) == (96, 8, 1, 32, 5, 6)
    same = build_tiny_model(40, 2, seed=1).state_dict()
    assert all(
        torch.equal(a, b)
        for a, b in zip(same.values(), build_tiny_model(40, 2, seed=1).state_dict().values())
    )
    assert not torch.equal(same["lm_head.weight"], model.state_dict()["lm_head.weight"])
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model(40, 2, hidden_size=30, num_heads=4)


def test_native_bidirectional_models_need_transformers5(monkeypatch):
    """Before transformers 5, use_bidirectional_attention is ignored and the model is causal:
    the tiny model and the transformers-native bidirectional family are refused there, in one
    line (on the installed release, and on a stated older one)."""
    message = (
        r"^bidirectional models need transformers >= 5.0 \(earlier releases ignore "
        r"use_bidirectional_attention and build the model causal\); found {}: pip install "
        r"'transformers>=5.0'$"
    )
    found = transformers.__version__
    if models.TRANSFORMERS_5:
        assert build_tiny_model(40, 2, num_layers=1).config.use_bidirectional_attention
        found = "4.57.1"
        monkeypatch.setattr(families, "installed", lambda name: found)
    with pytest.raises(ValueError, match=message.format(re.escape(found))):
        build_tiny_model(40, 2, num_layers=1)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        use_bidirectional_attention=True,
    )
    with pytest.raises(ValueError, match="bidirectional models need transformers >= 5.0"):
        models._accepted_family(config, "a-bidirectional-llama", assume_bidirectional=False)


def test_transformers_without_distribution_metadata_reads_its_version(monkeypatch):
    """A transformers source tree on the path has no distribution metadata: its version is then
    the module's __version__ (the version check used to fail on release(None))."""
    monkeypatch.setattr(families, "installed", lambda name: None)
    assert families.transformers_version() == transformers.__version__
    if models.TRANSFORMERS_5:
        assert build_tiny_model(40, 2, num_layers=1).config.use_bidirectional_attention


def test_reference_is_a_frozen_copy_none_with_lora_or_the_named_model(tmp_path):
    policy = build_tiny_model(40, 2, num_layers=1)
    reference = frozen_reference(policy, ModelConfig())
    assert reference is not policy and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)
    assert not torch.equal(policy.lm_head.weight, reference.lm_head.weight)

    assert frozen_reference(policy, ModelConfig(lora_r=4)) is None

    build_tiny_model(40, 2, num_layers=1, seed=7).save_pretrained(tmp_path / "ref")
    named = frozen_reference(policy, ModelConfig(ref_model_name_or_path=str(tmp_path / "ref")))
    saved = build_tiny_model(40, 2, num_layers=1, seed=7)
    assert torch.equal(named.lm_head.weight, saved.lm_head.weight)
    assert not any(p.requires_grad for p in named.parameters())


# --- the families' published code under transformers 5 (stand-ins) --------------------------------


@pytest.fixture
def transformers_as_shipped():
    """transformers as a fresh process finds it: its RoPE table and its modules as released
    (elbokto's fix-ups register nothing globally, but be sure)."""
    table = modeling_rope_utils.ROPE_INIT_FUNCTIONS
    saved_table, saved_module = dict(table), sys.modules.pop(fixups.ATTN_MASK_UTILS, None)
    if models.TRANSFORMERS_5:
        table.pop("default", None)
    yield
    table.clear()
    table.update(saved_table)
    sys.modules.pop(fixups.ATTN_MASK_UTILS, None)
    if saved_module is not None:
        sys.modules[fixups.ATTN_MASK_UTILS] = saved_module


@pytest.mark.parametrize(
    "family, mask_token_id", [("dream", 31), ("llada", 30), ("llada_moe", 156895)]
)
def test_published_code_loads_through_load_model(
    tmp_path, transformers_as_shipped, family, mask_token_id
):
    """What elbokto promises of the families' published code on every supported transformers:
    it loads through load_model (with the fix-ups where transformers 5 broke it) and computes
    right."""
    rope_table = dict(modeling_rope_utils.ROPE_INIT_FUNCTIONS)
    folder = write_standin(tmp_path / family, family)
    model = load_model(str(folder), ModelConfig(trust_remote_code=True))
    assert family_of(model.config).name == family
    assert model.config.mask_token_id == mask_token_id
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = (ids != 0).long()
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (2, 5, 32) and torch.isfinite(logits).all()
    # RoPE frequencies as written out, not whatever memory the loader left in the buffers.
    for name, module in model.named_modules():
        if hasattr(module, "inv_freq"):
            assert torch.allclose(module.inv_freq, standard_inv_freq(WIDTH // HEADS)), name
    # The fix-ups stay in the model's own module: transformers' table is untouched.
    assert modeling_rope_utils.ROPE_INIT_FUNCTIONS == rope_table
    # Saving (what the trainer does at the end) reads the tied-weights mapping.
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").exists()
    # Padding is padding: tokens behind the mask do not move the real positions' logits.
    with torch.no_grad():
        other = model(
            input_ids=ids.index_fill(1, torch.tensor([3, 4]), 11), attention_mask=mask
        ).logits
    assert torch.allclose(logits[1, :3], other[1, :3], atol=1e-6)


@pytest.mark.parametrize(
    "head",
    [
        {},
        {"weight_tying": True},
        {"scale_logits": True},
        {"weight_tying": True, "scale_logits": True},
    ],
    ids=str,
)
def test_llada_published_heads_are_scored_fused(tmp_path, head):
    """LLaDA's head as published (a separate ff_out, or the input embedding applied with
    F.linear under weight_tying; logits scaled in place under scale_logits) is fused and scores
    the model's own logits, value and gradients."""
    from elbokto import MCConfig, sample_draws
    from elbokto.estimate import elbo_estimate, noisy_copies

    folder = write_standin(tmp_path / "llada", "llada")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **head}))
    model = load_model(str(folder), ModelConfig(trust_remote_code=True))
    assert lm_head_unsupported(model) is None
    ids = torch.randint(1, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    draws = sample_draws(
        MCConfig(n_t=2),
        torch.tensor([2, 3]),
        torch.tensor([5, 4]),
        7,
        uids=torch.tensor([1, 2]),
        seed=0,
    )
    fused = elbo_estimate(model, ids, draws, mask_token_id=30, backend="torch")
    logits = model(input_ids=noisy_copies(ids, draws, 30)).logits
    assert logits.shape[-1] == 32  # the model's own logits again after the fused call
    want = fused_elbo(
        logits,
        ids[draws.sample_index],
        draws.mask,
        draws.weight,
        draws.sample_index,
        2,
        backend="torch",
    )
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for got, expected in zip(
        torch.autograd.grad(fused.sum(), params, allow_unused=True),
        torch.autograd.grad(want.sum(), params, allow_unused=True),
    ):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_dream_keeps_its_generation_config(tmp_path):
    validate = GenerationConfig.validate
    model = load_model(
        str(write_standin(tmp_path / "dream", "dream")), ModelConfig(trust_remote_code=True)
    )
    assert type(model.generation_config).__name__ == "DreamGenerationConfig"
    assert uses_shifted_logits(model.config)
    assert GenerationConfig.validate is validate  # only Dream's subclass was adapted


@pytest.mark.parametrize(
    "family, adapted",
    [
        (
            "llada",
            {
                f"model.transformer.blocks.0.{name}"
                for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj")
            },
        ),
        (
            "llada_moe",
            {
                f"model.layers.0.self_attn.{name}"
                for name in ("q_proj", "k_proj", "v_proj", "o_proj")
            },
        ),
    ],
)
def test_lora_default_targets_on_the_families_module_names(tmp_path, family, adapted):
    model = load_model(
        str(write_standin(tmp_path / family, family)), ModelConfig(trust_remote_code=True)
    )
    assert lora_adapted(prepare_policy(model, ModelConfig(lora_r=2))) == adapted


def test_class_fixups_apply_once(tmp_path):
    """Loading twice (policy and reference) must not wrap the same class twice."""
    for family in ("dream", "llada"):
        folder = write_standin(tmp_path / family, family)
        first = load_model(str(folder), ModelConfig(trust_remote_code=True))
        methods = {
            name: getattr(type(first), name)
            for name in ("__init__", "tie_weights", "_init_weights", "_tied_weights_keys")
        }
        second = load_model(str(folder), ModelConfig(trust_remote_code=True))
        assert type(second) is type(first)
        assert methods == {name: getattr(type(second), name) for name in methods}


def test_standard_rope_matches_transformers_own_formula():
    """Against transformers' linear-scaling RoPE at factor 1 (plain RoPE), with a partial
    rotary factor too."""
    for partial in (1.0, 0.5):
        config = LlamaConfig(
            hidden_size=64,
            num_attention_heads=4,
            partial_rotary_factor=partial,
            rope_parameters={"rope_type": "linear", "factor": 1.0, "rope_theta": 500000.0},
        )
        theirs, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS["linear"](config)
        ours, scaling = fixups.standard_rope_parameters(
            SimpleNamespace(
                rope_theta=500000.0,
                hidden_size=64,
                num_attention_heads=4,
                partial_rotary_factor=partial,
            )
        )
        assert scaling == 1.0 and ours.shape == (int(16 * partial) // 2,)
        assert torch.allclose(ours, theirs)


def test_attention_mask_converter_stand_in():
    keep = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mask = fixups.AttentionMaskConverter(is_causal=False).to_4d(keep, 2, dtype=torch.float16)
    assert mask.shape == (2, 1, 2, 3) and mask.dtype == torch.float16
    assert (mask[0, 0, :, 2] == torch.finfo(torch.float16).min).all()
    assert (mask[0, 0, :, :2] == 0).all() and (mask[1] == 0).all()
    with pytest.raises(NotImplementedError):
        fixups.AttentionMaskConverter(is_causal=True)
