"""The golden outputs of tests/golden.py: every case's pixels and infotexts as recorded, and the HTTP API's schema.

A change that is meant to move a case re-records it (`python tests/golden.py --write`) in a commit that names the
cases it moves and why."""
import json

import pytest

import golden


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return golden.Models(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="module")
def recorded():
    return golden.load_golden()


def test_every_case_is_recorded(recorded):
    assert sorted(recorded[0]["cases"]) == sorted(golden.ALL)


@pytest.mark.parametrize("name", golden.ALL)
def test_golden(models, recorded, name):
    pixels, infotexts = golden.run_case(models, name)
    why = golden.compare(name, pixels, infotexts, *recorded)
    assert why is None, f"{name}: {why}"


def test_openapi_schema_is_unchanged():
    assert golden.openapi() == json.loads(golden.OPENAPI.read_text())
