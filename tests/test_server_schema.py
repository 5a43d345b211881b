"""Property-based API testing: schemathesis generates requests from our own /openapi.json (bounded examples per
operation) and checks that the server never answers 5xx and never crashes, whatever the body holds.

Limits are set small (64-pixel images, 4 steps, batches of 2) so that the requests that are valid stay cheap.
"""
import shutil
import tempfile

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from kiln.server import Limits, ServerConfig, create_app  # noqa: E402

# A queue long enough for every job the native API's examples submit (a full queue's 503 is tested elsewhere)
LIMITS = Limits(max_size=64, max_steps=4, max_batch_size=2, max_n_iter=2, max_prompt_chars=500, queue_size=10_000)
# a job store on disk (no output files): the history, paging and delete endpoints run against SQLite
DATA = tempfile.mkdtemp(prefix="kiln-schema-")
app = create_app(ServerConfig(outdir=None, save=False, limits=LIMITS, data_dir=DATA))
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])
STATUS = {}


@pytest.fixture(scope="module", autouse=True)
def stop_worker():
    yield
    app.state.worker.stop()  # cancel what the native API's examples left queued
    shutil.rmtree(DATA, ignore_errors=True)


def document(valid_sizes: bool) -> dict:
    """Our /openapi.json; with `valid_sizes`, the numeric fields narrowed to what the limits allow, so that the
    generated requests also reach the model (most random widths are refused with 422 before queueing)."""
    from fastapi.testclient import TestClient

    doc = TestClient(app).get("/openapi.json").json()  # no lifespan: the worker keeps running
    if valid_sizes:
        narrow = {"width": (8, 64, 8), "height": (8, 64, 8), "steps": (1, 4, 1), "batch_size": (1, 2, 1),
                  "n_iter": (1, 2, 1)}
        for name in ("Txt2ImgRequest", "Img2ImgRequest"):
            props = doc["components"]["schemas"][name]["properties"]
            for field, (lo, hi, step) in narrow.items():
                props[field] = {"type": "integer", "minimum": lo, "maximum": hi, "multipleOf": step}
            props["prompt"] = {"type": "string", "maxLength": 200}
            props["hr_scale"] = {"type": "number", "minimum": 1, "maximum": 1}
        # OpenAI's /v1/images/generations: small sizes (always sent), few steps
        openai = doc["components"]["schemas"]["ImageGenerationRequest"]
        openai["properties"].update(steps={"type": "integer", "minimum": 1, "maximum": 2}, n={"type": "integer",
                                    "minimum": 1, "maximum": 2}, size={"enum": ["16x16", "32x16"]},
                                    model={"type": "null"}, prompt={"type": "string", "minLength": 1,
                                                                    "maxLength": 200})
        openai["required"] = ["prompt", "size"]
    schema = schemathesis.openapi.from_dict(doc)
    schema.app = app
    return schema


def check(case):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    key = (case.method, case.path)
    STATUS.setdefault(key, set()).add(response.status_code)


@document(valid_sizes=False).parametrize()
@SETTINGS
def test_no_server_errors_on_any_input(case):
    check(case)


@document(valid_sizes=True).parametrize()
@SETTINGS
def test_no_server_errors_on_runnable_requests(case):
    check(case)


def test_generated_requests_reached_the_model():
    """The runs above are not vacuous: both generation endpoints returned images for some generated bodies."""
    if not STATUS:
        pytest.skip("run together with the schemathesis tests above")
    assert 200 in STATUS.get(("POST", "/sdapi/v1/txt2img"), set()), STATUS
    assert 202 in STATUS.get(("POST", "/api/v1/txt2img"), set()), STATUS
    assert 200 in STATUS.get(("POST", "/v1/images/generations"), set()), STATUS
