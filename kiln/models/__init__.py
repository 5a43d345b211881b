"""Pure nn.Modules (no file I/O). Attribute names follow the CompVis checkpoint keys."""
from .clip_text import CLIPTextConfig, CLIPTextTransformer, OpenCLIPTextTransformer
from .sd import LatentDiffusion, ModelConfig, alphas_cumprod
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

__all__ = ["CLIPTextConfig", "CLIPTextTransformer", "OpenCLIPTextTransformer", "LatentDiffusion", "ModelConfig",
           "alphas_cumprod", "UNetConfig", "UNetModel", "AutoencoderKL", "VAEConfig"]
