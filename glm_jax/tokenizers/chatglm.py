"""ChatGLM-6B tokenizer: sentencepiece `ice_text.model` with the SPTokenizer text pre-processing."""

from __future__ import annotations

import numpy as np

from glm_jax.tokenizers import templates, tool_parse
from glm_jax.tokenizers.base import (
    GLMTokenizer,
    as_id_list,
    clean_up_tokenization,
    load_sentencepiece,
    sp_piece_id,
    special_pattern,
    split_special,
)

GENERATION_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
# transformers 4.30 cuts these (the class's bos/eos/mask/pad/unk attributes) out of the text and strips
# the whitespace around them; [gMASK] is not among them, so a literal "[gMASK]" is ordinary text.
SPLIT_TOKENS = ("<sop>", "<eop>", "[MASK]", "<pad>", "<unk>")
SKIP_TOKENS = SPLIT_TOKENS  # decode(skip_special_tokens=True) drops these ids


class ChatGLMTokenizer(GLMTokenizer):
    """ChatGLM-6B: newline/tab/blank-run pieces, ids shifted by num_image_tokens, [gMASK] <sop> suffix."""

    chat_format = "chatglm"

    def __init__(
        self,
        vocab_file: str,
        num_image_tokens: int = 0,
        max_blank_length: int = 80,
        remove_space: bool = False,
        do_lower_case: bool = False,
    ):
        self._init_args = dict(
            vocab_file=vocab_file,
            num_image_tokens=num_image_tokens,
            max_blank_length=max_blank_length,
            remove_space=remove_space,
            do_lower_case=do_lower_case,
        )
        self.vocab_file = vocab_file
        self.sp = load_sentencepiece(vocab_file)
        self.num_image_tokens = int(num_image_tokens)
        self.max_blank_length = max_blank_length
        self.remove_space, self.do_lower_case = remove_space, do_lower_case
        names = GENERATION_TOKENS + ("<pad>", "<unk>", "</s>", "<n>", "<|tab|>")
        self.special_tokens = {}
        for name in names:
            pid = self.sp.piece_to_id(name)
            if name != "<unk>" and pid == self.sp.unk_id():
                raise ValueError(f"{vocab_file}: no piece {name!r}; not a ChatGLM-6B ice_text.model")
            self.special_tokens[name] = pid + self.num_image_tokens
        st = self.special_tokens
        self.pad_token_id = st["<pad>"]
        self.eos_token_ids = [st["<eop>"]]
        self.suffix_ids = [st["[gMASK]"], st["<sop>"]]
        self.vocab_size = self.sp.vocab_size() + self.num_image_tokens
        self._split = special_pattern(SPLIT_TOKENS)
        self._skip_ids = {st[t] for t in SKIP_TOKENS}

    # ---- SPTokenizer pieces
    def _preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for i in range(self.max_blank_length, 1, -1):
            text = text.replace(" " * i, f"<|blank_{i}|>")
        return text

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for i in range(2, self.max_blank_length + 1):
            text = text.replace(f"<|blank_{i}|>", " " * i)
        return text

    def sp_encode(self, text: str, add_dummy_prefix: bool = True) -> list[int]:
        """SPTokenizer.encode: pre-process, sentencepiece; without dummy prefix via '<n>' + text."""
        text = self._preprocess(text)
        if not add_dummy_prefix:
            text = "<n>" + text
        ids = [i + self.num_image_tokens for i in self.sp.encode(text)]
        return ids if add_dummy_prefix else ids[2:]

    def _chunks(self, text: str) -> list[tuple[str, bool]]:
        """Text cut at the split tokens, neighbours of each stripped (transformers 4.30 tokenize)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        parts = [list(p) for p in split_special(text, self._split)]
        for i, (_chunk, special) in enumerate(parts):
            if special:
                if i > 0 and not parts[i - 1][1]:
                    parts[i - 1][0] = parts[i - 1][0].rstrip()
                if i + 1 < len(parts) and not parts[i + 1][1]:
                    parts[i + 1][0] = parts[i + 1][0].lstrip()
        return [(c, s) for c, s in parts if c]

    def tokenize(self, text: str) -> list[str]:
        """Pieces as the reference tokenize() gives them (special tokens by name)."""
        out = []
        for chunk, special in self._chunks(text):
            out.extend([chunk] if special else self.sp.encode(self._preprocess(chunk), out_type=str))
        return out

    def _encode_text(self, text: str) -> list[int]:
        out = []
        for chunk, special in self._chunks(text):
            out.extend([self.special_tokens[chunk]] if special else self.sp_encode(chunk))
        return out

    def _piece_to_id(self, piece: str) -> int | None:
        pid = sp_piece_id(self.sp, piece)
        return None if pid is None else pid + self.num_image_tokens

    def _id_to_piece(self, i: int) -> str:
        if i < self.num_image_tokens:
            return f"<image_{i}>"
        i -= self.num_image_tokens
        return self.sp.id_to_piece(i) if i < self.sp.vocab_size() else ""  # unknown ids decode to nothing

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Reference decode: pad ids dropped, control pieces empty, <n>/tab/blanks restored, clean-up."""
        ids = [i for i in as_id_list(ids) if i != self.pad_token_id]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip_ids]
        text = self._postprocess(self.sp.decode_pieces([self._id_to_piece(i) for i in ids]))
        return clean_up_tokenization(text)

    # ---- chat
    def build_prompt(self, query: str, history=()) -> str:
        """The prompt string chat() builds."""
        return templates.chatglm_prompt(query, history)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Ids chat() feeds the model: encode(prompt) + [gMASK] <sop>. The prompt always ends with the
        answer cue, so add_generation_prompt has no effect."""
        query, history = templates.messages_to_query_history(messages)
        return self.encode(self.build_prompt(query, history), add_special_tokens=True)

    def process_response(self, response: str) -> str:
        return tool_parse.chatglm_process_response(response)

    def parse_response(self, text: str, history=None) -> dict:
        """{"content": process_response(text)} (ChatGLM-6B has no tool calls)."""
        return {"content": self.process_response(text)}

    # ---- batches
    def pad(self, batch) -> dict[str, np.ndarray]:
        """The class's _pad: left padding; attention_mask [B,1,L,L] True = hidden; position_ids [B,2,L]."""
        rows = [as_id_list(r) for r in batch]
        width = max((len(r) for r in rows), default=0)
        bos, mask_id, gmask_id = (self.special_tokens[t] for t in ("<sop>", "[MASK]", "[gMASK]"))
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        hidden = np.ones((len(rows), 1, width, width), dtype=bool)
        pos = np.zeros((len(rows), 2, width), dtype=np.int64)
        for b, r in enumerate(rows):
            n, start = len(r), width - len(r)
            ctx = r.index(bos) if bos in r else n
            seen = np.tril(np.ones((n, n), dtype=bool))
            seen[:, :ctx] = True
            positions = np.arange(n)
            mask_tok = mask_id if mask_id in r else gmask_id
            if mask_tok in r:
                positions[ctx:] = r.index(mask_tok)
            ids[b, start:] = r
            hidden[b, 0, start:, start:] = ~seen
            pos[b, 0, start:] = positions
            pos[b, 1, start:] = np.concatenate([np.zeros(ctx, np.int64), np.arange(1, n - ctx + 1)])
        return {"input_ids": ids, "attention_mask": hidden, "position_ids": pos}
