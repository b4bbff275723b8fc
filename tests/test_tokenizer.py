"""The instruction pool and the text tokenizers (`reca.models.tokenizer`). Fast: CPU only, no network."""
import hashlib
import importlib.resources
import json
import random
import re
import subprocess
import sys

import pytest

from reca.models.adapter import TextTokenizer
from reca.models.tokenizer import (
    FIXED_INSTRUCTION,
    SPECIAL_TOKENS,
    BPETokenizer,
    HFTokenizer,
    instruction_pool,
    load_tokenizer,
    tiny_tokenizer,
)

CHAT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>"
    "Generate an image.<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
)
UNICODE = [
    "",
    " ",
    "plain ascii, with punctuation!?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "héllo wörld — ça va? naïve façade",
    "中文字符与日本語のテキスト、한국어",
    "emoji 🎨🖼️👩‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "combining e\u0301 a\u0308 and zero\u200bwidth",
    "RTL: مرحبا بالعالم שלום",
    "control \x00\x01\x7f chars",
    "math ∑∫√∞ ≤ ≥ ≠ and \U0001d400\U0001d401",
    "<|im_start|> inside text <|im_end|> and <|nope|> not special",
    "almost special <|im_start| and |im_start|>",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(1024)


def _pool_text() -> str:
    return (importlib.resources.files("reca.engine.prompts") / "instructions.txt").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- instruction pool
def test_pool_file_format():
    raw = (importlib.resources.files("reca.engine.prompts") / "instructions.txt").read_bytes()
    text = raw.decode("utf-8")  # strict UTF-8
    assert "\r" not in text and text.endswith("\n") and not text.endswith("\n\n")
    lines = text[:-1].split("\n")
    assert all(line and line == line.strip() for line in lines), "blank or padded line"
    assert not any(re.match(r"^\s*(\d+|[-*•])[.):\s]", line) for line in lines), "numbered or bulleted line"
    assert lines == instruction_pool()


def test_pool_content():
    pool = instruction_pool()
    assert len(pool) >= 120
    assert len(set(pool)) == len(pool), "duplicate instructions"
    assert len({p.lower().rstrip(".!?") for p in pool}) == len(pool), "near-duplicate instructions"
    for p in pool:
        assert 6 <= len(p.split()) <= 30, p
        assert p.strip().lower().rstrip(".") != FIXED_INSTRUCTION.lower().rstrip("."), p
        assert not any(s in p for s in SPECIAL_TOKENS), p


# ----------------------------------------------------------------------------- BPE tokenizer
def test_protocol_and_vocab(tok):
    assert isinstance(tok, TextTokenizer)
    assert tok.vocab_size == 1024
    assert tiny_tokenizer(1024) is tok  # cached
    small = tiny_tokenizer(300)
    assert small.vocab_size == 300
    assert tiny_tokenizer(100_000).vocab_size <= 100_000  # a small corpus runs out of merges first
    with pytest.raises(ValueError):
        BPETokenizer.train(["abc"], vocab_size=len(SPECIAL_TOKENS) + 255)


def test_special_tokens(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(t) == i
        assert tok.encode(t) == [i]
    with pytest.raises(KeyError):
        tok.token_id("<|not_a_token|>")
    ids = tok.encode(CHAT)
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-1] == tok.token_id("<|endoftext|>")
    assert ids.count(tok.token_id("<|image_pad|>")) == 3
    assert ids.count(tok.token_id("<|im_start|>")) == 2 and ids.count(tok.token_id("<|im_end|>")) == 1
    # a special token splits the text around it but leaves its neighbours as they encode alone
    assert tok.encode("<|im_start|>user") == [1] + tok.encode("user")
    assert tok.encode("ab<|image_pad|>cd") == tok.encode("ab") + [5] + tok.encode("cd")
    # encode adds nothing: no BOS/EOS
    assert 0 not in tok.encode("hello") and len(tok.encode("hello")) >= 1
    assert tok.encode("") == []


@pytest.mark.parametrize("text", UNICODE)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(1, 40)):
            c = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
            chars.append(chr(0x20 if 0xD800 <= c <= 0xDFFF else c))  # no lone surrogates
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text


def test_determinism(tok):
    texts = instruction_pool() + [FIXED_INSTRUCTION, "user", "assistant", "\n"]
    a, b = BPETokenizer.train(texts, 700), BPETokenizer.train(texts, 700)
    assert a.backend.to_str() == b.backend.to_str()
    assert tiny_tokenizer.__wrapped__(1024).backend.to_str() == tok.backend.to_str()
    # and across processes (Rust hash maps are seeded per process): load the module by file path,
    # so the child does not import torch through reca.models
    import reca.models.tokenizer as mod

    child = (
        "import hashlib, importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('t', {mod.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print(hashlib.sha256(m.BPETokenizer.train(texts, 700).backend.to_str().encode()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", child], input=json.dumps(texts), capture_output=True,
                         text=True, check=True, timeout=60).stdout.strip()
    assert out == hashlib.sha256(a.backend.to_str().encode()).hexdigest()


def test_instruction_lengths(tok, record_property):
    lens = [len(tok.encode(p)) for p in instruction_pool()]
    mean, longest = sum(lens) / len(lens), max(lens)
    record_property("mean_tokens_per_instruction", mean)
    record_property("max_tokens_per_instruction", longest)
    print(f"\ninstruction tokens (vocab {tok.vocab_size}): mean {mean:.2f}, max {longest}, min {min(lens)}")
    assert mean < 30 and longest <= 48
    assert len(tok.encode(FIXED_INSTRUCTION)) <= 6


def test_save_load(tok, tmp_path):
    tok.save(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = BPETokenizer.load(str(tmp_path))
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.backend.to_str() == tok.backend.to_str()
    for text in [CHAT, *UNICODE, *instruction_pool()[:20]]:
        assert loaded.encode(text) == tok.encode(text)
    assert [loaded.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


# ----------------------------------------------------------------------------- transformers tokenizer
def _check_agreement(hf, tok):
    assert isinstance(hf, TextTokenizer)
    assert hf.vocab_size == tok.vocab_size
    assert [hf.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    with pytest.raises(KeyError):
        hf.token_id("<|not_a_token|>")
    for text in [CHAT, *UNICODE, FIXED_INSTRUCTION, *instruction_pool()]:
        assert hf.encode(text) == tok.encode(text), text
    for text in [CHAT, *UNICODE]:
        assert hf.decode(hf.encode(text)) == text


def test_hf_tokenizer_agrees(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok.backend).save_pretrained(str(tmp_path / "hf"))
    hf = load_tokenizer(str(tmp_path / "hf"), 1024)
    assert isinstance(hf, HFTokenizer)
    _check_agreement(hf, tok)
    # HFTokenizer.save -> BPETokenizer.load and back
    hf.save(str(tmp_path / "again"))
    assert BPETokenizer.load(str(tmp_path / "again")).encode(CHAT) == tok.encode(CHAT)
    # a directory written by BPETokenizer.save also loads through transformers with the same ids
    tok.save(str(tmp_path / "ours"))
    ours = load_tokenizer(str(tmp_path / "ours"), 1024)
    assert isinstance(ours, HFTokenizer)
    _check_agreement(ours, tok)


def test_hf_token_id_with_unk(tok, tmp_path):
    """A tokenizer with an unk token maps unknown tokens to it: token_id must still raise."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok.backend, unk_token="<|endoftext|>").save_pretrained(str(tmp_path))
    hf = HFTokenizer(str(tmp_path))
    assert hf.token_id("<|endoftext|>") == 0  # the unk token itself is known
    assert hf.token_id("<|image_pad|>") == 5
    with pytest.raises(KeyError):
        hf.token_id("<|not_a_token|>")


def test_load_tokenizer_fallback(tok, tmp_path):
    assert load_tokenizer(None, 1024) is tok
    assert load_tokenizer("", 1024) is tok
    assert load_tokenizer(None, 512).vocab_size == 512
    # a path that holds no tokenizer is an error: never the tiny tokenizer in its place
    with pytest.raises(ValueError, match="no tokenizer files there"):
        load_tokenizer(str(tmp_path), 1024)
    with pytest.raises(ValueError, match="no such directory"):
        load_tokenizer(str(tmp_path / "missing"), 1024)


def test_a_family_names_its_own_special_tokens(tmp_path):
    """The no-download tokenizer takes a family's special tokens (its template's image, pad and
    end-of-turn tokens; Qwen's only by default): ids 0, 1, ... in order, matched literally in
    text, saved as the pad / end-of-text token and read back by transformers alike."""
    specials = ("<pad>", "<image>", "<eot>")
    own = load_tokenizer(None, 512, special_tokens=specials)
    assert own is tiny_tokenizer(512, specials) and own.special_tokens == specials
    assert [own.token_id(t) for t in specials] == [0, 1, 2]
    with pytest.raises(KeyError):
        own.token_id("<|im_end|>")
    assert own.encode("a photo<image><image>of<eot>").count(1) == 2 and own.encode("x<eot>")[-1] == 2
    assert tiny_tokenizer(512).special_tokens == SPECIAL_TOKENS  # the default is untouched
    own.save(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["pad_token"] == config["eos_token"] == "<pad>"
    hf = load_tokenizer(str(tmp_path), 512)
    assert [hf.token_id(t) for t in specials] == [0, 1, 2] and hf.encode("a<eot>") == own.encode("a<eot>")
    with pytest.raises(ValueError, match="distinct"):
        BPETokenizer.train(["abc"], 512, ("<a>", "<a>"))
