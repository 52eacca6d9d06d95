"""The lm-eval model `elbokto` on a tiny saved model: ELBO against a plain implementation, exact
one-token log-probabilities, is_greedy, rolling windows, generation, and lm-eval's own CLI run
offline on two local tasks."""

import copy
import json
from functools import partialmethod
from pathlib import Path

import pytest
import torch
from distributed import torchrun
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from tiny_eval import save_tiny_model

from elbokto.cli import main
from elbokto.eval import DiffusionLM
from elbokto.sampling import decode_responses, generate

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def lm(folder):
    return DiffusionLM(
        pretrained=str(folder),
        device="cpu",
        mc_num=6,
        mc_chunk_size=4,
        batch_size=2,
        kernel_backend="torch",
    )


def loglikelihood_request(context, continuation, idx=0):
    return Instance(
        request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=idx
    )


@torch.no_grad()
def plain_elbo(lm, context, continuation):
    """The straightforward estimator on the same draws: each copy through the full LM head."""
    draws = lm._draws(context, continuation)
    ids = torch.tensor([context + continuation])
    total = 0.0
    for k in range(lm.mc.num_copies):
        noisy = ids.masked_fill(draws.mask[k : k + 1], lm.mask_token_id)
        logp = lm.model(input_ids=noisy).logits.double().log_softmax(-1)
        picked = logp[0].gather(-1, ids[0, :, None])[:, 0]
        total += float(draws.weight[k]) * picked[draws.mask[k]].sum().item()
    return total


def test_elbo_matches_the_plain_estimator_across_chunks(lm):
    torch.manual_seed(0)
    pairs = [
        (torch.randint(10, 200, (n,)).tolist(), torch.randint(10, 200, (m,)).tolist())
        for n, m in [(5, 3), (2, 7), (9, 1), (4, 4)]
    ]
    # 6 copies per pair in forwards of 4: pairs share forwards (right-padded) and are split.
    got = lm.elbo(pairs)
    want = [plain_elbo(lm, *pair) for pair in pairs]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert got == lm.elbo(pairs)  # a pure function of the tokens and the seed


def test_one_token_continuation_is_the_exact_log_probability(lm):
    context = lm.tok_encode("What color is the sky?")
    token = lm.tok_encode(" blue")[:1]
    ((value, _),) = lm._loglikelihood_tokens([(("", ""), context, token)])
    logits = lm.model(input_ids=torch.tensor([context + [lm.mask_token_id]])).logits
    exact = logits[0, -1].double().log_softmax(-1)[token[0]].item()
    assert value == pytest.approx(exact, rel=1e-5, abs=1e-5)


def test_loglikelihood_through_lm_eval_instances(lm):
    requests = [
        loglikelihood_request("What color is the sky?", c, i)
        for i, c in enumerate([" blue", " green", " red"])
    ]
    values = lm.loglikelihood(requests)
    assert all(isinstance(v, float) and v < 0 and isinstance(g, bool) for v, g in values)


def test_is_greedy_is_the_argmax_with_the_continuation_masked(lm):
    context = lm.tok_encode("Which is a fruit?")
    masked = torch.tensor([context + [lm.mask_token_id] * 3])
    argmax = lm.model(input_ids=masked).logits[0, -3:].argmax(-1).tolist()
    other = [(argmax[0] + 1) % 300] + argmax[1:]
    # A longer context in the same batch: left padding must not move the scored columns.
    assert lm.is_greedy([(context, argmax), (context, other), (context * 2, argmax)])[:2] == [
        True,
        False,
    ]


@torch.no_grad()
def llada_suffix_decode(model, mask_id, context, length):
    """A stand-in of LLaDA's ``suffix_greedy_prediction`` (eval_llada.py), one request without
    padding: ``length`` steps, each unmasking the masked position whose argmax is the most
    probable (softmax in float32), with that argmax."""
    seq = torch.tensor([context + [mask_id] * length])
    for _ in range(length):
        masked = seq == mask_id
        logits = model(input_ids=seq).logits[masked]
        x0 = logits.argmax(-1)
        confidence = logits.float().softmax(-1).gather(-1, x0[:, None])[:, 0]
        keep = confidence.argsort(descending=True)[1:]
        x0[keep] = mask_id
        seq[masked] = x0
    return seq[0, len(context) :].tolist()


def test_is_greedy_llada_decodes_one_token_per_step(lm):
    # The saved tiny model predicts nearly one token everywhere: noise on its weights makes the
    # order of unmasking matter.
    model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    llada = DiffusionLM(
        pretrained=model,
        tokenizer=lm.tokenizer,
        device="cpu",
        batch_size=3,
        kernel_backend="torch",
        is_greedy_mode="llada",
    )
    mask_id = llada.mask_token_id
    contexts = [
        llada.tok_encode(text)
        for text in ("Which is a fruit?", "Name a colour:", "Two plus two is")
    ]
    decoded = [llada_suffix_decode(model, mask_id, context, 5) for context in contexts]
    one_pass = [
        model(input_ids=torch.tensor([c + [mask_id] * 5])).logits[0, -5:].argmax(-1).tolist()
        for c in contexts
    ]
    assert decoded != one_pass  # the two definitions differ on this model: the test can tell
    # Continuations of different lengths and contexts in one left-padded batch.
    longer = contexts[1] * 2
    pairs = [
        (contexts[0], decoded[0]),
        (longer, llada_suffix_decode(model, mask_id, longer, 5)),
        (contexts[2], decoded[2]),
        (contexts[0], decoded[0][:-1] + [(decoded[0][-1] + 1) % 300]),
        (contexts[1], llada_suffix_decode(model, mask_id, contexts[1], 2)),
    ]
    assert llada.is_greedy(pairs) == [True, True, True, False, True]
    assert llada.is_greedy([(c, o) for c, o in zip(contexts, one_pass)]) == [
        d == o for d, o in zip(decoded, one_pass)
    ]
    with pytest.raises(ValueError, match="is_greedy_mode"):
        DiffusionLM(pretrained=model, tokenizer=lm.tokenizer, is_greedy_mode="sampled")


def test_classifier_free_guidance_on_one_token(folder):
    guided = DiffusionLM(
        pretrained=str(folder), device="cpu", mc_num=2, cfg_scale=1.5, kernel_backend="torch"
    )
    context, token = guided.tok_encode("How many legs has a cat?"), guided.tok_encode(" four")[:1]
    ((value, _),) = guided._loglikelihood_tokens([(("", ""), context, token)])
    ids = torch.tensor([context + [guided.mask_token_id]])
    cond = guided.model(input_ids=ids).logits[0, -1].double()
    uncond = (
        guided.model(
            input_ids=ids.masked_fill(
                torch.arange(ids.shape[1]) < len(context), guided.mask_token_id
            )
        )
        .logits[0, -1]
        .double()
    )
    exact = (uncond + 2.5 * (cond - uncond)).log_softmax(-1)[token[0]].item()
    assert value == pytest.approx(exact, rel=1e-5, abs=1e-5)


def test_rolling_windows_cover_the_text_once(folder, monkeypatch):
    short = DiffusionLM(
        pretrained=str(folder), device="cpu", mc_num=2, max_length=8, kernel_backend="torch"
    )
    text = "the quick brown fox jumps over the lazy dog"
    tokens = short.tok_encode(text, add_special_tokens=False)
    seen = []

    def record(pairs, disable_tqdm=True):
        seen.extend(pairs)
        return [1.0] * len(pairs)

    monkeypatch.setattr(short, "elbo", record)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    assert short.loglikelihood_rolling([request]) == [float(len(seen))]
    assert len(seen) > 1 and seen[0][0] == [short.prefix_token_id]
    assert [t for _, cont in seen for t in cont] == tokens
    assert all(len(ctx) + len(cont) <= 8 for ctx, cont in seen)


def test_generate_until_is_the_sampler_cut_at_until(lm):
    context = "Reverse abc:"
    request = Instance(
        request_type="generate_until",
        doc={},
        idx=0,
        arguments=(context, {"until": ["."], "max_gen_toks": 5, "do_sample": False}),
    )
    (text,) = lm.generate_until([request])
    config = lm._sampler_config(5, 0.0)
    assert (config.gen_length, config.block_length, config.steps) == (5, 5, 5)
    tokens = generate(lm.model, [lm.tok_encode(context)], config, pad_token_id=0)
    assert text == decode_responses(lm.tokenizer, tokens)[0].split(".")[0]


def test_likelihoods_of_a_block_model_are_refused_not_misscored(lm, monkeypatch):
    """A block-diffusion model's ELBO is not the plain one: scoring it as such would be wrong."""
    from elbokto.eval import harness

    monkeypatch.setattr(harness, "resolve_block_size", lambda config, block_size: 4)
    with pytest.raises(NotImplementedError, match="block-diffusion model"):
        lm.loglikelihood([loglikelihood_request("Reverse abc:", " cba")])


def test_a_model_without_a_mask_token_is_refused(tmp_path):
    folder = save_tiny_model(tmp_path / "nomask", mask=False)
    with pytest.raises(ValueError, match="no mask token id"):
        DiffusionLM(pretrained=str(folder), device="cpu")


def test_lm_eval_cli_runs_offline_on_local_tasks(folder, lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(TASKS)  # the task files name their data relative to here
    # Offline, only the local tasks matter: skip indexing lm-eval's thousands of built-in ones.
    monkeypatch.setattr(
        TaskManager, "__init__", partialmethod(TaskManager.__init__, include_defaults=False)
    )
    out = tmp_path / "results"
    args = [
        "--model",
        "elbokto",
        "--device",
        "cpu",
        "--model_args",
        f"pretrained={folder},mc_num=6,mc_chunk_size=4,kernel_backend=torch",
        "--tasks",
        "elbokto_mc,elbokto_gen",
        "--include_path",
        str(TASKS),
        "--batch_size",
        "2",
        "--output_path",
        str(out),
        "--log_samples",
        "--apply_chat_template",
    ]
    assert main(["eval", "lm-eval", *args]) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["elbokto_mc"]["acc,none"] <= 1
    assert 0 <= results["elbokto_gen"]["exact_match,none"] <= 1
    # The harness's numbers are the model's: the same requests scored directly agree.
    samples = [
        json.loads(line)
        for line in next(out.rglob("samples_elbokto_mc_*.jsonl")).read_text().splitlines()
    ]
    for sample in samples:
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        assert "<|user|>" in context  # the chat template was applied
        choices = [a["arg_1"] for a in sample["arguments"].values()]
        direct = [
            v for v, _ in lm.loglikelihood([loglikelihood_request(context, c) for c in choices])
        ]
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(direct, abs=1e-5)
    generated = [
        json.loads(line)
        for line in next(out.rglob("samples_elbokto_gen_*.jsonl")).read_text().splitlines()
    ]
    for sample in generated:
        context, kwargs = (
            sample["arguments"]["gen_args_0"]["arg_0"],
            sample["arguments"]["gen_args_0"]["arg_1"],
        )
        (direct,) = lm.generate_until(
            [Instance(request_type="generate_until", doc={}, idx=0, arguments=(context, kwargs))]
        )
        assert sample["resps"][0][0] == direct


@pytest.mark.slow  # two fresh interpreters importing torch, transformers and lm-eval
def test_two_processes_split_the_requests_and_gather_them(folder, tmp_path):
    worker = Path(__file__).parent / "lm_eval_worker.py"
    out = tmp_path / "results.json"
    torchrun(worker, str(folder), str(out))
    gathered = json.loads(out.read_text())
    assert gathered["world_size"] == 2 and len(gathered["requests"]) == 3  # every doc, once
    single = DiffusionLM(
        pretrained=str(folder), device="cpu", mc_num=4, mc_chunk_size=4, kernel_backend="torch"
    )
    for requests, values in zip(gathered["requests"], gathered["values"]):
        direct = single.loglikelihood([loglikelihood_request(*r) for r in requests])
        assert values == pytest.approx([v for v, _ in direct], abs=1e-5)


def test_the_old_name_of_mc_chunk_size_is_accepted_with_a_warning(lm):
    with pytest.warns(FutureWarning, match="mc_chunk_size"):
        old = DiffusionLM(
            pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", mc_batch_size=5
        )
    assert old.mc_chunk_size == 5
