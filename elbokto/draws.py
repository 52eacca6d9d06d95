"""Deterministic Monte-Carlo draws: which response tokens each copy masks, and with what weight.

A batch of B examples becomes B*K *copies* (K = n_t * n_yt: n_t noise levels, n_yt masks per level).
Every random number is a pure function of (seed, draw index, uid, copy, relative position) computed
by a counter-based integer hash (splitmix64's finaliser in wrapping int64 arithmetic) on the inputs'
device. There is no RNG state, so a draw does not depend on the batch order or its companions, the
reference ELBO can be precomputed offline and matched exactly, a resumed run replays its draws, and
CPU and CUDA give identical draws (integer ops and correctly rounded float64 ops only).

Estimators (DESIGN.md §2; both are unbiased for the ELBO, see ``sample_draws`` for the details):

- ``fixed_count``: l ~ Uniform{1..L}, a uniformly random subset of exactly l response tokens,
  weight L / l;
- ``bernoulli``: t ~ Uniform(0, 1], each response token masked independently with probability t,
  weight 1 / t.

Block diffusion (``MCConfig.block_size = b``): the sequence is cut into blocks of b positions
counted from position 0 (a block may hold prompt and response tokens; prompt tokens are never
masked), and the ELBO is the block ELBO

    B = sum_k E[ (1/t_k) sum_{masked response positions i of block k}
                 log p(y_i | noisy block k, clean blocks < k) ]

with an independent noise level per block and copy. Each block is one *window*: the draws above
run on the n_k response positions of block k as they run on the L response positions of a
whole-response copy (l_k ~ U{1..n_k} with weight n_k / l_k, or t_k with weight 1 / t_k), with the
block index added to the hash counter so that blocks are independent. The exact identity of
DESIGN.md §2 then holds block by block: B = sum_k sum_{S subset of R_k, S != {}}
(|S|-1)! (n_k-|S|)! / n_k! * sum_{i in S} log p(y_i | block k with S masked, clean blocks < k),
R_k the response positions of block k. :mod:`elbokto.block` runs the matching forward.

The authors' recipe (``MCConfig.draw_source = "authors"``, the official preset): the same
fixed-count law with independent levels, drawn by the random calls of the ELBO-KTO authors'
``precompute_bref.py`` / ``train.py`` instead of the hash: a seed per example from its uid (their
row index), the levels by an integer hash of it, each copy's positions by ``torch.rand`` of a
``torch.Generator`` on the draws' device. Their masks exactly, on the device type they drew on
(a CUDA generator gives other numbers than the CPU's); see ``_authors_draws``.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from elbokto.renames import renamed_keywords

__all__ = ["Draws", "MCConfig", "sample_draws"]


@dataclass
class MCConfig:
    """How the Monte-Carlo ELBO estimate draws its copies. The estimator, n_t and n_yt are the
    ELBO-KTO paper's; antithetic levels and redraws at each draw index are elbokto's own defaults
    (the authors' code has neither: ``elbokto.presets``, "official")."""

    estimator: Literal["fixed_count", "bernoulli"] = field(
        default="fixed_count",
        metadata={
            "help": "ELBO estimator: 'fixed_count' (mask exactly l ~ U{1..L} response tokens, "
            "weight L/l; lower variance) or 'bernoulli' (mask each token with probability "
            "t ~ U(0,1], weight 1/t)."
        },
    )
    n_t: int = field(default=8, metadata={"help": "Noise levels (t or l) drawn per example."})
    n_yt: int = field(default=1, metadata={"help": "Masks drawn per noise level."})
    antithetic: bool = field(
        default=True,
        metadata={
            "help": "Stratify the n_t noise levels of an example: level j uses (j + u) / n_t with "
            "one u per example, instead of n_t independent uniforms."
        },
    )
    fixed_draws: bool = field(
        default=False,
        metadata={
            "help": "Draw each example's copies once and reuse them at every draw index (the "
            "authors' code seeds an example's masks by the example alone); default: the draw "
            "index (the epoch in training) redraws them, so that revisits see fresh masks."
        },
    )
    share_across_batch: bool = field(
        default=False,
        metadata={
            "help": "Give every example of a batch the same noise levels and the same uniform per "
            "relative response position (common random numbers across items; the draws then depend "
            "on (seed, draw index) only, not on the example uid)."
        },
    )
    eps: float = field(
        default=1e-3,
        metadata={
            "help": "Bernoulli only: a copy whose t falls below eps (probability eps) is drawn "
            "from the size-biased law (one uniformly chosen response token plus each other token "
            "with probability t, weight L/|S|) instead of weight 1/t. Exactly unbiased; bounds "
            "every weight by max(1/eps, L). 0 disables it (plain 1/t, whose variance grows like "
            "log(1/t_min))."
        },
    )
    draw_source: Literal["hash", "authors"] = field(
        default="hash",
        metadata={
            "help": "Where the random numbers come from. 'hash': elbokto's counter-based hash of "
            "(seed, draw index, uid, copy, position), the same on every device. 'authors': the "
            "ELBO-KTO authors' recipe (precompute_bref.py, train.py), each example's K levels and "
            "masks seeded by its uid, which must then be its row number (--uid_source row); masks "
            "from a torch.Generator on the draws' device, so CUDA and CPU draw different masks. "
            "Needs fixed_count, n_yt 1, no antithetic levels, fixed_draws, no shared or block "
            "draws. Seed 0 is the authors' run."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Block-diffusion models (LLaDA2.0: 32, SDAR: its config's block_size): score "
            "the block ELBO, blocks of this many positions counted from position 0, an "
            "independent noise level per block, every block in one forward over [x_t ; x_0]. "
            "None: the whole-response ELBO of a bidirectional model. Default: the model config's "
            "block size where it has one."
        },
    )

    def __post_init__(self) -> None:
        if self.estimator not in ("fixed_count", "bernoulli"):
            raise ValueError(f"estimator={self.estimator!r}; expected 'fixed_count' or 'bernoulli'")
        for name in ("n_t", "n_yt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an integer >= 1")
        for name in ("antithetic", "fixed_draws", "share_across_batch"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}; expected a bool")
        if (
            isinstance(self.eps, bool)
            or not isinstance(self.eps, (int, float))
            or not 0 <= self.eps < 1
        ):
            raise ValueError(f"eps={self.eps!r}; expected a float in [0, 1)")
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise ValueError(f"block_size={self.block_size!r}; expected None or an integer >= 1")
        if self.draw_source not in ("hash", "authors"):
            raise ValueError(f"draw_source={self.draw_source!r}; expected 'hash' or 'authors'")
        if self.draw_source == "authors":
            self._check_authors()

    def _check_authors(self) -> None:
        """The authors' recipe has K = n_mc_samples draws, each an independent l ~ U{1..L} and
        an l-subset, seeded by the example alone: refuse every setting it has no counterpart of."""
        wanted = {
            "estimator": "fixed_count",
            "n_yt": 1,
            "antithetic": False,
            "fixed_draws": True,
            "share_across_batch": False,
            "block_size": None,
        }
        wrong = {k: getattr(self, k) for k, v in wanted.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(
                f"draw_source='authors' follows the authors' recipe, which has "
                f"{', '.join(f'{k}={v!r}' for k, v in wanted.items() if k in wrong)}"
                f"; got {', '.join(f'{k}={v!r}' for k, v in wrong.items())}"
            )

    @property
    def num_copies(self) -> int:
        """K = n_t * n_yt: copies per example."""
        return self.n_t * self.n_yt


@dataclass(frozen=True)
class Draws:
    """The copies of one batch. C = B * K; copy c = b*K + j*n_yt + i (example b, level j, mask i).

    Attributes:
        mask: bool [C, seq_len]. True = replaced by the mask token; only inside the example's
            response window [prompt_len, prompt_len + response_len).
        weight: float32, ALREADY divided by K. Whole-response draws: [C], one weight per copy, so
            that B_hat[b] = sum over the copies c of b of weight[c] * sum_{p: mask[c, p]}
            log pi(y_p | ...); 0 for an example with an empty response. Block draws: [C, seq_len],
            the weight of the block holding each position (n_k / (l_k K) or 1 / (t_k K)), 0
            outside the response, and B_hat[b] = sum_c sum_p mask[c, p] * weight[c, p] * log p.
        sample_index: int64 [C]. The example b each copy belongs to (c // K).
        t: float32, the shape of ``weight``. Noise level, for diagnostics: t for bernoulli, l / L
            (l_k / n_k per block) for fixed_count, 0 for an empty response (block).
        block_size: None for whole-response draws; b for block draws, whose log-probabilities
            condition on the clean earlier blocks only (see :mod:`elbokto.block`).
    """

    mask: Tensor
    weight: Tensor
    sample_index: Tensor
    t: Tensor
    block_size: int | None = None


# --- counter-based hash -------------------------------------------------------------------------
# torch has no usable uint64 arithmetic: the splitmix64 finaliser runs on int64, whose + and * wrap
# modulo 2^64 on CPU and CUDA like uint64 would. Right shifts of int64 are arithmetic, so the
# sign-extended high bits are masked off to get the logical shift.


def _int64(x: int) -> int:
    """The int64 with the same low 64 bits as the Python int ``x``."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MUL1 = _int64(0xBF58476D1CE4E5B9)
_MUL2 = _int64(0x94D049BB133111EB)
_INT64_MAX = (1 << 63) - 1


def pair_uid(first: Tensor, second: Tensor) -> Tensor:
    """int64 uid of an ordered pair of examples (e.g. the KL baseline's mismatched pairs):
    ``first * golden + second``, wrapping modulo 2^64, so their draws are their own."""
    return first * _GOLDEN + second


# Independent streams, so that e.g. the noise level and the mask of a copy are not correlated.
_STREAM_LEVEL, _STREAM_POSITION, _STREAM_FORCED = 1, 2, 3
_STREAM_SHARED = 1 << 8  # or-ed in when draws are shared across the batch


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 by 0 < k < 64."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64 finaliser: a bijection of int64 with full avalanche."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def _combine(h: Tensor | int, v: Tensor) -> Tensor:
    """Hash of the key sequence (..., v) from the hash h of (...); broadcasts."""
    return _mix(h ^ _mix(v + _GOLDEN))


def _host_key(*values: int) -> int:
    """Hash of a sequence of Python ints, on CPU tensors: no host-device copy, hence no sync."""
    h = torch.zeros((), dtype=torch.int64)
    for v in values:
        h = _combine(h, torch.tensor(_int64(v)))
    return int(h)


def _sample_index(batch: int, num_copies: int, device: torch.device) -> Tensor:
    """int64 [B*K]: the example c // K that copy c belongs to."""
    return torch.arange(batch, device=device).repeat_interleave(num_copies)


def _fixed_count_weight(count: Tensor, n: Tensor, num_copies: int) -> tuple[Tensor, Tensor]:
    """float64 weight n / (l K) and t = l / n of copies that mask l = ``count`` of their n
    response tokens (int64, broadcast); both 0 where n = 0."""
    has_response = n > 0
    denominator = count.clamp(min=1).to(torch.float64) * num_copies
    weight = torch.where(has_response, n / denominator, 0.0)
    t = torch.where(has_response, count.to(torch.float64) / n.clamp(min=1), 0.0)
    return weight, t


def _unit(h: Tensor) -> Tensor:
    """float64 uniform in [0, 1) from the top 53 bits of h (exact: k * 2^-53)."""
    return _shr(h, 11).to(torch.float64) * 2.0**-53


@renamed_keywords(step="draw_index")
def sample_draws(
    config: MCConfig,
    prompt_lengths: Tensor,
    response_lengths: Tensor,
    seq_len: int,
    *,
    uids: Tensor,
    seed: int,
    draw_index: int = 0,
    validate: bool = True,
) -> Draws:
    """Draw the K masked copies of every example of a batch, vectorised on the inputs' device.

    Args:
        config: the Monte-Carlo configuration.
        prompt_lengths: int64 [B]. The response of example b starts at position prompt_lengths[b].
        response_lengths: int64 [B]. L_b >= 0 response tokens, the only maskable ones.
        seq_len: length of the (padded) sequences; prompt_len + response_len <= seq_len.
        uids: int64 [B]. Example ids, any int64 (negative or hashed ids are fine); the draws of an
            example depend on its uid, never on its place in the batch.
        seed: any Python int (reduced modulo 2^64).
        draw_index: any Python int, e.g. the epoch or optimizer step, so that revisits draw
            afresh (the old keyword ``step=`` works, with a warning, for one release).
        validate: check the length values; that costs one host sync when the inputs live on an
            accelerator, so a hot loop with trusted inputs may pass False.

    Returns:
        Draws with C = B * K copies; the K copies of example b are rows b*K .. b*K + K - 1.

    Noise levels (level j of n_t, shared by the n_yt masks of that level): with ``antithetic``,
    one u ~ U[0, 1) per (uid, draw index) and level j uses the stratum j: fixed_count takes
    a_j = (j + u) / n_t and l = floor(a_j * L) + 1; bernoulli takes t_j = (j + 1 - u) / n_t in
    (0, 1].
    Otherwise each level has its own u_j (a_j = u_j, t_j = 1 - u_j). Every copy's t (or l) thus
    keeps its exact marginal law U(0, 1] (or U{1..L}): nothing is floored, and the estimate is
    unbiased (up to the 2^-53 resolution of the uniforms).

    Masks: fixed_count masks the l response positions with the smallest hash keys, a uniformly
    random l-subset, weight L / (l K). Bernoulli masks position p when its uniform is < t, weight
    1 / (t K); an empty mask is legal and contributes 0. If t < eps the copy instead masks one
    uniformly chosen response position plus each other one with probability t, with weight
    L / (|S| K): P(S) = |S|/L * t^(|S|-1) (1-t)^(L-|S|), so E[L/|S| * F(S)] = E_bern(t)[F(S)] / t
    for every F with F(empty) = 0, i.e. the same expectation as the 1/t estimator at that t, with a
    bounded weight. An example with L = 0 gets no mask and weight 0.

    With ``share_across_batch`` the uid is left out of the hash: all examples share u (or u_j) and
    the per-relative-position uniforms, so equal-length responses get identical masks.

    Block draws (``config.block_size = b``): every block k of an example is a window of its own,
    the n_k response positions in [k b, (k + 1) b), and everything above applies per window with
    L replaced by n_k: its own noise levels (the block index joins the hash counter, so blocks are
    independent), its own masks, weight n_k / (l_k K) or 1 / (t_k K). Blocks without response
    positions get no mask. ``weight`` and ``t`` are then per position, [C, seq_len].

    ``draw_source="authors"`` replaces all of the above by the authors' random calls
    (``_authors_draws``): the draw index is not used, seed 0 is their global seed, and the masks
    come from a ``torch.Generator`` on the inputs' device (one host sync).
    """
    _check_inputs(prompt_lengths, response_lengths, seq_len, uids, validate)
    if config.draw_source == "authors":
        return _authors_draws(config.n_t, prompt_lengths, response_lengths, seq_len, uids, seed)
    device = prompt_lengths.device
    n_t, n_yt, num_copies = config.n_t, config.n_yt, config.num_copies
    batch = prompt_lengths.shape[0]
    # Windows: G per example, window g covering the columns [g W, (g + 1) W) of a [G, W] grid of
    # positions. Whole response: G = 1, W = seq_len. Blocks: W = b, G = ceil(seq_len / b).
    width = config.block_size or max(seq_len, 1)
    num_windows = -(-seq_len // width) if config.block_size else 1
    first = torch.arange(num_windows, device=device) * width  # [G]
    response_end = (prompt_lengths + response_lengths)[:, None]
    starts = torch.maximum(prompt_lengths[:, None], first).clamp(max=first + width)  # [B, G]
    lengths = (torch.minimum(response_end, first + width) - starts).clamp(min=0)  # [B, G]

    def stream(tag: int) -> Tensor:
        """Hash of (seed, stream, draw index[, uid][, block]): int64 [B, G]."""
        if config.share_across_batch:
            h = torch.full(
                (batch, 1), _host_key(seed, tag | _STREAM_SHARED, draw_index), device=device
            )
        else:
            h = _combine(_host_key(seed, tag, draw_index), uids)[:, None]
        # Whole-response draws keep the hash without a block index (their values predate blocks).
        return _combine(h, torch.arange(num_windows, device=device)) if config.block_size else h

    copy = torch.arange(num_copies, device=device)
    level = copy // n_yt  # [K]
    h_level = stream(_STREAM_LEVEL)
    if config.antithetic:
        u = _unit(h_level)[:, :, None].expand(batch, num_windows, num_copies)
        stratum, strata = level.to(torch.float64), n_t
    else:
        u = _unit(_combine(h_level[:, :, None], level))  # [B, G, K], one uniform per level
        stratum, strata = torch.zeros(num_copies, dtype=torch.float64, device=device), 1

    n = lengths[:, :, None]  # [B, G, 1]
    relative = first[:, None] + torch.arange(width, device=device) - starts[:, :, None]  # [B, G, W]
    in_window = ((relative >= 0) & (relative < n))[:, :, None, :]  # [B, G, 1, W]
    h_position = _combine(
        _combine(stream(_STREAM_POSITION)[:, :, None], copy)[..., None], relative[:, :, None, :]
    )  # [B, G, K, W]
    has_response = n > 0

    if config.estimator == "fixed_count":
        a = (stratum + u) / strata  # [B, G, K] in [0, 1]; may round up to 1.0, hence the clamp
        count = torch.minimum(torch.floor(a * n).to(torch.int64) + 1, n)
        # Ranking iid keys picks a uniformly random subset; positions outside the window sort last
        # (in-window keys are < 2^62, the sentinel is 2^63 - 1).
        keys = torch.where(in_window, _shr(h_position, 2), _INT64_MAX)
        order = torch.argsort(keys, dim=-1, stable=True)
        take = torch.arange(width, device=device) < count[..., None]
        mask = torch.zeros_like(take).scatter_(-1, order, take)
        weight, t = _fixed_count_weight(count, n, num_copies)
    else:
        t = (stratum + 1.0 - u) / strata  # [B, G, K] in (0, 1]
        mask = in_window & (_unit(h_position) < t[..., None])
        weight = 1.0 / (t * num_copies)
        if config.eps > 0:
            small = t < config.eps
            forced = _shr(_combine(stream(_STREAM_FORCED)[:, :, None], copy), 1) % n.clamp(min=1)
            mask = mask | (
                small[..., None] & in_window & (relative[:, :, None, :] == forced[..., None])
            )
            size = mask.sum(-1).clamp(min=1).to(torch.float64)
            weight = torch.where(small, n / (size * num_copies), weight)
        weight = torch.where(has_response, weight, 0.0)
        t = torch.where(has_response, t, 0.0)

    def per_copy(x: Tensor) -> Tensor:
        """[B, G, K, W] -> [C, seq_len]: copies as rows, the windows laid side by side."""
        return x.transpose(1, 2).reshape(batch * num_copies, num_windows * width)[:, :seq_len]

    if config.block_size:
        weight = per_copy(torch.where(in_window, weight[..., None], 0.0))
        t = per_copy(torch.where(in_window, t[..., None], 0.0))
    else:
        weight, t = weight.reshape(-1), t.reshape(-1)
    return Draws(
        mask=per_copy(mask),
        weight=weight.to(torch.float32),
        sample_index=_sample_index(batch, num_copies, device),
        t=t.to(torch.float32),
        block_size=config.block_size,
    )


# --- the authors' recipe -----------------------------------------------------------------------
# precompute_bref.py and train.py of github.com/vaibhavjindal/elbo-kto, in wrapping int64 (the same
# low 64 bits as their Python-int arithmetic masked to 64 bits).
AUTHORS_GLOBAL_SEED = 0x1A2B3C4D5E6F7788
_AUTHORS_TAG = _int64(0xD1342543DE82EF95)
_UINT64 = (1 << 64) - 1


def _authors_mix64(x: Tensor) -> Tensor:
    """Their ``mix64``: splitmix64's golden-ratio step, then its finaliser (``_mix``)."""
    return _mix(x + _GOLDEN)


def _authors_global_seed(seed: int) -> int:
    """Their GLOBAL_SEED for seed 0; another seed gives another, unrelated global seed (redraws)."""
    if seed == 0:
        return AUTHORS_GLOBAL_SEED
    return int(_authors_mix64(torch.tensor(_int64(AUTHORS_GLOBAL_SEED ^ seed))))


def _unsigned_mod(x: Tensor, n: Tensor) -> Tensor:
    """(x read as uint64) mod n, for int64 x and 1 <= n < 2^62: x = 2 (x >> 1) + (x & 1)."""
    return (2 * (_shr(x, 1) % n) + (x & 1)) % n


def _authors_draws(
    num_copies: int,
    prompt_lengths: Tensor,
    response_lengths: Tensor,
    seq_len: int,
    uids: Tensor,
    seed: int,
) -> Draws:
    """The K = ``num_copies`` copies of every example as the authors draw them.

    For the example of uid i (their row index ``idx``) with L response tokens starting at p, and
    k = 1..K: base = mix64(GLOBAL_SEED ^ i); l_k = 1 + mix64(derive_seed(base, k, 0)) mod L (an
    integer hash, no RNG); a ``torch.Generator`` on the draws' device seeded with
    derive_seed(base, k, 1) draws ``torch.rand((L,))``, and the positions p + argsort(r)[:l_k]
    are masked; derive_seed(base, k, tag) = mix64(base ^ k * golden ^ tag * 0xD1342543DE82EF95).
    The same calls in the same order as theirs, so the masks are bit-identical to their run on
    the same device type (CPU: mt19937; CUDA: Philox, whose numbers differ from the CPU's).
    Weight L / (l_k K), t = l_k / L, as in :func:`sample_draws`; an empty response gets no mask.

    One host sync: the lengths set the shapes of the random calls, and the seeds are Python ints.
    """
    device = prompt_lengths.device
    batch = prompt_lengths.shape[0]
    starts, lengths, uids = torch.stack([prompt_lengths, response_lengths, uids]).cpu()
    n = lengths[:, None]  # [B, 1]
    base = _authors_mix64(_int64(_authors_global_seed(seed)) ^ uids)[:, None]  # [B, 1]
    draw = base ^ (torch.arange(1, num_copies + 1) * _GOLDEN)  # [B, K], draws k = 1..K
    level_seed = _authors_mix64(draw)  # derive_seed(base, k, 0); l_from_seed mixes it again
    count = torch.where(n > 0, 1 + _unsigned_mod(_authors_mix64(level_seed), n.clamp(min=1)), 0)
    selects = _authors_mix64(draw ^ _AUTHORS_TAG).tolist()
    mask = torch.zeros(batch * num_copies, seq_len, dtype=torch.bool, device=device)
    for b, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        for j in range(num_copies if length > 0 else 0):
            generator = torch.Generator(device=device)
            generator.manual_seed(selects[b][j] & _UINT64)
            r = torch.rand((length,), generator=generator, device=device)
            mask[b * num_copies + j, start + torch.argsort(r)[: int(count[b, j])]] = True
    weight, t = _fixed_count_weight(
        count.reshape(-1), n.expand(batch, num_copies).reshape(-1), num_copies
    )
    return Draws(
        mask=mask,
        weight=weight.to(device, torch.float32),
        sample_index=_sample_index(batch, num_copies, device),
        t=t.to(device, torch.float32),
    )


def _check_inputs(
    prompt_lengths: Tensor, response_lengths: Tensor, seq_len: int, uids: Tensor, validate: bool
) -> None:
    tensors = {"prompt_lengths": prompt_lengths, "response_lengths": response_lengths, "uids": uids}
    for name, x in tensors.items():
        if not isinstance(x, Tensor) or x.dtype != torch.int64 or x.dim() != 1:
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x)
            raise ValueError(f"{name} must be an int64 tensor [B]; got {got}")
    shapes = {name: x.shape[0] for name, x in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"batch sizes differ: {shapes}")
    devices = {name: str(x.device) for name, x in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"inputs on different devices: {devices}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len={seq_len!r}; expected an integer >= 0")
    if validate and prompt_lengths.numel() > 0:
        ends = prompt_lengths + response_lengths
        bad = (prompt_lengths < 0) | (response_lengths < 0) | (ends > seq_len)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"example {b}: prompt_length {int(prompt_lengths[b])} and response_length "
                f"{int(response_lengths[b])} must be >= 0 with a sum <= seq_len {seq_len}"
            )
