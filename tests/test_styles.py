"""Prompt styles (A1111's styles.csv): reading the file, applying styles, finding them again in an expanded prompt;
and the same styles through the CLI (`--styles-file`, `--style`)."""
import pytest

from kiln.errors import KilnError
from kiln.styles import Style, StyleTable, merge, read_styles

CSV = ('name,prompt,negative_prompt\n'
       'Oil,"oil painting of {prompt}, thick brush",blurry\n'
       'Sharp,"sharp focus, 8k","lowres, jpeg artifacts"\n'
       '"Quoted, name",,"{prompt}, watermark"\n'
       ',orphan,\n')


@pytest.fixture
def styles_csv(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("\ufeff" + CSV, encoding="utf-8")  # A1111 writes a BOM
    return path


def test_merge_as_a1111():
    assert merge("oil painting of {prompt}", "a cat") == "oil painting of a cat"
    assert merge("{prompt} {prompt}", "x") == "x x"
    assert merge("sharp focus", "a cat ") == "a cat, sharp focus"
    assert merge("sharp focus", "") == "sharp focus"
    assert merge("", "a cat") == "a cat"
    assert merge("  ", "  ") == ""


def test_read_and_apply(styles_csv):
    table = StyleTable.read(styles_csv)
    assert table.names == ["Oil", "Sharp", "Quoted, name"]  # the nameless row cannot be chosen
    assert table.styles["Sharp"] == Style("Sharp", "sharp focus, 8k", "lowres, jpeg artifacts")
    assert table.apply(["Oil", "Sharp"], "a cat", "") == (
        "oil painting of a cat, thick brush, sharp focus, 8k", "blurry, lowres, jpeg artifacts")
    assert table.apply(["Sharp", "Oil"], "a cat", "ugly") == (
        "oil painting of a cat, sharp focus, 8k, thick brush", "ugly, lowres, jpeg artifacts, blurry")
    assert table.apply(["Quoted, name"], "a cat", "ugly") == ("a cat", "ugly, watermark")
    assert table.apply([], "a cat", "ugly") == ("a cat", "ugly")


def test_extract_finds_the_styles_again(styles_csv):
    table = StyleTable.read(styles_csv)
    for names in (["Oil"], ["Sharp"], ["Oil", "Sharp"], ["Sharp", "Oil"], ["Quoted, name", "Sharp"]):
        prompt, negative = table.apply(names, "a red  cat", "ugly")
        assert table.extract(prompt, negative) == (names, "a red cat", "ugly"), names
    assert table.extract("a cat", "") == ([], "a cat", "")


def test_unknown_style_names_the_choices(styles_csv):
    with pytest.raises(KilnError, match=r"unknown style 'Nope'; the styles are: 'Oil', 'Sharp', 'Quoted, name'"):
        StyleTable.read(styles_csv).apply(["Oil", "Nope"], "a", "")
    with pytest.raises(KilnError, match="no styles file given"):
        read_styles(None).apply(["Oil"], "a", "")


@pytest.mark.parametrize("content, words", [
    ("title,prompt\nx,y\n", r"needs the columns name, prompt\[, negative_prompt\].*found prompt, title"),
    ("name,negative_prompt\nx,y\n", "needs the columns name, prompt"),
    (b"name,prompt\n\xff\xfe,x\n", "not UTF-8"),
])
def test_bad_styles_files_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / "styles.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(KilnError, match=words) as e:
        StyleTable.read(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(KilnError, match="no such file"):
        StyleTable.read(tmp_path / "missing.csv")


def test_old_text_column_and_empty_file(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("name,text\nA,in the style of {prompt}\n")
    assert StyleTable.read(old).apply(["A"], "x", "") == ("in the style of x", "")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert StyleTable.read(empty).names == []


# ---------------------------------------------------------------------- the CLI
def cli(tmp_path, *args):
    from kiln.cli import main
    from kiln.demo.report import EMBEDDED

    return main(["txt2img", "--ckpt", str(EMBEDDED), "--outdir", str(tmp_path / "out"), "--ddim_steps", "2",
                 "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--prompt", "a cat", *args])


def test_cli_styles_reach_the_infotext(styles_csv, tmp_path):
    from kiln.output import read_parameters

    assert cli(tmp_path, "--styles-file", str(styles_csv), "--style", "Oil", "--style", "Sharp",
               "--negative-prompt", "ugly") == 0
    info = read_parameters(str(tmp_path / "out" / "samples" / "00000.png"))
    assert info["prompt"] == "oil painting of a cat, thick brush, sharp focus, 8k"
    assert info["negative_prompt"] == "ugly, blurry, lowres, jpeg artifacts"


@pytest.mark.parametrize("args, words", [
    (["--style", "Oil"], "--style needs --styles-file"),
    (["--styles-file", "STYLES", "--style", "Nope"], "--style: unknown style 'Nope'; the styles are: 'Oil'"),
    (["--styles-file", "/nonexistent.csv"], "styles file /nonexistent.csv: no such file"),
])
def test_cli_bad_styles_are_one_line(styles_csv, tmp_path, capsys, args, words):
    assert cli(tmp_path, *[str(styles_csv) if a == "STYLES" else a for a in args]) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / "samples").exists() or not list((tmp_path / "out" / "samples").iterdir())


def test_serve_refuses_a_bad_styles_file_before_loading(tmp_path, capsys):
    from kiln.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("title\nx\n")
    assert main(["serve", "--styles-file", str(bad)]) == 1
    assert "needs the columns name, prompt" in capsys.readouterr().err
