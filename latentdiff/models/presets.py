"""Named model architectures: one dict, :data:`MODEL_PRESETS`, which also feeds the command line's choices
(``model.preset=tiny``). Plain config dataclasses, so that :mod:`latentdiff.config` reads them without
importing Diffusers.

========  ==================================================================================
tiny      tests: every forward pass in milliseconds on a CPU
small     the built-in shapes demo: 64 px images, 16x16x4 latents, trains on a 2-core CPU
sd15      the Stable Diffusion 1.5 architecture (860M U-Net, CLIP ViT-L/14 text encoder)
sd2       the Stable Diffusion 2 architecture (OpenCLIP ViT-H/14 text tower, linear attention heads)
========  ==================================================================================
"""

from __future__ import annotations

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

__all__ = ["MODEL_PRESETS"]

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8),
        unet=UNetConfig(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=16,
            norm_num_groups=32,
        ),
        text_encoder=TextEncoderConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        ),
    ),
    "small": ModelConfig(  # the shapes demo's model (the dataclass defaults, with a lighter autoencoder)
        vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16),
    ),
    "sd15": ModelConfig(
        vae=VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                      scaling_factor=0.18215),
        unet=UNetConfig(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
            layers_per_block=2,
            attention_head_dim=40,
            norm_num_groups=32,
        ),
        text_encoder=TextEncoderConfig(
            kind="clip", train=False, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, hidden_act="quick_gelu",
        ),
    ),
    "sd2": ModelConfig(
        vae=VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                      scaling_factor=0.18215),
        unet=UNetConfig(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
            layers_per_block=2,
            attention_head_dim=64,
            norm_num_groups=32,
        ),
        text_encoder=TextEncoderConfig(
            # OpenCLIP ViT-H/14's 24 blocks, read at the penultimate one (Diffusers' converted
            # CLIPTextModel of SD 2 has 23: the last block already dropped).
            kind="open_clip", train=False, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, hidden_act="gelu",
        ),
    ),
}
