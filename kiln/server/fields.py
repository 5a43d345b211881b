"""A1111's txt2img / img2img request fields in three groups, one table (docs/server.md lists it; a test checks
that every field of the request bodies is in exactly one group):

- **honoured**: kiln does what A1111 does with it;
- **UI-only**: accepted with any value; it has no effect in A1111's API either (or only with a model kind kiln
  does not load), so clients that always send it work unchanged;
- **refused unless a no-op**: accepted at the value that does nothing (what clients send by default); any other
  value is answered 422 naming the field and why, never accepted and ignored.

A field A1111 does not have is refused (422 naming it): a misspelt field would otherwise be a silent no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from .context import RequestError

HONOURED = {
    "both": ("prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
             "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps",
             "cfg_scale", "width", "height", "tiling", "eta", "s_noise", "denoising_strength", "override_settings",
             "override_settings_restore_afterwards", "send_images", "save_images", "force_task_id", "script_name",
             "script_args", "alwayson_scripts", "refiner_checkpoint", "refiner_switch_at"),
    "txt2img": ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y"),
    "img2img": ("init_images", "resize_mode", "mask", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill",
                "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert", "include_init_images"),
}

UI_ONLY = {
    "do_not_save_samples": "A1111's API replaces it with `not save_images`",
    "do_not_save_grid": "A1111's API replaces it with `not save_images`; kiln never saves a grid for the API",
    "comments": "A1111 empties it when the request starts",
    "image_cfg_scale": "(img2img) used by instruct-pix2pix models only, which kiln does not load; A1111 ignores it "
                       "for every other model (webuiapi always sends 1.5)",
}


@dataclass(frozen=True)
class Refused:
    accepted: tuple  # the values that do nothing (what clients send when they do not use the feature)
    why: str
    same_as: Callable[[Any], Any] | None = None  # also a no-op: the value this request field already has
    also: str = ", or the first pass' own value"  # what `same_as` accepts, in words

    def is_noop(self, value, req) -> bool:
        if any(value == a and type(value) is not bool or value is a for a in self.accepted):
            return True
        return self.same_as is not None and value == self.same_as(req)


def _sampler(req):
    return req.sampler_name or req.sampler_index


NO_CHURN = "kiln's samplers take no churn (s_churn, s_tmin, s_tmax); leave them at 0"
OLD_HIRES = "the old hires fix's first-pass size is not supported: send width/height with enable_hr and hr_scale or " \
            "hr_resize_x/y"

REFUSED = {
    "restore_faces": Refused((None, False), "face restoration needs a face-restorer model, kiln has none"),
    "s_churn": Refused((None, 0), NO_CHURN),
    "s_tmin": Refused((None, 0), NO_CHURN),
    "s_tmax": Refused((None, 0), NO_CHURN),
    "s_min_uncond": Refused((None, 0), "skipping the negative prompt at low noise (NGMS) is not implemented"),
    "disable_extra_networks": Refused((None, False), "kiln always applies <lora:…> tags; leave them out of the "
                                      "prompt instead"),
    "firstpass_image": Refused((None, ""), "starting the hires pass from a given image is not supported"),
    "infotext": Refused((None, ""), "filling a request from an infotext is not supported: send its fields "
                        "(POST /sdapi/v1/png-info parses one)"),
    # txt2img
    "firstphase_width": Refused((None, 0), OLD_HIRES),
    "firstphase_height": Refused((None, 0), OLD_HIRES),
    "hr_checkpoint_name": Refused((None, "", "Use same checkpoint"), "the hires pass runs on the first pass' "
                                  "checkpoint"),
    "hr_sampler_name": Refused((None, "", "Use same sampler"), "the hires pass runs with the first pass' sampler",
                               same_as=_sampler),
    "hr_scheduler": Refused((None, "", "Use same scheduler"), "the hires pass runs with the first pass' scheduler",
                            same_as=lambda r: r.scheduler),
    "hr_prompt": Refused((None, ""), "the hires pass uses the first pass' prompt", same_as=lambda r: r.prompt),
    "hr_negative_prompt": Refused((None, ""), "the hires pass uses the first pass' negative prompt",
                                  same_as=lambda r: r.negative_prompt),
    # img2img
    "initial_noise_multiplier": Refused((None, 1), "scaling img2img's noise is not supported"),
    "latent_mask": Refused((None, ""), "a separate latent mask is not supported"),
    "mask_round": Refused((None,), "kiln's inpainting blends with its own soft latent mask; rounding it is not "
                          "an option"),
}


def show(values) -> str:
    return " or ".join("null" if v is None else repr(v).lower() if isinstance(v, bool) else repr(v)
                       for v in values)


def check_fields(req, mode: str):
    """422 for a field A1111 does not have, and for a refused field set to something other than a no-op."""
    unknown = sorted(req.model_extra or {})
    if unknown:
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not part of "
                           f"A1111's {mode} request")
    fields = type(req).model_fields
    bad = [f"{name}: {r.why} (accepted: {show(r.accepted)}{r.also if r.same_as else ''})"
           for name, r in REFUSED.items() if name in fields and not r.is_noop(getattr(req, name), req)]
    if bad:
        raise RequestError("; ".join(bad))
