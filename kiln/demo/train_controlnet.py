"""Training of a demo ControlNet for kiln's embedded model: edges (canny) → the shape, as Zhang et al. (2023) train
theirs.

The ControlNet starts as a copy of the demo UNet's encoder (time embedding, input blocks, middle block) with its
zero convolutions and the hint block's last convolution zero-initialised, so at step 0 it changes nothing; the demo
UNet, text encoder and autoencoder stay frozen. Data: `shapes.sample` images and their captions, half of the
captions dropped to "" (the paper's 50%, so that the ControlNet learns to read the shape from the edges alone); the
control image is the image's canny map (white outline on black, sd-webui-controlnet's `canny` at the image's own
size), fed at 128 px as the pipeline feeds the demo model's hints (`kiln.pipeline.control.activate`: the hint block
downsamples by 8, the demo VAE by 4). ε-MSE on the demo's noise schedule, AdamW, optional EMA; resumable from
`workdir/state.pt`; exported as fp16 `.safetensors` in lllyasviel's layout (`control_model.*`) with the config in
the header.
"""
from __future__ import annotations

import copy
import csv
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .. import preprocessors
from ..checkpoints import load_model
from ..checkpoints.controlnet import CONTROL, load_controlnet
from ..errors import KilnError
from ..models import alphas_cumprod
from ..models.controlnet import ControlNetConfig, ControlNetModel
from ..tokenizer import default_tokenizer
from . import shapes
from .report import EMBEDDED
from .train import ema_update, to_float

HINT_SIZE = 128  # 8 × the demo's 16-px latent: what `activate` feeds a ControlNet on a model whose VAE is f = 4


@dataclass
class ControlTrainOptions:
    base: str = str(EMBEDDED)  # the demo model the ControlNet steers (frozen)
    seed: int = 0
    images: int = 4000
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    caption_dropout: float = 0.5  # the paper's: half the prompts empty, so the edges alone must carry the shape
    # Of the captions kept, this fraction has its shape word replaced by "shape" ("a red shape on a white
    # background"): the prompt a ControlNet's user writes, naming what the control image does not fix (the colors)
    # and leaving the rest to it. 0: captions as the data has them (docs/controlnet.md, "Demo ControlNet").
    shape_dropout: float = 0.0
    # The demo model was trained with offset noise 0.15 (docs/demo-model.md); the frozen UNet sees the same ε here.
    offset_noise: float = 0.15
    ema_decay: float = 0.0  # 0: no EMA, the trained weights are exported
    # Timesteps: "uniform" (Zhang et al.), or "cubic", t = (1 − u³)·T as T2I-Adapter samples them, most of them at
    # high noise, where the layout is decided and where ε-MSE alone gives a structure control little to learn from.
    timesteps: str = "uniform"
    # The hint block's first convolutions: "gaussian", He-normal weights and zero biases (the paper: "initialized
    # with Gaussian weights"), or "torch", PyTorch's default uniform init, under which seven conv + SiLU layers
    # shrink the outline's spatial signal to ~0.5% of the input's and the hint path barely learns
    # (docs/controlnet.md, "Demo ControlNet").
    hint_init: str = "gaussian"
    save_every: int = 100


def edge_map(image) -> np.ndarray:
    """The [64, 64] uint8 canny map (255 on the outline, 0 elsewhere) of a 64-px image: sd-webui-controlnet's
    `canny` module at its default thresholds, run at the image's size as pixel-perfect mode does."""
    return np.asarray(preprocessors.run("canny", image, shapes.IMAGE_SIZE))[:, :, 0].copy()


def hints(edges: np.ndarray) -> torch.Tensor:
    """[N, 64, 64] uint8 edge maps → the ControlNet's input [N, 3, 128, 128] in [0, 1], resized with PIL's bicubic
    as the pipeline resizes a demo-size control map."""
    out = [np.asarray(Image.fromarray(e).convert("RGB").resize((HINT_SIZE, HINT_SIZE), Image.BICUBIC)) for e in edges]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def sample_timesteps(kind: str, n: int, steps: int, g: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, steps, (n,), generator=g)
    if kind == "cubic":
        u = torch.rand(n, generator=g)
        return ((1 - u ** 3) * steps).long().clamp(0, steps - 1)
    raise KilnError(f"timesteps must be 'uniform' or 'cubic', not {kind!r}")


def init_controlnet(unet, workdir: Path, hint_init: str = "gaussian") -> ControlNetModel:
    """A ControlNet for `unet`: its encoder copied, zero convolutions and the hint block's last conv zeroed. Built
    through `load_controlnet` from a file of its own, so it has exactly the layout the loader will give the export
    (its heads from the file's kiln_config, as the export's: tensor shapes do not show them)."""
    net = ControlNetModel(ControlNetConfig(unet.cfg))
    own = net.state_dict()
    copied = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in ("time_embed", "input_blocks",
                                                                              "middle_block") and k in own}
    net.load_state_dict(copied, strict=False)
    if hint_init not in ("gaussian", "torch"):
        raise KilnError(f"hint_init must be 'gaussian' or 'torch', not {hint_init!r}")
    with torch.no_grad():
        if hint_init == "gaussian":
            for conv in net.input_hint_block[:-1]:
                if isinstance(conv, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                    conv.bias.zero_()
        for module in (*net.zero_convs, net.middle_block_out, net.input_hint_block[-1:]):
            for p in module.parameters():
                p.zero_()
    path = workdir / "init.safetensors"
    save_controlnet(net, path, {})
    net = load_controlnet(path).requires_grad_(True).train()
    path.unlink()
    return net


def save_controlnet(net: ControlNetModel, out: Path, training: dict):
    """fp16 `.safetensors` in lllyasviel's layout, the config (and how it was trained) in the header."""
    from safetensors.torch import save_file

    state = {CONTROL + k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    meta = dict(kiln_config=json.dumps(asdict(net.cfg)), kiln_training=json.dumps(training))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)


class ControlTrainer:
    def __init__(self, workdir, opt: ControlTrainOptions | None = None, progress=True, log=print):
        self.opt = ControlTrainOptions() if opt is None else opt
        self.workdir, self.progress, self.log = Path(workdir), progress, log
        self.state_path = self.workdir / "state.pt"
        torch.manual_seed(self.opt.seed)
        self.base, info = load_model(self.opt.base)  # frozen: eval mode, no grad
        self.cfg = info.config
        if self.cfg.native_size != shapes.IMAGE_SIZE or shapes.IMAGE_SIZE // self.cfg.downscale * 8 != HINT_SIZE:
            raise KilnError(f"{self.opt.base}: not a demo model (64 px, f = 4); the demo ControlNet steers only those")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net = init_controlnet(self.base.unet, self.workdir, self.opt.hint_init)
        self.optim = torch.optim.AdamW(self.net.parameters(), lr=self.opt.lr, weight_decay=0.01)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False) if self.opt.ema_decay else None
        self.rng = torch.Generator().manual_seed(self.opt.seed)
        self.step, self.elapsed, self.loss_log = 0, 0.0, []
        if self.state_path.exists():
            self.load_state()

    # ------------------------------------------------------------------ training state
    def save_state(self):
        state = dict(step=self.step, elapsed=self.elapsed, net=self.net.state_dict(), optim=self.optim.state_dict(),
                     ema=self.ema.state_dict() if self.ema else None, rng=self.rng.get_state(),
                     torch_rng=torch.get_rng_state(), loss_log=self.loss_log, opt=asdict(self.opt))
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def load_state(self):
        s = torch.load(self.state_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(s["net"])
        self.optim.load_state_dict(s["optim"])
        if self.ema is not None and s["ema"] is not None:
            self.ema.load_state_dict(s["ema"])
        elif self.ema is not None:  # EMA asked for only now: it starts from the weights so far
            self.ema.load_state_dict(s["net"])
        self.step, self.elapsed = s["step"], s["elapsed"]
        self.rng.set_state(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        self.loss_log = [tuple(x) for x in s["loss_log"]]
        self.log(f"resumed from {self.state_path}: step {self.step}")

    # ------------------------------------------------------------------ data
    def dataset(self):
        """(latent means, latent stds, caption token ids, the same with the shape word replaced by "shape",
        [N, 64, 64] edge maps) of the training split, kept in `workdir/data.pt` for a resumed run (encoding thousands
        of images takes minutes on a shared CPU)."""
        cache, key = self.workdir / "data.pt", dict(images=self.opt.images, seed=self.opt.seed, base=self.opt.base)
        if cache.exists():
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                if "masked" not in saved:  # a cache from before shape_dropout: only the token ids are new
                    saved["masked"] = self.shapeless_ids(shapes.sample(self.opt.images, seed=self.opt.seed))
                    torch.save(saved, cache)
                return saved["means"], saved["stds"], saved["ids"], saved["masked"], saved["edges"].numpy()
        means, stds, ids, masked, edges = self.make_dataset()
        torch.save(dict(key=key, means=means, stds=stds, ids=ids, masked=masked, edges=torch.from_numpy(edges)),
                   cache)
        return means, stds, ids, masked, edges

    def shapeless_ids(self, data) -> torch.Tensor:
        """The captions' token ids with the shape word replaced by "shape"."""
        captions = [re.sub(rf"\b{labels.shape}\b", "shape", text) for _, text, labels in data]
        return default_tokenizer()(captions, max_length=self.cfg.text.max_position)

    @torch.no_grad()
    def make_dataset(self):
        data = shapes.sample(self.opt.images, seed=self.opt.seed, split="train")
        images = torch.from_numpy(np.stack([d[0] for d in data])).permute(0, 3, 1, 2).contiguous()
        means, stds = [], []
        for i in range(0, len(images), 256):
            m, lv = self.base.vae.encode(to_float(images[i:i + 256]))
            means.append(m)
            stds.append(torch.exp(0.5 * lv))
        ids = default_tokenizer()([d[1] for d in data], max_length=self.cfg.text.max_position)
        edges = np.stack([edge_map(d[0]) for d in data])
        return torch.cat(means), torch.cat(stds), ids, self.shapeless_ids(data), edges

    # ------------------------------------------------------------------ the run
    def run(self, out: Path):
        """Train up to `opt.steps` (a run that has them already only exports), export, write the loss log."""
        if self.step < self.opt.steps:
            self.train(*self.dataset())
        self.save_state()
        self.export(Path(out))
        self.write_loss_csv()

    def train(self, means, stds, ids, masked, edges):
        empty = default_tokenizer()([""], max_length=self.cfg.text.max_position)[0]
        ac = alphas_cumprod(self.cfg)
        bar = tqdm(total=self.opt.steps, initial=self.step, desc="controlnet", unit="step",
                   disable=not self.progress, smoothing=0.05)
        while self.step < self.opt.steps:
            t0 = time.time()
            loss = self.train_step(means, stds, ids, masked, edges, empty, ac)
            self.step += 1
            self.elapsed += time.time() - t0
            self.loss_log.append((self.step, loss))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % self.opt.save_every == 0:
                self.save_state()
        bar.close()

    def train_step(self, means, stds, ids, masked, edges, empty, ac) -> float:
        opt, g = self.opt, self.rng
        for group in self.optim.param_groups:
            group["lr"] = opt.lr * min(1.0, (self.step + 1) / opt.warmup)
        idx = torch.randint(0, len(means), (opt.batch,), generator=g)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * self.cfg.scale_factor
        b_ids = ids[idx].clone()
        u = torch.rand(opt.batch, generator=g)  # one draw decides: empty, shape word dropped, or the caption
        kept = u >= opt.caption_dropout
        shapeless = kept & (u < opt.caption_dropout + (1 - opt.caption_dropout) * opt.shape_dropout)
        b_ids[shapeless] = masked[idx][shapeless]
        b_ids[u < opt.caption_dropout] = empty
        t = sample_timesteps(opt.timesteps, opt.batch, len(ac), g)
        noise = torch.randn(x0.shape, generator=g)
        if opt.offset_noise:
            noise = noise + opt.offset_noise * torch.randn(x0.shape[:2] + (1, 1), generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            context = self.base.text_model(b_ids)
        residuals = self.net(xt, hints(edges[idx.numpy()]), t, context)
        pred = self.base.unet(xt, t, context, control=residuals)  # frozen; gradients flow through to the residuals
        loss = F.mse_loss(pred, noise)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optim.step()
        if self.ema is not None:
            ema_update(self.ema, self.net, opt.ema_decay, self.step)
        return loss.item()

    def export(self, out: Path):
        final = self.ema if self.ema is not None else self.net
        training = dict(options=asdict(self.opt), steps=self.step, train_seconds=round(self.elapsed, 1),
                        final_loss=self.loss_log[-1][1] if self.loss_log else None)
        save_controlnet(final, out, training)
        self.log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {self.step} steps, "
                 f"{self.elapsed / 60:.1f} min of training")

    def write_loss_csv(self):
        with open(self.workdir / "loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows(self.loss_log)
