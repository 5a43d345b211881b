"""kiln.checkpoints.safe_pickle: .ckpt/.pt files load without ever running the unrestricted unpickler."""

import collections
import io
import os
import pickle
import pickletools
import random
import shlex
import struct
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.checkpoints import safe_pickle
from kiln.checkpoints.safe_pickle import ALLOWED_GLOBALS, InertPlaceholder, load_pickle_checkpoint
from kiln.errors import CheckpointError

FORMATS = ("zip", "legacy")
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


def save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def bits(t):
    """The raw bytes of a tensor, for bit-exact comparison (NaN-safe, -0.0-safe)."""
    return t.detach().contiguous().view(-1).view(torch.uint8)


def assert_bit_identical(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(bits(a), bits(b))


# ----------------------------------------------------------------------------- payloads

def _py_touch(marker):
    return f"open({str(marker)!r}, 'w').close()"


def _os_system_standin(cmd):  # never called: only stands in for os.system while pickling
    raise AssertionError("stand-in called")


def payload_reduce(kind, marker):
    """(callable, args) that creates `marker` when called -- what a malicious __reduce__ returns."""
    if kind in ("posix.system", "os.system"):
        return os.system, (f"touch {shlex.quote(str(marker))}",)
    if kind == "builtins.exec":
        return exec, (_py_touch(marker),)
    if kind == "builtins.eval":
        return eval, (_py_touch(marker),)
    if kind == "subprocess.Popen":
        return subprocess.Popen, ([sys.executable, "-c", _py_touch(marker)],)
    if kind == "subprocess.call":
        return subprocess.call, ([sys.executable, "-c", _py_touch(marker)],)
    raise ValueError(kind)


class Evil:
    def __init__(self, kind, marker):
        self.kind, self.marker = kind, marker

    def __reduce__(self):
        return payload_reduce(self.kind, self.marker)


PAYLOADS = ("posix.system", "os.system", "builtins.exec", "builtins.eval", "subprocess.Popen", "subprocess.call")


def write_malicious(path, kind, marker, fmt, monkeypatch):
    """A checkpoint-shaped file whose pickle calls the payload (a real tensor next to it)."""
    obj = {"state_dict": {"w": torch.ones(3)}, "global_step": 1, "evil": Evil(kind, marker)}
    with monkeypatch.context() as m:
        if kind == "os.system":
            # os.system is posix.system, so pickle would write "posix system". Make the
            # global in the file literally "os system" (the real os.system on unpickling).
            _os_system_standin.__module__, _os_system_standin.__qualname__ = "os", "system"
            m.setattr(os, "system", _os_system_standin)
        if fmt == "raw":
            del obj["state_dict"]
            path.write_bytes(pickle.dumps(obj, protocol=2))
        else:
            save(obj, path, fmt)
    return path


def global_name_in_file(kind):
    """How a protocol-2 pickle spells the global (py2 names: __builtin__, commands)."""
    return {"builtins.exec": "__builtin__\nexec", "builtins.eval": "__builtin__\neval",
            "subprocess.Popen": "commands\nPopen", "subprocess.call": "commands\ncall"}.get(
        kind, kind.replace(".", "\n"))


def wait_for(path, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live_under_stock_pickle(tmp_path, kind, monkeypatch):
    """Control: each payload really creates its marker when unpickled without restrictions."""
    marker = tmp_path / "pwned"
    data = write_malicious(tmp_path / "evil.ckpt", kind, marker, "raw", monkeypatch).read_bytes()
    assert ("c" + global_name_in_file(kind) + "\n").encode() in data
    result = pickle.loads(data)
    if isinstance(result["evil"], subprocess.Popen):
        result["evil"].wait(timeout=30)
    assert wait_for(marker)


def test_payload_is_live_under_unrestricted_torch_load(tmp_path, monkeypatch):
    """Control: torch.load(weights_only=False) would run the payload in both torch formats."""
    for fmt in FORMATS:
        marker = tmp_path / f"pwned-{fmt}"
        path = write_malicious(tmp_path / f"evil-{fmt}.ckpt", "builtins.exec", marker, fmt, monkeypatch)
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("fmt", ("zip", "legacy", "raw"))
@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, kind, fmt, monkeypatch):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "model.ckpt", kind, marker, fmt, monkeypatch)
    with pytest.raises(CheckpointError) as info:
        load_pickle_checkpoint(path)
    msg = str(info.value)
    assert f"'{kind}'" in msg
    assert msg.startswith(f"refusing to load {path}:")
    assert "nothing from the file was executed" in msg and "\n" not in msg
    time.sleep(0.2 if "subprocess" in kind else 0)  # a stray child would need a moment
    assert not marker.exists()


def test_refusal_message_matches_spec_wording(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "model.ckpt", "posix.system", marker, "zip", monkeypatch)
    with pytest.raises(CheckpointError) as info:
        load_pickle_checkpoint(path)
    assert str(info.value) == (
        f"refusing to load {path}: it references the global 'posix.system', which a weights file "
        "never needs; nothing from the file was executed")


def test_py2_spelling_is_reported_as_written(tmp_path, monkeypatch):
    path = write_malicious(tmp_path / "m.ckpt", "builtins.eval", tmp_path / "x", "zip", monkeypatch)
    with pytest.raises(CheckpointError, match=r"'builtins\.eval' \(written as '__builtin__\.eval'\)"):
        load_pickle_checkpoint(path)


def test_payload_in_legacy_header_pickle_is_refused(tmp_path):
    """The legacy loader reads its magic number with pickle_module.load: that is restricted too."""
    marker = tmp_path / "pwned"
    header = pickle.dumps(Evil("builtins.exec", marker), protocol=2)  # where the magic number goes
    path = tmp_path / "legacy.pt"
    path.write_bytes(header + pickle.dumps(1001, protocol=2))
    with pytest.raises(CheckpointError, match="'builtins.exec'"):
        load_pickle_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------- hand-assembled opcode tricks

def _unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _in_dict(body):
    """A protocol-2 pickle of {'k': <body>} so the top level would be a dict."""
    return b"\x80\x02}" + _unicode("k") + body + b"s."


def test_inst_opcode_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    # protocol 0: MARK, string arg, INST os system -> os.system('touch ...')
    data = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."
    path = tmp_path / "inst.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="'os.system'"):
        load_pickle_checkpoint(path)
    assert not marker.exists()


def test_stack_global_attribute_path_through_allowed_module_is_refused(tmp_path):
    # protocol 4 STACK_GLOBAL('torch._utils', 'os.system'): a dotted name reaching through a module.
    def short(s):
        return b"\x8c" + bytes([len(s)]) + s.encode()
    data = b"\x80\x04}" + short("k") + short("torch._utils") + short("os.system") + b"\x93s."
    path = tmp_path / "sg.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"'torch\._utils\.os\.system'"):
        load_pickle_checkpoint(path)


def test_build_cannot_patch_an_allowed_function(tmp_path):
    fn = torch._utils._rebuild_tensor_v2
    before = fn.__defaults__
    # GLOBAL f, (None, {'__defaults__': (1,)}), BUILD  -> setattr(f, '__defaults__', (1,)) in stock pickle
    body = (b"ctorch._utils\n_rebuild_tensor_v2\nN}" + _unicode("__defaults__") + b"K\x01\x85s\x86b")
    path = tmp_path / "build.ckpt"
    path.write_bytes(_in_dict(body))
    with pytest.raises(CheckpointError, match="set the state of the callable torch._utils._rebuild_tensor_v2"):
        load_pickle_checkpoint(path)
    assert fn.__defaults__ == before


def test_build_cannot_patch_the_placeholder_class(tmp_path):
    body = (b"c" + LIGHTNING_MODULE.encode() + b"\nModelCheckpoint\nN}" + _unicode("__repr__")
            + b"c__builtin__\nstr\ns\x86b")
    path = tmp_path / "build2.ckpt"
    path.write_bytes(_in_dict(body))
    with pytest.raises(CheckpointError, match="set the state of the class"):
        load_pickle_checkpoint(path)
    assert InertPlaceholder.__repr__ is not str and repr(InertPlaceholder()) == "InertPlaceholder()"


def test_newobj_on_a_non_class_is_refused(tmp_path):
    body = b"ctorch._utils\n_rebuild_tensor_v2\n)\x81"
    path = tmp_path / "newobj.ckpt"
    path.write_bytes(_in_dict(body))
    with pytest.raises(CheckpointError, match="NEWOBJ to something that is not a class"):
        load_pickle_checkpoint(path)


def test_extension_registry_opcodes_are_refused(tmp_path):
    path = tmp_path / "ext.ckpt"
    path.write_bytes(_in_dict(b"\x82\x01"))  # EXT1 code 1
    with pytest.raises(CheckpointError, match="extension registry"):
        load_pickle_checkpoint(path)


# ------------------------------------------------------------------ legitimate checkpoints

@pytest.fixture
def fake_lightning(monkeypatch):
    """Yield a context manager that makes a fake pytorch_lightning ModelCheckpoint importable.

    Used only while saving, so the pickle names the real-life global
    `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`; it is gone again at load time.
    """
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": LIGHTNING_MODULE})

    class Injected:
        cls = ModelCheckpoint

        def __enter__(self):
            self.ctx = monkeypatch.context()
            m = self.ctx.__enter__()
            for name in ("pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE):
                m.setitem(sys.modules, name, types.ModuleType(name))
            sys.modules[LIGHTNING_MODULE].ModelCheckpoint = ModelCheckpoint
            return ModelCheckpoint

        def __exit__(self, *exc):
            self.ctx.__exit__(*exc)

    return Injected()


def lightning_ckpt(model_checkpoint_cls):
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict()
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3, generator=g)
    sd["model.diffusion_model.input_blocks.0.0.bias"] = torch.randn(8, generator=g).half()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["first_stage_model.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3, generator=g).to(torch.bfloat16)
    sd["special"] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float16)
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "best_score": np.float64(0.5),
        "num_updates": np.int64(470000),
        "loops": collections.OrderedDict(fit_loop={"epoch_progress": {"current": 6}}),
        "callbacks": {model_checkpoint_cls: {"best_model_score": np.float64(0.25), "dirpath": "logs/ckpts"}},
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_lightning_checkpoint_loads_bit_identical(tmp_path, fmt, fake_lightning):
    before = sys.modules.get(LIGHTNING_MODULE)  # None unless lightning is really installed and imported
    with fake_lightning as ModelCheckpoint:
        ckpt = lightning_ckpt(ModelCheckpoint)
        path = save(ckpt, tmp_path / "sd.ckpt", fmt)
    assert sys.modules.get(LIGHTNING_MODULE) is before  # the fake module is gone again
    assert f"c{LIGHTNING_MODULE}\nModelCheckpoint\n".encode() in path.read_bytes()

    out = load_pickle_checkpoint(path)

    assert sys.modules.get(LIGHTNING_MODULE) is before  # loading imported nothing named lightning
    assert set(out) == set(ckpt)
    assert isinstance(out["state_dict"], collections.OrderedDict)
    assert list(out["state_dict"]) == list(ckpt["state_dict"])
    for k, v in ckpt["state_dict"].items():
        assert_bit_identical(out["state_dict"][k], v)
    assert {t.dtype for t in out["state_dict"].values()} >= {torch.float32, torch.float16, torch.bfloat16}
    assert out["epoch"] == 6 and type(out["global_step"]) is int and out["global_step"] == 470000
    assert type(out["best_score"]) is np.float64 and out["best_score"] == 0.5
    assert type(out["num_updates"]) is np.int64 and out["num_updates"] == 470000
    assert out["loops"] == ckpt["loops"] and isinstance(out["loops"], collections.OrderedDict)
    (key, value), = out["callbacks"].items()
    assert key is InertPlaceholder
    assert value == {"best_model_score": 0.25, "dirpath": "logs/ckpts"}
    assert type(value["best_model_score"]) is np.float64


@pytest.mark.parametrize("fmt", FORMATS)
def test_lightning_callback_instance_becomes_inert(tmp_path, fmt, fake_lightning):
    with fake_lightning as ModelCheckpoint:
        cb = ModelCheckpoint()
        cb.dirpath, cb.monitor = "logs", "val/loss"
        path = save({"callback": cb}, tmp_path / "cb.ckpt", fmt)
    out = load_pickle_checkpoint(path)
    assert type(out["callback"]) is InertPlaceholder
    assert not hasattr(out["callback"], "__dict__") and not hasattr(out["callback"], "dirpath")


def test_lightning_2_spelling_maps_to_placeholder(tmp_path, monkeypatch):
    mod = "lightning.pytorch.callbacks.model_checkpoint"
    cls = type("ModelCheckpoint", (), {"__module__": mod})
    with monkeypatch.context() as m:
        for name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks", mod):
            m.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[mod].ModelCheckpoint = cls
        path = save({"callbacks": {cls: {}}}, tmp_path / "l2.ckpt", "zip")
    assert list(load_pickle_checkpoint(path)["callbacks"]) == [InertPlaceholder]


@pytest.mark.parametrize("fmt", FORMATS)
def test_view_sharing_storage_stays_a_view(tmp_path, fmt):
    base = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    view = base[2:5, 1:]
    path = save({"base": base, "view": view, "t": base.t()}, tmp_path / "views.pt", fmt)
    out = load_pickle_checkpoint(path)
    assert_bit_identical(out["base"], base)
    assert torch.equal(out["view"], view)
    assert out["view"].storage_offset() == 21 and out["view"].stride() == (10, 1)
    assert out["t"].stride() == (1, 10)
    ptr = out["base"].untyped_storage().data_ptr()
    assert out["view"].untyped_storage().data_ptr() == ptr == out["t"].untyped_storage().data_ptr()


@pytest.mark.parametrize("fmt", FORMATS)
def test_bare_state_dict_and_parameters(tmp_path, fmt):
    sd = torch.nn.Linear(4, 3).state_dict()  # OrderedDict with _metadata
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2))
    tagged = torch.ones(2)
    tagged.note = "python attribute"  # goes through torch._tensor._rebuild_from_type_v2
    sd["tagged"] = tagged
    path = save(sd, tmp_path / "bare.pt", fmt)
    out = load_pickle_checkpoint(path)
    assert isinstance(out, collections.OrderedDict) and list(out) == list(sd)
    assert out._metadata == sd._metadata
    for k in sd:
        assert_bit_identical(out[k], sd[k])
    assert type(out["param"]) is torch.nn.Parameter
    assert out["tagged"].note == "python attribute"


def test_zip_checkpoint_is_memory_mapped(tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    path = save({"w": torch.randn(256, 256)}, tmp_path / "mm.pt", "zip")
    out = load_pickle_checkpoint(path)
    ptr = out["w"].data_ptr()
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
              for line in maps.read_text().splitlines() if line.endswith(str(path))]
    assert any(lo <= ptr < hi for lo, hi in ranges)


def test_top_level_must_be_a_dict(tmp_path):
    path = save([torch.ones(2)], tmp_path / "list.pt", "zip")
    with pytest.raises(CheckpointError, match="expected a checkpoint dict at the top level, found builtins.list"):
        load_pickle_checkpoint(path)


def test_accepts_pathlike_and_str(tmp_path):
    path = save({"a": torch.ones(1)}, tmp_path / "p.pt", "zip")
    assert torch.equal(load_pickle_checkpoint(str(path))["a"], load_pickle_checkpoint(path)["a"])


# ------------------------------------------------------------- find_class is the only door

def _globals_in_pickles(stream, count):
    names = []
    for _ in range(count):
        for op, arg, _pos in pickletools.genops(stream):
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            assert op.name not in ("STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4")
    return names


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_global_goes_through_our_find_class(tmp_path, fmt, monkeypatch, fake_lightning):
    with fake_lightning as ModelCheckpoint:
        ckpt = lightning_ckpt(ModelCheckpoint)
        ckpt["state_dict"]["p"] = torch.nn.Parameter(torch.ones(2))
        ckpt["set"] = {1, 2}
        path = save(ckpt, tmp_path / "spy.ckpt", fmt)

    if fmt == "zip":
        with zipfile.ZipFile(path) as z:
            data_pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            in_file = _globals_in_pickles(io.BytesIO(z.read(data_pkl)), 1)
    else:  # magic number, protocol, sys_info, the object, storage keys
        with open(path, "rb") as f:
            in_file = _globals_in_pickles(f, 5)

    seen = []
    real = safe_pickle._RestrictedUnpickler.find_class

    def spy(self, module, name):
        seen.append(f"{module}.{name}")
        return real(self, module, name)

    monkeypatch.setattr(safe_pickle._RestrictedUnpickler, "find_class", spy)
    load_pickle_checkpoint(path)

    # torch's wrapper answers storage-type names itself with inert StorageType tokens; every
    # other global in the file reached our find_class.
    storage_names = {n for n in in_file if "Storage" in n}
    assert storage_names and all(n.startswith("torch.") for n in storage_names)
    assert set(seen) == set(in_file) - storage_names
    assert {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict", "numpy.dtype",
            f"{LIGHTNING_MODULE}.ModelCheckpoint", "__builtin__.set"} <= set(seen)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stock_unpickler_is_never_used(tmp_path, fmt, monkeypatch):
    path = save({"state_dict": {"w": torch.randn(3)}, "step": np.int64(3)}, tmp_path / "s.pt", fmt)

    def forbidden(*a, **k):
        raise AssertionError("the stock unpickler was used")

    for attr in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, attr, forbidden)
    out = load_pickle_checkpoint(path)
    assert out["step"] == 3 and out["state_dict"]["w"].shape == (3,)


# --------------------------------------------------------------------------- the allowlist

def test_allowlist_holds_nothing_that_can_run_code():
    forbidden_modules = ("os.", "posix.", "nt.", "subprocess.", "sys.", "importlib.", "shutil.", "socket.",
                         "ctypes.", "pickle.", "copyreg.", "functools.", "operator.", "runpy.", "code.",
                         "types.", "io.", "builtins.__")
    forbidden = {f"builtins.{n}" for n in ("eval", "exec", "compile", "getattr", "setattr", "delattr", "open",
                                           "input", "breakpoint", "globals", "vars", "type", "object",
                                           "__import__", "print", "memoryview")}
    assert isinstance(ALLOWED_GLOBALS, frozenset)
    assert not {g for g in ALLOWED_GLOBALS if g.startswith(forbidden_modules)}
    assert not ALLOWED_GLOBALS & forbidden


def test_allowlist_covers_what_sd_checkpoints_use():
    required = {
        "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor", "torch._utils._rebuild_parameter",
        "torch._tensor._rebuild_from_type_v2", "torch.serialization._get_layout", "torch.Size", "torch.device",
        "torch.FloatStorage", "torch.HalfStorage", "torch.BFloat16Storage", "torch.LongStorage",
        "torch.IntStorage", "torch.ByteStorage", "torch.float32", "torch.float16", "torch.bfloat16",
        "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
        "_codecs.encode", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
        "numpy.core.multiarray._reconstruct", "numpy.ndarray", f"{LIGHTNING_MODULE}.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    }
    assert required <= ALLOWED_GLOBALS


def test_every_allowed_global_resolves_without_importing_by_name():
    before = set(sys.modules)
    u = safe_pickle._RestrictedUnpickler(io.BytesIO(b"."))
    u.proto, u.fix_imports = 4, True  # as during a protocol-4 load
    resolved = {g: u.find_class(*g.rsplit(".", 1)) for g in sorted(ALLOWED_GLOBALS)}
    assert all(v is not None for v in resolved.values())
    assert resolved[f"{LIGHTNING_MODULE}.ModelCheckpoint"] is InertPlaceholder
    assert resolved["torch._utils._rebuild_tensor_v2"] is torch._utils._rebuild_tensor_v2
    assert resolved["numpy.core.multiarray.scalar"] is resolved["numpy._core.multiarray.scalar"]
    assert not {m for m in set(sys.modules) - before if "lightning" in m}


def test_numpy_dtype_is_always_a_fresh_copy():
    u = safe_pickle._RestrictedUnpickler(io.BytesIO(b"."))
    u.proto, u.fix_imports = 2, True
    make_dtype = u.find_class("numpy", "dtype")
    d = make_dtype("f8", False, False)  # copy=False would hand out numpy's shared singleton
    assert d == np.dtype("f8") and d is not np.dtype("f8")


def test_inert_placeholder_holds_and_runs_nothing():
    p = InertPlaceholder(1, 2, x=3)
    p.__setstate__({"__class__": dict, "a": 1})
    assert type(p) is InertPlaceholder and not hasattr(p, "__dict__")
    with pytest.raises(AttributeError):
        p.a = 1
    assert not callable(p) and repr(p) == "InertPlaceholder()"


# ------------------------------------------------------------------------- unusable files

def _truncated(tmp_path, fmt):
    full = save({"state_dict": {"w": torch.randn(64, 64)}}, tmp_path / f"full-{fmt}.pt", fmt).read_bytes()
    path = tmp_path / f"trunc-{fmt}.ckpt"
    path.write_bytes(full[: len(full) // 2])
    return path


def _make_zip(path, names):
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, "hello")
    return path


BAD_FILES = {
    "random bytes": lambda p: p.write_bytes(random.Random(0).randbytes(4096)),
    "text file": lambda p: p.write_text("This is not a checkpoint.\nJust some notes.\n"),
    "empty file": lambda p: p.write_bytes(b""),
    "zip without subdirectory": lambda p: _make_zip(p, ["readme.txt"]),
    "zip without data.pkl": lambda p: _make_zip(p, ["archive/readme.txt", "archive/data/0"]),
    "pickle prefix only": lambda p: p.write_bytes(b"\x80\x02}q\x00(X"),
    "zip magic then junk": lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 100),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unusable_file_raises_one_line_checkpoint_error(tmp_path, case):
    path = tmp_path / "model.ckpt"
    BAD_FILES[case](path)
    with pytest.raises(CheckpointError) as info:
        load_pickle_checkpoint(path)
    msg = str(info.value)
    assert type(info.value) is CheckpointError
    assert str(path) in msg and "\n" not in msg and len(msg) < 600


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_checkpoint_raises_checkpoint_error(tmp_path, fmt):
    path = _truncated(tmp_path, fmt)
    with pytest.raises(CheckpointError) as info:
        load_pickle_checkpoint(path)
    assert "truncated, corrupt, or not a PyTorch checkpoint" in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_file_message(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"the file is empty \(0 bytes\)"):
        load_pickle_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_pickle_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_pickle_checkpoint(tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused_not_dispatched_to_jit(tmp_path, monkeypatch):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was reached"))
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_pickle_checkpoint(path)


def test_pre_0_4_tar_format_is_refused(tmp_path):
    import tarfile

    path = tmp_path / "old.pt"
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = 0
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(CheckpointError, match="pre-0.4 PyTorch tar format"):
        load_pickle_checkpoint(path)
