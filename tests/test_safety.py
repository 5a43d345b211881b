"""The NSFW safety checker against diffusers' StableDiffusionSafetyChecker on random weights."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.checkpoints.safety import load_safety_checker
from kiln.models.safety import SafetyChecker
from kiln.pipeline.safety import check_images, clip_preprocess

transformers = pytest.importorskip("transformers")
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance  # noqa


def small_config():
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                       num_hidden_layers=1),
                      vision_config=dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                         num_hidden_layers=3, image_size=224, patch_size=14),
                      projection_dim=48)


def random_reference(seed=0):
    torch.manual_seed(seed)
    ref = StableDiffusionSafetyChecker(small_config()).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            elif p.ndim >= 2:
                p.normal_(0, 0.6 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.02)
    return ref


def images(n=6, seed=0, size=(256, 320)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 40, (n, *size, 3)), 0, 255).astype(np.uint8)


def reference_scores(ref, clip_input):
    with torch.no_grad():
        emb = ref.visual_projection(ref.vision_model(clip_input)[1])
        special = cosine_distance(emb, ref.special_care_embeds) - ref.special_care_embeds_weights
        concept = cosine_distance(emb, ref.concept_embeds) - ref.concept_embeds_weights
    hit = (special > 0).any(dim=1, keepdim=True)
    return concept + 0.01 * hit, special


def set_thresholds(ref, clip_input):
    """Thresholds placed around the images' actual similarities so that the batch holds: clean images, images
    flagged by a concept, and one image flagged only through the special-care adjustment (score −0.005 + 0.01)."""
    with torch.no_grad():
        emb = ref.visual_projection(ref.vision_model(clip_input)[1])
        cos_c = cosine_distance(emb, ref.concept_embeds)
        cos_s = cosine_distance(emb, ref.special_care_embeds)
        ref.concept_embeds_weights.copy_(cos_c.max(dim=0).values + 0.05)   # nobody flagged by default
        ref.special_care_embeds_weights.copy_(cos_s.max(dim=0).values + 0.05)
        ref.concept_embeds_weights[3] = cos_c[:, 3].max() - 0.02            # the closest image(s) over concept 3
        i = int(cos_c[:, 5].argmax())
        ref.concept_embeds_weights[5] = cos_c[i, 5] + 0.005                 # image i just under concept 5 ...
        ref.special_care_embeds_weights[1] = cos_s[i, 1] - 0.03             # ... but a special-care hit adds 0.01
        return i


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = random_reference()
    px = images()
    clip_input = clip_preprocess(px)
    special_idx = set_thresholds(ref, clip_input)
    folder = tmp_path_factory.mktemp("sc") / "safety_checker"
    ref.save_pretrained(folder)
    return ref, px, clip_input, special_idx, folder


def test_preprocessing_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(do_resize=True, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                              do_center_crop=True, resample=3)
    px = images(3, seed=2, size=(300, 410))
    ours = clip_preprocess(px)
    theirs = proc([p for p in px], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (3, 3, 224, 224)
    assert (ours - theirs).abs().max() < 2e-2  # PIL bicubic on both sides; rounding of the resized uint8 only
    assert (ours - theirs).abs().mean() < 1e-3


def test_decisions_and_scores_match_diffusers(setup):
    ref, px, clip_input, special_idx, folder = setup
    ours = load_safety_checker(folder)
    flagged, scores, special = ours(clip_input)
    ref_scores, ref_special = reference_scores(ref, clip_input)
    assert (scores - ref_scores).abs().max() <= 1e-5
    assert (special - ref_special).abs().max() <= 1e-5
    _, ref_flags = ref(clip_input=clip_input, images=px.copy())
    _, onnx_flags = ref.forward_onnx(clip_input, torch.from_numpy(px.copy()))
    assert flagged.tolist() == list(ref_flags) == onnx_flags.tolist()
    # the batch exercises both outcomes and the special-care adjustment
    assert any(flagged.tolist()) and not all(flagged.tolist())
    assert flagged[special_idx] and -0.01 < float(scores[special_idx, 5] - 0.01) < 0


def test_flagged_images_are_replaced_by_black(setup):
    ref, px, clip_input, _, folder = setup
    r = check_images(load_safety_checker(folder), px)
    for i, f in enumerate(r.flagged):
        assert (r.pixels[i] == 0).all() if f else np.array_equal(r.pixels[i], px[i])


def test_published_key_layout_loads_the_same(setup, tmp_path):
    """The released checker files name the tower `vision_model.vision_model.*`; transformers ≥ 5.6 flattens it."""
    ref, px, clip_input, _, folder = setup
    flat = load_file(folder / "model.safetensors")
    nested = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in flat.items()}
    assert any(k.startswith("vision_model.vision_model.") for k in nested)
    save_file(nested, tmp_path / "checker.safetensors")
    a = load_safety_checker(tmp_path / "checker.safetensors")(clip_input)[1]
    b = load_safety_checker(folder)(clip_input)[1]
    assert torch.equal(a, b)


def test_full_size_layout_matches_the_reference():
    from transformers import CLIPConfig

    vit_l = CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                          num_hidden_layers=24, image_size=224, patch_size=14), projection_dim=768)
    with torch.device("meta"):
        ref = StableDiffusionSafetyChecker(vit_l)
        ours = SafetyChecker()
    theirs = {("vision_model." + k if k.startswith("vision_model.") else k): tuple(v.shape)
              for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs


def test_bad_files_are_refused(tmp_path):
    from kiln.errors import CheckpointError

    save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a Stable Diffusion safety checker"):
        load_safety_checker(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no safety checker weights"):
        load_safety_checker(tmp_path)


def test_cli_safety_switches(setup, tmp_path, capsys):
    from PIL import Image

    from kiln.cli import main

    *_, folder = setup
    args = ["txt2img", "--prompt", "a red circle", "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "4",
            "--skip_grid"]
    assert main(args + ["--safety", "--outdir", str(tmp_path / "a")]) == 1
    assert "--safety needs --safety-checker" in capsys.readouterr().err
    assert main(args + ["--outdir", str(tmp_path / "b")]) == 0
    assert "safety check is off" in capsys.readouterr().err
    assert main(args + ["--no-safety", "--outdir", str(tmp_path / "c")]) == 0
    assert "safety check is off" not in capsys.readouterr().err
    assert main(args + ["--safety-checker", str(folder), "--outdir", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    saved = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "d" / "samples").glob("*.png"))]
    black = [bool((s == 0).all()) for s in saved]
    assert black.count(True) == err.count("flagged by the safety checker")
