"""Every front end renders through the same generation loop and output path: the same request gives the same
pixels from `kiln txt2img`, `kiln serve` (/sdapi/v1/txt2img), `kiln batch` and the Python API, each with the
invisible watermark (unless it is switched off)."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from kiln.demo.report import EMBEDDED
from kiln.errors import KilnError
from kiln.pipeline.watermark import put_watermark

PROMPT = "a large red circle in the center on a blue background"
REQUEST = dict(seed=21, steps=6, cfg_scale=5.0, width=256, height=256)


def test_python_api_marks_images_by_default(pipe):
    """The Python API's default is the CLI's: marked. watermark=False leaves the loop's pixels as they are."""
    text = pipe.cfg.watermark
    on = pipe.txt2img(PROMPT, sampler="euler_a", **REQUEST)
    off = pipe.txt2img(PROMPT, sampler="euler_a", watermark=False, **REQUEST)
    own = pipe.txt2img(PROMPT, sampler="euler_a", watermark="kiln test", **REQUEST)
    # (a smooth demo picture does not always decode back: invisible-watermark can lose a bit on such images)
    assert np.array_equal(on.pixels[0], put_watermark(off.pixels[0], text))
    assert np.array_equal(own.pixels[0], put_watermark(off.pixels[0], "kiln test"))
    assert np.array_equal(np.asarray(on.images[0]), on.pixels[0])  # Result.images are the marked pixels
    assert (on.pixels != off.pixels).mean() > 0.05  # the mark moves many pixel values a little
    small = pipe.txt2img(PROMPT, steps=2, seed=1)
    assert any("cannot carry the invisible watermark" in n for n in small.notices)
    with pytest.raises(KilnError, match="must not be empty"):
        pipe.txt2img(PROMPT, steps=2, watermark=" ")


def test_the_same_request_gives_the_same_pixels_on_every_front_end(pipe, tmp_path):
    from fastapi.testclient import TestClient

    from kiln.cli import main
    from kiln.distributed.batch import run_batch
    from kiln.server import ServerConfig, create_app

    api = pipe.txt2img(PROMPT, sampler="euler_a", **REQUEST).pixels[0]
    assert main(["txt2img", "--prompt", PROMPT, "--sampler", "euler_a", "--seed", "21", "--ddim_steps", "6",
                 "--scale", "5", "--W", "256", "--H", "256", "--n_samples", "1", "--n_iter", "1", "--skip_grid",
                 "--outdir", str(tmp_path / "cli")]) == 0
    cli = np.asarray(Image.open(tmp_path / "cli" / "samples" / "00000.png").convert("RGB"))
    app = create_app(ServerConfig(outdir=str(tmp_path / "serve")))
    try:
        with TestClient(app) as client:
            r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "sampler_name": "Euler a", **REQUEST})
            assert r.status_code == 200, r.text
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    finally:
        app.state.worker.stop()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": PROMPT, "sampler": "euler_a", **REQUEST}) + "\n")
    run_batch(rows, tmp_path / "batch", ckpt=str(EMBEDDED), progress=False)
    batch = np.asarray(Image.open(tmp_path / "batch" / "images" / "000000.png").convert("RGB"))
    for name, px in (("kiln txt2img", cli), ("kiln serve", served), ("kiln batch", batch)):
        assert np.array_equal(px, api), f"{name} differs from the Python API"
    plain = pipe.txt2img(PROMPT, sampler="euler_a", watermark=False, **REQUEST).pixels[0]
    assert np.array_equal(api, put_watermark(plain, pipe.cfg.watermark)) and not np.array_equal(api, plain)
