import math
from dataclasses import replace

import pytest
import torch
from authors_code import authors_masks

from elbokto.draws import Draws, MCConfig, _int64, _mix, sample_draws

# --- a toy "model" and the exact ELBO by enumeration ---------------------------------------------


def toy_logp(sub: torch.Tensor) -> torch.Tensor:
    """log pi(y^i | y with S masked) for every response position i: float64 [N, L] from bool [N, L].

    Depends on the position, on |S| (non-linearly) and on which neighbours are masked, so that
    the ELBO estimate is sensitive to the joint law of the mask, not only to its marginals.
    """
    n, length = sub.shape
    s = sub.to(torch.float64)
    i = torch.arange(length, dtype=torch.float64)
    left = torch.nn.functional.pad(s, (1, 0))[:, :-1]
    right = torch.nn.functional.pad(s, (0, 1))[:, 1:]
    frac = s.sum(-1, keepdim=True) / length
    return -(
        0.2
        + 0.15 * i
        + 2.0 * frac**2
        + 0.6 * left
        + 0.35 * right * (1 + 0.5 * i)
        + 0.3 * left * right
    )


def exact_elbo(length: int, offset: float = 0.0) -> float:
    """B = sum_{S != {}} (|S|-1)! (L-|S|)! / L! * sum_{i in S} f(i, S), f = toy_logp - offset."""
    codes = torch.arange(1, 2**length)
    subsets = (codes[:, None] >> torch.arange(length)) & 1 == 1
    sizes = subsets.sum(-1)
    coef = torch.tensor(
        [
            math.factorial(k - 1) * math.factorial(length - k) / math.factorial(length)
            for k in sizes.tolist()
        ],
        dtype=torch.float64,
    )
    return float((coef * ((toy_logp(subsets) - offset) * subsets).sum(-1)).sum())


def estimates(
    draws: Draws, prompt_lengths: torch.Tensor, length: int, num_copies: int
) -> torch.Tensor:
    """Per-example ELBO estimates float64 [N] of the toy model from draws of responses of one
    length."""
    window = prompt_lengths.repeat_interleave(num_copies)[:, None] + torch.arange(length)
    sub = draws.mask.gather(1, window)
    per_copy = draws.weight.to(torch.float64) * (toy_logp(sub) * sub).sum(-1)
    return per_copy.reshape(-1, num_copies).sum(-1)


def toy_batch(n: int, length: int, seed: int = 0):
    """n examples with the same response length, uids spread over int64, prompts of 0..2 tokens."""
    gen = torch.Generator().manual_seed(seed)
    uids = torch.randint(-(2**62), 2**62, (n,), generator=gen)
    prompt_lengths = torch.randint(0, 3, (n,), generator=gen)
    return prompt_lengths, torch.full((n,), length), uids


def assert_unbiased(values: torch.Tensor, target: float, z: float = 4.0) -> None:
    se = float(values.std() / math.sqrt(values.numel()))
    err = float(values.mean()) - target
    message = (
        f"mean {float(values.mean()):.5f} vs exact {target:.5f}: "
        f"{err / max(se, 1e-300):.1f} standard errors"
    )
    assert abs(err) < z * se + 1e-6 * abs(target), message


NUM_EXAMPLES = 12_000


@pytest.mark.parametrize(
    "config",
    [
        MCConfig(estimator="fixed_count", n_t=4, n_yt=1, antithetic=True),
        MCConfig(estimator="fixed_count", n_t=3, n_yt=2, antithetic=False),
        MCConfig(estimator="bernoulli", n_t=4, n_yt=1, antithetic=True, eps=0.0),
        MCConfig(estimator="bernoulli", n_t=2, n_yt=2, antithetic=False, eps=0.0),
        # eps large enough that the size-biased branch is exercised in ~30% of the copies.
        MCConfig(estimator="bernoulli", n_t=4, n_yt=1, antithetic=True, eps=0.3),
        MCConfig(estimator="bernoulli", n_t=1, n_yt=1, antithetic=False, eps=0.3),
    ],
    ids=lambda c: f"{c.estimator}-nt{c.n_t}-nyt{c.n_yt}-anti{c.antithetic}-eps{c.eps}",
)
@pytest.mark.parametrize("length", [1, 5])
def test_unbiased_against_enumeration(config, length):
    prompt_lengths, response_lengths, uids = toy_batch(NUM_EXAMPLES, length)
    draws = sample_draws(
        config, prompt_lengths, response_lengths, 2 + length + 1, uids=uids, seed=11, draw_index=3
    )
    assert_unbiased(estimates(draws, prompt_lengths, length, config.num_copies), exact_elbo(length))


def test_antithetic_reduces_variance():
    prompt_lengths, response_lengths, uids = toy_batch(4000, 6)
    spread = {}
    for antithetic in (True, False):
        config = MCConfig(n_t=4, antithetic=antithetic)
        draws = sample_draws(config, prompt_lengths, response_lengths, 9, uids=uids, seed=2)
        spread[antithetic] = float(estimates(draws, prompt_lengths, 6, 4).var())
    assert spread[True] < 0.8 * spread[False]


def _llada_floor_draws(n: int, length: int, floor: float, gen: torch.Generator) -> Draws:
    """Textbook Bernoulli draws from torch's RNG, with LLaDA's t = floor + (1 - floor) * u."""
    t = floor + (1 - floor) * (1 - torch.rand(n, generator=gen, dtype=torch.float64))
    mask = torch.rand(n, length, generator=gen, dtype=torch.float64) < t[:, None]
    return Draws(mask=mask, weight=(1 / t).float(), sample_index=torch.arange(n), t=t.float())


def test_harness_catches_biased_estimators():
    """The enumeration test is not vacuous: it passes the textbook estimator and fails biased
    ones."""
    length, n = 5, 20_000
    target = exact_elbo(length)
    starts = torch.zeros(n, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    assert_unbiased(estimates(_llada_floor_draws(n, length, 0.0, gen), starts, length, 1), target)
    # Flooring t changes its law.
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(
            estimates(_llada_floor_draws(n, length, 0.1, gen), starts, length, 1), target
        )

    # Right count l and uniform per-position marginals l/L, wrong joint law: a cyclic block of l
    # tokens instead of a uniformly random l-subset (the toy model sees masked neighbours).
    _, response_lengths, uids = toy_batch(n, length)
    draws = sample_draws(MCConfig(n_t=1), starts, response_lengths, length, uids=uids, seed=5)
    count = draws.mask.sum(-1, keepdim=True)
    offset = (torch.arange(length) - torch.randint(0, length, (n, 1), generator=gen)) % length
    block = Draws(
        mask=offset < count, weight=draws.weight, sample_index=draws.sample_index, t=draws.t
    )
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(estimates(block, starts, length, 1), target)


# --- block draws: the block ELBO by exact enumeration, block by block ----------------------------
# Layout: prompt 2, response 7, blocks of 4 from position 0: block 0 holds 2 prompt and 2 response
# tokens, block 1 four response tokens, block 2 one response token (then padding).
BLOCK, PROMPT, RESPONSE = 4, 2, 7


def block_windows(prompt: int, length: int, block: int) -> list[torch.Tensor]:
    """Response positions of each block that holds any, as column indices."""
    response = torch.arange(prompt, prompt + length)
    return [
        response[response // block == k]
        for k in range(int(response[-1]) // block + 1)
        if (response // block == k).any()
    ]


def block_offset(k: int) -> float:
    """The toy conditions on the block: its log-probabilities shift with the block index."""
    return 0.3 * k


def exact_block_elbo(prompt: int, length: int, block: int) -> float:
    """sum_k of the whole-response identity on block k's response positions."""
    return sum(
        exact_elbo(len(cols), block_offset(int(cols[0]) // block))
        for cols in block_windows(prompt, length, block)
    )


def block_estimates(
    draws: Draws, prompt: int, length: int, block: int, num_copies: int
) -> torch.Tensor:
    """Per-example block ELBO estimates float64 [N]: each block scored on its own mask only."""
    per_copy = torch.zeros(draws.mask.shape[0], dtype=torch.float64)
    for cols in block_windows(prompt, length, block):
        sub, weight = draws.mask[:, cols], draws.weight[:, cols].to(torch.float64)
        logp = toy_logp(sub) - block_offset(int(cols[0]) // block)
        per_copy += (weight * logp * sub).sum(-1)
    return per_copy.reshape(-1, num_copies).sum(-1)


def block_draws(config: MCConfig, n: int = NUM_EXAMPLES) -> Draws:
    _, response_lengths, uids = toy_batch(n, RESPONSE)
    prompt_lengths = torch.full((n,), PROMPT)
    return sample_draws(
        replace(config, block_size=BLOCK),
        prompt_lengths,
        response_lengths,
        PROMPT + RESPONSE + 1,
        uids=uids,
        seed=13,
        draw_index=1,
    )


@pytest.mark.parametrize(
    "config",
    [
        MCConfig(estimator="fixed_count", n_t=4, antithetic=True),
        MCConfig(estimator="fixed_count", n_t=2, n_yt=2, antithetic=False),
        MCConfig(estimator="bernoulli", n_t=4, antithetic=True, eps=0.0),
        MCConfig(estimator="bernoulli", n_t=2, n_yt=2, antithetic=False, eps=0.0),
        MCConfig(estimator="bernoulli", n_t=4, antithetic=True, eps=0.3),
    ],
    ids=lambda c: f"{c.estimator}-nt{c.n_t}-nyt{c.n_yt}-anti{c.antithetic}-eps{c.eps}",
)
def test_block_estimator_unbiased_against_enumeration(config):
    draws = block_draws(config)
    assert draws.block_size == BLOCK and draws.weight.shape == draws.mask.shape
    values = block_estimates(draws, PROMPT, RESPONSE, BLOCK, config.num_copies)
    assert_unbiased(values, exact_block_elbo(PROMPT, RESPONSE, BLOCK))


def test_block_harness_catches_whole_response_weights():
    """Weight L / l_k instead of n_k / l_k (the whole-response weight inside a block) is caught."""
    config = MCConfig(n_t=4)
    draws = block_draws(config)
    rescale = torch.ones(draws.mask.shape[1])
    for cols in block_windows(PROMPT, RESPONSE, BLOCK):
        rescale[cols] = RESPONSE / len(cols)
    planted = replace(draws, weight=draws.weight * rescale)
    target = exact_block_elbo(PROMPT, RESPONSE, BLOCK)
    assert_unbiased(block_estimates(draws, PROMPT, RESPONSE, BLOCK, 4), target)
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(block_estimates(planted, PROMPT, RESPONSE, BLOCK, 4), target)


@pytest.mark.parametrize("estimator", ["fixed_count", "bernoulli"])
def test_block_draws_structure(estimator):
    """Per block: masks inside its response positions, l_k of them (fixed_count), the block's
    weight n_k / (l_k K) on its positions, 0 elsewhere; levels independent across blocks."""
    config = MCConfig(estimator=estimator, n_t=2, n_yt=2, eps=0.0)
    draws = block_draws(config, n=200)
    k = config.num_copies
    windows = block_windows(PROMPT, RESPONSE, BLOCK)
    response = torch.zeros(draws.mask.shape[1], dtype=torch.bool)
    response[PROMPT : PROMPT + RESPONSE] = True
    assert not (draws.mask & ~response).any()
    assert (draws.weight[:, ~response] == 0).all() and (draws.t[:, ~response] == 0).all()
    for cols in windows:
        w, t, sub = draws.weight[:, cols], draws.t[:, cols], draws.mask[:, cols]
        assert (w == w[:, :1]).all() and (t == t[:, :1]).all()  # one level per block and copy
        if estimator == "fixed_count":
            count = sub.sum(-1)
            assert (count >= 1).all()
            assert torch.allclose(w[:, 0], len(cols) / (count * k).float())
            assert torch.allclose(t[:, 0], count / len(cols))
        else:
            assert torch.allclose(w[:, 0], 1 / (t[:, 0] * k))
        # The n_yt masks of a level share the block's level.
        per_level = t[:, 0].reshape(-1, 2, 2)
        assert (per_level == per_level[..., :1]).all()
    if estimator == "bernoulli":  # independent levels: within a stratum, blocks uncorrelated
        level0 = torch.arange(draws.mask.shape[0]) % k < 2
        levels = torch.stack([draws.t[level0, cols[0]] for cols in windows[:2]]).double()
        assert abs(float(torch.corrcoef(levels)[0, 1])) < 0.15


@pytest.mark.parametrize("estimator", ["fixed_count", "bernoulli"])
def test_block_draws_depend_on_uid_not_on_the_batch(estimator):
    """Same uid and layout: the same block draws in another batch, order and padded length."""
    config = MCConfig(estimator=estimator, n_t=2, n_yt=2, eps=0.2, block_size=3)
    prompt_lengths, response_lengths, uids, seq_len = _ragged_batch()
    k = config.num_copies
    base = sample_draws(
        config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=7, draw_index=2
    )
    perm = torch.tensor([3, 0, 4, 1, 2])
    other = sample_draws(
        config,
        torch.cat([prompt_lengths[perm], torch.tensor([0])]),
        torch.cat([response_lengths[perm], torch.tensor([5])]),
        seq_len + 4,
        uids=torch.cat([uids[perm], torch.tensor([99])]),
        seed=7,
        draw_index=2,
    )
    for new, old in enumerate(perm.tolist()):
        for field in ("mask", "weight", "t"):
            mine = getattr(base, field)[old * k : (old + 1) * k]
            theirs = getattr(other, field)[new * k : (new + 1) * k]
            assert torch.equal(mine, theirs[:, :seq_len]) and not theirs[:, seq_len:].any()
    again = sample_draws(
        config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=8, draw_index=2
    )
    assert not torch.equal(again.mask, base.mask)


# --- structure of the draws ----------------------------------------------------------------------


def _ragged_batch():
    prompt_lengths = torch.tensor([0, 3, 5, 2, 1])
    response_lengths = torch.tensor([7, 4, 0, 1, 9])
    uids = torch.tensor([10, -7, 2**63 - 1, -(2**63), 123456789012345])
    return prompt_lengths, response_lengths, uids, 12


@pytest.mark.parametrize("estimator", ["fixed_count", "bernoulli"])
@pytest.mark.parametrize("share", [False, True])
def test_masks_stay_in_response_window(estimator, share):
    prompt_lengths, response_lengths, uids, seq_len = _ragged_batch()
    config = MCConfig(estimator=estimator, n_t=3, n_yt=2, share_across_batch=share, eps=0.2)
    for seed in range(20):
        draws = sample_draws(
            config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=seed
        )
        k = config.num_copies
        assert draws.mask.shape == (5 * k, seq_len) and draws.mask.dtype == torch.bool
        assert draws.weight.shape == draws.t.shape == (5 * k,)
        assert draws.weight.dtype == draws.t.dtype == torch.float32
        assert torch.equal(draws.sample_index, torch.arange(5).repeat_interleave(k))
        start = prompt_lengths.repeat_interleave(k)[:, None]
        end = start + response_lengths.repeat_interleave(k)[:, None]
        position = torch.arange(seq_len)
        assert not (draws.mask & ((position < start) | (position >= end))).any()
        empty = response_lengths.repeat_interleave(k) == 0
        assert (draws.weight[empty] == 0).all() and (draws.t[empty] == 0).all()
        assert (draws.weight[~empty] > 0).all()


def test_fixed_count_masks_exactly_l_tokens():
    prompt_lengths, response_lengths, uids, seq_len = _ragged_batch()
    config = MCConfig(n_t=4, n_yt=3)
    k = config.num_copies
    draws = sample_draws(
        config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=1, draw_index=9
    )
    length = response_lengths.repeat_interleave(k)
    count = draws.mask.sum(-1)
    full = length > 0
    assert ((count >= 1) & (count <= length))[full].all()
    assert torch.allclose(draws.t[full], (count / length)[full].float())
    assert torch.allclose(draws.weight[full], (length / (count * k))[full].float())
    # The n_yt masks of one level share l (and t), and differ in which tokens they mask.
    per_level = count.reshape(5, 4, 3)
    assert (per_level == per_level[..., :1]).all()
    masks = draws.mask.reshape(5, 4, 3, seq_len)[4]
    assert not all(torch.equal(masks[j, 0], masks[j, 1]) for j in range(4))


def test_stratified_levels():
    """Antithetic: level j's t (or l / L) falls in stratum j, for each example."""
    n_t, length = 4, 64
    prompt_lengths, response_lengths, uids = toy_batch(50, length)
    config = MCConfig(estimator="bernoulli", n_t=n_t)
    bern = sample_draws(config, prompt_lengths, response_lengths, 67, uids=uids, seed=0)
    t = bern.t.double().reshape(50, n_t)
    j = torch.arange(n_t)
    assert ((t > j / n_t) & (t <= (j + 1) / n_t)).all()
    fixed = sample_draws(MCConfig(n_t=n_t), prompt_lengths, response_lengths, 67, uids=uids, seed=0)
    count = fixed.mask.sum(-1).reshape(50, n_t)
    assert ((count > j * length // n_t) & (count <= (j + 1) * length // n_t)).all()


def test_bernoulli_eps_branch_bounds_weights():
    """Copies with t < eps mask at least one token and get weight L/(|S| K) <= max(1/eps, L)/K."""
    prompt_lengths, response_lengths, uids = toy_batch(3000, 7)
    config = MCConfig(estimator="bernoulli", n_t=2, eps=0.05)
    draws = sample_draws(config, prompt_lengths, response_lengths, 10, uids=uids, seed=4)
    small = draws.t < 0.05
    assert small.sum() > 50
    size = draws.mask.sum(-1)
    assert (size[small] >= 1).all()
    assert torch.allclose(draws.weight[small], (7 / (size[small] * 2)).float())
    assert torch.allclose(draws.weight[~small], 1 / (draws.t[~small] * 2))
    assert draws.weight.max() <= 1 / (0.05 * 2) + 1e-3


def test_bernoulli_forced_token_is_uniform_over_the_response():
    """In the small-t branch the forced token is uniform over the response positions: among the
    copies that mask exactly one token (t ~ 0), each position is that token 1/L of the time."""
    prompt_lengths, response_lengths, uids = toy_batch(6000, 5)
    config = MCConfig(estimator="bernoulli", n_t=1, antithetic=False, eps=0.999)
    draws = sample_draws(config, prompt_lengths, response_lengths, 10, uids=uids, seed=9)
    single = draws.mask.sum(-1) == 1
    relative = draws.mask[single].long().argmax(-1) - prompt_lengths[draws.sample_index[single]]
    share = torch.bincount(relative, minlength=5).double() / relative.numel()
    n = relative.numel()
    assert n > 500
    assert torch.allclose(
        share, torch.full((5,), 0.2, dtype=torch.float64), atol=5 * (0.2 * 0.8 / n) ** 0.5
    ), share


# --- determinism ---------------------------------------------------------------------------------


def _rows(draws: Draws, k: int, b: int, prompt_length: int, response_length: int):
    """Draws of example b, with the mask cut to its response window."""
    rows = slice(b * k, (b + 1) * k)
    window = slice(prompt_length, prompt_length + response_length)
    return draws.mask[rows, window], draws.weight[rows], draws.t[rows]


@pytest.mark.parametrize("estimator", ["fixed_count", "bernoulli"])
def test_draws_depend_on_uid_not_on_the_batch(estimator):
    prompt_lengths, response_lengths, uids, seq_len = _ragged_batch()
    config = MCConfig(estimator=estimator, n_t=2, n_yt=2, eps=0.2)
    k = config.num_copies
    base = sample_draws(
        config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=7, draw_index=2
    )
    perm = torch.tensor([3, 0, 4, 1, 2])
    # A shuffled batch, with the prompts shifted by one and two extra companions.
    shifted = torch.cat([prompt_lengths[perm] + 1, torch.tensor([0, 2])])
    other = sample_draws(
        config,
        shifted,
        torch.cat([response_lengths[perm], torch.tensor([3, 5])]),
        seq_len + 1,
        uids=torch.cat([uids[perm], torch.tensor([99, 100])]),
        seed=7,
        draw_index=2,
    )
    for new, old in enumerate(perm.tolist()):
        mine = _rows(base, k, old, int(prompt_lengths[old]), int(response_lengths[old]))
        theirs = _rows(other, k, new, int(shifted[new]), int(response_lengths[old]))
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("estimator", ["fixed_count", "bernoulli"])
def test_step_and_seed_change_the_draws(estimator):
    prompt_lengths, response_lengths, uids = toy_batch(64, 20)
    config = MCConfig(estimator=estimator)
    base = sample_draws(
        config, prompt_lengths, response_lengths, 23, uids=uids, seed=0, draw_index=0
    )
    again = sample_draws(
        config, prompt_lengths, response_lengths, 23, uids=uids, seed=0, draw_index=0
    )
    assert torch.equal(base.mask, again.mask) and torch.equal(base.weight, again.weight)
    for kwargs in (
        {"seed": 0, "draw_index": 1},
        {"seed": 1, "draw_index": 0},
        {"seed": 2**64 + 1, "draw_index": 0},
    ):
        changed = sample_draws(config, prompt_lengths, response_lengths, 23, uids=uids, **kwargs)
        assert (changed.t != base.t).any()
        assert (changed.mask != base.mask).any(-1).float().mean() > 0.9


@pytest.mark.parametrize("estimator", ["fixed_count", "bernoulli"])
def test_share_across_batch(estimator):
    prompt_lengths = torch.tensor([0, 2, 1, 3])
    response_lengths = torch.tensor([6, 6, 6, 4])
    uids = torch.tensor([1, 2, 3, 4])
    k, seq_len = 4, 10
    shared = MCConfig(estimator=estimator, n_t=2, n_yt=2, share_across_batch=True, eps=0.0)
    draws = sample_draws(shared, prompt_lengths, response_lengths, seq_len, uids=uids, seed=3)
    rows = [_rows(draws, k, b, int(prompt_lengths[b]), int(response_lengths[b])) for b in range(4)]
    for b in (1, 2):  # same length as example 0: identical relative masks, weights and levels
        for a, c in zip(rows[0], rows[b]):
            assert torch.equal(a, c)
    if estimator == "bernoulli":  # a shorter response still shares t and the per-position uniforms
        assert torch.equal(rows[3][2], rows[0][2])
        assert torch.equal(rows[3][0], rows[0][0][:, :4])
    # Independent of the uids, but not of the seed; without sharing, items differ.
    relabelled = sample_draws(
        shared, prompt_lengths, response_lengths, seq_len, uids=uids + 50, seed=3
    )
    assert torch.equal(relabelled.mask, draws.mask)
    unshared = MCConfig(estimator=estimator, n_t=2, n_yt=2, eps=0.0)
    private = sample_draws(unshared, prompt_lengths, response_lengths, seq_len, uids=uids, seed=3)
    assert not torch.equal(private.t[:k], private.t[k : 2 * k])


# --- the hash ------------------------------------------------------------------------------------


def _splitmix64_finaliser(x: int) -> int:
    """Reference in Python's unbounded ints, on uint64."""
    m = (1 << 64) - 1
    x &= m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_int64_mix_matches_uint64_splitmix():
    """Wrapping int64 arithmetic and masked shifts reproduce the uint64 finaliser bit for bit."""
    values = [0, 1, -1, 2**63 - 1, -(2**63), 0x9E3779B97F4A7C15 - 2**64, 12345, -987654321]
    values += torch.randint(
        -(2**63), 2**63 - 1, (200,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    got = _mix(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_int64(_splitmix64_finaliser(v)) for v in values]


def test_uniforms_look_uniform():
    prompt_lengths, response_lengths, uids = toy_batch(20_000, 1)
    t = sample_draws(
        MCConfig(estimator="bernoulli", n_t=1, antithetic=False, eps=0.0),
        prompt_lengths,
        response_lengths,
        3,
        uids=uids,
        seed=0,
    ).t.double()
    counts = torch.histc(t, bins=20, min=0, max=1)
    expected = t.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45  # 19 degrees of freedom: P(chi2 > 45) ~ 7e-4


# --- the authors' recipe (draw_source="authors") ------------------------------------------------

AUTHORS = {"draw_source": "authors", "antithetic": False, "fixed_draws": True}


def _rows_of_the_authors():
    """A ragged batch (an empty response, one of 200 tokens) whose uids are row numbers, and a
    negative one (the KL baseline's mixed uids are any int64)."""
    prompt_lengths = torch.tensor([0, 3, 5, 2, 1, 4])
    response_lengths = torch.tensor([7, 4, 0, 1, 9, 200])
    return prompt_lengths, response_lengths, torch.tensor([0, 1, 2, 13999, 2**40, -7]), 204


def test_authors_draws_are_their_random_calls():
    prompt_lengths, response_lengths, uids, seq_len = _rows_of_the_authors()
    config = MCConfig(**AUTHORS)
    k = config.num_copies
    draws = sample_draws(config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=0)
    want = authors_masks(uids.tolist(), prompt_lengths, response_lengths, seq_len, k)
    assert torch.equal(draws.mask.view(-1, k, seq_len).transpose(0, 1), want)
    length = response_lengths.repeat_interleave(k).double()
    count = draws.mask.sum(-1).double()
    assert torch.equal(
        draws.weight, torch.where(length > 0, length / (count.clamp(min=1) * k), 0.0).float()
    )
    assert torch.equal(draws.t, torch.where(length > 0, count / length.clamp(min=1), 0.0).float())
    # Any batch composition: a shuffled batch, prompts shifted, a companion, a draw index.
    perm = torch.tensor([5, 3, 0, 4, 1, 2])
    other = sample_draws(
        config,
        torch.cat([prompt_lengths[perm] + 1, torch.tensor([0])]),
        torch.cat([response_lengths[perm], torch.tensor([5])]),
        seq_len + 1,
        uids=torch.cat([uids[perm], torch.tensor([99])]),
        seed=0,
        draw_index=4,
    )
    for new, old in enumerate(perm.tolist()):
        mine = draws.mask[old * k : (old + 1) * k]
        theirs = other.mask[new * k : (new + 1) * k, 1:]
        assert torch.equal(mine, theirs)
    # Seed 0 is theirs; another seed draws other levels and masks (independent redraws).
    redraw = sample_draws(config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=1)
    longer = (response_lengths >= 7).repeat_interleave(k)
    assert (redraw.mask != draws.mask).any(-1)[longer].float().mean() > 0.9


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"estimator": "uniform"}, "estimator='uniform'"),
        ({"n_t": 0}, "n_t=0"),
        ({"n_yt": 1.5}, "n_yt=1.5"),
        ({"antithetic": 1}, "antithetic=1"),
        ({"eps": 1.0}, "eps=1.0"),
        ({"eps": -0.1}, "eps=-0.1"),
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": 2.0}, "block_size=2.0"),
        ({"draw_source": "lcg"}, "draw_source='lcg'"),
        (
            {"draw_source": "authors"},
            "has antithetic=False, fixed_draws=True; got antithetic=True, fixed_draws=False",
        ),
        (dict(AUTHORS, n_yt=2), "has n_yt=1; got n_yt=2"),
        (dict(AUTHORS, estimator="bernoulli"), "got estimator='bernoulli'"),
        (dict(AUTHORS, share_across_batch=True), "got share_across_batch=True"),
        (dict(AUTHORS, block_size=32), "got block_size=32"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MCConfig(**kwargs)


def test_num_copies():
    assert MCConfig().num_copies == 8
    assert MCConfig(n_t=3, n_yt=5).num_copies == 15


def test_input_validation():
    p, r, u = torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([0, 1])
    config = MCConfig()
    with pytest.raises(ValueError, match="example 1: prompt_length 2 and response_length 4"):
        sample_draws(config, p, r, 5, uids=u, seed=0)
    with pytest.raises(ValueError, match="example 0"):
        sample_draws(config, p, torch.tensor([-1, 0]), 8, uids=u, seed=0)
    with pytest.raises(ValueError, match="uids must be an int64 tensor"):
        sample_draws(config, p, r, 8, uids=u.int(), seed=0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        sample_draws(config, p, r, 8, uids=torch.tensor([0]), seed=0)
    empty = sample_draws(config, p[:0], r[:0], 8, uids=u[:0], seed=0)
    assert empty.mask.shape == (0, 8) and empty.weight.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["fixed_count", "bernoulli"])
@pytest.mark.parametrize("share", [False, True])
def test_cuda_draws_match_cpu(estimator, share):
    prompt_lengths, response_lengths, uids, seq_len = _ragged_batch()
    config = MCConfig(estimator=estimator, n_t=3, n_yt=2, share_across_batch=share, eps=0.2)
    cpu = sample_draws(
        config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=8, draw_index=5
    )
    cuda = sample_draws(
        config,
        prompt_lengths.cuda(),
        response_lengths.cuda(),
        seq_len,
        uids=uids.cuda(),
        seed=8,
        draw_index=5,
    )
    for name in ("mask", "weight", "sample_index", "t"):
        assert torch.equal(getattr(cuda, name).cpu(), getattr(cpu, name)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_authors_cuda_draws_are_their_cuda_random_calls():
    """The authors draw on the model's device: a CUDA generator (Philox) gives other masks than
    the CPU's (mt19937), so each device type matches their run on that device type."""
    prompt_lengths, response_lengths, uids, seq_len = _rows_of_the_authors()
    config = MCConfig(**AUTHORS)
    cuda = sample_draws(
        config, prompt_lengths.cuda(), response_lengths.cuda(), seq_len, uids=uids.cuda(), seed=0
    )
    want = authors_masks(
        uids.tolist(), prompt_lengths, response_lengths, seq_len, config.num_copies, device="cuda"
    )
    assert torch.equal(cuda.mask.view(-1, config.num_copies, seq_len).transpose(0, 1), want)
    cpu = sample_draws(config, prompt_lengths, response_lengths, seq_len, uids=uids, seed=0)
    assert torch.equal(cuda.mask.sum(-1).cpu(), cpu.mask.sum(-1))  # the levels: integer hashes
    assert not torch.equal(cuda.mask.cpu(), cpu.mask)
