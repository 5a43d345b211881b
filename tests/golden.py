"""Golden outputs: SHA-256 of the final pixels and the infotexts of a fixed set of generations, recorded before
the generation core was restructured, so that a restructuring is proved to change no pixel and no metadata.

Every case runs on the CPU, one thread, full precision, at 64x64 (the embedded demo model's native size) or on
tiny random models of the other architectures (a 9-channel inpainting UNet, SDXL base + refiner).

    python tests/golden.py --write      # record tests/data/golden.json (only when a change is meant to move them)
    python tests/golden.py              # compare, case by case

The hashes are exact on the kind of CPU they were recorded on (`torch.backends.cpu.get_cpu_capability()`);
elsewhere oneDNN may pick kernels that sum in another order, so the pixels (kept in golden_pixels.npz) are
compared within one level instead, and the infotexts still exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden.json"
PIXELS = DATA / "golden_pixels.npz"
OPENAPI = DATA / "golden_openapi.json"
PROMPT = "a large red circle in the center on a blue background"


def digest(pixels: np.ndarray, infotexts: list[str]) -> str:
    h = hashlib.sha256()
    h.update(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    for t in infotexts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def picture(color="red", shape="square", background="blue", position="center", size="large"):
    from kiln.demo.shapes import Labels, render

    return Image.fromarray(render(Labels(color, shape, background, position, size), np.random.default_rng(0)))


def square_mask(size=64, lo=20, hi=44):
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 255
    return Image.fromarray(m)


class Models:
    """The models the cases run on, made once (tiny random ones written under `root`)."""

    def __init__(self, root: Path):
        self.root = root
        self._cache = {}

    def get(self, name):
        if name not in self._cache:
            self._cache[name] = getattr(self, "_" + name)()
        return self._cache[name]

    def _demo(self):
        import kiln
        from kiln.demo.report import EMBEDDED

        return kiln.load(EMBEDDED, device="cpu", precision="full")

    def _inpaint9(self):
        import sdref
        from safetensors.torch import save_file

        import kiln

        cfg = sdref.tiny_config()
        cfg = replace(cfg, family="sd1-inpaint", unet=replace(cfg.unet, in_channels=9))
        state = sdref.random_state(cfg, seed=11)
        sdref.calibrate(state, cfg)
        path = self.root / "tiny-inpainting.safetensors"
        save_file(state, path, metadata={"kiln_config": json.dumps(cfg.to_dict())})
        return kiln.load(path, device="cpu", precision="full")

    def _sdxl(self):
        import kiln
        from test_sdxl import write_tiny_sdxl

        return kiln.load(write_tiny_sdxl(self.root / "tinyxl.safetensors"), device="cpu", precision="full")

    def _refiner(self):
        import kiln
        from test_sdxl import write_tiny_sdxl

        return kiln.load(write_tiny_sdxl(self.root / "tinyrefiner.safetensors", refiner=True), device="cpu",
                         precision="full")

    def _lora(self):
        """A kohya LoRA over the demo model (UNet attention and feed-forward, text encoder), and its folder."""
        from safetensors.torch import save_file

        import sdref

        pipe = self.get("demo")
        shapes = {k: tuple(v.shape) for k, v in pipe.model.state_dict().items()}
        folder = self.root / "loras"
        folder.mkdir(exist_ok=True)
        save_file(sdref.random_kohya_lora(sdref.kohya_modules(shapes, pipe.cfg), seed=4), folder / "golden.safetensors")
        return folder

    def _embeddings(self):
        """Textual inversion: "crimsonish" made of the token vectors of "red circle", and its folder."""
        from safetensors.torch import save_file

        pipe = self.get("demo")
        ids = pipe.tokenizer.encode("red circle")
        vec = pipe.model.text_model.embeddings.token_embedding.weight[ids].detach().clone()
        folder = self.root / "embeddings"
        folder.mkdir(exist_ok=True)
        save_file({"emb_params": vec * 1.1}, str(folder / "crimsonish.safetensors"))
        return folder


@contextlib.contextmanager
def dirs(pipe, lora_dir=None, embeddings_dir=None):
    old = pipe.lora_dir, pipe.embeddings_dir
    pipe.lora_dir, pipe.embeddings_dir = lora_dir, embeddings_dir
    try:
        yield
    finally:
        pipe.lora_dir, pipe.embeddings_dir = old


@contextlib.contextmanager
def setting(apply, *on):
    """`apply(*on)` for the block, `apply(None)` after it (a pipeline's refiner or DeepCache)."""
    apply(*on)
    try:
        yield
    finally:
        apply(None)


def _txt(prompt=PROMPT, **kw):
    kw = {"steps": 8, "cfg_scale": 5.0, "seed": 3, **kw}
    return lambda m: m.get("demo").txt2img(prompt, **kw)


def _lora_file(m):
    pipe = m.get("demo")
    return pipe.txt2img(PROMPT, steps=6, cfg_scale=5.0, seed=4, loras=[(str(m.get("lora") / "golden.safetensors"),
                                                                        0.8)])


def _lora_tag(m):
    pipe = m.get("demo")
    with dirs(pipe, lora_dir=m.get("lora")):
        return pipe.txt2img(PROMPT + " <lora:golden:0.6>", steps=6, cfg_scale=5.0, seed=4)


def _ti(m):
    pipe = m.get("demo")
    with dirs(pipe, embeddings_dir=m.get("embeddings")):
        return pipe.txt2img("a large crimsonish in the center on a green background", steps=6, cfg_scale=5.0,
                            seed=5)


def _img2img(sampler):
    return lambda m: m.get("demo").img2img("a large yellow square in the center on a blue background",
                                           picture(), strength=0.6, steps=10, sampler=sampler, cfg_scale=5.0,
                                           seed=6)


def _inpaint(sampler, fill="original", blur=4.0):
    return lambda m: m.get("demo").img2img("a large green circle in the center on a blue background", picture(),
                                           mask=square_mask(), strength=0.9, steps=10, sampler=sampler,
                                           inpaint_fill=fill, mask_blur=blur, cfg_scale=5.0, seed=7)


def _outpaint(m):
    return m.get("demo").img2img(PROMPT, picture().resize((48, 48)), outpaint=(8, 8, 0, 16), strength=1.0,
                                 inpaint_fill="latent-noise", steps=8, sampler="euler", cfg_scale=5.0, seed=8)


def _only_masked(m):
    init = picture().resize((128, 128))
    mask = square_mask(128, 40, 88)
    return m.get("demo").img2img("a large yellow circle in the center on a blue background", init, mask=mask,
                                 inpaint_area="masked", masked_padding=8, mask_blur=2, strength=1.0, steps=8,
                                 cfg_scale=5.0, seed=9, width=64, height=64)


def _inpaint9(m):
    return m.get("inpaint9").img2img("a cube", picture(), mask=square_mask(), strength=1.0, steps=6,
                                     cfg_scale=5.0, seed=10)


def _sdxl(m):
    return m.get("sdxl").txt2img("a red cube", negative_prompt="blurry", steps=5, cfg_scale=6.0, seed=11,
                                 width=64, height=64)


def _sdxl_refiner(m):
    pipe = m.get("sdxl")
    with setting(pipe.set_refiner, m.get("refiner"), 0.6):
        return pipe.txt2img("a red cube", steps=5, sampler="euler", cfg_scale=6.0, seed=12, width=64, height=64)


def _deepcache(m):
    pipe = m.get("demo")
    with setting(pipe.set_deepcache, 3, 2):
        return pipe.txt2img(PROMPT, steps=9, sampler="dpmpp_2m", cfg_scale=5.0, seed=13)


CASES = {
    "txt2img-ddim": _txt(),
    "txt2img-plms": _txt(sampler="plms"),
    "txt2img-euler_a": _txt(sampler="euler_a"),
    "txt2img-dpmpp_2m-karras": _txt(sampler="DPM++ 2M Karras"),
    "txt2img-ddim-eta": _txt(eta=0.5, seed=14),
    "txt2img-batch2-n_iter2": _txt(batch_size=2, n_iter=2, steps=6),
    "txt2img-fixed_code": _txt(batch_size=2, n_iter=2, steps=6, fixed_code=True, sampler="euler"),
    "txt2img-prompt-list": _txt(prompt=[PROMPT, "a small blue star at the top left on a yellow background",
                                        "a large green triangle"], batch_size=2, steps=6),
    "txt2img-negative-clip_skip": _txt(negative_prompt="a green background", clip_skip=2, sampler="dpmpp_sde"),
    "txt2img-cfg1": _txt(cfg_scale=1.0, sampler="heun", steps=5),
    "txt2img-variation": _txt(subseed=99, subseed_strength=0.3),
    "txt2img-seed_resize": _txt(seed_resize_from=(48, 80), sampler="euler", width=64, height=96),
    "txt2img-hires-latent": _txt(hires_scale=1.5, hires_steps=4, hires_strength=0.6, steps=6),
    "txt2img-hires-lanczos": _txt(hires_scale=1.5, hires_upscaler="lanczos", sampler="euler_a", steps=6),
    "txt2img-seamless": _txt(seamless=True, sampler="euler"),
    "txt2img-tiled": _txt(tile="on", steps=5),
    "txt2img-deepcache": _deepcache,
    "txt2img-lora-file": _lora_file,
    "txt2img-lora-tag": _lora_tag,
    "txt2img-textual-inversion": _ti,
    "img2img-ddim": _img2img("ddim"),
    "img2img-euler_a": _img2img("euler_a"),
    "inpaint-ddim": _inpaint("ddim"),
    "inpaint-euler-latent-noise": _inpaint("euler", "latent-noise", 0.0),
    "inpaint-fill": _inpaint("dpmpp_2m", "fill"),
    "outpaint": _outpaint,
    "inpaint-only-masked": _only_masked,
    "inpaint-9-channel": _inpaint9,
    "sdxl-txt2img": _sdxl,
    "sdxl-refiner": _sdxl_refiner,
}


# ------------------------------------------------------------------ front ends: what each one writes or returns
def _png(data) -> tuple[np.ndarray, str]:
    import io

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im.convert("RGB")), im.info.get("parameters", "")


def _stack(items):
    """[(pixels, text)] of equal sizes → (pixels [N, H, W, 3], texts)."""
    return np.stack([p for p, _ in items]), [t for _, t in items]


def _cli(m, tmp: Path):
    """`kiln txt2img` with its defaults (precision included) at the demo model's size: samples and the grid."""
    from kiln.cli import main as cli

    out = tmp / "cli"
    assert cli(["txt2img", "--prompt", PROMPT, "--ddim_steps", "6", "--n_samples", "2", "--n_iter", "1",
                "--seed", "15", "--scale", "5", "--outdir", str(out)]) == 0
    samples = _stack([_png(p) for p in sorted((out / "samples").glob("*.png"))])
    grid, _ = _png(out / "grid-0000.png")
    return np.concatenate([samples[0].reshape(-1), grid.reshape(-1)]), samples[1]


def _server(m, tmp: Path):
    """`/sdapi/v1/txt2img` of `kiln serve` with its defaults, as a client sees it."""
    import base64

    from fastapi.testclient import TestClient

    from kiln.server import ServerConfig, create_app

    app = create_app(ServerConfig(outdir=str(tmp / "serve")))
    try:
        with TestClient(app) as client:
            r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 6, "seed": 16, "width": 64,
                                                       "height": 64, "cfg_scale": 5, "sampler_name": "Euler a",
                                                       "batch_size": 2})
            assert r.status_code == 200, r.text
            return _stack([_png(base64.b64decode(b)) for b in r.json()["images"]])
    finally:
        app.state.worker.stop()


def _batch(m, tmp: Path):
    """`kiln batch` with its defaults on a two-row file."""
    from kiln.demo.report import EMBEDDED
    from kiln.distributed.batch import Defaults, run_batch

    rows = tmp / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": PROMPT, "seed": 17}) + "\n"
                    + json.dumps({"prompt": "a small green star", "sampler": "dpmpp_2m", "steps": 5}) + "\n")
    run_batch(rows, tmp / "batch", ckpt=str(EMBEDDED), defaults=Defaults(steps=6, cfg_scale=5.0), progress=False)
    return _stack([_png(p) for p in sorted((tmp / "batch" / "images").glob("*.png"))])


FRONT_ENDS = {"front-cli": _cli, "front-server": _server, "front-batch": _batch}


def openapi() -> dict:
    """The HTTP API's schema, as `kiln serve` publishes it (its worker not started: no model loaded)."""
    from kiln.server import ServerConfig, create_app

    class NoWorker:
        models = None

    return create_app(ServerConfig(), worker=NoWorker()).openapi()


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_case(models: Models, name: str):
    with one_thread():
        if name in FRONT_ENDS:
            (models.root / name).mkdir(exist_ok=True)
            return FRONT_ENDS[name](models, models.root / name)
        r = CASES[name](models)
    return np.asarray(r.pixels), list(r.infotexts)


ALL = [*CASES, *FRONT_ENDS]


def machine() -> str:
    return torch.backends.cpu.get_cpu_capability()


def load_golden():
    return json.loads(GOLDEN.read_text()), dict(np.load(PIXELS))


def compare(name, pixels, infotexts, golden, stored) -> str | None:
    """None when the case matches its golden record; else what differs."""
    want = golden["cases"][name]
    if infotexts != want["infotexts"]:
        return f"infotexts differ:\n  got  {infotexts}\n  want {want['infotexts']}"
    if golden["cpu"] == machine():
        got = digest(pixels, infotexts)
        return None if got == want["sha256"] else f"pixels differ (sha256 {got[:16]}… ≠ {want['sha256'][:16]}…)"
    ref = stored[name]
    if ref.shape != pixels.shape:
        return f"shape {pixels.shape} ≠ {ref.shape}"
    d = np.abs(ref.astype(int) - pixels.astype(int))
    return None if d.max() <= 1 else f"pixels differ by up to {d.max()} (recorded on {golden['cpu']})"


def main(argv):
    import tempfile

    write = "--write" in argv
    with tempfile.TemporaryDirectory() as tmp:
        models = Models(Path(tmp))
        cases, pixels, failures = {}, {}, []
        golden, stored = (None, None) if write else load_golden()
        for name in ALL:
            px, infos = run_case(models, name)
            cases[name] = {"sha256": digest(px, infos), "infotexts": infos}
            pixels[name] = px
            if not write:
                why = compare(name, px, infos, golden, stored)
                print(f"{name}: {'ok' if why is None else why}")
                failures += [name] if why else []
            else:
                print(f"{name}: {cases[name]['sha256'][:16]}")
    if write:
        DATA.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"cpu": machine(), "torch": torch.__version__, "cases": cases}, indent=1,
                                     ensure_ascii=False) + "\n")
        np.savez_compressed(PIXELS, **pixels)
        OPENAPI.write_text(json.dumps(openapi(), indent=1, sort_keys=True) + "\n")
        return 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
