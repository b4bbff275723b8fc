"""The adapter protocol: what the engine needs from a unified multimodal model.

A micro-batch of any objective is ONE module call (FSDP2 gathers parameters around forwards;
torch.compile and CUDA graphs see one function):

    out = model(ReconBatch(und, gen, prompt), "recon", generator=g)      # -> LossOutput
    out = model(CaptionBatch(und, prompt, answer_ids, answer_mask), "caption")
    images = model(SampleBatch(und, prompt, steps), "sample", generator=g)  # previews

`prompt` (a `PromptBatch`: ids [B, P], mask [B, P]) comes from the engine's sample builder,
which lays out `model.template` with the image placeholder expanded to `model.num_visual_tokens`
positions; the model writes its visual prompt over them (`reca.models.base.Conditioning`).
`reca.models.base.RecaModule` implements `forward` from a family's native pieces
(`encode_visual_prompt`, `make_target`, `generation_loss`, `sample`); another repository
subclasses it with a page of code (README: "Using reca from another repository").
Shapes: B batch, P prompt length (fixed), D LLM width, N visual tokens per image, Hu/Wu the
understanding view, Hg/Wg the generation view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True, kw_only=True)
class ViewSpec:
    """The two views one decode of an image must produce for this model."""

    und_size: int  # understanding encoder's square input side, pixels
    und_mean: tuple[float, float, float]  # per-channel normalisation of the [0, 1] image
    und_std: tuple[float, float, float]
    gen_size: int  # generation target's square side, pixels; values in [-1, 1]
    gen_resize: str = "crop"  # "crop": aspect-preserving resize + centre crop | "stretch": to square (Harmon)
    #                           | "pad": to square with grey (127) bands (Harmon's image-to-text input)
    # "same": the understanding view shows the generation view's region | "pad": the whole image
    # padded to a square with the understanding mean, int(255 x und_mean) per channel (0 after
    # normalisation), as Janus's and LLaVA's expand2square; a random crop (data.crop_scale < 1)
    # is square and shared by both views either way. `data.und_resize` overrides it.
    und_resize: str = "same"

    def same_pixels(self, und_downscale: float = 1.0) -> bool:
        """Both views hold the same pixels: equal sides, no deliberate downscale, one region, and
        an understanding normalisation that maps [0, 1] to [-1, 1] as the generation view does
        (Harmon, whose visual prompt is the image's own latents). The loader then hands ONE
        tensor as both views (one resize, one copy), and `encode_views` may encode it once."""
        return (self.und_size == self.gen_size and und_downscale == 1.0 and self.und_resize == "same"
                and tuple(self.und_mean) == (0.5,) * 3 and tuple(self.und_std) == (0.5,) * 3)


@dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """A family's prompt around the visual tokens, e.g. Harmon's chat turn.

    `text` holds `{image}` (expanded to `num_visual_tokens` copies of `image_token`) and
    `{instruction}`; everything else is literal text, special tokens included.
    """

    text: str
    image_token: str = "<|image_pad|>"
    pad_token: str = "<|endoftext|>"
    # The template for instructions drawn from the pool, where the family's code lays those out
    # apart from the fixed one ("" = `text`): Harmon tokenises "\n{instruction}" after its user
    # turn, so the newline before the visual tokens becomes one "\n\n" token for pooled ones.
    pooled_text: str = ""
    # image-to-text conversations: the text between an answer's end-of-turn token and the next
    # answer, `{instruction}` the next question (Qwen: "\n<|im_start|>user\n{instruction}<|im_end|>
    # \n<|im_start|>assistant\n"; Show-o's LLaVA phi1.5: "USER: {instruction} ASSISTANT:")
    next_turn: str = ""
    # The prompt's text (template and instruction, not the visual tokens) padded to exactly this
    # many tokens, as Show-o pads its recon prompt to 128 (0 = the template plus
    # sample.max_text_tokens); a longer instruction is refused, never cut.
    text_tokens: int = 0
    # "sample": each row draws its instruction; "batch": one draw for every row of a batch
    # (Show-o's VQ script), from the batch's first stream position.
    instruction_per: str = "sample"
    # image-to-text answers: what precedes each answer and the token that ends it (Show-o:
    # "ASSISTANT: {answer}<|endoftext|>", the answer after a space; Qwen families: <|im_end|>)
    answer_prefix: str = ""
    end_of_turn: str = "<|im_end|>"


@dataclass
class PromptBatch:
    """Token ids of a batch of prompts, right-padded to a fixed length P so shapes never change."""

    input_ids: torch.Tensor  # [B, P] int64; image placeholders where the visual tokens go
    mask: torch.Tensor  # [B, P] bool; False on padding

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device, non_blocking=True), self.mask.to(device, non_blocking=True))


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    # detached scalars, read back lazily; the engine logs each as "OBJECTIVE/KEY" (a key that
    # already starts with "OBJECTIVE/" is logged as it is: "recon/mse", never "recon/recon/mse")
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ReconBatch:
    """One RecA micro-batch: both views of each image and its prompt. `gen` may be the same
    tensor as `und` (`ViewSpec.same_pixels`: one decode, one copy, one codec pass)."""

    und: torch.Tensor  # [B, 3, Hu, Wu], the understanding normalisation
    gen: torch.Tensor  # [B, 3, Hg, Wg] in [-1, 1]
    prompt: PromptBatch


@dataclass
class CaptionBatch:
    """One image-to-text micro-batch: the visual prompt and a question, then the answer."""

    und: torch.Tensor  # [B, 3, Hu, Wu] (the model's `caption_views`)
    prompt: PromptBatch  # the caption template with the question
    answer_ids: torch.Tensor  # [B, A] int64, right-padded
    answer_mask: torch.Tensor  # [B, A] bool; all False for an image without a caption
    # [B, A] bool, the tokens scored: a conversation's later questions are in the answer part
    # (seen, not scored); None = every answer token
    answer_target: torch.Tensor | None = None

    def targets(self) -> torch.Tensor:
        """The answer tokens the loss scores (`answer_target`, else `answer_mask`)."""
        return self.answer_mask if self.answer_target is None else self.answer_target  # a subset of the mask


@dataclass
class SampleBatch:
    """What to generate from: an image's visual prompt (`und`) or, with `und` None, the text
    prompt alone (RecA's inference); `steps` sampling steps.

    A sampler's shapes may change from step to step (a token-by-token sampler's sequence grows
    each token): the engine draws previews with every compiled block and op run eagerly, and
    `reca sample` never compiles."""

    und: torch.Tensor | None  # [B, 3, Hu, Wu] or None
    prompt: PromptBatch
    # denoising steps, MaskGIT rounds, ... (`output.preview_steps`, `reca sample --steps`); a
    # token-by-token sampler, whose step count is its token count, may ignore it
    steps: int


@runtime_checkable
class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...  # no special tokens added

    def token_id(self, token: str) -> int: ...  # id of a special token; KeyError if absent

    def save(self, directory: str) -> None: ...


@runtime_checkable
class RecaAdapter(Protocol):
    """What `reca.engine` reads and calls. Implement it on an `nn.Module` (subclassing
    `reca.models.base.RecaModule` gives `forward` and the defaults); freeze what must stay frozen
    with `requires_grad_(False)`: the engine optimises exactly the parameters that require grad."""

    views: ViewSpec  # the two views one decode produces (recon); `caption_views` for "caption"
    template: PromptTemplate  # the RecA prompt; `caption_template` for "caption" (default: the same)
    tokenizer: TextTokenizer
    num_visual_tokens: int  # visual-prompt tokens per image
    image_token_id: int  # id of `template.image_token`
    objectives: frozenset[str]  # what `forward` accepts: "recon" and "sample" always, "caption" ...
    # optional members the engine uses: "init_from" -> load_pretrained(directory); "export" ->
    # export(path) in the family's original layout; "flop_plan" -> flop_plan(prompt_len, useful)
    # (`reca.models.flops.Stage` list; without it FLOPs are counted with FlopCounterMode)
    capabilities: frozenset[str]

    def forward(self, batch: Any, objective: str, generator: torch.Generator | None = None) -> Any:
        """`ReconBatch` + "recon" (and `CaptionBatch` + "caption") -> `LossOutput`: the family's
        native loss on the target only, randomness from `generator`. `SampleBatch` + "sample" ->
        images [B, 3, Hg, Wg] in [-1, 1]."""
        ...

    def no_weight_decay_modules(self) -> tuple[str, ...]:
        """Parameter-name prefixes the optimizer must not decay (beyond 1-D tensors and biases)."""
        ...
