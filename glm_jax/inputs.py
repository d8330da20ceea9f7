"""What callers hand the model, checked on the host before anything is traced, compiled or allocated.

`GLM.__call__`, `GLM.generate` and `glm_jax.stream.stream_generate` call these checks with numpy, outside jit, so
a step costs nothing extra. Each failure is an `InputError` (a ValueError) that names the argument and the
problem: ids outside [0, vocab_size) (an id >= vocab_size gives NaN logits and -1 silently wraps to the last row),
shapes and dtypes, and lengths beyond a learned position table (the original GLM's max_sequence_length; past it
the logits are NaN). Arrays that are tracers (a caller's own jit) keep their shape and dtype checks only.

Also here: the memory a KV-cached decode allocates (glm-generate compares it with what the machine has before
allocating), and text from bytes or surrogate-escaped str (argv, stdin, data files) with invalid UTF-8 replaced
and counted.

Shapes: B batch, T sequence length, S cache length, L layers, N query heads, K kv heads, H head dim, V vocab.
"""

from __future__ import annotations

import math

import numpy as np

from glm_jax.errors import InputError

__all__ = [
    "InputError",
    "available_memory",
    "check_call",
    "check_generate",
    "check_memory",
    "decode_memory_bytes",
    "decode_text",
    "position_limit",
]


def position_limit(cfg) -> int | None:
    """Most tokens one sequence may span: the rows of the learned position table (the original GLM's
    max_sequence_length), None for rotary positions, which have no table."""
    return None if cfg.rotary else int(cfg.max_position_embeddings)


def _is_tracer(x) -> bool:
    import sys

    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def _array(x, name: str):
    """(numpy array or None for a tracer, shape, dtype)."""
    if _is_tracer(x):
        return None, tuple(x.shape), np.dtype(x.dtype)
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} is not an array: {e}") from None
    if a.dtype == object:
        raise InputError(f"{name} must be a rectangular array of numbers, got ragged or non-numeric values")
    return a, a.shape, a.dtype


def _integer(dtype) -> bool:
    return np.issubdtype(dtype, np.integer)


def _need_int(name: str, dtype) -> None:
    if not _integer(dtype):
        raise InputError(f"{name} must hold integers, got dtype {dtype}")


def _first_outside(a: np.ndarray, lo: int, hi: int):
    """(index tuple, value) of the first element outside [lo, hi), or None."""
    bad = (a < lo) | (a >= hi)
    if not bad.any():
        return None
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    return at, int(a[at])


def _check_ids(cfg, ids, shape, dtype, name: str = "input_ids") -> None:
    _need_int(name, dtype)
    if len(shape) != 2:
        raise InputError(f"{name} must be 2-D [batch, length], got shape {shape}")
    if shape[0] < 1 or shape[1] < 1:
        raise InputError(f"{name} is empty (shape {shape}): give at least one token")
    if ids is not None:
        hit = _first_outside(ids, 0, cfg.vocab_size)
        if hit is not None:
            at, v = hit
            raise InputError(
                f"{name}[{at[0]}, {at[1]}] = {v} is outside the vocabulary: ids must be in [0, {cfg.vocab_size}) "
                f"(vocab_size {cfg.vocab_size})"
            )


def _check_padding_mask(m, shape, B: int, T: int, name: str = "attention_mask") -> None:
    if shape != (B, T):
        raise InputError(f"{name} [batch, length] must have shape {(B, T)} like input_ids, got {shape}")
    if m is not None and not np.isin(m, (0, 1)).all():
        v = m[~np.isin(m, (0, 1))].flat[0]
        raise InputError(f"{name} is a 1/0 padding mask; it holds {v!r}")


def _span(mask, B: int, T: int) -> int:
    """Longest run of default positions: from each row's first real token to the end (T without a padding mask)."""
    if mask is None:
        return T
    real = mask.astype(bool)
    first = np.where(real.any(axis=1), real.argmax(axis=1), 0)
    return int((T - first).max())


def _check_span(cfg, span: int, new: int = 0) -> None:
    limit = position_limit(cfg)
    if limit is None or span + new <= limit:
        return
    what = f"a prompt of {span} tokens + max_new_tokens {new} = {span + new}" if new else f"{span} tokens"
    raise InputError(
        f"{what} is more than the model's {limit} learned positions (max_position_embeddings, config.json "
        f"max_sequence_length): the position table has no rows past them"
    )


def _check_positions(cfg, pos, shape, dtype, B: int, T: int) -> None:
    _need_int("position_ids", dtype)
    two_d = cfg.positions_2d
    want = (B, 2, T) if two_d else (B, T)
    one_table = cfg.position_encoding == "learned" and not cfg.block_position_encoding  # [B, T] works as well
    if shape != want and not (one_table and shape == (B, T)):
        kind = "2-D positions [batch, 2, length]" if two_d else "positions [batch, length]"
        raise InputError(f"position_ids: this model ({cfg.family}) takes {kind}, shape {want}; got {shape}")
    if pos is None or cfg.rotary:
        return
    M = cfg.max_position_embeddings
    rows = {"position": M + (1 if cfg.block_position_encoding else 0), "block position": M + 1}
    parts = [("position", pos if pos.ndim == 2 else pos[:, 0])]
    if pos.ndim == 3 and cfg.block_position_encoding:
        parts.append(("block position", pos[:, 1]))
    for what, a in parts:
        hit = _first_outside(a, 0, rows[what])
        if hit is not None:
            raise InputError(
                f"position_ids: {what} {hit[1]} (row {hit[0][0]}, token {hit[0][1]}) is outside the learned "
                f"table's [0, {rows[what]}) (max_position_embeddings {M})"
            )


def _check_prefix_len(pl, shape, dtype, B: int, T: int) -> None:
    _need_int("prefix_len", dtype)
    if shape not in ((), (B,)):
        raise InputError(f"prefix_len must have shape ({B},) (one per row) or be one number, got {shape}")
    if pl is not None:
        hit = _first_outside(np.atleast_1d(pl), 0, T + 1)
        if hit is not None:
            raise InputError(f"prefix_len {hit[1]} (row {hit[0][0]}) is outside [0, {T}], the sequence length")


def check_call(cfg, input_ids, attention_mask=None, position_ids=None, prefix_len=None) -> None:
    """The arguments of GLM.__call__ (see DESIGN §3.1): raises InputError naming the first problem."""
    ids, shape, dtype = _array(input_ids, "input_ids")
    _check_ids(cfg, ids, shape, dtype)
    B, T = shape
    mask = None
    if attention_mask is not None:
        m, mshape, _ = _array(attention_mask, "attention_mask")
        if len(mshape) == 2:
            _check_padding_mask(m, mshape, B, T)
            mask = m
        elif mshape not in ((B, T, T), (B, 1, T, T)):
            raise InputError(
                f"attention_mask must be a [batch, length] padding mask {(B, T)} or a dense mask "
                f"{(B, 1, T, T)} / {(B, T, T)}; got shape {mshape}"
            )
    if prefix_len is not None:
        _check_prefix_len(*_array(prefix_len, "prefix_len"), B, T)
    if position_ids is not None:
        _check_positions(cfg, *_array(position_ids, "position_ids"), B, T)
    else:
        _check_span(cfg, _span(mask, B, T))


def check_generate(cfg, input_ids, attention_mask=None, max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0):
    """The arguments of GLM.generate: input_ids [B, T] (or [T]), a [B, T] padding mask, the prompt plus
    max_new_tokens within a learned position table, and sampling settings that mean something."""
    ids, shape, dtype = _array(input_ids, "input_ids")
    if len(shape) == 1:
        shape, ids = (1,) + shape, None if ids is None else ids[None]
    _check_ids(cfg, ids, shape, dtype)
    B, T = shape
    mask = None
    if attention_mask is not None:
        mask, mshape, _ = _array(attention_mask, "attention_mask")
        if len(mshape) == 1 and len(np.shape(input_ids)) == 1:
            mshape, mask = (1,) + mshape, None if mask is None else mask[None]
        _check_padding_mask(mask, mshape, B, T, "attention_mask (generate takes a [batch, length] padding mask)")
    if isinstance(max_new_tokens, bool) or not float(max_new_tokens).is_integer() or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if isinstance(top_k, bool) or not float(top_k).is_integer() or top_k < 0:
        raise InputError(f"top_k must be a whole number >= 0 (0: off), got {top_k!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if not math.isfinite(float(v)) or v < 0:
            raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
    _check_span(cfg, _span(mask, B, T), int(max_new_tokens))


# ----------------------------------------------------------------------------- memory


def decode_memory_bytes(cfg, batch: int, prefill_len: int, cache_len: int) -> dict:
    """Bytes a KV-cached decode allocates beyond the params, by part: the cache (model/transformer.py's
    cache_layout in the compute dtype: keys and values of every layer, 2·L·B·K·S·H, or MLA's latents), and the
    prefill's largest transients on the XLA attention path (which decoding with a cache takes): float32 scores and
    their softmax [B, N, T, S], the dense mask [B, T, S] and the float32 logits [B, T, V]. Measured on XLA:CPU, a
    prefill's peak is the sum within a few percent."""
    import jax.numpy as jnp

    from glm_jax.model.transformer import cache_layout

    item = jnp.dtype(cfg.dtype).itemsize
    B, T, S = int(batch), int(prefill_len), int(cache_len)
    keys = S + cfg.pre_seq_len  # P-Tuning prefixes are more keys
    return {
        "kv_cache": sum(math.prod(s) for shapes in cache_layout(cfg, B, S).values() for s in shapes) * item,
        "attention": B * cfg.num_heads * T * keys * (4 + item) + B * T * keys,
        "logits": B * T * cfg.vocab_size * 4,
    }


def available_memory(device=None) -> int | None:
    """Bytes the next allocation can take on `device` (default: the first): the allocator's limit less what is in
    use on an accelerator, the host's available RAM (cgroup limit included) on the CPU; None when unknown."""
    import jax

    from glm_jax import hostmem

    dev = device or jax.devices()[0]
    if dev.platform == "cpu":
        return hostmem.available_ram()
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(cfg, batch: int, prefill_len: int, cache_len: int, what: str = "this decode", device=None) -> int:
    """InputError when decode_memory_bytes exceeds available_memory (nothing is allocated). Returns the estimate."""
    parts = decode_memory_bytes(cfg, batch, prefill_len, cache_len)
    need, have = sum(parts.values()), available_memory(device)
    if have is not None and need > have:
        detail = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in parts.items())
        raise InputError(
            f"{what} needs about {_gib(need)} ({detail}) but the machine has {_gib(max(have, 0))} available; "
            "use a shorter prompt or fewer new tokens"
        )
    return need


# ----------------------------------------------------------------------------- text


def decode_text(raw) -> tuple[str, int]:
    """(text, replaced): bytes decoded as UTF-8, or a str that may hold lone surrogates (argv and stdin bytes that
    Python could not decode arrive surrogate-escaped) turned back into its bytes and decoded; each invalid
    sequence becomes U+FFFD and is counted (U+FFFD characters already in the text are not)."""
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")
            return raw, 0
        except UnicodeEncodeError:
            pass
        try:
            data = raw.encode("utf-8", "surrogateescape")  # the original bytes
        except UnicodeEncodeError:  # other lone surrogates (e.g. from a JSON escape)
            data = raw.encode("utf-8", "surrogatepass")
    else:
        data = bytes(raw)
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        return text, text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
