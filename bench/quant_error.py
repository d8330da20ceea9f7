"""Weight-only int8 / int4 against float: logits error and greedy agreement on the golden fixtures.

    .venv/bin/python bench/quant_error.py

For each model fixture: the float32 model, and the same checkpoint with its layer linears quantized at load
(from_pretrained(quantize=)). Printed: max |logit difference| over the real prompt tokens, relative to the
largest |logit|; the share of prompt positions whose top-1 token is the same; the share of 8 greedily generated
ids that are the same. The fixtures are tiny random models (their logit gaps are not a trained model's), so
these figures bound the rounding, they do not predict a released model's quality.
"""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))


def main():
    import numpy as np
    from helpers.fixture_models import FIX, MODEL_FIXTURES, folders, io, reference_inputs

    import glm_jax

    print(f"{'fixture':<24} {'quant':>5} {'max|dlogit|':>12} {'rel':>7} {'top-1 same':>10} {'greedy same':>11}")
    for name in MODEL_FIXTURES:
        if "model" not in folders(name):
            continue
        d = io(name)
        kw, real = reference_inputs(name, d)
        lf = glm_jax.from_pretrained(FIX / name / "model")
        f = np.asarray(lf(d["input_ids"], **kw))
        am = d.get("attention_mask")
        am = am if am is not None and am.ndim == 2 else None
        gf = np.asarray(lf.generate(d["input_ids"], attention_mask=am, max_new_tokens=8, eos_token_id=[-1]))
        for q in ("int8", "int4"):
            lq = glm_jax.from_pretrained(FIX / name / "model", quantize=q)
            x = np.asarray(lq(d["input_ids"], **kw))
            g = np.asarray(lq.generate(d["input_ids"], attention_mask=am, max_new_tokens=8, eos_token_id=[-1]))
            err = np.abs(x - f)[real].max()
            top1 = (x.argmax(-1) == f.argmax(-1))[real].mean()
            T = d["input_ids"].shape[1]
            print(
                f"{name:<24} {q:>5} {err:>12.4f} {err / np.abs(f)[real].max():>7.2%} {top1:>10.0%} "
                f"{(g[:, T:] == gf[:, T:]).mean():>11.0%}"
            )


if __name__ == "__main__":
    main()
