"""Our modules against the key/shape manifests generated from CompVis' own modules, and architecture detection."""
import dataclasses
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


@pytest.mark.parametrize("name,family,in_ch",
                         [("sd_v1_keys.json", "sd1", 4), ("sd_v1_inpainting_keys.json", "sd1-inpaint", 9)])
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


@pytest.mark.parametrize("name,family,in_ch",
                         [("sd_v2_keys.json", "sd2", 4), ("sd_v2_inpainting_keys.json", "sd2-inpaint", 9)])
def test_sd2_manifest_maps_exactly_onto_our_modules(name, family, in_ch):
    ref = manifest(name)
    cfg = detect(shapes_source(ref))
    assert cfg.family == family and cfg.unet.in_channels == in_ch
    assert cfg.text.kind == "openclip" and cfg.text_skip == 1 and cfg.unet.upcast_attention
    ours = our_shapes(cfg)
    file_model = {k: v for k, v in ref.items() if k.startswith(MODEL_PREFIXES)}
    assert set(file_model) == set(ours)
    assert all(ours[k] == file_model[k] for k in ours)
    count = lambda p: sum(torch.Size(s).numel() for k, s in ours.items() if k.startswith(p))
    # Published sizes: SD 2 UNet 865,910,724 (+ 14,400 for the 5 extra input channels of inpainting);
    # OpenCLIP ViT-H/14 text tower 354,032,641 (incl. text_projection and logit_scale).
    assert count("model.diffusion_model.") == 865_910_724 + (14_400 if in_ch == 9 else 0)
    assert count("cond_stage_model.") == 354_032_641


@pytest.mark.parametrize("yaml_name,pred,native",
                         [("v2-inference-v.yaml", "v", 768), ("v2-inference.yaml", "eps", 512)])
def test_sd2_yaml_gives_the_detected_model(yaml_name, pred, native):
    from kiln.checkpoints import config_from_yaml

    over = config_from_yaml(DATA / yaml_name)
    cfg = detect(shapes_source(manifest("sd_v2_keys.json")))
    assert over["unet"] == cfg.unet and over["vae"] == cfg.vae
    assert over["parameterization"] == pred and over["native_size"] == native


@pytest.mark.parametrize("name,family,unet_params", [("sdxl_base_keys.json", "sdxl", 2_567_463_684),
                                                      ("sdxl_refiner_keys.json", "sdxl-refiner", 2_259_526_660)])
def test_sdxl_manifest_maps_exactly_onto_our_modules(name, family, unet_params):
    ref = manifest(name)
    cfg = detect(shapes_source(ref))
    assert cfg.family == family and cfg.scale_factor == 0.13025 and cfg.native_size == 1024
    ours = our_shapes(cfg)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.")
    file_model = {k: v for k, v in ref.items() if k.startswith(prefixes)}
    assert set(file_model) - set(ours) <= {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}
    assert set(ours) <= set(file_model)
    assert all(ours[k] == file_model[k] for k in ours)
    count = lambda p: sum(torch.Size(s).numel() for k, s in ours.items() if k.startswith(p))
    # Published: SDXL base UNet 2,567,463,684; CLIP ViT-L text 123,060,480; OpenCLIP bigG text 694,659,841
    assert count("model.diffusion_model.") == unet_params
    big_g = "conditioner.embedders.1." if family == "sdxl" else "conditioner.embedders.0."
    assert count(big_g) == 694_659_841
    if family == "sdxl":
        assert count("conditioner.embedders.0.") == 123_060_480
        assert cfg.unet.transformer_depth == (1, 2, 10) and cfg.unet.context_dim == 2048
        assert cfg.unet.adm_in_channels == 2816
    else:
        assert cfg.unet.context_dim == 1280 and cfg.unet.adm_in_channels == 2560


@pytest.mark.parametrize("name,yaml_name", [("sdxl_base_keys.json", "sd_xl_base.yaml"),
                                            ("sdxl_refiner_keys.json", "sd_xl_refiner.yaml")])
def test_sdxl_detection_agrees_with_the_upstream_yaml(name, yaml_name):
    import yaml

    u = yaml.safe_load((DATA / yaml_name).read_text())["model"]["params"]["network_config"]["params"]
    cfg = detect(shapes_source(manifest(name))).unet
    assert cfg.model_channels == u["model_channels"] and cfg.channel_mult == tuple(u["channel_mult"])
    ctx = u["context_dim"]
    assert cfg.context_dim == (ctx[0] if isinstance(ctx, list) else ctx) and cfg.adm_in_channels == u["adm_in_channels"]
    assert cfg.num_head_channels == u["num_head_channels"] and cfg.use_linear_in_transformer
    depth = u["transformer_depth"]
    depth = depth if isinstance(depth, list) else [depth] * len(u["channel_mult"])
    levels = [i for i in range(len(u["channel_mult"])) if 2 ** i in u["attention_resolutions"]]
    assert [cfg.depth(i) for i in levels] == [depth[i] for i in levels]


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
    own = dataclasses.replace(cfg, sampler_schedules={"plms": "quad"})
    assert ModelConfig.from_dict(json.loads(json.dumps(own.to_dict()))) == own
    older = {k: v for k, v in cfg.to_dict().items() if k != "sampler_schedules"}  # files written before the field
    assert ModelConfig.from_dict(older).sampler_schedules == {}


def test_yaml_config_gives_the_same_model():
    from kiln.checkpoints import config_from_yaml

    over = config_from_yaml(DATA / "v1-inference.yaml")
    ref = ModelConfig()
    assert over["unet"] == ref.unet and over["vae"] == ref.vae
    assert over["scale_factor"] == 0.18215 and over["native_size"] == 512 and over["parameterization"] == "eps"
