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
