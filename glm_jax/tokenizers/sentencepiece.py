"""A plain sentencepiece model with GLM's command tokens as control pieces: the tokenizer glm-train builds from
its bundled corpus (`data.tokenizer=bundled`, glm_jax/data/tokenize.py), saved into a run's folder so that the
run can be talked to and exported.

Files: `glm_sentencepiece.model` (the model proto, byte for byte the one training used) and
`tokenizer_config.json` naming the class. Ids are exactly what the data pipeline fed the model
(`sp.encode(text)`); encode(..., add_special_tokens=True) gives `[CLS] text </s>` like the original GLM
tokenizers. It has no chat template.
"""

from __future__ import annotations

import json
import os

from glm_jax.tokenizers.base import GLMTokenizer, SentencePieceText, as_id_list, load_sentencepiece, sp_piece_id

MODEL_FILE = "glm_sentencepiece.model"
CLASS_NAME = "GLMSentencePieceTokenizer"
COMMAND_PIECES = ("[CLS]", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>", "[dBLOCK]", "</s>", "<pad>", "<unk>")


class GLMSentencePieceTokenizer(SentencePieceText, GLMTokenizer):
    chat_format = "sentencepiece"

    def __init__(self, vocab_file: str):
        self._init_args = dict(vocab_file=vocab_file)
        self.vocab_file = vocab_file
        self.sp = load_sentencepiece(vocab_file)
        found = {p: sp_piece_id(self.sp, p) for p in COMMAND_PIECES}
        self.special_tokens = {p: i for p, i in found.items() if i is not None}
        self.index_special = {i: p for p, i in self.special_tokens.items()}
        eos = self.special_tokens.get("</s>")
        self.eos_token_ids = [i for i in (self.special_tokens.get("<eop>"), eos) if i is not None]
        self.pad_token_id = self.special_tokens.get("<pad>", 0)
        self.prefix_ids = [self.special_tokens["[CLS]"]] if "[CLS]" in self.special_tokens else []
        self.suffix_ids = [eos] if eos is not None else []
        self.vocab_size = self.sp.get_piece_size()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = as_id_list(ids)
        out, run = [], []
        for i in ids:
            if i in self.index_special:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens and self.index_special[i] not in ("<pad>", "</s>"):
                    out.append(self.index_special[i])
            elif 0 <= i < self.vocab_size:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """No chat format: one user message becomes GLM's generation prompt `[CLS] text [gMASK] </s> <sop>`
        (THUDM/GLM's `tokenizer(text + " [gMASK]")` then build_inputs_for_generation's <sop>): the model
        continues the text after <sop>, as blank infilling trained it to."""
        need = ("[CLS]", "[gMASK]", "</s>", "<sop>")
        if (
            len(messages) != 1
            or not isinstance(messages[0], dict)
            or messages[0].get("role") != "user"
            or not all(t in self.special_tokens for t in need)
        ):
            raise ValueError("a plain sentencepiece GLM tokenizer has no chat format; use encode()")
        cls, gmask, eos, sop = (self.special_tokens[t] for t in need)
        return [cls] + self._encode_text(messages[0].get("content") or "") + [gmask, eos, sop]

    def parse_response(self, text: str, history=None) -> dict:
        return {"content": text.strip()}


def is_sentencepiece_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MODEL_FILE))


def save_sentencepiece(model_proto: bytes, folder) -> list[str]:
    """Writes the tokenizer files of a sentencepiece model proto into `folder` (each file atomically);
    returns the file names."""
    folder = os.fspath(folder)
    files = {
        MODEL_FILE: bytes(model_proto),
        "tokenizer_config.json": (
            json.dumps({"tokenizer_class": CLASS_NAME, "model_file": MODEL_FILE}, indent=2) + "\n"
        ).encode(),
    }
    for name, data in files.items():
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(folder, name))
    return list(files)
