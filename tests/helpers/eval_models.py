"""Tiny checkpoints for the evaluation tests and bench/eval_bench.py: a random transformers Glm4ForCausalLM
with a byte-level BPE tokenizer trained on a few sentences, saved side by side (tokenizer.json +
tokenizer_config.json), so glm-jax and lm-eval's hf backend read the same files."""

import json
import pathlib

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what colour is the sky? Answer: blue.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "A small model answers questions about animals, colours and cities.",
    "The secret number is 7421. Remember it well.",
    "Cats sleep during the day and hunt at night; dogs bark at the moon.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
]


def write_tokenizer(folder, vocab_size=320, chat_template=None):
    """A byte-level BPE trained on SENTENCES; ids 0 = <pad>, 1 = <|endoftext|>, 2 = <|user|>, 3 = <|assistant|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|endoftext|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<pad>",
        "model_max_length": 512,
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tok.get_vocab_size()


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_glm4(
    folder, seed=0, hidden=48, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96, max_pos=512, vocab=0, scale=4.0
):
    """Random Glm4ForCausalLM + tokenizer in `folder` (model vocab: the tokenizer's, or `vocab` if larger; weight
    matrices scaled by `scale` for peaked distributions); returns the torch model."""
    import torch
    import transformers

    vocab = max(vocab, write_tokenizer(folder, chat_template=CHAT_TEMPLATE))
    torch.manual_seed(seed)
    cfg = transformers.Glm4Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        partial_rotary_factor=0.5,
        max_position_embeddings=max_pos,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = transformers.Glm4ForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked, non-trivial distributions: larger weights, non-unit norms
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.mul_(scale)
    model.save_pretrained(folder)
    return model
