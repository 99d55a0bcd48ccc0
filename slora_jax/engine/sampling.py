"""Per-request sampling parameters and the batched on-device sampler.

Every row of a batch carries its own temperature, top-k, top-p and PRNG key, so
greedy and sampled requests share one jitted step. A row's key is
`fold_in(request_key, token_index)`: it depends only on the request's seed (or,
without one, on the engine seed and the request id) and on how many tokens the
request has generated, never on the batch it shares or the engine step it runs
in. The same seed therefore gives the same tokens, also after a preemption that
recomputes the request.

Sampling is Gumbel-max (what `jax.random.categorical` does) with the Gumbel
noise drawn in vocabulary order from the row's key; top-k/top-p only mask
tokens out. A row's token thus does not depend on which code path the batch
takes (all greedy / temperature only / filtered), only on its own parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.errors import RequestError
from jax import lax

# Temperatures below this are greedy: logits / T would overflow fp32 long
# before the distribution differs from argmax.
MIN_TEMPERATURE = 1e-5

_U32 = 0xFFFFFFFF
_U64_END = 1 << 64


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 is greedy (argmax). top_k 0 and top_p 1.0 switch those
    filters off; top-k applies before top-p, both after temperature. seed None
    derives the request's key from the engine seed and the request id.
    Generation stops after `max_new_tokens`, on a token in `stop_token_ids`, or
    on an EOS token unless `ignore_eos`; the stopping token is kept in the output.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < _U64_END):
            raise RequestError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            raise RequestError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}")
        bad = [t for t in self.stop_token_ids if not _is_int(t) or t < 0]
        if bad:
            raise RequestError(f"stop_token_ids must be non-negative integers, got {bad!r}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise RequestError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def finish_reason(self, token_id: int, num_generated: int, eos_token_ids: Sequence[int] = ()) -> str | None:
        """"stop" or "length" if the request ends with `token_id` (its `num_generated`-th token), else None."""
        if token_id in self.stop_token_ids or (not self.ignore_eos and token_id in eos_token_ids):
            return "stop"
        if num_generated >= self.max_new_tokens:
            return "length"
        return None


# ---------------------------------------------------------------- keys


def _check_u64(name: str, n) -> int:
    if not _is_int(n) or not 0 <= n < _U64_END:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {n!r}")
    return int(n)


@functools.partial(jax.jit, static_argnames="seeded")
def _derive_key(words_4: jax.Array, seeded: bool) -> jax.Array:
    # words: [seed or engine_seed lo, hi, request_id lo, hi]; jax.random.key
    # alone would silently truncate a seed to 32 bits.
    key = jax.random.fold_in(jax.random.key(words_4[0]), words_4[1])
    if not seeded:
        key = jax.random.fold_in(jax.random.fold_in(key, words_4[2]), words_4[3])
    return key


def request_key(seed: int | None, request_id: int, engine_seed: int = 0) -> jax.Array:
    """A request's base PRNG key (typed, scalar).

    With a seed it depends on the seed only; without one, on `engine_seed` and
    `request_id`. All three are integers in [0, 2**64).
    """
    request_id = _check_u64("request_id", request_id)
    seeded = seed is not None
    n = _check_u64("seed", seed) if seeded else _check_u64("engine_seed", engine_seed)
    words = np.array([n & _U32, n >> 32, request_id & _U32, request_id >> 32], np.uint32)
    return _derive_key(words, seeded)


@functools.lru_cache(maxsize=None)
def _host_device():
    """JAX's CPU device, or None where only accelerators are enabled (`JAX_PLATFORMS`)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def request_key_data(seed: int | None, request_id: int, engine_seed: int = 0) -> np.ndarray:
    """`request_key` as host uint32 key data ([2] for threefry); compute once per request.

    Computed on JAX's CPU device (the same bits: threefry is defined bit for bit): on
    a GPU, reading back a result computed there waits for every step queued before it, so
    each `Engine.submit` stalled the overlapped steps (~12 ms a submit in S-LoRA's S1 trace).
    """
    with jax.default_device(_host_device()):
        return np.asarray(jax.random.key_data(request_key(seed, request_id, engine_seed)))


def as_keys(keys: jax.Array | np.ndarray) -> jax.Array:
    """Typed PRNG keys [B] from typed keys [B] or raw uint32 key data [B, K]."""
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return keys
    return jax.random.wrap_key_data(jnp.asarray(keys, jnp.uint32))


def step_keys(base_keys_B: jax.Array | np.ndarray, token_index_B: jax.Array | np.ndarray) -> jax.Array:
    """Each row's key for its `token_index`-th generated token (0 = the first): typed keys [B]."""
    return jax.vmap(jax.random.fold_in)(as_keys(base_keys_B), jnp.asarray(token_index_B, jnp.uint32))


# ---------------------------------------------------------------- sampler


def _gumbel_BxV(keys_B: jax.Array, V: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys_B)


SAMPLING_MODES = ("greedy", "unfiltered", "filtered")


def sampling_mode(temperature_B, top_k_B, top_p_B) -> str:
    """The path a batch needs, decided on the host: "greedy" (every row), "unfiltered"
    (temperature only) or "filtered" (some sampled row has top-k or top-p).

    A top_k at or above the vocabulary counts as a filter here (the host does not know V);
    that only sends the batch down the sorted path, which gives the same tokens.
    """
    greedy_B = np.asarray(temperature_B) < MIN_TEMPERATURE
    if greedy_B.all():
        return "greedy"
    filters_B = ~greedy_B & ((np.asarray(top_k_B) > 0) | (np.asarray(top_p_B) < 1.0))
    return "filtered" if filters_B.any() else "unfiltered"


def sample(
    logits_BxV: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    keys_B: jax.Array,
    mode: str | None = None,
) -> jax.Array:
    """Next token of every row: int32 [B]. Pure and jittable; shapes are static.

    logits_BxV: fp32 (other float dtypes are upcast). temperature_B: float,
    < MIN_TEMPERATURE = greedy (exactly `jnp.argmax(logits)`). top_k_B: int32,
    0 or >= V = off. top_p_B: float in (0, 1], 1 = off; keeps the smallest set
    of most probable tokens (after temperature and top-k) whose probability sums
    to >= top_p, always at least the top token. keys_B: typed PRNG keys [B] or
    uint32 key data [B, K], e.g. from `step_keys`.

    One stable sort of the logits per row, only when some sampled row filters;
    an all-greedy batch does no sort and draws no noise. `mode` (static, one of
    `SAMPLING_MODES`, from `sampling_mode` on the host) picks that path at trace
    time; None picks it on the device with `lax.switch`, which on a GPU makes
    the host wait for the device at that point of the computation (XLA reads
    the branch index back), so a serving loop should pass `mode`.
    """
    if mode is not None and mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES} or None, got {mode!r}")
    logits_BxV = jnp.asarray(logits_BxV, jnp.float32)
    B, V = logits_BxV.shape
    keys_B = as_keys(keys_B)
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    is_greedy_B = jnp.asarray(temperature_B) < MIN_TEMPERATURE
    temperature_B = jnp.where(is_greedy_B, 1.0, temperature_B).astype(jnp.float32)
    top_k_B = jnp.asarray(top_k_B, jnp.int32)
    top_k_B = jnp.where((top_k_B <= 0) | (top_k_B > V), V, top_k_B)
    top_p_B = jnp.asarray(top_p_B, jnp.float32)
    filters_B = ~is_greedy_B & ((top_k_B < V) | (top_p_B < 1.0))

    def all_greedy():
        return greedy_B

    def unfiltered():
        scaled_BxV = logits_BxV / temperature_B[:, None]
        return jnp.argmax(scaled_BxV + _gumbel_BxV(keys_B, V), axis=-1).astype(jnp.int32)

    def filtered():
        # Sort the raw logits (the order of logits / T): top_k = 1 is then exactly argmax, ties included.
        iota_BxV = lax.broadcasted_iota(jnp.int32, (B, V), 1)
        neg_sorted_BxV, idx_BxV = lax.sort((-logits_BxV, iota_BxV), dimension=1, is_stable=True, num_keys=1)
        scaled_BxV = -neg_sorted_BxV / temperature_B[:, None]  # rank order
        rank_V = jnp.arange(V, dtype=jnp.int32)
        keep_BxV = rank_V[None, :] < top_k_B[:, None]
        probs_BxV = jax.nn.softmax(jnp.where(keep_BxV, scaled_BxV, -jnp.inf), axis=-1)
        # Probability of all better-ranked tokens; 0 for the top one, so it always stays.
        before_BxV = jnp.pad(jnp.cumsum(probs_BxV, axis=-1)[:, :-1], ((0, 0), (1, 0)))
        keep_BxV &= (before_BxV < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
        noise_BxV = jnp.take_along_axis(_gumbel_BxV(keys_B, V), idx_BxV, axis=1)
        rank_B = jnp.argmax(jnp.where(keep_BxV, scaled_BxV + noise_BxV, -jnp.inf), axis=-1)
        return jnp.take_along_axis(idx_BxV, rank_B[:, None], axis=1)[:, 0]

    paths = (all_greedy, unfiltered, filtered)
    if mode is None:
        branch = jnp.where(jnp.all(is_greedy_B), 0, jnp.where(jnp.any(filters_B), 2, 1))
        sampled_B = lax.switch(branch, paths)
    else:
        sampled_B = paths[SAMPLING_MODES.index(mode)]()
    return jnp.where(is_greedy_B, greedy_B, sampled_B)


# ---------------------------------------------------------------- host batch


@functools.cache
def _key_data_shape() -> tuple[int, ...]:
    return jax.random.key_data(jax.random.key(0)).shape


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["temperature", "top_k", "top_p", "key_data", "token_index"],
    meta_fields=["mode"],
)
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """The sampler's per-row inputs for one step, padded to a bucket size (a pytree).

    Padding rows are greedy; their tokens are to be ignored. `mode` (static: a jitted
    step compiles once per mode met) is the sampler path the rows need.
    """

    temperature: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int32
    top_p: np.ndarray  # [B] float32
    key_data: np.ndarray  # [B, K] uint32, each row's request key (`request_key_data`)
    token_index: np.ndarray  # [B] int32, tokens the row's request has generated so far
    mode: str = "filtered"  # `sampling_mode` of the rows; the sorted path serves every row

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        key_data: Sequence[np.ndarray],
        token_index: Sequence[int],
        size: int | None = None,
    ) -> SamplingBatch:
        """Rows from each request's params, key data and token index, padded to `size` rows."""
        n = len(params)
        size = n if size is None else size
        if len(key_data) != n or len(token_index) != n:
            raise ValueError(f"got {n} params, {len(key_data)} key_data and {len(token_index)} token_index rows")
        if size < n:
            raise ValueError(f"size {size} is smaller than the {n} rows")
        key_shape = _key_data_shape()
        batch = cls(
            temperature=np.zeros(size, np.float32),
            top_k=np.zeros(size, np.int32),
            top_p=np.ones(size, np.float32),
            key_data=np.zeros((size, *key_shape), np.uint32),
            token_index=np.zeros(size, np.int32),
        )
        if n:
            batch.temperature[:n] = [p.temperature for p in params]
            batch.top_k[:n] = [min(p.top_k, np.iinfo(np.int32).max) for p in params]
            batch.top_p[:n] = [p.top_p for p in params]
            batch.key_data[:n] = np.stack([np.asarray(k, np.uint32) for k in key_data])
            batch.token_index[:n] = token_index
        return dataclasses.replace(batch, mode=sampling_mode(batch.temperature, batch.top_k, batch.top_p))


def sample_batch(logits_BxV: jax.Array, batch: SamplingBatch) -> jax.Array:
    """`sample` with a `SamplingBatch` (inside the jitted step): int32 [B]."""
    return sample(logits_BxV, batch.temperature, batch.top_k, batch.top_p,
                  step_keys(batch.key_data, batch.token_index), batch.mode)
