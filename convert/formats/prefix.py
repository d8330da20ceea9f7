"""P-Tuning v2 prefix encoder rows (ChatGLM-6B and ChatGLM2/3 share the key names)."""
from convert.formats.rows import Row, linear

_P = "transformer.prefix_encoder."
_on = lambda cfg: cfg.pre_seq_len > 0  # noqa: E731
_proj = lambda cfg: cfg.pre_seq_len > 0 and cfg.prefix_projection  # noqa: E731
_emb = lambda cfg: ((cfg.prefix_embed_size or cfg.prefix_width),)  # noqa: E731
_hid = lambda cfg: (cfg.prefix_hidden_size,)  # noqa: E731
_w = lambda cfg: (cfg.prefix_width,)  # noqa: E731

PREFIX_ROWS = [
    Row((_P + "embedding.weight",), ("prefix_encoder/embedding",), when=_on),
    Row((_P + "trans.0.weight",), ("prefix_encoder/trans_0/kernel",), *linear(_emb, _hid), when=_proj),
    Row((_P + "trans.0.bias",), ("prefix_encoder/trans_0/bias",), when=_proj),
    Row((_P + "trans.2.weight",), ("prefix_encoder/trans_2/kernel",), *linear(_hid, _w), when=_proj),
    Row((_P + "trans.2.bias",), ("prefix_encoder/trans_2/bias",), when=_proj),
]
