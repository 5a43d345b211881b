"""Textual inversion: an embedding made of the token vectors of "red" (or "red circle") must condition exactly as
those words do, from every file layout; names never split over chunks; TI hashes in the infotext."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kiln.prompts import CHUNK


def vectors(pipe, words):
    ids = pipe.tokenizer.encode(words)
    return pipe.model.text_model.embeddings.token_embedding.weight[ids].detach().clone()


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    red, red_circle = vectors(pipe, "red"), vectors(pipe, "red circle")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": red}, "name": "crimsonish", "step": 500},
               d / "crimsonish.pt")  # A1111 / textual_inversion layout
    save_file({"emb_params": red_circle}, str(d / "redball.safetensors"))  # A1111 safetensors, two vectors
    torch.save({"<scarlet>": red[0]}, d / "scarlet.bin")  # diffusers learned_embeds
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(d / "sdxlonly.safetensors"))
    return d


def cond(pipe, prompt, used=None):
    return pipe.conditioning([prompt], None, used=used)[0].context


def test_every_layout_conditions_like_the_words_it_was_made_of(pipe, folder):
    pipe.embeddings_dir = folder
    plain = cond(pipe, "a red circle on a blue background")
    for prompt in ("a crimsonish circle on a blue background", "a scarlet circle on a blue background",
                   "a redball on a blue background"):
        used = {}
        torch.testing.assert_close(cond(pipe, prompt, used), plain, rtol=0, atol=1e-5)
    assert set(used) == {"redball"}  # the embeddings a conditioning used are reported to its caller
    assert any("sdxlonly" in n and "width" in n for n in pipe.notices)  # another family's embedding is skipped
    pipe.embeddings_dir = None
    assert not torch.allclose(cond(pipe, "a crimsonish circle on a blue background"), plain, atol=1e-3)


def test_embeddings_are_never_split_over_chunks(pipe, folder):
    from kiln.prompts import chunk_tokens

    pipe.embeddings_dir = folder
    from kiln.pipeline.text import embedding_table

    table, _, owners = embedding_table(pipe)
    filler = " ".join(["blue"] * (CHUNK - 1))  # one free slot left: the two-vector embedding moves on
    chunks = chunk_tokens(pipe.tokenizer, filler + " redball", embeddings=table)
    assert len(chunks) == 2
    second = [i for i in chunks[1].ids if i in owners]
    assert len(second) == 2 and not [i for i in chunks[0].ids if i in owners]
    pipe.embeddings_dir = None


def test_images_and_infotext(pipe, folder):
    pipe.embeddings_dir = folder
    kw = dict(seed=2, steps=6, sampler="euler")
    a = pipe.txt2img("a crimsonish circle on a blue background", **kw)
    b = pipe.txt2img("a red circle on a blue background", **kw)
    assert np.abs(a.pixels.astype(int) - b.pixels).max() <= 1  # same conditioning up to float rounding
    assert 'TI hashes: "crimsonish: ' in a.infotexts[0] and "TI hashes" not in b.infotexts[0]
    pipe.embeddings_dir = None


def test_damaged_embedding_is_a_notice_not_a_crash(pipe, tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    save_file({"a": torch.zeros(3), "b": torch.zeros(3)}, str(tmp_path / "noembedding.safetensors"))
    pipe.embeddings_dir = tmp_path
    pipe.notices.clear()
    cond(pipe, "a broken noembedding circle")
    assert any("broken" in n for n in pipe.notices) and any("no embedding vectors" in n for n in pipe.notices)
    pipe.embeddings_dir = None


def test_cli_embeddings_dir(folder, tmp_path):
    from PIL import Image

    from kiln.cli import main

    out = tmp_path / "o"
    assert main(["txt2img", "--prompt", "a crimsonish circle", "--embeddings-dir", str(folder), "--outdir", str(out),
                 "--n_samples", "1", "--ddim_steps", "3", "--skip_grid"]) == 0
    with Image.open(out / "samples" / "00000.png") as im:
        assert 'TI hashes: "crimsonish: ' in im.info["parameters"]
    assert main(["txt2img", "--prompt", "a", "--embeddings-dir", str(tmp_path / "nope")]) == 1
