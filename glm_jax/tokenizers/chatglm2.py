"""ChatGLM2-6B and ChatGLM3-6B tokenizers: sentencepiece `tokenizer.model` plus appended special ids."""

from __future__ import annotations

from glm_jax.tokenizers import templates, tool_parse
from glm_jax.tokenizers.base import (
    GLMTokenizer,
    SentencePieceText,
    as_id_list,
    check_messages,
    load_sentencepiece,
    special_pattern,
    split_special,
)

GENERATION_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class ChatGLM2Tokenizer(SentencePieceText, GLMTokenizer):
    """ChatGLM2: the appended ids follow the last piece; [gMASK] sop prefix; '[Round n]' prompts."""

    chat_format = "chatglm2"
    appended_tokens: tuple[str, ...] = GENERATION_TOKENS
    stop_names: tuple[str, ...] = ("<eos>",)
    names_in_decode = False  # ChatGLM3 writes the appended tokens by name when decoding

    def __init__(self, vocab_file: str):
        self._init_args = dict(vocab_file=vocab_file)
        self.vocab_file = vocab_file
        self.sp = load_sentencepiece(vocab_file)
        n = self.sp.vocab_size()
        if min(self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()) < 0:
            raise ValueError(
                f"{vocab_file}: sentencepiece model lacks <s>, </s> or <unk>; not a ChatGLM2/ChatGLM3 tokenizer.model"
            )
        self.appended = {tok: n + i for i, tok in enumerate(self.appended_tokens)}
        self.index_special = {i: tok for tok, i in self.appended.items()}
        self.special_tokens = {
            **self.appended,
            "<bos>": self.sp.bos_id(),
            "<eos>": self.sp.eos_id(),
            "<unk>": self.sp.unk_id(),
            "<pad>": self.sp.unk_id(),
        }
        self.pad_token_id = self.sp.unk_id()
        self.eos_token_ids = [self.special_tokens[t] for t in self.stop_names]
        self.prefix_ids = [self.appended["[gMASK]"], self.appended["sop"]]
        self.vocab_size = n + len(self.appended)
        self._empty_ids = {self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()}

    def _id_to_token(self, i: int) -> str:
        if i in self.index_special:
            return self.index_special[i] if self.names_in_decode else ""
        if i in self._empty_ids or i < 0 or i >= self.sp.vocab_size():
            return ""
        return self.sp.id_to_piece(i)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """transformers decode of the reference class: ids -> pieces -> sentencepiece DecodePieces.
        <s>, </s>, <unk> decode to nothing. skip_special_tokens has no effect, as in the reference."""
        return self.sp.decode_pieces([self._id_to_token(i) for i in as_id_list(ids)])

    # ---- chat
    def build_prompt(self, query: str, history=()) -> str:
        return templates.chatglm2_prompt(query, history)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Ids chat() feeds the model ([gMASK] sop + encode(build_prompt)). The prompt always ends with
        the answer cue, so add_generation_prompt has no effect."""
        query, history = templates.messages_to_query_history(messages)
        return self.encode(self.build_prompt(query, history), add_special_tokens=True)

    def build_stream_inputs(self, query: str, history=()) -> list[int]:
        """stream_chat's input ids when it continues from cached keys/values (only the new round)."""
        if not history:
            return self.encode(self.build_prompt(query), add_special_tokens=True)
        return self.encode(templates.chatglm2_stream_prompt(query, history))[1:]  # drop the lone dummy prefix

    def process_response(self, response: str) -> str:
        return tool_parse.chatglm2_process_response(response)

    def parse_response(self, text: str, history=None) -> dict:
        """{"content": process_response(text)} (ChatGLM2 has no tool calls)."""
        return {"content": self.process_response(text)}


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3: role tokens, messages built one by one (build_chat_input), tool calls as code blocks."""

    chat_format = "chatglm3"
    appended_tokens = GENERATION_TOKENS + ROLE_TOKENS
    stop_names = ("<eos>", "<|user|>", "<|observation|>")
    names_in_decode = True

    def __init__(self, vocab_file: str, encode_special_tokens: bool = False, role_tokens_only: bool = False):
        """encode_special_tokens: encode special names written in text as their ids (all nine for the
        chatglm3-6b file; only the four role tokens with role_tokens_only, as the chatglm3-6b-32k file)."""
        super().__init__(vocab_file)
        self._init_args = dict(
            vocab_file=vocab_file, encode_special_tokens=encode_special_tokens, role_tokens_only=role_tokens_only
        )
        self.encode_special_tokens = encode_special_tokens
        self._split = special_pattern(ROLE_TOKENS if role_tokens_only else self.appended_tokens)

    def tokenize(self, text: str) -> list[str]:
        if not self.encode_special_tokens:
            return super().tokenize(text)
        out = []
        for chunk, special in split_special(text, self._split):
            out.extend([chunk] if special else self.sp.encode(chunk, out_type=str))
        return out

    def _encode_text(self, text: str) -> list[int]:
        if not self.encode_special_tokens:
            return self.sp.encode(text)
        out = []
        for chunk, special in split_special(text, self._split):
            out.extend([self.appended[chunk]] if special else self.sp.encode(chunk))
        return out

    def decode_sp(self, ids) -> str:
        """SPTokenizer.decode: appended tokens written by name, no spaces added around them."""
        text, buf = "", []
        for i in as_id_list(ids):
            if i in self.index_special:
                if buf:
                    text += self.sp.decode(buf)
                text += self.index_special[i]
                buf = []
            else:
                buf.append(i)
        return text + (self.sp.decode(buf) if buf else "")

    def build_single_message(self, role: str, metadata: str, content: str) -> list[int]:
        """Role id, then encode(metadata + newline) and encode(content) as two separate calls."""
        return templates.single_message_ids(self.appended[f"<|{role}|>"], metadata, content, self.sp.encode)

    def apply_chat_template(
        self, messages, add_generation_prompt: bool = True, add_special_tokens: bool = True, **kwargs
    ) -> list[int]:
        """build_chat_input: [gMASK] sop, every message, then a bare <|assistant|>. A system message's
        `tools` are appended to its content as JSON. stream_chat with a cache sends only the new message."""
        ids = list(self.prefix_ids) if add_special_tokens else []
        for m in check_messages(messages):
            ids += self.build_single_message(m["role"], templates.message_metadata(m), templates.chatglm3_content(m))
        return ids + [self.appended["<|assistant|>"]] if add_generation_prompt else ids

    def process_response(self, output: str, history: list):
        """The model's process_response -> (response, new_history)."""
        return tool_parse.chatglm3_process_response(output, history)

    def parse_response(self, text: str, history=None) -> dict:
        """{"name", "parameters"} for a tool call, {"name", "content"} for other metadata, else {"content"}.
        Without a history, tools are taken as available."""
        return tool_parse.parse_with(tool_parse.chatglm3_process_response, text, history)
