"""The web UI of `kiln serve` in a real browser: Playwright driving Debian's Chromium (headless) against a live
server on the embedded demo model (64x64 colored shapes, about 0.1 s a step on a CPU).

One server (one model load) serves the whole module; a second app with a token shares its worker for the
credentials test. Screenshots go to $KILN_TEST_ARTIFACTS (default tests/artifacts/).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError as e:  # CI installs it; a bare checkout may not
    pytest.skip(f"playwright is not installed ({e}); pip install playwright", allow_module_level=True)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium executable on PATH (Debian: apt-get install chromium)", allow_module_level=True)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

ARTIFACTS = Path(os.environ.get("KILN_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
TOKEN = "s3cret-token"
# the full caption template: the demo model then places the circle in the center every time (12/12 seeds),
# where a bare "a red circle on a blue background" may put it 12 px off to any side
PROMPT = "a large red circle in the center on a blue background"
FINAL = ("done", "failed", "cancelled", "interrupted")
STYLES_CSV = 'name,prompt,negative_prompt\nOnBlue,"a large {prompt} in the center on a blue background",\n' \
             'Crisp,sharp,blurry\n'
# Records every value #progress's data-progress takes and every live preview #preview loads, as they happen
# (a MutationObserver with old values misses none, however fast the job runs).
RECORD = """() => {
  const rec = window.__kiln = {progress: [], previews: []};
  const bar = document.querySelector('#progress'), preview = document.querySelector('#preview');
  new MutationObserver((records) => {
    for (const r of records) rec.progress.push(parseFloat(r.oldValue));
    rec.progress.push(parseFloat(bar.dataset.progress));
  }).observe(bar, {attributes: true, attributeFilter: ['data-progress'], attributeOldValue: true});
  preview.addEventListener('load', () => rec.previews.push(
    {src: preview.src, width: preview.naturalWidth, visible: !preview.hidden}));
}"""


# ---------------------------------------------------------------------- servers and browser
def _serve(app, lifespan="on"):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # handed to uvicorn: no race for a free port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _stop(server, thread):
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, pipe):
    from kiln.server import Limits, ServerConfig, create_app
    from test_controlnet import write_controlnet

    styles = tmp_path_factory.mktemp("styles") / "styles.csv"
    styles.write_text(STYLES_CSV, encoding="utf-8")
    controlnets = tmp_path_factory.mktemp("controlnets")
    write_controlnet(controlnets / "edges.safetensors", pipe.cfg.unet)
    config = ServerConfig(outdir=str(tmp_path_factory.mktemp("serve")), limits=Limits(max_size=256),
                          styles_file=str(styles), controlnet_dir=str(controlnets))
    app = create_app(config)
    srv, thread, base = _serve(app)
    yield SimpleNamespace(base=base, app=app, config=config)
    _stop(srv, thread)


@pytest.fixture(autouse=True)
def empty_history(request):
    """Each test's gallery starts empty: the module's earlier jobs, which the gallery's history would show, are
    deleted first."""
    if "server" in request.fixturenames:
        base = request.getfixturevalue("server").base
        for job in get_json(base, "/api/v1/jobs?limit=100")["jobs"]:
            if job["state"] in FINAL:
                delete(base, f"/api/v1/jobs/{job['id']}")


@pytest.fixture(scope="module")
def auth_server(server, tmp_path_factory):
    """The same worker behind a token. Lifespan off: its shutdown must not stop the shared worker."""
    from kiln.server import ServerConfig, create_app

    config = ServerConfig(outdir=str(tmp_path_factory.mktemp("serve-auth")), limits=server.config.limits,
                          token=TOKEN)
    srv, thread, base = _serve(create_app(config, worker=server.app.state.worker), lifespan="off")
    yield SimpleNamespace(base=base)
    _stop(srv, thread)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def _new_page(browser, **context_args):
    context = browser.new_context(**context_args)
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # console errors, except the browser's own line for each 4xx answer (the tests provoke some)
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    return context, page, errors


@pytest.fixture
def page(browser):
    context, page, errors = _new_page(browser, viewport={"width": 1280, "height": 900})
    yield page
    context.close()
    assert errors == [], f"errors in the page: {errors}"


# ---------------------------------------------------------------------- helpers
def get_json(base, path, token=None):
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def post_json(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def delete(base, path) -> dict:
    with urllib.request.urlopen(urllib.request.Request(base + path, method="DELETE"), timeout=10) as r:
        return json.load(r)


def get_png(base, path) -> Image.Image:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        assert r.headers["Content-Type"] == "image/png"
        im = Image.open(io.BytesIO(r.read()))
        im.load()
        return im


def open_ui(page, base):
    page.goto(base + "/", timeout=90_000)  # CI runs this beside a second pytest process on 2 cores
    expect(page.locator("#generate")).to_be_enabled(timeout=30_000)  # once /api/v1/info has filled the form
    expect(page.locator("#sampler")).to_have_value("Euler a")


def fill_form(page, prompt=PROMPT, steps=4, size=64, seed=None):
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.fill("#width", str(size))
    page.fill("#height", str(size))
    if seed is not None:
        page.fill("#seed", str(seed))


def wait_results(page, count, timeout=60_000):
    results = page.locator("#gallery img.result")
    expect(results).to_have_count(count, timeout=timeout)
    expect(page.locator("#generate")).to_be_enabled(timeout=timeout)
    expect(page.locator("#cancel")).to_be_disabled()
    return results


def set_range(page, selector, value):
    page.locator(selector).evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input', "
                                    "{bubbles: true})); }", str(value))


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"webui-{name}.png"), full_page=True)


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))


# ---------------------------------------------------------------------- tests
def test_generate_shows_progress_preview_and_result(page, server):
    open_ui(page, server.base)
    expect(page.locator("#width")).to_have_value("64")  # the model's native size, from /api/v1/info
    expect(page.locator("#schedule")).to_have_value("")  # Automatic
    assert page.locator("#sampler option").count() == len(get_json(server.base, "/api/v1/info")["samplers"])
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, canvas')]
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map((el) => el.id)""")
    assert unlabelled == []
    fill_form(page, steps=30, size=64, seed=3)
    page.evaluate(RECORD)
    page.click("#generate")
    expect(page.locator("#generate")).to_be_disabled()
    expect(page.locator("#cancel")).to_be_enabled(timeout=30_000)
    page.wait_for_function("() => window.__kiln.progress.some((v) => v > 0 && v < 1)", polling=20,
                           timeout=60_000)
    page.wait_for_function("() => window.__kiln.previews.length > 0", polling=20, timeout=60_000)
    results = wait_results(page, 1)
    record = page.evaluate("() => window.__kiln")
    assert record["progress"][0] == 0 and record["progress"][-1] == 1
    middle = [v for v in record["progress"] if 0 < v < 1]
    assert middle == sorted(middle) and len(set(middle)) >= 2, record["progress"]  # several live updates
    preview = record["previews"][0]
    assert preview["visible"] and preview["width"] == 64
    assert decode_data_url(preview["src"]).size == (64, 64)  # an SSE `preview` data URL
    expect(page.locator("#preview")).to_be_hidden()  # the result replaces the live preview
    expect(page.locator("#progress")).to_have_attribute("data-progress", "1")
    expect(page.locator("#progress")).to_have_attribute("data-state", "done")
    expect(page.locator("#progress-text")).to_contain_text("Done: 1 image")
    job_id = page.locator("#progress").get_attribute("data-job")

    infotext = page.locator("#infotext").text_content()
    assert infotext.startswith(PROMPT + "\n"), infotext
    assert "Seed:" in infotext and "Steps: 30" in infotext and "Sampler: Euler a" in infotext, infotext
    assert "Size: 64x64" in infotext, infotext

    url = results.first.get_attribute("data-url")
    assert url == f"/api/v1/jobs/{job_id}/images/0"
    assert results.first.evaluate("img => img.complete && img.naturalWidth") == 64  # the browser loaded it
    im = get_png(server.base, url)
    assert im.size == (64, 64)
    assert im.info["parameters"] == infotext  # the PNG's A1111 text chunk is what the UI shows
    rgb = np.asarray(im.convert("RGB"), dtype=np.float64)[24:40, 24:40]
    assert rgb[..., 0].mean() > rgb[..., 2].mean() + 40, "the demo model should have drawn a red circle there"

    status = get_json(server.base, f"/api/v1/jobs/{job_id}")
    assert status["state"] == "done" and status["params"]["steps"] == 30 and status["params"]["prompt"] == PROMPT
    seed = status["seeds"][0]
    assert seed == 3 and "Seed: 3," in infotext
    page.click("#seed-random")
    expect(page.locator("#seed")).to_have_value("-1")
    page.click("#seed-reuse")
    expect(page.locator("#seed")).to_have_value("3")
    page.click("#seed-random")
    expect(page.locator("#seed")).to_have_value("-1")
    expect(page.locator("#error")).to_be_hidden()
    shot(page, "txt2img")


def test_ctrl_enter_generates(page, server):
    open_ui(page, server.base)
    prompt = "a small yellow star in the top left on black"
    fill_form(page, prompt=prompt, steps=4)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    wait_results(page, 1)
    expect(page.locator("#prompt")).to_have_value(prompt)  # no newline typed into the prompt
    expect(page.locator("#infotext")).to_contain_text("Steps: 4")
    expect(page.locator("#infotext")).to_contain_text(prompt)
    # the schedule the server reports is the sampler's default: reuse shows it as Automatic again
    page.select_option("#schedule", "karras")
    page.click("#reuse")
    expect(page.locator("#schedule")).to_have_value("")
    shot(page, "ctrl-enter")


def test_cancel_stops_a_running_job(page, server):
    open_ui(page, server.base)
    fill_form(page, steps=150, size=256)
    page.click("#generate")
    page.wait_for_function("() => parseFloat(document.querySelector('#progress').dataset.progress) > 0",
                           polling=20, timeout=60_000)
    job_id = page.locator("#progress").get_attribute("data-job")
    assert get_json(server.base, f"/api/v1/jobs/{job_id}")["state"] == "running"
    expect(page.locator("#progress-text")).to_contain_text("/150")  # "1% · step 2/150 · ETA 3 min 10 s"
    expect(page.locator("#progress-text")).to_contain_text("ETA")
    start = time.monotonic()
    page.click("#cancel")
    expect(page.locator("#generate")).to_be_enabled(timeout=30_000)
    elapsed = time.monotonic() - start
    status = get_json(server.base, f"/api/v1/jobs/{job_id}")
    assert status["state"] in ("cancelled", "interrupted"), status["state"]
    assert status["progress"] < 0.5 and status["images"] == 0
    assert elapsed < 60, f"cancelling took {elapsed:.1f} s"  # the job stopped at a step, not after its 150
    assert job_id not in [j["id"] for j in get_json(server.base, "/api/v1/jobs")["queue"]]
    expect(page.locator("#progress")).to_have_attribute("data-state", status["state"])
    expect(page.locator("#progress-text")).to_contain_text("Interrupted" if status["state"] == "interrupted"
                                                           else "Cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#gallery img.result")).to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()
    shot(page, "cancelled")


def test_cancel_a_queued_job(page, server):
    """Another client's long job runs first: the UI's job waits in the queue, and Cancel removes it there."""
    blocker = post_json(server.base, "/api/v1/txt2img", {"prompt": PROMPT, "steps": 150, "width": 256,
                                                         "height": 256})
    try:
        open_ui(page, server.base)
        fill_form(page, steps=3)
        page.click("#generate")
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Queued: position [12]$"))
        expect(page.locator("#progress")).to_have_attribute("data-state", "queued")
        job_id = page.locator("#progress").get_attribute("data-job")
        page.click("#cancel")
        expect(page.locator("#progress-text")).to_have_text("Cancelled before it started")
        expect(page.locator("#generate")).to_be_enabled()
        assert get_json(server.base, f"/api/v1/jobs/{job_id}")["state"] == "cancelled"
    finally:
        post_json(server.base, f"/api/v1/jobs/{blocker['id']}/cancel", {})
    deadline = time.monotonic() + 30
    while get_json(server.base, f"/api/v1/jobs/{blocker['id']}")["state"] not in FINAL:
        assert time.monotonic() < deadline, "the other client's job did not stop"
        time.sleep(0.1)


def test_reuse_parameters_restores_the_form(page, server):
    open_ui(page, server.base)
    fill_form(page, prompt="a green square in the bottom right on white", steps=5, seed=1234)
    page.fill("#negative-prompt", "blurry")
    page.select_option("#sampler", "DPM++ 2M")
    page.select_option("#schedule", "exponential")  # not DPM++ 2M's default (karras)
    page.fill("#cfg", "5.5")
    page.fill("#batch-size", "2")
    page.click("#generate")
    results = wait_results(page, 2)
    status = get_json(server.base, f"/api/v1/jobs/{page.locator('#progress').get_attribute('data-job')}")
    assert status["seeds"] == [1234, 1235] and status["params"]["schedule"] == "exponential"

    # change everything, then reuse the second image's job
    page.fill("#prompt", "something else")
    page.fill("#negative-prompt", "")
    page.select_option("#sampler", "Euler")
    page.select_option("#schedule", "")
    page.fill("#steps", "20")
    page.fill("#cfg", "7")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#seed", "-1")
    page.fill("#batch-size", "1")
    page.fill("#batch-count", "3")
    results.nth(1).click()
    expect(results.nth(1)).to_have_class("result selected")
    expect(page.locator("#infotext")).to_contain_text("Seed: 1235,")
    page.click("#reuse")
    expected = {"#prompt": "a green square in the bottom right on white", "#negative-prompt": "blurry",
                "#sampler": "DPM++ 2M", "#schedule": "exponential", "#steps": "5", "#cfg": "5.5", "#width": "64",
                "#height": "64", "#seed": "1234", "#batch-size": "2", "#batch-count": "1"}
    for selector, value in expected.items():
        expect(page.locator(selector)).to_have_value(value)
    page.click("#seed-reuse")  # the selected image's own seed
    expect(page.locator("#seed")).to_have_value("1235")
    shot(page, "reuse")


def test_styles_picker_applies_the_servers_styles(page, server):
    """The styles of --styles-file are listed; the chosen ones are applied in order to both prompts, and the
    image's infotext records the expanded prompts, as A1111's does."""
    open_ui(page, server.base)
    expect(page.locator("#styles-field")).to_be_visible()
    expect(page.locator("#styles option")).to_have_text(["OnBlue", "Crisp"])
    fill_form(page, prompt="red circle", steps=4, seed=77)
    page.fill("#negative-prompt", "noise")
    page.select_option("#styles", ["OnBlue", "Crisp"])
    page.click("#generate")
    wait_results(page, 1)
    expect(page.locator("#infotext")).to_contain_text(
        "a large red circle in the center on a blue background, sharp\nNegative prompt: noise, blurry\n")
    status = get_json(server.base, f"/api/v1/jobs/{page.locator('#progress').get_attribute('data-job')}")
    assert status["styles"] == ["OnBlue", "Crisp"]
    expect(page.locator("#prompt")).to_have_value("red circle")  # the form keeps what the user typed
    page.click("#reuse")  # the job's prompts hold the styles already: the picker is cleared, not applied twice
    expect(page.locator("#prompt")).to_have_value("a large red circle in the center on a blue background, sharp")
    assert page.locator("#styles").evaluate("(el) => el.selectedOptions.length") == 0
    shot(page, "styles")


def test_phone_width_layout(browser, server):
    context, page, errors = _new_page(browser, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                      is_mobile=True, has_touch=True)
    try:
        open_ui(page, server.base)
        scroll_width = "() => document.documentElement.scrollWidth"
        assert page.evaluate(scroll_width) <= 390
        expect(page.locator("#generate")).to_be_visible()
        page.locator("#generate").scroll_into_view_if_needed()
        expect(page.locator("#generate")).to_be_in_viewport()
        controls = page.locator("#params").bounding_box()
        output = page.locator(".output").bounding_box()
        assert output["y"] >= controls["y"] + controls["height"] - 1, "one column: the output below the form"
        assert controls["x"] >= 0 and controls["x"] + controls["width"] <= 390

        fill_form(page, steps=3)
        page.tap("#generate")
        wait_results(page, 1)
        expect(page.locator("#infotext")).to_contain_text("Steps: 3")
        assert page.evaluate(scroll_width) <= 390
        shot(page, "phone-txt2img")

        page.tap("#tab-img2img")
        page.click("#send-to-img2img")  # the result becomes the init image
        expect(page.locator("#canvas-box")).to_be_visible()
        page.locator("#mask-canvas").scroll_into_view_if_needed()
        box = page.locator("#mask-canvas").bounding_box()  # in viewport coordinates
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
        page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # a touch paints
        painted = page.locator("#mask-canvas").evaluate(
            "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 == 3 && v)"
            ".length")
        assert painted > 0
        assert page.evaluate(scroll_width) <= 390
        shot(page, "phone-img2img")
    finally:
        context.close()
    assert errors == [], f"errors in the page: {errors}"


def test_img2img_with_a_painted_mask(page, server, tmp_path):
    init = Image.new("RGB", (64, 64), (20, 40, 200))
    ImageDraw.Draw(init).ellipse((16, 16, 47, 47), fill=(220, 30, 30))
    path = tmp_path / "init.png"
    init.save(path)

    open_ui(page, server.base)
    expect(page.locator("#init-image")).to_be_hidden()
    page.click("#tab-img2img")
    expect(page.locator("#tab-img2img")).to_have_attribute("aria-selected", "true")
    page.set_input_files("#init-image", str(path))
    expect(page.locator("#canvas-box")).to_be_visible()
    assert page.locator("#init-canvas").evaluate("c => [c.width, c.height]") == [64, 64]
    fill_form(page, steps=8)
    set_range(page, "#strength", 0.6)
    expect(page.locator("#strength-value")).to_have_text("0.60")

    box = page.locator("#mask-canvas").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, y, steps=8)
    page.mouse.up()

    with page.expect_request(lambda r: r.url.endswith("/api/v1/img2img") and r.method == "POST") as request:
        page.click("#generate")
    body = request.value.post_data_json
    sent = decode_data_url(body["init_images"][0]).convert("RGB")
    assert sent.size == (64, 64)
    assert np.abs(np.asarray(sent, dtype=np.int16) - np.asarray(init, dtype=np.int16)).max() <= 2
    mask = np.asarray(decode_data_url(body["mask"]).convert("RGB"))
    assert mask.shape == (64, 64, 3)
    assert (mask[..., 0] == mask[..., 1]).all() and (mask[..., 1] == mask[..., 2]).all()  # black/white
    assert mask[32, 32, 0] == 255 and mask[32, 20, 0] == 255  # on the stroke
    assert mask[2, 2, 0] == 0 and mask[60, 60, 0] == 0  # away from it
    assert body["denoising_strength"] == 0.6 and body["inpainting_fill"] == 1 and body["mask_blur"] == 4
    assert body["steps"] == 8 and body["width"] == 64

    wait_results(page, 1)
    job_id = page.locator("#progress").get_attribute("data-job")
    status = get_json(server.base, f"/api/v1/jobs/{job_id}")
    assert status["mode"] == "img2img" and status["state"] == "done"
    assert status["params"]["strength"] == 0.6 and status["params"]["inpaint_fill"] == "original"  # masked
    expect(page.locator("#infotext")).to_contain_text("Denoising strength: 0.6")
    assert get_png(server.base, status["image_urls"][0]).size == (64, 64)

    page.click("#clear-mask")
    assert page.locator("#mask-canvas").evaluate(
        "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 == 3 && v)") is False
    shot(page, "img2img")


def test_controlnet_panel(page, server, tmp_path):
    square = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(square).rectangle([10, 10, 40, 40], outline="white", width=2)
    square.save(tmp_path / "square.png")
    open_ui(page, server.base)
    page.click("#controlnet summary")
    # the folder's ControlNet, then the embedded demo ControlNet (the embedded demo model is served)
    expect(page.locator("#cn-model option")).to_have_count(2)
    assert page.locator("#cn-model").input_value().startswith("edges [")
    assert page.locator("#cn-model option").nth(1).inner_text().startswith("demo_controlnet [")
    page.set_input_files("#cn-image", str(tmp_path / "square.png"))
    page.select_option("#cn-module", "invert")
    with page.expect_response(lambda r: r.url.endswith("/controlnet/detect")) as detected:
        page.click("#cn-detect")
    assert detected.value.status == 200
    expect(page.locator("#cn-preview")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    shown = decode_data_url(page.locator("#cn-preview").get_attribute("src")).convert("RGB")
    assert np.array_equal(np.asarray(shown), 255 - np.asarray(square))  # the inverted map, not the upload
    page.check("#cn-enabled")
    page.fill("#cn-weight", "1.5")
    fill_form(page, seed=5)
    with page.expect_request(lambda r: r.url.endswith("/api/v1/txt2img") and r.method == "POST") as request:
        page.click("#generate")
    unit = request.value.post_data_json["alwayson_scripts"]["controlnet"]["args"][0]
    assert unit["model"].startswith("edges [") and unit["module"] == "invert" and unit["weight"] == 1.5
    wait_results(page, 1)
    expect(page.locator("#infotext")).to_contain_text('ControlNet 0: "Module: invert, Model: edges [')
    shot(page, "controlnet")


def test_hires_upscaler_list_and_extras_tab(page, server, tmp_path):
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    source.save(tmp_path / "source.png")
    open_ui(page, server.base)
    page.click("#hires summary")
    names = [o.get_attribute("value") for o in page.locator("#hr-upscaler option").all()]
    assert names[:3] == ["Latent", "Lanczos", "Nearest"] and "None" not in names
    page.check("#hr-enabled")
    page.select_option("#hr-upscaler", "Lanczos")
    page.fill("#hr-steps", "2")
    fill_form(page, steps=2, seed=4)
    with page.expect_request(lambda r: r.url.endswith("/api/v1/txt2img") and r.method == "POST") as request:
        page.click("#generate")
    body = request.value.post_data_json
    assert (body["enable_hr"], body["hr_upscaler"], body["hr_scale"], body["hr_second_pass_steps"]) == (
        True, "Lanczos", 2, 2)
    wait_results(page, 1)
    expect(page.locator("#infotext")).to_contain_text("Hires upscaler: Lanczos")

    page.click("#tab-extras")
    expect(page.locator("#params")).to_be_hidden()
    page.set_input_files("#ex-image", str(tmp_path / "source.png"))
    page.select_option("#ex-upscaler-1", "Nearest")
    page.fill("#ex-resize", "2")
    page.click("#ex-run")
    expect(page.locator("#ex-result")).to_be_visible()
    shown = decode_data_url(page.locator("#ex-result").get_attribute("src")).convert("RGB")
    assert np.array_equal(np.asarray(shown), np.asarray(source.resize((80, 96), Image.NEAREST)))
    expect(page.locator("#ex-info")).to_contain_text("Postprocess upscale by: 2.0, Postprocess upscaler: Nearest")
    page.fill("#ex-resize", "0.05")
    page.click("#ex-run")
    expect(page.locator("#ex-error")).to_contain_text("outside 8 pixels")
    shot(page, "extras")


def test_errors_show_the_servers_detail(page, server):
    open_ui(page, server.base)
    fill_form(page, size=100)  # not a multiple of 8
    page.click("#generate")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("width must be a multiple of 8")
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#gallery img.result")).to_have_count(0)
    page.click("#tab-img2img")
    fill_form(page, size=64)
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("Choose an init image first")
    shot(page, "error")


def test_credentials_are_asked_for_and_sent(page, auth_server):
    with pytest.raises(urllib.error.HTTPError) as exc:
        get_json(auth_server.base, "/api/v1/info")
    assert exc.value.code == 401
    page.goto(auth_server.base + "/")
    expect(page.locator("#auth-box")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("API token")
    expect(page.locator("#generate")).to_be_disabled()
    page.fill("#auth", "wrong")
    page.click("#auth-save")
    expect(page.locator("#error")).to_contain_text("not accepted")
    page.fill("#auth", TOKEN)
    page.click("#auth-save")
    expect(page.locator("#generate")).to_be_enabled()  # /api/v1/info retried with the token
    expect(page.locator("#auth-box")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("() => sessionStorage.getItem('kiln-auth')") == TOKEN
    fill_form(page, steps=3)
    page.click("#generate")
    results = wait_results(page, 1)
    # an <img src> cannot send the token: the image is fetched with it and shown from a blob: URL
    assert results.first.evaluate("img => img.src.startsWith('blob:') && img.complete && img.naturalWidth") == 64
    expect(page.locator("#selected")).to_have_attribute("src", re.compile(r"^blob:"))
    expect(page.locator("#download")).to_have_attribute("href", re.compile(r"^blob:"))
    job_id = page.locator("#progress").get_attribute("data-job")
    assert get_json(auth_server.base, f"/api/v1/jobs/{job_id}", token=TOKEN)["state"] == "done"
    shot(page, "auth")


def test_gallery_shows_the_history_after_a_reload_and_a_restart_with_paging_and_delete(page, server, pipe):
    """Nine jobs submitted through the API: the gallery shows the newest eight (a page), "Older results" the
    ninth; Delete removes a job's images and files on the server; a reload, and a second server on the same
    store (a restart), show the same history."""
    from kiln.demo.report import EMBEDDED
    from kiln.server import create_app
    from kiln.server.worker import ModelIndex, Worker

    ids = [post_json(server.base, "/api/v1/txt2img", {"prompt": PROMPT, "steps": 1, "width": 64, "height": 64,
                                                      "seed": 40 + k})["id"] for k in range(9)]
    deadline = time.monotonic() + 60
    while any(get_json(server.base, f"/api/v1/jobs/{i}")["state"] != "done" for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    open_ui(page, server.base)
    results = page.locator("#gallery img.result")
    expect(results).to_have_count(8)
    assert results.first.get_attribute("data-job") == ids[-1]
    page.click("#gallery-more")
    expect(results).to_have_count(9)
    assert results.last.get_attribute("data-job") == ids[0]
    expect(page.locator("#gallery-more")).to_be_hidden()
    newest = get_json(server.base, f"/api/v1/jobs/{ids[-1]}")
    results.first.click()
    page.click("#delete")
    expect(results).to_have_count(8)
    with pytest.raises(urllib.error.HTTPError) as gone:
        get_json(server.base, f"/api/v1/jobs/{ids[-1]}")
    assert gone.value.code == 404
    assert not (Path(server.config.outdir) / newest["files"][0]).exists()
    page.reload()
    expect(results).to_have_count(8)
    assert results.first.get_attribute("data-job") == ids[-2]
    worker = Worker(ModelIndex.scan(None, None), str(EMBEDDED), server.config.limits, outdir=server.config.outdir,
                    loader=lambda *a, **k: pipe)
    srv, thread, base = _serve(create_app(server.config, worker=worker), lifespan="off")
    try:
        open_ui(page, base)
        expect(results).to_have_count(8)
        assert [results.nth(k).get_attribute("data-job") for k in range(8)] == ids[-2::-1]
    finally:
        _stop(srv, thread)
        worker.stop()
