"""One model index for the local server and the Ray Serve ingress: the same entries, found by the same names and
hashes (A1111's title, file name, name, the SHA-256 whole or its first 10 or 8 digits), never by path."""
import hashlib

from kiln.server.worker import ModelEntry, ModelIndex


def test_the_ingress_index_finds_what_the_local_index_finds(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "alpha.safetensors").write_bytes(b"alpha weights")
    (folder / "beta.ckpt").write_bytes(b"beta weights")
    (folder / "notes.txt").write_text("not a model")
    local = ModelIndex.scan(None, str(folder))
    remote = ModelIndex.from_records(local.records())  # what the replicas' facts carry to the ingress
    names = [e.filename for e in local.entries]
    assert names[:2] == ["alpha.safetensors", "beta.ckpt"] and "notes.txt" not in names
    alpha = local.entries[0]
    assert alpha.sha256 == hashlib.sha256(b"alpha weights").hexdigest()
    for index in (local, remote):
        for name in (alpha.title, alpha.filename, alpha.name, alpha.sha256, alpha.sha256[:10],
                     alpha.sha256[:8].upper(), f"  {alpha.name} "):
            found = index.find(name)
            assert found is not None and found.path == alpha.path, name
        assert index.find(str(folder / "alpha.safetensors")) is None  # never by path
        assert index.find("gamma") is None


def test_refresh_sees_new_files_and_keeps_known_hashes(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"a")
    index = ModelIndex.scan(None, str(tmp_path))
    first = index.entries[0]
    (tmp_path / "b.safetensors").write_bytes(b"b")
    index.refresh()
    assert [e.filename for e in index.entries][:2] == ["a.safetensors", "b.safetensors"]
    assert index.entries[0] is first  # known entries (and their hashes) are kept
    assert ModelEntry.of(tmp_path / "a.safetensors").title == "a.safetensors"  # unhashed: no [hash] in the title
