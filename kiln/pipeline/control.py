"""ControlNet units in a generation: each a ControlNet file, a control image, a weight and the part of the steps
it acts in. `with_control` is the denoiser wrapper: the units' residuals (summed) go into the UNet's skips and
middle block, for the rows of the batched model call as the unit's control mode says (sd-webui-controlnet's:
"Balanced", diffusers' default, steers prompt and negative prompt alike; "My prompt is more important" weighs the
deeper residuals less; "ControlNet is more important" also leaves the negative prompt's rows alone)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, KilnError
from ..images import load_image, load_mask


@dataclass
class ControlUnit:
    """One ControlNet unit of `GenerationParams.controlnets`."""
    model: Any  # a ControlNet file (path), or a loaded `ControlNetModel`
    image: Any  # the control image: a path or a PIL image (already preprocessed: edges, pose…)
    weight: float = 1.0
    start: float = 0.0  # acts from this fraction of the steps…
    end: float = 1.0  # …to this one
    resize_mode: str = "Crop and Resize"  # how the control map is fitted to the picture (sd-webui-controlnet's)
    module: str = "none"  # the preprocessor that turns `image` into the control map (kiln.preprocessors)
    processor_res: int | None = None  # the short side the preprocessor works at (None: pixel perfect)
    threshold_a: float | None = None  # the preprocessor's sliders (None: its defaults)
    threshold_b: float | None = None
    control_mode: Any = "Balanced"  # or "My prompt is more important", "ControlNet is more important" (0, 1, 2)
    mask: Any = None  # inpaint preprocessors: white = repaint (default: the generation's inpainting mask)

    def check(self, k: int):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise KilnError(f"ControlNet unit {k}: guidance start and end must satisfy 0 <= start < end <= 1, "
                            f"got {self.start} and {self.end}")
        if not -10.0 <= self.weight <= 10.0:
            raise KilnError(f"ControlNet unit {k}: weight must be between -10 and 10, got {self.weight}")
        self.control_mode = control_mode(self.control_mode, k)


CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")


def control_mode(mode, k: int = 0) -> str:
    """sd-webui-controlnet's control mode from its name (any case), its number (0, 1, 2) or its short name."""
    short = {"balanced": 0, "prompt": 1, "more_prompt": 1, "control": 2, "more_control": 2}
    if isinstance(mode, (int, float)) and not isinstance(mode, bool) and int(mode) == mode and 0 <= mode <= 2:
        return CONTROL_MODES[int(mode)]
    if isinstance(mode, str):
        key = mode.strip().lower()
        if key in ("0", "1", "2"):
            return CONTROL_MODES[int(key)]
        for i, name in enumerate(CONTROL_MODES):
            if key == name.lower() or short.get(key) == i:
                return name
    raise KilnError(f"ControlNet unit {k}: control mode must be one of {', '.join(CONTROL_MODES)} (or 0, 1, 2), "
                    f"got {mode!r}")


@dataclass
class Active:
    """A unit ready to run: its model on the pipeline's device and its hint [1, 3, H, W] in [0, 1]; `record`: the
    unit as sd-webui-controlnet's infotext writes it."""
    model: Any
    hint: torch.Tensor
    weight: float
    start: float
    end: float
    record: str = ""
    soft: bool = False  # "My prompt is more important" and "ControlNet is more important": deeper layers weigh less
    prompt_only: bool = False  # "ControlNet is more important": the negative prompt's rows get no control

    def scales(self, n: int) -> list[float]:
        """The weight of each of the `n` residuals (sd-webui-controlnet: 0.825^(12−i) under soft injection, the
        first 10 of those for SDXL's 10)."""
        if not self.soft:
            return [self.weight] * n
        return [self.weight * 0.825 ** float(12 - i) for i in range(13)][:n]

    def on(self, step: int, total: int) -> bool:
        """Whether the unit acts at `step` (from 0) of `total`: diffusers' rule (the step's span lies in
        [start, end])."""
        return not (step / total < self.start or (step + 1) / total > self.end)


def load_unit_model(pipe, model):
    """A unit's ControlNet, loaded once per file and pipeline, on its device and in its dtype, checked against the
    model it is to steer."""
    from ..checkpoints.controlnet import check_fits, load_controlnet, model_name, weights_file

    if not isinstance(model, (str, Path)):
        net = model
    else:
        key = str(Path(model).resolve())
        cache = pipe._controlnets
        if key not in cache:
            from ..checkpoints.hashes import legacy_hash

            # --medvram/--lowvram: in CPU memory, on the device only while it runs (one more offloaded part)
            offloaded = pipe.offloader is not None
            cache[key] = load_controlnet(model, dtype=pipe.dtype, device="cpu" if offloaded else pipe.device,
                                         base=pipe.cfg.unet)
            if offloaded:
                pipe.offloader.add(cache[key])
            # sd-webui-controlnet names models "name [hash]" with A1111's old 8-digit hash
            cache[key].title = f"{model_name(Path(model))} [{legacy_hash(weights_file(Path(model)))}]"
        net = cache[key]
    try:
        check_fits(net, pipe.cfg.unet, getattr(net, "name", "?"))
    except CheckpointError as e:
        raise KilnError(str(e)) from None
    return net


def activate(pipe, units: list[ControlUnit], width: int, height: int, mask=None) -> list[Active]:
    """The units for a picture of width × height: models loaded, control images read, preprocessed and fitted to the
    size (`mask`: the generation's inpainting mask, for inpaint units without their own). The hint encoder
    downsamples by 8: a model whose VAE downsamples less (the embedded demo model: 4) gets its hint at 8 × the
    latent's size."""
    out = []
    f = pipe.cfg.downscale
    for k, u in enumerate(units):
        u.check(k)
        hint, res = control_map(u, k, width, height, mask)
        hint = torch.from_numpy(hint).permute(2, 0, 1)[None]
        if f != 8:
            hint = torch.nn.functional.interpolate(hint, size=(height // f * 8, width // f * 8), mode="bicubic",
                                                   align_corners=False)
        net = load_unit_model(pipe, u.model)
        out.append(Active(net, hint.to(pipe.device), float(u.weight), u.start, u.end, _record(u, net, res),
                          soft=u.control_mode != CONTROL_MODES[0], prompt_only=u.control_mode == CONTROL_MODES[2]))
    return out


def _record(u: ControlUnit, net, res: int) -> str:
    """sd-webui-controlnet's infotext value of a unit: "Module: canny, Model: name [hash], Weight: 1, …"."""
    from .. import preprocessors

    num = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    module = preprocessors.find(u.module)
    fields = {"Module": module.name, "Model": getattr(net, "title", getattr(net, "name", "?")),
              "Weight": num(float(u.weight)), "Resize Mode": preprocessors.resize_mode(u.resize_mode),
              "Processor Res": res, "Threshold A": num(float(u.threshold_a if u.threshold_a is not None else -1)),
              "Threshold B": num(float(u.threshold_b if u.threshold_b is not None else -1)),
              "Guidance Start": num(float(u.start)), "Guidance End": num(float(u.end)),
              "Pixel Perfect": str(u.processor_res is None), "Control Mode": u.control_mode}
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def control_fields(units: list[Active]) -> dict:
    """The infotext fields of the units (\"ControlNet 0\": …)."""
    return {f"ControlNet {k}": u.record for k, u in enumerate(units)}


# sd-webui-controlnet's infotext keys → ControlUnit fields; keys it writes that change nothing here
RECORD_FIELDS = {"Module": "module", "Model": "model", "Weight": "weight", "Resize Mode": "resize_mode",
                 "Processor Res": "processor_res", "Threshold A": "threshold_a", "Threshold B": "threshold_b",
                 "Guidance Start": "start", "Guidance End": "end", "Pixel Perfect": "pixel_perfect",
                 "Control Mode": "control_mode"}
RECORD_NO_EFFECT = {"Save Detected Map": None, "Hr Option": "Both", "Low Vram": None}


def units_from_infotext(info: dict) -> list[dict]:
    """The units an infotext records (`ControlNet 0: "Module: canny, Model: name [hash], Weight: 1, …"`, as
    sd-webui-controlnet and kiln write it), in order, as ControlUnit fields with the model's title in `model`
    (a name to look up: the file is not in the infotext, nor is the control image). KilnError names a unit it
    cannot read."""
    units = []
    while (record := info.get(f"ControlNet {len(units)}")) is not None:
        k = len(units)
        where = f"ControlNet {k}"
        fields = {}
        for part in record.split(", "):
            key, sep, value = part.partition(": ")
            key, value = key.strip(), value.strip()
            if not sep or (key not in RECORD_FIELDS and key not in RECORD_NO_EFFECT):
                raise KilnError(f"{where}: cannot read {part!r} (known: {', '.join(RECORD_FIELDS)})")
            if key in RECORD_NO_EFFECT:
                if RECORD_NO_EFFECT[key] is not None and value != RECORD_NO_EFFECT[key]:
                    raise KilnError(f"{where}: {key}: {value} is not supported (kiln's units act in both passes)")
                continue
            fields[RECORD_FIELDS[key]] = value
        try:
            unit = dict(model=fields["model"], module=fields.get("module", "none"),
                        weight=float(fields.get("weight", 1)), start=float(fields.get("start", 0)),
                        end=float(fields.get("end", 1)), resize_mode=fields.get("resize_mode", "Crop and Resize"),
                        control_mode=fields.get("control_mode", "Balanced"))
            if fields.get("pixel_perfect", "False") != "True" and "processor_res" in fields:
                unit["processor_res"] = int(float(fields["processor_res"]))
            for name in ("threshold_a", "threshold_b"):
                if name in fields and float(fields[name]) != -1:
                    unit[name] = float(fields[name])
        except (KeyError, ValueError) as e:
            raise KilnError(f"{where}: cannot read {record!r} ({type(e).__name__}: {e})") from None
        units.append(unit)
    return units


def control_map(u: ControlUnit, k: int, width: int, height: int, mask=None) -> tuple[np.ndarray, int]:
    """(The unit's control map at width × height, float32 [H, W, 3] in 0..1, the preprocessor's resolution): the
    image read, preprocessed (at `processor_res`, or pixel perfect: the resolution the image has once fitted) and
    fitted as its resize mode says. Inpaint units: the masked pixels are −1 (ControlNet 1.1's inpaint input)."""
    from .. import preprocessors

    image = load_image(u.image, f"ControlNet unit {k}'s control image")
    try:
        mode = preprocessors.resize_mode(u.resize_mode)
        res = u.processor_res or preprocessors.pixel_perfect_resolution(image.size, width, height, mode)
        module = preprocessors.find(u.module).name
        image = preprocessors.resize_for(preprocessors.run(module, image, res, u.threshold_a, u.threshold_b),
                                         width, height, mode).convert("RGB")
        if not module.startswith("inpaint"):
            return np.asarray(image, dtype=np.float32) / 255.0, res
        if u.mask is None and mask is None:
            raise KilnError(f"the {module} preprocessor needs a mask (the unit's, or the inpainting mask)")
        m = load_mask(u.mask if u.mask is not None else mask, image.size)
        return preprocessors.inpaint_hint(image, m), res
    except KilnError as e:
        raise KilnError(f"ControlNet unit {k}: {e}") from None


def with_control(call, units: list[Active], clock):
    """A model call with the units' residuals added (those acting at the clock's step; none: the plain call)."""
    def controlled(x, t, c, **kw):
        residuals = None
        for u in units:
            if not u.on(clock.step, clock.total):
                continue
            hint = u.hint.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
            out = u.model(x, hint, t, c.context, c.vector)
            out = [r * w for r, w in zip(out, u.scales(len(out)))]
            if u.prompt_only and c.prompt_rows is not None:
                mark = c.prompt_rows.to(x.device, x.dtype)[:, None, None, None]
                out = [r * mark for r in out]
            residuals = out if residuals is None else [a + b for a, b in zip(residuals, out)]
        return call(x, t, c, control=residuals, **kw)

    return controlled
