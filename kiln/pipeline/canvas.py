"""Canvases: what txt2img and img2img/inpainting start sampling from, and how the decoded pixels are put back
(the original pixels outside an inpainting mask; an "only masked" crop pasted into the whole picture)."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..errors import KilnError
from ..images import blur_mask, fill_masked, fit, load_image, load_mask, mask_region, model_size, outpaint_canvas
from .noise import randn
from .params import GenerationParams, check_size, size_unit
from .vae import encode_images, to_model_input


@dataclass
class Canvas:
    """What sampling starts from and how its pixels become the picture."""
    width: int
    height: int
    shape: tuple  # latent (C, h, w)
    z0: torch.Tensor | None = None  # img2img: the init image's latents [1, C, h, w]
    known: torch.Tensor | None = None  # inpainting: [1, 1, h, w], 1 = keep the init there
    concat: torch.Tensor | None = None  # inpainting models: their extra input channels [1, 5, h, w]
    fill: str = "original"
    region: tuple | None = None  # "only masked": the crop of the picture that was rendered
    composite: Callable = None  # decoded pixels → the picture's pixels (None: as they are)

    def finish(self, pixels: np.ndarray) -> np.ndarray:
        return pixels if self.composite is None else self.composite(pixels)

    @property
    def masked(self) -> bool:
        return self.known is not None

    def start(self, n: int, gens, device) -> torch.Tensor | None:
        """img2img's clean start latents for a batch of `n` (the masked area as `fill` asks)."""
        if self.z0 is None:
            return None
        init = self.z0.to(device).expand(n, -1, -1, -1).clone()
        if self.masked and self.fill not in ("original", "fill"):
            hole = (1 - self.known).expand_as(init)
            fill = randn(self.z0.shape[1:], gens, device) if self.fill == "latent-noise" else torch.zeros_like(init)
            init = init * (1 - hole) + fill * hole
        return init


def txt2img_canvas(pipe, p: GenerationParams) -> Canvas:
    w, h = p.width or pipe.native_size, p.height or pipe.native_size
    return Canvas(w, h, (pipe.cfg.latent_channels, h // pipe.cfg.downscale, w // pipe.cfg.downscale))


def prepare_init(pipe, init_image, width=None, height=None, resize_mode="just-resize", mask=None, outpaint=None,
                 notices=None):
    """(RGB init image at the generation size, mask [H, W] float or None). Without width/height the image's
    own size is used, rounded down to a multiple of 8 (with a notice). `outpaint` = (left, right, top,
    bottom) extends the canvas and masks the new area."""
    notices = pipe.notices if notices is None else notices
    im = load_image(init_image, "init image")
    m = None if mask is None else load_mask(mask, im.size, notices)
    if outpaint is not None:
        im, new_area = outpaint_canvas(im, *outpaint)
        if m is not None:
            m = np.maximum(np.pad(m, ((outpaint[2], outpaint[3]), (outpaint[0], outpaint[1]))), new_area)
        else:
            m = new_area
    unit = size_unit(pipe.cfg)
    if width is None and height is None:
        width, height = model_size(im.width, im.height, unit)
        if (width, height) != im.size:
            notices.append(f"the init image is {im.width}x{im.height}; resized to {width}x{height} "
                           f"(sizes must be multiples of {unit})")
    else:
        width = width or round(im.width * height / im.height / unit) * unit
        height = height or round(im.height * width / im.width / unit) * unit
    check_size(pipe.cfg, width, height)
    im = fit(im, width, height, resize_mode)
    if m is not None:
        m_im = fit(Image.fromarray((m * 255).astype(np.uint8)).convert("RGB"), width, height, resize_mode)
        m = np.asarray(m_im.convert("L"), dtype=np.float32) / 255.0
    return im, m


def img2img_canvas(pipe, p: GenerationParams, notices: list) -> Canvas:
    """The init image (fitted, or outpainted) encoded; with a mask, the region to keep in latent space, the
    inpainting model's extra channels and the compositing of the original pixels outside the mask."""
    region = None
    if p.inpaint_area == "masked" and p.inpainting:  # the picture keeps its size; width/height: the crop's
        init_im, m = prepare_init(pipe, p.init_image, None, None, p.resize_mode, p.mask, p.outpaint, notices)
        width, height = p.width or pipe.native_size, p.height or pipe.native_size
        check_size(pipe.cfg, width, height)
        region = mask_region(m, p.masked_padding, width, height)
        whole = (np.asarray(init_im), blur_mask(m, p.mask_blur))
        m_crop = Image.fromarray((m * 255).astype(np.uint8)).crop(region).resize((width, height), Image.BILINEAR)
        init_im = init_im.crop(region).resize((width, height), Image.LANCZOS)
        m = np.asarray(m_crop, dtype=np.float32) / 255.0
    else:
        init_im, m = prepare_init(pipe, p.init_image, p.width, p.height, p.resize_mode, p.mask, p.outpaint,
                                  notices)
        width, height = init_im.size
    nine = pipe.cfg.unet.in_channels != pipe.cfg.latent_channels
    if nine and m is None:
        raise KilnError(f"{pipe.info.path} is an inpainting model: it needs a mask (--mask) or --outpaint")
    init_px = enc_px = np.array(init_im)
    if m is not None and p.inpaint_fill == "fill":  # the sampler starts from the hole painted with its surroundings
        enc_px = fill_masked(init_px, m)
    x_img = to_model_input(enc_px)
    z0 = encode_images(pipe, x_img, tile=p.tile).float()  # the posterior mean: strength 0 is the VAE round trip
    canvas = Canvas(width, height, tuple(z0.shape[1:]), z0=z0, fill=p.inpaint_fill, region=region)
    if m is None:
        return canvas
    lat_hw = z0.shape[-2:]
    m_lat = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=lat_hw, mode="bilinear",
                                            align_corners=False)
    repaint = (m_lat > 0.5).float() if nine else m_lat.clamp(0, 1)
    canvas.known = (1 - repaint).to(pipe.device)
    if nine:  # the model's own conditioning: binarised mask ⊕ latents of the image with the hole blanked
        hard = torch.from_numpy((m >= 0.5).astype(np.float32))[None, None]
        masked = encode_images(pipe, x_img * (1 - hard), tile=p.tile).float()
        canvas.concat = torch.cat([torch.nn.functional.interpolate(hard, size=lat_hw), masked.cpu()],
                                  dim=1).to(pipe.device)
    paste = blur_mask(m, p.mask_blur)  # pixel-space blend weights (1 = generated)
    canvas.composite = lambda pixels: _composite(pixels, paste, p.mask_blur, init_px, region,
                                                 whole if region else None)
    return canvas


def _composite(pixels, paste, mask_blur, init_px, region, whole):
    """The original pixels outside the (blurred) mask, exactly; an "only masked" crop back into the picture."""
    w = paste[None, :, :, None]
    pixels = np.clip(w * pixels + (1 - w) * init_px[None] + 0.5, 0, 255).astype(np.uint8) \
        if mask_blur > 0 else np.where(w > 0.5, pixels, init_px[None]).astype(np.uint8)
    if region is None:
        return pixels
    (full_px, full_paste), (x0, y0, x1, y1) = whole, region
    w = full_paste[y0:y1, x0:x1, None]
    out = []
    for px in pixels:
        small = np.asarray(Image.fromarray(px).resize((x1 - x0, y1 - y0), Image.LANCZOS))
        full = full_px.astype(np.float64).copy()
        full[y0:y1, x0:x1] = w * small + (1 - w) * full[y0:y1, x0:x1]
        out.append(np.clip(full + 0.5, 0, 255).astype(np.uint8))
    return np.stack(out)
