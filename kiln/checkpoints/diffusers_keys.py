"""Names of our (CompVis) tensors in the diffusers folder layout.

Each function takes our key (without its `model.diffusion_model.` / `first_stage_model.` prefix) and
returns the diffusers name, following the same rules as diffusers' own single-file converters.
"""
import re

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
          "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
FIXED_UNET = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _resnet(rest):
    for ours, theirs in RESNET.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def unet_key(key: str, num_res_blocks: int) -> str:
    for ours, theirs in FIXED_UNET.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    per_level = num_res_blocks + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        i, part, rest = int(m[1]), int(m[2]), m[3]
        b, layer = (i - 1) // per_level, (i - 1) % per_level
        if rest.startswith("op."):
            return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}"
        if part == 0:
            return f"down_blocks.{b}.resnets.{layer}.{_resnet(rest)}"
        return f"down_blocks.{b}.attentions.{layer}.{rest}"
    if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", key):
        part, rest = int(m[1]), m[2]
        if part == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{part // 2}.{_resnet(rest)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        i, part, rest = int(m[1]), int(m[2]), m[3]
        b, layer = i // per_level, i % per_level
        if rest.startswith("conv."):
            return f"up_blocks.{b}.upsamplers.0.conv.{rest[5:]}"
        if part == 0:
            return f"up_blocks.{b}.resnets.{layer}.{_resnet(rest)}"
        return f"up_blocks.{b}.attentions.{layer}.{rest}"
    raise KeyError(key)


VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_key(key: str, levels: int) -> str:
    key = key.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)", key):
        side, way, i, what, rest = m[1], m[2], int(m[3]), m[4], m[5]
        b = i if way == "down" else levels - 1 - i  # diffusers orders decoder blocks from low resolution up
        if what == "block":
            return f"{side}.{way}_blocks.{b}.resnets.{rest}"
        if what == "attn":
            j, name, param = rest.split(".")
            return f"{side}.{way}_blocks.{b}.attentions.{j}.{VAE_ATTN[name]}.{param}"
        return f"{side}.{way}_blocks.{b}.{what}rs.0.{rest}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", key):
        side, what, rest = m[1], m[2], m[3]
        if what == "attn_1":
            name, param = rest.rsplit(".", 1)
            return f"{side}.mid_block.attentions.0.{VAE_ATTN[name]}.{param}"
        return f"{side}.mid_block.resnets.{int(what[-1]) - 1}.{rest}"
    return key
