"""The one walker over an SD1-style UNet's attention layers (ComfyUI's ``openaimodel.UNetModel``).

Inference (RRA patches), training (the trainable copy, the loss layers) and the maps node all name
layers the way ComfyUI's attention patches see them: ``transformer_options["block"]`` is
("input" | "middle" | "output", block number) and ``block_index`` the transformer inside the block.
"""

from __future__ import annotations

from dataclasses import dataclass

from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

PARTS = (("input", "input_blocks"), ("middle", "middle_block"), ("output", "output_blocks"))


@dataclass(frozen=True)
class AttentionLayer:
    """One BasicTransformerBlock: where it is, how wide it is and at which resolution it works."""

    block: str     # "input", "middle" or "output"
    number: int    # the block's number within its part (ComfyUI's patch key)
    index: int     # the transformer's index within the block
    dim: int       # channels
    level: int     # how many times the latent is halved at this layer
    prefix: str    # state-dict prefix, e.g. "output_blocks.3.1.transformer_blocks.0"

    @property
    def key(self) -> str:
        """The pack's name of the layer, as concept files key RRA layers: ``output.3.0``."""
        return f"{self.block}.{self.number}.{self.index}"

    @property
    def patch_key(self) -> tuple[str, int, int]:
        """ComfyUI's key for attention replace patches: (block, number, transformer index)."""
        return self.block, self.number, self.index


def attention_layers(diffusion_model) -> list[AttentionLayer]:
    """Every transformer block of the UNet, in the order the UNet runs them."""
    layers, level = [], 0
    for part, attribute in PARTS:
        blocks = getattr(diffusion_model, attribute)
        blocks = [blocks] if part == "middle" else blocks
        for number, block in enumerate(blocks):
            base = attribute if part == "middle" else f"{attribute}.{number}"
            for position, module in enumerate(block):
                for index, transformer in enumerate(getattr(module, "transformer_blocks", [])):
                    layers.append(AttentionLayer(part, number, index, transformer.attn1.to_q.in_features, level,
                                                 f"{base}.{position}.transformer_blocks.{index}"))
            if part == "input":
                level += sum(isinstance(m, Downsample) for m in block)
            elif part == "output":
                level -= sum(isinstance(m, Upsample) for m in block)
    return layers


def layer_key(transformer_options: dict) -> str | None:
    """The layer an attention patch is called for, from its ``extra_options``."""
    block = transformer_options.get("block")
    if block is None:
        return None
    return f"{block[0]}.{block[1]}.{transformer_options.get('block_index', 0)}"


def parse_key(key: str) -> tuple[str, int, int]:
    """``output.3.0`` -> ("output", 3, 0), ComfyUI's replace-patch key."""
    block, number, index = key.split(".")
    return block, int(number), int(index)
