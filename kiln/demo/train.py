"""Training of kiln's embedded demo model: the SD v1 architecture at a tiny size, on the captioned-shapes data.

Two stages, both resumable from `workdir/state.pt`:
1. the autoencoder (f = 4: 64×64×3 ↔ 16×16×4), L1 + MSE reconstruction with a light KL term;
2. UNet + CLIP text encoder together on cached latents: ε-prediction on SD's own noise schedule, min-SNR-5
   loss weighting (faster convergence), 10% caption dropout so classifier-free guidance works, offset noise, EMA
   weights; optionally caption noise (wrong attributes, as in web captions) and color jitter, and a fine-tune from
   an exported model, exported as a weight-space ensemble with it.
The result is one CompVis-layout `.safetensors` (EMA weights, fp16) whose header carries the model config,
read by the ordinary checkpoint loader.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoints import load_model
from ..checkpoints.sources import open_file
from ..errors import CheckpointError, KilnError
from ..models import CLIPTextConfig, LatentDiffusion, ModelConfig, UNetConfig, VAEConfig, alphas_cumprod
from ..tokenizer import default_tokenizer
from . import shapes

DEMO_CONFIG = ModelConfig(
    family="sd1",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_res_blocks=1,
                    num_heads=2, context_dim=64),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=64),
    text=CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=256),
    scale_factor=1.0,  # replaced by 1/std of the trained autoencoder's latents, as LDM's scale_by_std does
    native_size=64,
    # PLMS's 4-step extrapolation is unstable on this model's guided ε at CompVis' uniform 20-step timesteps
    # (docs/samplers.md); on CompVis' quad ones it meets the adherence targets. Real checkpoints keep uniform.
    sampler_schedules={"plms": "quad"},
)


@dataclass
class TrainOptions:
    seed: int = 0
    images: int = 20000
    vae_steps: int = 1500  # on random 32x32 crops: 4x cheaper, and convolutions do not care
    vae_crop: int = 32
    vae_batch: int = 16
    vae_lr: float = 3e-3
    vae_full_steps: int = 200  # then whole 64x64 images, so the mid-block attention sees the full latent
    vae_full_batch: int = 8
    unet_steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    min_snr: float = 5.0
    # Offset noise (a per-image, per-channel constant added to ε): SD's schedule leaves the image mean visible at
    # t = 999, so without it the start noise, not the prompt, decides flat background colors.
    offset_noise: float = 0.15
    # Caption noise: each stated attribute of a drawn caption is, with this probability, replaced by a wrong value
    # (as web alt-text often is), so that the model needs guidance to follow a prompt, as real SD does. Alone it costs
    # the SDE samplers their backgrounds at scale 5 (docs/demo-model.md, "Caption noise"); the shipped weights use it
    # only in the color-jitter fine-tune, mixed with the model it started from (`wise_ft`).
    caption_noise: float = 0.0
    # Caption noise for the two color attributes only (None: `caption_noise`), since colors are what guidance must
    # fix in this data, while wrong shape words mostly cost shape accuracy.
    caption_noise_colors: float | None = None
    # Spread of each named color in the training images, as a fraction of its distance to the nearest other palette
    # color (`shapes.render`). Exact palette colors make 8 sharp modes, and guidance at scale 5 between them is too
    # steep for multistep samplers such as PLMS (docs/demo-model.md).
    color_jitter: float = 0.0
    # Start the UNet stage from this exported model (its EMA weights, VAE and config) with a fresh optimizer,
    # counting steps on from the number it was trained for: a fine-tune (docs/demo-model.md, "Color jitter").
    init: str | None = None
    # With `init`: export (1 − w)·start + w·fine-tuned EMA for the UNet and text encoder, a weight-space ensemble of
    # the fine-tune and the model it began from (WiSE-FT, Wortsman et al. 2022). The color-jitter fine-tune alone
    # makes the model trust a picture's colors over the prompt's and breaks img2img; a partial step keeps img2img
    # and still gains most of what the fine-tune is for (docs/demo-model.md, "Weight-space ensemble").
    wise_ft: float = 1.0
    save_every: int = 250

    def caption_noise_p(self) -> float | dict[str, float]:
        """The mislabeling probability `shapes.mislabel` takes: one for all attributes, or one per attribute."""
        if self.caption_noise_colors is None:
            return self.caption_noise
        return {a: self.caption_noise_colors if a in ("color", "background") else self.caption_noise
                for a in shapes.ATTRIBUTES}


def dataset(opt: TrainOptions):
    """(uint8 NCHW images, captions, labels) of the training split."""
    data = shapes.sample(opt.images, seed=opt.seed, split="train", color_jitter=opt.color_jitter)
    images = torch.from_numpy(np.stack([d[0] for d in data])).permute(0, 3, 1, 2).contiguous()
    return images, [d[1] for d in data], [d[2] for d in data]


def noisy_captions(idx, labels, p: float | dict[str, float], tok, rng: np.random.Generator,
                   max_length: int = 77) -> dict:
    """Token ids of freshly mislabeled captions (`shapes.mislabel` with probability `p` per stated attribute) for
    the drawn images `idx` that got a wrong attribute, as {row in the batch: ids}."""
    rows, texts = [], []
    for row, i in enumerate(idx.tolist()):
        wrong = shapes.mislabel(labels[i], p, rng)
        if wrong != labels[i]:
            rows.append(row)
            texts.append(shapes.caption_stating(wrong, rng))
    return dict(zip(rows, tok(texts, max_length=max_length))) if texts else {}


def to_float(images_u8):
    return images_u8.float() / 127.5 - 1.0


def vae_loss(vae, x):
    mean, logvar = vae.encode(x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    rec = vae.decode(z)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl


@torch.no_grad()
def fit_latent_rgb(vae, images_u8, scale_factor: float, n: int = 512, ridge: float = 0.1) -> tuple:
    """Least-squares linear map (plus bias) from scaled latent channels to the image averaged over each latent
    pixel's patch: the model's cheap preview, stored in its config."""
    x = to_float(images_u8[:n])
    mean, _ = vae.eval().encode(x)
    z = (mean * scale_factor).permute(0, 2, 3, 1).reshape(-1, mean.shape[1]).double()
    f = x.shape[-1] // mean.shape[-1]
    y = F.avg_pool2d(x, f).permute(0, 2, 3, 1).reshape(-1, 3).double()
    a = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    # Ridge (bias not penalised): sampled latents carry high-frequency detail the decoder ignores, and an
    # unregularised fit amplifies it (mean error on DDIM samples: 45/255 plain, 15/255 with this ridge).
    ridge = ridge * len(a) * torch.diag(torch.tensor([1.0] * z.shape[1] + [0.0], dtype=a.dtype))
    m = torch.linalg.solve(a.T @ a + ridge, a.T @ y)
    return tuple(tuple(round(float(v), 5) for v in row) for row in m)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int):
    d = min(decay, (1 + step) / (10 + step))  # LitEma's warm-up
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)


class Trainer:
    def __init__(self, workdir, opt: TrainOptions | None = None, progress=True, log=print, config=DEMO_CONFIG):
        opt = TrainOptions() if opt is None else opt  # a fresh default each time: TrainOptions is mutable
        self.workdir = Path(workdir)  # created on the first save, so a run that fails at once leaves nothing
        self.opt, self.progress, self.log = opt, progress, log
        torch.manual_seed(opt.seed)
        self.cfg = config
        self.model = LatentDiffusion(self.cfg)
        with torch.no_grad():  # start the posterior narrow (std 0.05), or the decoder first learns to ignore z
            self.model.vae.encoder.conv_out.bias[self.cfg.vae.z_channels:] = -6.0
        self.stage, self.step, self.elapsed = "vae", 0, 0.0
        self.vae_opt = torch.optim.AdamW(self.model.vae.parameters(), lr=opt.vae_lr, weight_decay=0.0)
        self.new_diffusion_optimizer()
        self.ema = None
        self.base = None  # the fine-tune's starting UNet and text-encoder weights, kept for `wise_ft`
        self.rng = torch.Generator().manual_seed(opt.seed)
        self.loss_log = []  # (stage, step, loss)
        self.state_path = self.workdir / "state.pt"
        if self.state_path.exists():
            self.load_state()
        elif opt.init:
            self.start_from(opt.init)
        if opt.wise_ft != 1.0 and self.base is None:
            raise KilnError("--wise-ft needs --init: the ensemble mixes a fine-tune with the model it starts from")

    def start_from(self, path):
        """Fine-tune: the UNet stage begins from an exported model, with a fresh optimizer and EMA; the step count,
        the learning-rate schedule and the clock go on from what the file's header records."""
        src = open_file(path)  # the checkpoint reader's own checks: missing, truncated, not safetensors
        if "kiln_config" not in src.metadata or "kiln_training" not in src.metadata:
            raise CheckpointError(f"{path}: not a model written by `kiln train demo` (no kiln_config/kiln_training)")
        done = json.loads(src.metadata["kiln_training"])
        # the ordinary loader: config from the header, every tensor checked for name and shape before loading
        self.model, info = load_model(path)
        self.model.requires_grad_(True).train()  # the loader hands out a frozen inference model
        self.cfg = info.config
        self.new_diffusion_optimizer()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.base = {k: v.clone() for k, v in self.diffusion_weights(self.model).items()}
        self.stage, self.step = "unet", int(done["options"]["unet_steps"])
        self.elapsed = float(done.get("train_seconds") or 0.0)
        self.rng = torch.Generator().manual_seed(self.opt.seed + self.step)
        self.log(f"fine-tuning {path} from step {self.step}")

    @staticmethod
    def diffusion_weights(model) -> dict:
        """The floating-point weights of the modules the UNet stage trains (those `new_diffusion_optimizer` takes)."""
        return {f"{part}.{k}": v for part in ("unet", "text_model")
                for k, v in getattr(model, part).state_dict().items() if v.is_floating_point()}

    def new_diffusion_optimizer(self):
        """A fresh AdamW over the UNet's and the text encoder's parameters (trained together)."""
        self.diff_params = list(self.model.unet.parameters()) + list(self.model.text_model.parameters())
        self.diff_opt = torch.optim.AdamW(self.diff_params, lr=self.opt.lr, weight_decay=0.01)

    # ------------------------------------------------------------------ checkpoints of the training run
    def save_state(self):
        state = dict(stage=self.stage, step=self.step, elapsed=self.elapsed, cfg=json.dumps(self.cfg.to_dict()),
                     model=self.model.state_dict(), vae_opt=self.vae_opt.state_dict(),
                     diff_opt=self.diff_opt.state_dict(), ema=self.ema.state_dict() if self.ema else None,
                     rng=self.rng.get_state(), torch_rng=torch.get_rng_state(), loss_log=self.loss_log,
                     opt=asdict(self.opt), base=self.base)
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def load_state(self):
        s = torch.load(self.state_path, map_location="cpu", weights_only=True)
        self.cfg = ModelConfig.from_dict(json.loads(s["cfg"]))
        self.model = LatentDiffusion(self.cfg)
        self.model.load_state_dict(s["model"])
        self.vae_opt = torch.optim.AdamW(self.model.vae.parameters(), lr=self.opt.vae_lr, weight_decay=0.0)
        self.vae_opt.load_state_dict(s["vae_opt"])
        self.new_diffusion_optimizer()
        self.diff_opt.load_state_dict(s["diff_opt"])
        if s["ema"] is not None:
            self.ema = copy.deepcopy(self.model)
            self.ema.load_state_dict(s["ema"])
        self.stage, self.step, self.elapsed = s["stage"], s["step"], s["elapsed"]
        self.rng.set_state(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        self.loss_log = [tuple(x) for x in s["loss_log"]]
        self.base = s.get("base")
        self.log(f"resumed from {self.state_path}: stage {self.stage}, step {self.step}")

    # ------------------------------------------------------------------ stages
    def run(self, out: Path):
        images, captions, labels = dataset(self.opt)
        if self.stage == "vae":
            self.train_vae(images)
            self.stage, self.step = "unet", 0
            self.save_state()
        if self.stage in ("unet", "done"):  # "done" with more steps asked for goes on training
            self.train_unet(images, captions, labels)
            self.stage = "done"
            self.save_state()
        self.cfg = replace(self.cfg, latent_rgb=fit_latent_rgb(self.model.vae, images, self.cfg.scale_factor))
        self.export(out)
        self.write_loss_csv()

    def _finish_step(self, stage, loss, t0, bar):
        """Bookkeeping shared by both stages: count, clock, loss log, progress, periodic save."""
        self.step += 1
        self.elapsed += time.time() - t0
        self.loss_log.append((stage, self.step, loss.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if self.step % self.opt.save_every == 0:
            self.save_state()

    def _bar(self, total, desc):
        return tqdm(total=total, initial=self.step, desc=desc, unit="step", disable=not self.progress, smoothing=0.05)

    def train_vae(self, images):
        vae, opt = self.model.vae, self.opt
        vae.train()
        total = opt.vae_steps + opt.vae_full_steps
        bar = self._bar(total, "autoencoder")
        while self.step < total:
            t0 = time.time()
            if self.step < opt.vae_steps:
                idx = torch.randint(0, len(images), (opt.vae_batch,), generator=self.rng)
                y, x = torch.randint(0, images.shape[-1] - opt.vae_crop + 1, (2,), generator=self.rng).tolist()
                batch = images[idx][:, :, y:y + opt.vae_crop, x:x + opt.vae_crop]
                lr = (opt.vae_lr * min(1.0, (self.step + 1) / 50) * 0.5
                      * (1 + math.cos(math.pi * self.step / opt.vae_steps)))
            else:
                batch = images[torch.randint(0, len(images), (opt.vae_full_batch,), generator=self.rng)]
                lr = opt.vae_lr * 0.1
            for g in self.vae_opt.param_groups:
                g["lr"] = max(lr, opt.vae_lr * 0.01)
            loss = vae_loss(vae, to_float(batch))
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self._finish_step("vae", loss, t0, bar)
        bar.close()
        vae.eval()

    @torch.no_grad()
    def encode_all(self, images, batch=256):
        vae = self.model.vae.eval()
        means, stds = [], []
        for i in range(0, len(images), batch):
            m, lv = vae.encode(to_float(images[i:i + batch]))
            means.append(m)
            stds.append(torch.exp(0.5 * lv))
        return torch.cat(means), torch.cat(stds)

    def train_unet(self, images, captions, labels):
        opt = self.opt
        means, stds = self.encode_all(images)
        if self.cfg.scale_factor == 1.0:
            scale = float(1.0 / means.std())
            self.cfg = replace(self.cfg, scale_factor=round(scale, 5))
            self.model.cfg = self.cfg
            self.log(f"latent scale factor 1/std = {self.cfg.scale_factor}")
        tok = default_tokenizer()
        ids = tok(captions, max_length=self.cfg.text.max_position)
        empty = tok([""], max_length=self.cfg.text.max_position)[0]
        ac = alphas_cumprod(self.cfg)
        snr = ac / (1 - ac)
        weight = torch.clamp(snr, max=opt.min_snr) / snr  # min-SNR-γ for ε-prediction
        unet, text = self.model.unet.train(), self.model.text_model.train()
        if self.ema is None:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        bar = self._bar(opt.unet_steps, "unet+text")
        while self.step < opt.unet_steps:
            t0 = time.time()
            lr = (opt.lr * min(1.0, (self.step + 1) / 200)
                  * (0.55 + 0.45 * math.cos(math.pi * self.step / opt.unet_steps)))
            for g in self.diff_opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, len(images), (opt.batch,), generator=self.rng)
            x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=self.rng)) * self.cfg.scale_factor
            b_ids = ids[idx].clone()
            if opt.caption_noise or opt.caption_noise_colors:
                rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=self.rng)))
                for row, wrong in noisy_captions(idx, labels, opt.caption_noise_p(), tok, rng,
                                                 self.cfg.text.max_position).items():
                    b_ids[row] = wrong
            drop = torch.rand(opt.batch, generator=self.rng) < opt.caption_dropout
            b_ids[drop] = empty
            t = torch.randint(0, len(ac), (opt.batch,), generator=self.rng)
            noise = torch.randn(x0.shape, generator=self.rng)
            if opt.offset_noise:
                noise = noise + opt.offset_noise * torch.randn(x0.shape[:2] + (1, 1), generator=self.rng)
            a = ac[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = unet(xt, t, text(b_ids))
            loss = (weight[t] * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
            self.diff_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.diff_params, 1.0)
            self.diff_opt.step()
            ema_update(self.ema.unet, unet, opt.ema_decay, self.step)
            ema_update(self.ema.text_model, text, opt.ema_decay, self.step)
            self._finish_step("unet", loss, t0, bar)
        bar.close()

    # ------------------------------------------------------------------ outputs
    def export(self, out: Path):
        """One CompVis-layout .safetensors: EMA UNet and text encoder, the trained VAE, fp16, config in the header."""
        from safetensors.torch import save_file

        final = copy.deepcopy(self.ema if self.ema is not None else self.model)
        final.first_stage_model.load_state_dict(self.model.first_stage_model.state_dict())
        if self.opt.wise_ft != 1.0:
            with torch.no_grad():
                for k, v in self.diffusion_weights(final).items():
                    v.lerp_(self.base[k].to(v.dtype), 1.0 - self.opt.wise_ft)  # v + (1 − w)(base − v)
        final.cfg = self.cfg
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in final.state_dict().items()}
        info = dict(kiln_config=json.dumps(self.cfg.to_dict()), kiln_training=json.dumps(
            dict(options=asdict(self.opt), train_seconds=round(self.elapsed, 1),
                 final_loss=self.loss_log[-1][2] if self.loss_log else None)))
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        save_file(state, tmp, metadata=info)
        tmp.replace(out)
        self.log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {self.elapsed / 60:.1f} min of training")

    def write_loss_csv(self):
        with open(self.workdir / "loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["stage", "step", "loss"])
            w.writerows(self.loss_log)
