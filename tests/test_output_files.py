"""The one atomic writer: whole files under their final names only, and what a killed writer leaves swept away."""
from kiln.output.files import Destination, write_atomic


def test_write_atomic_leaves_only_the_final_file(tmp_path):
    write_atomic(tmp_path / "a.png", b"first")
    write_atomic(tmp_path / "a.png", b"second")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"] and (tmp_path / "a.png").read_bytes() == b"second"


def test_sweep_removes_a_killed_writer_s_temporary_files_only(tmp_path):
    out = Destination(str(tmp_path / "run"))
    out.write_atomic("images/000000.png", b"done")
    (tmp_path / "run" / "images" / ".tmp-abc123").write_bytes(b"half")  # as a SIGKILL mid-write leaves it
    assert out.sweep("images") == 1
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == ["000000.png"]
    assert out.sweep("images") == 0 and out.sweep("nothing-here") == 0
