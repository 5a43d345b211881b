"""Our modules against the key/shape manifests generated from CompVis' own modules, and architecture detection."""
import json
from pathlib import Path

import pytest
import torch

from kiln.checkpoints import detect
from kiln.checkpoints.sources import TensorSource
from kiln.errors import CheckpointError
from kiln.models import LatentDiffusion, ModelConfig

DATA = Path(__file__).parent / "data"
MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def manifest(name):
    return {k: tuple(v) for k, v in json.loads((DATA / name).read_text()).items()}


def shapes_source(shapes, name="manifest"):
    return TensorSource(shapes, lambda k: torch.zeros(shapes[k]), {}, name)


def our_shapes(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LatentDiffusion(cfg).state_dict().items()}


@pytest.mark.parametrize("name,family,in_ch", [("sd_v1_keys.json", "sd1", 4), ("sd_v1_inpainting_keys.json", "sd1-inpaint", 9)])
def test_manifest_maps_exactly_onto_our_modules(name, family, in_ch):
    ref = manifest(name)
    cfg = detect(shapes_source(ref))
    assert cfg.family == family and cfg.unet.in_channels == in_ch
    ours = our_shapes(cfg)
    file_model = {k: v for k, v in ref.items() if k.startswith(MODEL_PREFIXES)}
    # position_ids is a constant arange buffer; we compute positions instead of storing it.
    assert set(file_model) - set(ours) == {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert set(ours) <= set(file_model), "our modules have a tensor the file lacks"
    assert all(ours[k] == file_model[k] for k in ours)
    # Parameter counts as published for SD v1: UNet 859,520,964 (v1); VAE 83,653,863; CLIP text 123,060,480.
    count = lambda p: sum(torch.Size(s).numel() for k, s in ours.items() if k.startswith(p))
    assert count("first_stage_model.") == 83_653_863
    assert count("cond_stage_model.") == 123_060_480
    if family == "sd1":
        assert count("model.diffusion_model.") == 859_520_964


def test_detected_config_is_the_compvis_v1_config():
    cfg = detect(shapes_source(manifest("sd_v1_keys.json")))
    assert cfg == ModelConfig(family="sd1")


def test_ema_manifest_names_follow_litema():
    from kiln.checkpoints import ema_key

    ref = manifest("sd_v1_keys.json")
    unet = [k for k in ref if k.startswith("model.diffusion_model.")]
    assert all(ema_key(k) in ref and ref[ema_key(k)] == ref[k] for k in unet)


@pytest.mark.parametrize("name,words", [("sd_v2_keys.json", "2.x"), ("sdxl_base_keys.json", "SDXL")])
def test_other_families_are_named_and_refused(name, words):
    with pytest.raises(CheckpointError, match=words):
        detect(shapes_source(manifest(name)))


def test_non_sd_file_is_refused():
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        detect(shapes_source({"encoder.layer.0.weight": (4, 4)}))


def test_unet_with_unknown_input_channels_is_refused():
    ref = manifest("sd_v1_keys.json")
    ref["model.diffusion_model.input_blocks.0.0.weight"] = (320, 7, 3, 3)
    with pytest.raises(CheckpointError, match="7 input channels"):
        detect(shapes_source(ref))


def test_config_round_trips_through_dict():
    import sdref

    cfg = sdref.tiny_config()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_yaml_config_gives_the_same_model():
    from kiln.checkpoints import config_from_yaml

    over = config_from_yaml(DATA / "v1-inference.yaml")
    ref = ModelConfig()
    assert over["unet"] == ref.unet and over["vae"] == ref.vae
    assert over["scale_factor"] == 0.18215 and over["native_size"] == 512 and over["parameterization"] == "eps"
