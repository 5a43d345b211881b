"""Which architecture a weights file holds, read from its tensor names and shapes (or a CompVis yaml)."""
import json
import re
from dataclasses import replace

import torch

from ..errors import CheckpointError
from ..models.clip_text import CLIPTextConfig
from ..models.sd import ModelConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPENCLIP = "cond_stage_model.model."


def _indices(keys, pattern):
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def unet_config(src, prefix=UNET, out_channels: int | None = None) -> UNetConfig:
    """The UNet's layout from its tensors' names and shapes; `out_channels` given: an encoder alone (a ControlNet),
    which has no output layer to read it from."""
    keys = [k[len(prefix):] for k in src.keys() if k.startswith(prefix)]
    shape = lambda k: src.shape(prefix + k)
    if "input_blocks.0.0.weight" not in keys:
        raise CheckpointError(f"{src.name}: no UNet found (expected tensors named '{prefix}input_blocks.*')")
    mc, in_ch = shape("input_blocks.0.0.weight")[:2]
    # Walk the input blocks: ResBlocks give each level's width, `.op` convs end a level.
    mults, res_blocks, attn_levels, depths, level, count = [], [], set(), {}, 0, 0
    for i in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in keys:
            res_blocks.append(count)
            level, count = level + 1, 0
            continue
        out = shape(f"input_blocks.{i}.0.out_layers.3.weight")[0]
        if len(mults) == level:
            mults.append(out // mc)
        count += 1
        blocks = _indices(keys, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
        if blocks:
            attn_levels.add(level)
            depths[level] = len(blocks)
    res_blocks.append(count)
    if len(set(res_blocks)) != 1:
        raise CheckpointError(f"{src.name}: unsupported UNet layout (levels with {res_blocks} ResBlocks)")
    to_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if not to_k:
        raise CheckpointError(f"{src.name}: unsupported UNet: no cross-attention layers")
    context_dim = shape(to_k[0])[1]
    proj_in = [k for k in keys if k.endswith("proj_in.weight")][0]
    linear = len(shape(proj_in)) == 2
    mid_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    per_level = tuple(depths.get(lv, mid_depth if lv == len(mults) - 1 else 1) for lv in range(len(mults)))
    adm = shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in keys else None
    # Heads do not show in shapes: SD 1.x uses 8 heads; SD 2.x and SDXL use 64-channel heads.
    heads = dict(num_heads=8) if context_dim == 768 and not linear else dict(num_heads=-1, num_head_channels=64)
    return UNetConfig(
        in_channels=in_ch, out_channels=out_channels or shape("out.2.weight")[0], model_channels=mc,
        attention_resolutions=tuple(2 ** lv for lv in sorted(attn_levels, reverse=True)), num_res_blocks=res_blocks[0],
        channel_mult=tuple(mults), transformer_depth=per_level if len(set(per_level)) > 1 else per_level[0],
        context_dim=context_dim, use_linear_in_transformer=linear, adm_in_channels=adm, **heads)


def vae_config(src, prefix=VAE) -> VAEConfig:
    keys = [k[len(prefix):] for k in src.keys() if k.startswith(prefix)]
    shape = lambda k: src.shape(prefix + k)
    if "encoder.conv_in.weight" not in keys or "decoder.conv_out.weight" not in keys:
        raise CheckpointError(
            f"{src.name}: no autoencoder found (expected tensors named '{prefix}encoder.*', '{prefix}decoder.*')")
    ch, in_ch = shape("encoder.conv_in.weight")[:2]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    mults = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    attn_levels = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in keys]
    resolution = 256
    return VAEConfig(in_channels=in_ch, out_ch=shape("decoder.conv_out.weight")[0], ch=ch, ch_mult=mults,
                     num_res_blocks=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
                     attn_resolutions=tuple(resolution // 2 ** i for i in attn_levels), resolution=resolution,
                     z_channels=shape("decoder.conv_in.weight")[1], embed_dim=shape("post_quant_conv.weight")[0])


def clip_config(src, prefix=CLIP) -> CLIPTextConfig:
    shape = lambda k: src.shape(prefix + k)
    if prefix + "embeddings.token_embedding.weight" not in src:
        raise CheckpointError(f"{src.name}: no CLIP text encoder found (expected '{prefix}*')")
    vocab, width = shape("embeddings.token_embedding.weight")
    layers = len(_indices(src.keys(), re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
    return CLIPTextConfig(vocab_size=vocab, max_position=shape("embeddings.position_embedding.weight")[0],
                          width=width, layers=layers,
                          heads=max(1, width // 64), mlp_width=shape("encoder.layers.0.mlp.fc1.weight")[0])


def openclip_config(src, prefix=OPENCLIP) -> CLIPTextConfig:
    """open_clip's text tower (SD 2.x: ViT-H/14, 1024 wide, 24 layers; SDXL: bigG, 1280 wide, 32 layers)."""
    shape = lambda k: src.shape(prefix + k)
    if prefix + "token_embedding.weight" not in src:
        raise CheckpointError(f"{src.name}: no OpenCLIP text encoder found (expected '{prefix}token_embedding.weight')")
    vocab, width = shape("token_embedding.weight")
    proj = shape("text_projection")[1] if prefix + "text_projection" in src else width
    return CLIPTextConfig(kind="openclip", vocab_size=vocab, max_position=shape("positional_embedding")[0], width=width,
                          layers=len(_indices(src.keys(), re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")),
                          heads=max(1, width // 64), mlp_width=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
                          act="gelu", projection=proj)


def sd2_config(src) -> ModelConfig:
    """SD 2.x: OpenCLIP ViT-H text encoder, conditioning on its penultimate layer (+ final norm); attention in
    fp32 under half precision (SD 2.1 makes black images otherwise). ε vs v is not visible in the names: see
    `guess_v_prediction`."""
    unet = replace(unet_config(src), upcast_attention=True)
    family = {4: "sd2", 9: "sd2-inpaint"}.get(unet.in_channels)
    if family is None:
        raise CheckpointError(f"{src.name}: an SD 2.x variant with a {unet.in_channels}-channel UNet "
                              f"(depth-to-image?) is not supported")
    return ModelConfig(family=family, unet=unet, vae=vae_config(src), text=openclip_config(src), text_skip=1,
                       watermark="SDV2")


SDXL_EMBEDDERS = "conditioner.embedders."


def sdxl_config(src) -> ModelConfig:
    """SDXL base (CLIP ViT-L + OpenCLIP bigG, vector conditioning of 2,816) or refiner (bigG alone, 2,560 with the
    aesthetic score). Both condition on the penultimate layers without the final norm."""
    texts = []
    for i in range(2):
        pre = f"{SDXL_EMBEDDERS}{i}."
        if pre + "transformer.text_model.embeddings.token_embedding.weight" in src:
            texts.append(clip_config(src, pre + "transformer.text_model."))
        elif pre + "model.token_embedding.weight" in src:
            texts.append(openclip_config(src, pre + "model."))
    if not texts:
        raise CheckpointError(f"{src.name}: an SDXL-like file without a text encoder under '{SDXL_EMBEDDERS}N.'")
    unet = unet_config(src)
    if unet.adm_in_channels is None:
        raise CheckpointError(f"{src.name}: an SDXL-like file whose UNet has no vector conditioning (label_emb)")
    vector = texts[-1].projection + 256 * (6 if len(texts) == 2 else 5)  # pooled text + size/crop/(target | score)
    if unet.adm_in_channels != vector or unet.context_dim != sum(t.width for t in texts):
        raise CheckpointError(f"{src.name}: unknown SDXL variant (vector {unet.adm_in_channels}, context "
                              f"{unet.context_dim}, text encoders {[t.width for t in texts]})")
    kind = "sdxl" if len(texts) == 2 else "sdxl-refiner"
    family = {4: kind, 9: kind + "-inpaint"}.get(unet.in_channels)
    if family is None:
        raise CheckpointError(f"{src.name}: an SDXL variant with a {unet.in_channels}-channel UNet is not supported")
    return ModelConfig(family=family, unet=unet, vae=vae_config(src), text=texts[0],
                       text2=texts[1] if len(texts) == 2 else None, text_skip=1, text_final_norm=False,
                       scale_factor=0.13025, native_size=1024, watermark="SDXL")


@torch.no_grad()
def guess_v_prediction(unet) -> bool:
    """A1111's test for SD 2.x files without a yaml: at t=999 on a flat 0.5 latent, an ε-model predicts about the
    input itself, a v-model about its negative, so (output − input) has a mean below −1 only for v-models."""
    p = next(unet.parameters())
    x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 2, unet.cfg.context_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999.0], device=p.device), ctx).float()
    return (out - x.float()).mean().item() < -1


def detect(src) -> ModelConfig:
    """The model config of a CompVis-layout source; kiln's own files carry it in their metadata."""
    if "kiln_config" in src.metadata:
        return ModelConfig.from_dict(json.loads(src.metadata["kiln_config"]))
    keys = src.keys()
    if any(k.startswith(SDXL_EMBEDDERS) for k in keys):
        return sdxl_config(src)
    if any(k.startswith(OPENCLIP) for k in keys):
        return sd2_config(src)
    if not any(k.startswith(UNET) for k in keys):
        raise CheckpointError(f"{src.name}: not a Stable Diffusion checkpoint "
                              f"(no 'model.diffusion_model.*' tensors among {len(keys)} keys)")
    unet = unet_config(src)
    if unet.context_dim != 768 or unet.use_linear_in_transformer or unet.adm_in_channels:
        raise CheckpointError(f"{src.name}: unknown UNet variant (context {unet.context_dim}, linear proj "
                              f"{unet.use_linear_in_transformer}); only SD 1.x layouts are supported yet")
    family = {4: "sd1", 9: "sd1-inpaint"}.get(unet.in_channels)
    if family is None:
        raise CheckpointError(f"{src.name}: unknown UNet variant with {unet.in_channels} input channels")
    return ModelConfig(family=family, unet=unet, vae=vae_config(src), text=clip_config(src))


def config_from_yaml(path) -> dict:
    """The facts of a CompVis inference yaml that shape the model: returns ModelConfig keyword overrides."""
    import yaml

    try:
        with open(path) as f:
            params = yaml.safe_load(f)["model"]["params"]
        unet_p = params["unet_config"]["params"]
        dd = params["first_stage_config"]["params"]["ddconfig"]
        embed_dim = params["first_stage_config"]["params"]["embed_dim"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not a usable CompVis model config ({type(e).__name__}: {e})") from None
    openclip = "OpenCLIP" in params.get("cond_stage_config", {}).get("target", "")
    parameterization = params.get("parameterization", "eps")
    depth = unet_p.get("transformer_depth", 1)
    unet = UNetConfig(
        in_channels=unet_p["in_channels"], out_channels=unet_p["out_channels"], model_channels=unet_p["model_channels"],
        attention_resolutions=tuple(unet_p["attention_resolutions"]), num_res_blocks=unet_p["num_res_blocks"],
        channel_mult=tuple(unet_p["channel_mult"]), num_heads=unet_p.get("num_heads", -1),
        num_head_channels=unet_p.get("num_head_channels", -1),
        transformer_depth=tuple(depth) if isinstance(depth, list) else depth, context_dim=unet_p["context_dim"],
        use_linear_in_transformer=unet_p.get("use_linear_in_transformer", False), upcast_attention=openclip)
    vae = VAEConfig(in_channels=dd["in_channels"], out_ch=dd["out_ch"], ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
                    num_res_blocks=dd["num_res_blocks"], attn_resolutions=tuple(dd.get("attn_resolutions", [])),
                    resolution=dd["resolution"], z_channels=dd["z_channels"], embed_dim=embed_dim)
    return dict(unet=unet, vae=vae, scale_factor=params.get("scale_factor", 1.0),
                parameterization=parameterization,
                linear_start=params.get("linear_start", 0.00085), linear_end=params.get("linear_end", 0.012),
                timesteps=params.get("timesteps", 1000),
                # SD 2 v-models are 768² models, though their yaml says image_size 64 (unused upstream)
                native_size=768 if openclip and parameterization == "v"
                else params.get("image_size", 64) * 2 ** (len(dd["ch_mult"]) - 1))
