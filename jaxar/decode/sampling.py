"""Logits processors and token sampling.

Settings come in two forms. :class:`SamplingConfig` is static and hashable
(one setting for the whole batch, Python branching skips disabled
processors). :class:`SamplingParams` holds the same five settings as per-row
``[B]`` arrays traced into the program: the decode loops take this form, so a
new temperature, top-k, ... (or a mix of greedy and sampled rows) reuses the
compiled program. Every processor takes either a Python number or a per-row
array; with arrays a disabled setting (top_k 0, top_p 1, min_p 0, penalty 1)
leaves a row's logits bit-for-bit unchanged, exactly as skipping it would.

The processors reproduce Hugging Face ``transformers`` semantics
(``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper`` and ``MinPLogitsWarper`` with
``min_tokens_to_keep=1``), applied in the order ``generate`` applies them:
repetition penalty, temperature, top-k, top-p, min-p. Filtered entries are set
to ``-inf``.

Presence and frequency penalties follow OpenAI's (and vLLM's) definition:
``logit[v] -= presence * [count[v] > 0] + frequency * count[v]`` where
``count[v]`` is how often token ``v`` occurs among the tokens *generated so
far* (the prompt does not count, as in OpenAI's API and vLLM). They apply
after the repetition penalty and before temperature (vLLM's order), to greedy
rows too. The caller marks the generated tokens with ``output_mask`` (a mask
over ``prev_tokens``); without it these two penalties are not applied.

Greedy decoding (``temperature == 0``) follows ``generate(do_sample=False)``:
only the repetition penalty is applied (the warpers are sampling-only) and the
token is the argmax.

Randomness is per row: :func:`sample` takes one PRNG key per batch row, and
:func:`row_keys` derives them from one seed with ``fold_in(fold_in(key, row),
step)``, so a row's draws do not depend on which other rows share its batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SamplingConfig",
    "SamplingParams",
    "apply_repetition_penalty",
    "apply_presence_frequency_penalty",
    "token_counts",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "process_logits",
    "probabilities",
    "sample",
    "row_keys",
    "token_logprobs",
    "apply_cfg",
]

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling parameters (hashable: usable as a jit static argument).

    Attributes:
      temperature: softmax temperature; ``0`` means greedy (argmax).
      top_k: keep the ``top_k`` highest logits (ties with the k-th are kept,
        like Hugging Face); ``0`` disables it.
      top_p: nucleus sampling mass in ``(0, 1]``; ``1`` disables it.
      min_p: drop tokens whose probability is below ``min_p`` times the top
        token's, in ``[0, 1)``; ``0`` disables it.
      repetition_penalty: CTRL-style penalty (> 0); ``1`` disables it.
      presence_penalty: subtracted once from the logit of every token already
        generated (OpenAI semantics; negative values encourage repeats); ``0``
        disables it.
      frequency_penalty: subtracted from a token's logit once per time it has
        been generated; ``0`` disables it.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        # Normalise numeric types (numpy scalars, ints for floats) so equal
        # configs hash equally and never hold arrays. Validation is separate
        # (see validate()) so an invalid config can still be built and inspected.
        for name, typ in (("temperature", float), ("top_p", float), ("min_p", float),
                          ("repetition_penalty", float), ("presence_penalty", float), ("frequency_penalty", float)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
                raise TypeError(f"SamplingConfig.{name} must be a real number, got {value!r}")
            object.__setattr__(self, name, typ(value))
        top_k = self.top_k
        if isinstance(top_k, bool) or not hasattr(top_k, "__index__"):
            raise TypeError(f"SamplingConfig.top_k must be an integer, got {top_k!r}")
        object.__setattr__(self, "top_k", int(top_k))

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (``temperature == 0``)."""
        return self.temperature == 0.0

    def validate(self) -> "SamplingConfig":
        """Raise ``ValueError`` on out-of-range values; return ``self``."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables top-k), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables top-p), got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1) (0 disables min-p), got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be a finite number > 0 (1 disables it), "
                f"got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (0 disables it), got {getattr(self, name)}")
        return self

    @property
    def has_count_penalties(self) -> bool:
        """True when the presence or frequency penalty is on."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class SamplingParams(NamedTuple):
    """Per-row sampling settings, a pytree of ``[B]`` arrays traced into jit.

    Row ``b`` samples with ``temperature[b]`` (``0``: greedy, argmax after
    the repetition penalty), ``top_k[b]`` (``0``: off), ``top_p[b]`` (``1``:
    off), ``min_p[b]`` (``0``: off), ``repetition_penalty[b]`` (``1``: off),
    ``presence_penalty[b]`` and ``frequency_penalty[b]`` (``0``: off), with the
    meanings of :class:`SamplingConfig`. Build it with :meth:`build` (validates
    every row; it always fills the two count penalties, so switching them on
    does not change the pytree and does not recompile).
    """

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32
    # [B] float32: 1 - top_p computed in float64 on the host, then rounded, as
    # Hugging Face (and a static SamplingConfig) compare against it. None: 1 - top_p in float32.
    top_p_cut: Optional[jax.Array] = None
    presence_penalty: Optional[jax.Array] = None  # [B] float32; None: off
    frequency_penalty: Optional[jax.Array] = None  # [B] float32; None: off

    @classmethod
    def build(cls, sampling: Union[SamplingConfig, "SamplingParams", Sequence[SamplingConfig]],
              batch: int) -> "SamplingParams":
        """Per-row params for ``batch`` rows.

        ``sampling``: one :class:`SamplingConfig` for every row, a sequence of
        ``batch`` configs (one per row), or a :class:`SamplingParams` (checked
        for shape ``[batch]`` and, when concrete, for valid values).
        """
        if isinstance(sampling, SamplingConfig):
            rows = [sampling.validate()] * batch
        elif isinstance(sampling, SamplingParams):
            settings = tuple(jnp.asarray(x, d) for x, d in zip(sampling[:5], _PARAM_DTYPES))
            for name, value in zip(cls._fields, settings):
                if value.shape != (batch,):
                    raise ValueError(f"SamplingParams.{name} must have shape ({batch},), got {value.shape}")
            penalties = tuple(jnp.zeros((batch,), jnp.float32) if x is None else jnp.asarray(x, jnp.float32)
                              for x in (sampling.presence_penalty, sampling.frequency_penalty))
            for name, value in zip(("presence_penalty", "frequency_penalty"), penalties):
                if value.shape != (batch,):
                    raise ValueError(f"SamplingParams.{name} must have shape ({batch},), got {value.shape}")
            cut = sampling.top_p_cut
            if not any(isinstance(x, jax.core.Tracer) for x in settings + penalties):
                for b in range(batch):  # validate concrete values row by row
                    SamplingConfig(*(np.asarray(x)[b].item() for x in settings + penalties)).validate()
                if cut is None:
                    cut = np.float32(1.0 - np.asarray(settings[2], np.float64))
            return cls(*settings, top_p_cut=None if cut is None else jnp.asarray(cut, jnp.float32),
                       presence_penalty=penalties[0], frequency_penalty=penalties[1])
        else:
            rows = list(sampling)
            if len(rows) != batch:
                raise ValueError(f"got {len(rows)} per-row sampling configs for a batch of {batch}; give one per row")
            for r in rows:
                if not isinstance(r, SamplingConfig):
                    raise TypeError(f"per-row sampling settings must be SamplingConfig, got {type(r).__name__}")
                r.validate()
        settings = (jnp.asarray([getattr(r, name) for r in rows], dtype)
                    for name, dtype in zip(cls._fields, _PARAM_DTYPES))
        return cls(*settings, top_p_cut=jnp.asarray(np.array([1.0 - r.top_p for r in rows], np.float64), jnp.float32),
                   presence_penalty=jnp.asarray([r.presence_penalty for r in rows], jnp.float32),
                   frequency_penalty=jnp.asarray([r.frequency_penalty for r in rows], jnp.float32))

    @property
    def greedy(self) -> jax.Array:
        """bool ``[B]``: rows decoded by argmax (temperature 0)."""
        return self.temperature == 0.0

    def take_rows(self, rows) -> "SamplingParams":
        return SamplingParams(*(None if x is None else x[rows] for x in self))


_PARAM_DTYPES = (jnp.float32, jnp.int32, jnp.float32, jnp.float32, jnp.float32)

Sampling = Union[SamplingConfig, SamplingParams]


# ---------------------------------------------------------------------------
# Individual processors. All take logits [..., V] and return float32 [..., V].
# A setting is a Python number (static: a disabled processor is skipped) or an
# array of per-row values broadcastable to the logits' leading dims (leading
# axis first: [B] for [B, V] or [B, T, V] logits).
# ---------------------------------------------------------------------------

def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _is_static(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _per_row(value, logits, dtype=jnp.float32) -> jax.Array:
    """A per-row setting as ``[..., 1]``, broadcast against ``logits [..., V]``."""
    v = jnp.asarray(value, dtype)
    lead = logits.shape[:-1]
    if v.ndim > len(lead):
        raise ValueError(f"per-row setting of shape {v.shape} does not fit logits of shape {logits.shape}")
    v = v.reshape(v.shape + (1,) * (len(lead) - v.ndim))
    return jnp.broadcast_to(v, lead)[..., None]


def _when_any(pred, fn, x):
    """``fn(x)`` if any row needs it (a runtime branch, not a recompile), else ``x``."""
    return jax.lax.cond(jnp.any(pred), fn, lambda y: y, x)


def apply_repetition_penalty(logits, tokens, mask=None, penalty=1.0) -> jax.Array:
    """Hugging Face ``RepetitionPenaltyLogitsProcessor``.

    For every token id occurring among the valid previous tokens (prompt
    included), a positive logit is divided by ``penalty`` and a negative one
    multiplied by it; each id is penalised once however often it occurs.

    Args:
      logits: ``[..., V]``.
      tokens: ``[..., S]`` previous token ids, leading dims broadcastable to
        those of ``logits`` (e.g. ``[B, S]`` for ``[B, V]`` logits; use
        ``tokens[:, None]`` for ``[B, T, V]`` logits). Ids outside ``[0, V)``
        are ignored (Hugging Face ignores ids >= V).
      mask: optional bool ``[..., S]``, True where ``tokens`` is valid
        (padding positions False). ``None`` means all valid.
      penalty: the penalty (> 0), a number or per-row ``[B]``. ``1`` leaves
        the logits unchanged.
    """
    logits = _f32(logits)
    if _is_static(penalty):
        if penalty == 1.0:
            return logits
        if not penalty > 0:
            raise ValueError(f"repetition penalty must be > 0, got {penalty}")
    tokens = jnp.asarray(tokens)
    if tokens.ndim < 1:
        raise ValueError(f"tokens must have a trailing sequence axis, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    seq = tokens.shape[-1]
    try:
        tokens = jnp.broadcast_to(tokens, lead + (seq,))
        if mask is not None:
            mask = jnp.broadcast_to(jnp.asarray(mask, bool), lead + (seq,))
    except ValueError as e:
        raise ValueError(
            f"tokens/mask leading dims must broadcast to logits' {lead}; got tokens "
            f"{tokens.shape}" + ("" if mask is None else f", mask {jnp.shape(mask)}")) from e
    valid = (tokens >= 0) & (tokens < vocab)
    if mask is not None:
        valid = valid & mask
    # Invalid entries are sent to an extra column V that is dropped afterwards.
    idx = jnp.where(valid, tokens, vocab).astype(jnp.int32).reshape(-1, seq)
    rows = idx.shape[0]
    present = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], idx].set(True)
    present = present[:, :vocab].reshape(lead + (vocab,))
    pen = jnp.float32(penalty) if _is_static(penalty) else _per_row(penalty, logits)
    # A penalty of 1 gives x * 1 == x / 1 == x exactly: disabled rows are unchanged.
    penalised = jnp.where(logits < 0, logits * pen, logits / pen)
    return jnp.where(present, penalised, logits)


def token_counts(tokens, mask, vocab: int) -> jax.Array:
    """float32 ``[..., vocab]``: how often each id occurs among ``tokens [..., S]``
    where ``mask [..., S]`` is True (ids outside ``[0, vocab)`` are ignored)."""
    tokens = jnp.asarray(tokens)
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), tokens.shape)
    lead, seq = tokens.shape[:-1], tokens.shape[-1]
    valid = mask & (tokens >= 0) & (tokens < vocab)
    idx = jnp.where(valid, tokens, vocab).astype(jnp.int32).reshape(-1, seq)
    rows = idx.shape[0]
    counts = jnp.zeros((rows, vocab + 1), jnp.float32).at[jnp.arange(rows)[:, None], idx].add(1.0)
    return counts[:, :vocab].reshape(lead + (vocab,))


def apply_presence_frequency_penalty(logits, counts, presence=0.0, frequency=0.0) -> jax.Array:
    """OpenAI's presence / frequency penalties.

    ``logits - presence * (counts > 0) - frequency * counts``.

    Args:
      logits: ``[..., V]``.
      counts: ``[..., V]`` occurrences of each token among the tokens generated
        so far (see :func:`token_counts`), broadcastable to ``logits``.
      presence, frequency: numbers or per-row ``[B]`` arrays; a row with both
        at ``0`` is left bit-for-bit unchanged.
    """
    logits = _f32(logits)
    if _is_static(presence) and _is_static(frequency) and presence == 0.0 and frequency == 0.0:
        return logits
    counts = jnp.asarray(counts, jnp.float32)
    p = jnp.float32(presence) if _is_static(presence) else _per_row(presence, logits)
    f = jnp.float32(frequency) if _is_static(frequency) else _per_row(frequency, logits)
    return logits - p * (counts > 0).astype(jnp.float32) - f * counts


def apply_temperature(logits, temperature=1.0) -> jax.Array:
    """Hugging Face ``TemperatureLogitsWarper`` (``temperature > 0``).

    With per-row temperatures, rows at 0 (greedy) are divided by 1: their
    warped logits are not used (:func:`process_logits` keeps them unwarped).
    """
    logits = _f32(logits)
    if _is_static(temperature):
        if temperature == 1.0:
            return logits
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 here, got {temperature}")
        return logits / jnp.float32(temperature)
    t = _per_row(temperature, logits)
    return logits / jnp.where(t > 0, t, 1.0)


def apply_top_k(logits, top_k=0) -> jax.Array:
    """Hugging Face ``TopKLogitsWarper``: drop logits below the k-th largest.

    Ties with the k-th largest value are all kept. ``top_k == 0`` is a no-op.
    """
    logits = _f32(logits)
    vocab = logits.shape[-1]
    if _is_static(top_k):
        if top_k <= 0:
            return logits
        k = min(int(top_k), vocab)
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        return jnp.where(logits < kth, _NEG_INF, logits)
    k = _per_row(top_k, logits, jnp.int32)
    # the k-th largest value: index V - k of the ascending sort
    ascending = jnp.sort(logits, axis=-1)
    kth = jnp.take_along_axis(ascending, vocab - jnp.clip(k, 1, vocab), axis=-1)
    return jnp.where((k > 0) & (logits < kth), _NEG_INF, logits)


def apply_top_p(logits, top_p=1.0, cut=None) -> jax.Array:
    """Hugging Face ``TopPLogitsWarper`` (``min_tokens_to_keep=1``).

    Sorting ascending, tokens whose cumulative probability is ``<= 1 - top_p``
    are dropped; the most likely token is always kept. Among tied logits the
    sort is stable (lower index first), as torch's CPU sort is in practice.
    ``top_p == 1`` is a no-op (as in Hugging Face, which skips the warper).
    ``cut``: per-row ``1 - top_p`` (see ``SamplingParams.top_p_cut``); by
    default ``1 - top_p`` in float32.
    """
    logits = _f32(logits)
    static = _is_static(top_p)
    if static and top_p >= 1.0:
        return logits
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, vocab)
    p = float(top_p) if static else _per_row(top_p, logits).reshape(-1, 1)
    order = jnp.argsort(flat, axis=-1, stable=True)  # ascending
    sorted_logits = jnp.take_along_axis(flat, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # static: 1 - top_p in float64, rounded once when compared (as Hugging Face does)
    threshold = 1.0 - p if static or cut is None else _per_row(cut, logits).reshape(-1, 1)
    remove_sorted = cum <= threshold
    remove_sorted = remove_sorted.at[:, -1].set(False)
    rows = flat.shape[0]
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(rows)[:, None], order].set(remove_sorted)
    if not static:
        remove = remove & (p < 1.0)  # top_p == 1 rows are skipped, as Hugging Face skips the warper
    return jnp.where(remove, _NEG_INF, flat).reshape(lead + (vocab,))


def apply_min_p(logits, min_p=0.0) -> jax.Array:
    """Hugging Face ``MinPLogitsWarper`` (``min_tokens_to_keep=1``).

    Drops tokens whose probability is below ``min_p`` times the top token's
    probability. ``min_p == 0`` is a no-op.
    """
    logits = _f32(logits)
    static = _is_static(min_p)
    if static and min_p <= 0.0:
        return logits
    m = jnp.float32(min_p) if static else _per_row(min_p, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    # With min_p < 1 the top token is never below the threshold, so the
    # "keep at least one token" rule needs no extra work.
    return jnp.where((m > 0) & (probs < m * top), _NEG_INF, logits)


# ---------------------------------------------------------------------------
# Combined pipeline.
# ---------------------------------------------------------------------------

def _greedy_rows(config: SamplingParams, logits) -> jax.Array:
    """bool ``[..., 1]``: the greedy rows of per-row params, against ``logits [..., V]``."""
    return _per_row(config.temperature, logits) == 0.0


def process_logits(logits, config: Sampling, prev_tokens=None, prev_mask=None, output_mask=None) -> jax.Array:
    """Apply the processors of ``config`` in Hugging Face's order.

    Order: repetition penalty (needs ``prev_tokens``; skipped when ``None``),
    presence / frequency penalties (over the entries of ``prev_tokens`` that
    ``output_mask [..., S]`` marks as generated; skipped when ``None``), then,
    unless greedy, temperature, top-k, top-p, min-p. Returns float32 logits of
    the same shape with filtered entries at ``-inf``.

    ``config``: a static :class:`SamplingConfig`, or :class:`SamplingParams`
    (per-row ``[B]`` arrays, ``B`` the leading dim of ``logits``; processors
    no row needs are skipped by a runtime branch).

    For greedy rows only the repetition penalty is applied: like
    ``generate(do_sample=False)``, warpers do not take part in greedy search.
    """
    out = _f32(logits)
    if isinstance(config, SamplingConfig):
        config.validate()
        if config.repetition_penalty != 1.0 and prev_tokens is not None:
            out = apply_repetition_penalty(out, prev_tokens, prev_mask, config.repetition_penalty)
        if config.has_count_penalties and prev_tokens is not None and output_mask is not None:
            out = apply_presence_frequency_penalty(out, token_counts(prev_tokens, output_mask, out.shape[-1]),
                                                   config.presence_penalty, config.frequency_penalty)
        if config.greedy:
            return out
        out = apply_temperature(out, config.temperature)
        out = apply_top_k(out, config.top_k)
        out = apply_top_p(out, config.top_p)
        return apply_min_p(out, config.min_p)
    if not isinstance(config, SamplingParams):
        raise TypeError(f"sampling settings must be SamplingConfig or SamplingParams, got {type(config).__name__}")
    if prev_tokens is not None:
        out = _when_any(config.repetition_penalty != 1.0,
                        lambda x: apply_repetition_penalty(x, prev_tokens, prev_mask, config.repetition_penalty), out)
    if prev_tokens is not None and output_mask is not None and config.presence_penalty is not None:
        presence, frequency = config.presence_penalty, config.frequency_penalty
        frequency = jnp.zeros_like(presence) if frequency is None else frequency
        out = _when_any((presence != 0.0) | (frequency != 0.0),
                        lambda x: apply_presence_frequency_penalty(
                            x, token_counts(prev_tokens, output_mask, x.shape[-1]), presence, frequency), out)
    warped = apply_temperature(out, config.temperature)
    warped = _when_any(config.top_k > 0, lambda x: apply_top_k(x, config.top_k), warped)
    warped = _when_any(config.top_p < 1.0, lambda x: apply_top_p(x, config.top_p, config.top_p_cut), warped)
    warped = _when_any(config.min_p > 0.0, lambda x: apply_min_p(x, config.min_p), warped)
    return jnp.where(_greedy_rows(config, out), out, warped)


def probabilities(logits, config: Sampling, prev_tokens=None, prev_mask=None, output_mask=None) -> jax.Array:
    """The distribution :func:`sample` draws from, float32 ``[..., V]``.

    Softmax of :func:`process_logits`; for greedy rows the one-hot of its
    argmax. Used by speculative decoding for the target ``p`` and draft ``q``.
    """
    processed = process_logits(logits, config, prev_tokens, prev_mask, output_mask)

    def one_hot():
        return jax.nn.one_hot(jnp.argmax(processed, axis=-1), processed.shape[-1], dtype=jnp.float32)

    if isinstance(config, SamplingConfig):
        return one_hot() if config.greedy else jax.nn.softmax(processed, axis=-1)
    return jnp.where(_greedy_rows(config, processed), one_hot(), jax.nn.softmax(processed, axis=-1))


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _check_row_keys(keys, batch: int) -> jax.Array:
    if keys is None:
        raise ValueError("sampling with temperature > 0 needs one PRNG key per row (got keys=None)")
    if _is_typed_key(keys):
        if keys.shape != (batch,):
            raise ValueError(f"keys must be a key array of shape ({batch},), got {keys.shape}")
        return keys
    keys = jnp.asarray(keys)
    if keys.dtype != jnp.uint32 or keys.ndim != 2 or keys.shape[0] != batch:
        raise ValueError(
            f"keys must be a typed key array of shape ({batch},) or raw uint32 keys of shape "
            f"({batch}, 2) (one key per row); got dtype {keys.dtype}, shape {keys.shape}")
    return keys


def sample(keys, logits, config: Sampling, prev_tokens=None, prev_mask=None, output_mask=None) -> jax.Array:
    """Draw one token per row: int32 ``[B]``.

    Args:
      keys: one PRNG key per row, a typed key array ``[B]`` or raw uint32 keys
        ``[B, 2]`` (see :func:`row_keys`); ignored (may be ``None``) for a
        greedy :class:`SamplingConfig`. Each row's draw depends only on its
        own key, logits and settings.
      logits: ``[B, V]``.
      config: a static :class:`SamplingConfig` or per-row :class:`SamplingParams`
        (greedy rows take the argmax; their key is not used).
      prev_tokens, prev_mask: ``[B, S]`` previous tokens (prompt included) and
        validity mask for the repetition penalty.
      output_mask: ``[B, S]`` True where ``prev_tokens`` holds a generated
        token: the presence / frequency penalties count those.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    processed = process_logits(logits, config, prev_tokens, prev_mask, output_mask)
    argmax = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    if isinstance(config, SamplingConfig) and config.greedy:
        return argmax
    keys = _check_row_keys(keys, logits.shape[0])
    draw = jax.vmap(lambda k, row: jax.random.categorical(k, row, axis=-1))
    if isinstance(config, SamplingConfig):
        return draw(keys, processed).astype(jnp.int32)
    greedy = config.greedy
    return jax.lax.cond(jnp.all(greedy), lambda: argmax,
                        lambda: jnp.where(greedy, argmax, draw(keys, processed).astype(jnp.int32)))


def row_keys(seed_or_key: Any, batch: int, step: Any = 0, *, row_ids=None) -> jax.Array:
    """Per-row keys ``fold_in(fold_in(key, row), step)`` for ``row in range(batch)``.

    Args:
      seed_or_key: an integer seed (Python int or integer scalar array, may be
        traced), a typed key, or a raw uint32 key of shape ``(2,)``.
      batch: number of rows (static).
      step: decoding step (int, may be traced).
      row_ids: optional int ``[batch]`` ids to fold in instead of ``0..batch-1``
        (e.g. request ids, so a request keeps its stream when it moves slot).

    Returns keys of the same flavour as given (typed ``[batch]`` for typed keys
    and integer seeds, raw ``[batch, 2]`` for raw keys).
    """
    if _is_typed_key(seed_or_key):
        if seed_or_key.shape != ():
            raise ValueError(f"expected a single key, got key array of shape {seed_or_key.shape}")
        base = seed_or_key
    else:
        arr = jnp.asarray(seed_or_key)
        if arr.dtype == jnp.uint32 and arr.shape == (2,):
            base = arr
        elif jnp.issubdtype(arr.dtype, jnp.integer) and arr.shape == ():
            base = jax.random.key(arr)
        else:
            raise ValueError(
                f"seed_or_key must be an integer seed, a typed key or a raw uint32[2] key; "
                f"got dtype {arr.dtype}, shape {arr.shape}")
    rows = jnp.arange(batch, dtype=jnp.uint32) if row_ids is None else jnp.asarray(row_ids)
    if rows.shape != (batch,):
        raise ValueError(f"row_ids must have shape ({batch},), got {rows.shape}")
    step = jnp.asarray(step)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows)


def token_logprobs(logits, tokens, config: Sampling, prev_tokens=None, prev_mask=None, output_mask=None) -> jax.Array:
    """Log-probabilities (float32 ``[...]``) of ``tokens`` under the processed logits.

    ``log_softmax(process_logits(logits))`` gathered at ``tokens`` (shape
    ``logits.shape[:-1]``); filtered tokens get ``-inf``. This is what
    ``compute_transition_scores(..., normalize_logits=True)`` reports in
    Hugging Face; for greedy rows it is the log-softmax of the
    (repetition-penalised) logits rather than the degenerate one-hot.
    """
    processed = process_logits(logits, config, prev_tokens, prev_mask, output_mask)
    tokens = jnp.asarray(tokens)
    if tokens.shape != processed.shape[:-1]:
        raise ValueError(f"tokens must have shape {processed.shape[:-1]}, got {tokens.shape}")
    logp = jax.nn.log_softmax(processed, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def apply_cfg(cond_logits, uncond_logits, scale) -> jax.Array:
    """Classifier-free guidance: ``u + scale * (c - u)`` in log-softmax space.

    ``c = log_softmax(cond_logits)`` and ``u = log_softmax(uncond_logits)``
    (as Hugging Face's ``UnbatchedClassifierFreeGuidanceLogitsProcessor``);
    normalising first makes the mix independent of each input's logit offset.
    ``scale = 1`` gives the conditional distribution, ``0`` the unconditional
    one. A token that is ``-inf`` in either input stays ``-inf``. The result is
    float32 logits (not normalised) to feed to :func:`process_logits` /
    :func:`sample`. ``scale`` may be a Python float or an array broadcastable
    to ``[..., 1]`` (e.g. ``[B, 1]`` per row).
    """
    c = jax.nn.log_softmax(_f32(cond_logits), axis=-1)
    u = jax.nn.log_softmax(_f32(uncond_logits), axis=-1)
    mixed = u + jnp.asarray(scale, jnp.float32) * (c - u)
    return jnp.where(jnp.isneginf(c) | jnp.isneginf(u), _NEG_INF, mixed)
