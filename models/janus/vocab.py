"""Janus's special tokens and the tokenizer that has them.

Janus-Pro's tokenizer is DeepSeek-LLM's (vocabulary 100,015 plus specials, the embedding table
102,400 rows), with these among its specials (deepseek-community/Janus-Pro-1B's config.json:
bos 100000, eos 100001, pad 100002; image_token_id 100581):

    <｜begin▁of▁sentence｜>  <｜end▁of▁sentence｜>  <｜▁pad▁｜>     bos, eos (ends an answer), pad
    <image_placeholder>  <begin_of_image>  <end_of_image>        a visual token, the image's brackets
    <|User|>  <|Assistant|>                                      the conversation's roles

A release's own tokenizer holds them all; reca's no-download tokenizer is trained with them as
its special tokens (`load_tokenizer(..., special_tokens=SPECIALS)`: ids 0..7, the pad first).
"""
from __future__ import annotations

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIALS = (PAD, BOS, EOS, IMAGE, BOI, EOI, USER, ASSISTANT)


def check_tokenizer(tokenizer) -> None:
    """A tokenizer without Janus's special tokens (another model's) is refused in one line."""
    missing = []
    for token in SPECIALS:
        try:
            tokenizer.token_id(token)
        except KeyError:
            missing.append(token)
    if missing:
        raise ValueError(f"the tokenizer {tokenizer!r} lacks Janus's special tokens {', '.join(missing)} "
                         "(not a Janus tokenizer)")
