"""Tokenizers, chat templates and tool-call parsing of the GLM families."""

from glm_jax.tokenizers.base import GLMTokenizer
from glm_jax.tokenizers.loader import CHAT_FORMATS, load_tokenizer

__all__ = [
    "CHAT_FORMATS",
    "GLMTokenizer",
    "load_tokenizer",
    "ChatGLMTokenizer",
    "ChatGLM2Tokenizer",
    "ChatGLM3Tokenizer",
    "GLM4Tokenizer",
    "GLM45Tokenizer",
    "GPT2BPETokenizer",
]


def __getattr__(name):  # the family modules import sentencepiece / tiktoken / tokenizers only when used
    if name == "ChatGLMTokenizer":
        from glm_jax.tokenizers.chatglm import ChatGLMTokenizer

        return ChatGLMTokenizer
    if name in ("ChatGLM2Tokenizer", "ChatGLM3Tokenizer"):
        from glm_jax.tokenizers import chatglm2

        return getattr(chatglm2, name)
    if name == "GLM4Tokenizer":
        from glm_jax.tokenizers.glm4 import GLM4Tokenizer

        return GLM4Tokenizer
    if name == "GLM45Tokenizer":
        from glm_jax.tokenizers.glm45 import GLM45Tokenizer

        return GLM45Tokenizer
    if name == "GPT2BPETokenizer":
        from glm_jax.tokenizers.gpt2 import GPT2BPETokenizer

        return GPT2BPETokenizer
    raise AttributeError(name)
