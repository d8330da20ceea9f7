"""One declarative key map per checkpoint format (STYLE §5).

A key map is a list of `Row`s. Each row pairs HF keys with param paths and an invertible transform; the same
rows drive loading (HF → params) and export (params → HF), so a round trip is exact by construction.
"""
from convert.formats.rows import Row, expand, BUFFER_SUFFIXES  # noqa: F401

LAYOUTS = ("glm", "chatglm", "chatglm2", "glm-hf", "glm4")


def keymap(cfg, layout=None):
    """Concrete rows (layers expanded) for `cfg` in `layout` (default: the config's own family)."""
    from convert.formats import chatglm, chatglm2, glm, glm_hf
    layout = layout or cfg.family
    table = {"glm": glm.ROWS, "chatglm": chatglm.ROWS, "chatglm2": chatglm2.ROWS,
             "glm-hf": glm_hf.ROWS, "glm4": glm_hf.ROWS}[layout]
    return expand(table, cfg)
