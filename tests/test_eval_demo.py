"""The demo's judged win rate: models that always reverse or always copy, through the sampler, the
rule judge on 127.0.0.1 and the win-rate pipeline."""

import pytest
import torch
from torch import nn

from elbokto.demo import QUICK, DemoConfig, Encoder, answer
from elbokto.demo.winrate import demo_rule, demo_winrate


class Oracle(nn.Module):
    """Logits that put all mass on the demo answer (reversal or copy) of each canvas's prompt."""

    def __init__(self, encoder: Encoder, desirable: bool):
        super().__init__()
        self.encoder, self.desirable = encoder, desirable
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device

    def forward(self, input_ids, attention_mask=None):
        tok, gen = self.encoder.tokenizer, self.encoder.gen_length
        user, end = tok.convert_tokens_to_ids(["<|user|>", "<|end|>"])
        logits = torch.full((*input_ids.shape, len(tok)), -30.0)
        for b, row in enumerate(input_ids.tolist()):
            prompt = tok.decode(row[row.index(user) + 1 : row.index(end)])
            ids = tok(answer(prompt, self.desirable), add_special_tokens=False)["input_ids"]
            ids += [tok.eos_token_id] * (gen - len(ids))
            logits[b, torch.arange(-gen, 0), ids] = 30.0
        return logits


def test_demo_rule_ranks_reverse_over_copy_over_malformed():
    rule = demo_rule()
    assert rule("abc", "CBA", "abc") == "A" and rule("abc", "abc", "CBA") == "B"
    assert rule("abc", "abc", "zzz") == "A" and rule("abc", "CBA", "CBA") == "C"


@pytest.mark.parametrize("candidate_reverses, awr", [(True, 1.0), (False, 0.0)])
def test_demo_winrate_of_a_reverser_against_a_copier(tmp_path, candidate_reverses, awr):
    config = DemoConfig(**{**QUICK, "eval_prompts": 6})
    encoder = Encoder(config)
    prompts = ["abc", "hgfe", "abcdef", "bad", "gafe", "dcba"]
    summary = demo_winrate(
        Oracle(encoder, candidate_reverses),
        Oracle(encoder, not candidate_reverses),
        encoder,
        prompts,
        config,
        tmp_path,
    )
    assert summary["awr"] == awr and summary["n"] == 6 and summary["errors"] == 0
    assert (summary["candidate"], summary["opponent"]) == ("aligned", "sft")
    assert (tmp_path / "winrate" / "summary.json").exists()
