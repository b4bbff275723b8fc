"""Janus's special tokens and the tokenizer that has them.

Janus-Pro's tokenizer is DeepSeek-LLM's (vocabulary 100,015 plus specials, the embedding table
102,400 rows), with these among its specials (deepseek-community/Janus-Pro-1B's config.json:
bos 100000, eos 100001, pad 100002; image_token_id 100581):

    <｜begin▁of▁sentence｜>  <｜end▁of▁sentence｜>  <｜▁pad▁｜>     bos, eos (ends an answer), pad
    <image_placeholder>  <begin_of_image>  <end_of_image>        a visual token, the image's brackets
    <|User|>  <|Assistant|>                                      the conversation's roles

A release's own tokenizer holds them all and is used as it is. reca's no-download tokenizer
(`reca.models.tokenizer.tiny_tokenizer`) has Qwen's specials only; `janus_tokenizer` gives a
copy with Janus's appended as special tokens (ids after its vocabulary), which saves and loads
back as an ordinary tokenizer directory.
"""
from __future__ import annotations

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIALS = (BOS, EOS, PAD, IMAGE, BOI, EOI, USER, ASSISTANT)


def _has(tokenizer, token: str) -> bool:
    try:
        tokenizer.token_id(token)
    except KeyError:
        return False
    return True


def janus_tokenizer(base):
    """`base` when it has Janus's special tokens (a release's tokenizer); a copy of reca's tiny
    BPE tokenizer with them added when it has none. A tokenizer with some but not all, or a
    transformers tokenizer without them, is refused (another model's tokenizer)."""
    have = [t for t in SPECIALS if _has(base, t)]
    if len(have) == len(SPECIALS):
        return base
    from tokenizers import AddedToken, Tokenizer

    from reca.models.tokenizer import BPETokenizer

    if have or not isinstance(base, BPETokenizer):
        missing = [t for t in SPECIALS if t not in have]
        raise ValueError(f"the tokenizer {base!r} lacks Janus's special tokens {', '.join(missing)} "
                         "(not a Janus tokenizer)")
    tok = Tokenizer.from_str(base.backend.to_str())  # a copy: the tiny tokenizer is cached and shared
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return BPETokenizer(tok)
