"""Load ``.ckpt`` / ``.pt`` pickle checkpoints without ever running the unrestricted unpickler.

A pickle file is a small program: it can name any importable callable (``os.system``,
``builtins.exec``, ``subprocess.Popen``...) and call it with arguments of its choosing.
This module loads such files through :func:`torch.load` with a *restricted* pickle
module, so torch still does the storage/zip/mmap bookkeeping while every global the
file names goes through :meth:`_RestrictedUnpickler.find_class`, which only knows the
handful of names real Stable Diffusion checkpoints use (:data:`ALLOWED_GLOBALS`).
Anything else is refused with :class:`~kiln.errors.CheckpointError` *before* it is
imported or called.

How torch uses the ``pickle_module`` (torch/serialization.py, torch 2.1 - 2.13):

* zip format (``torch.save`` default): ``_load`` subclasses ``pickle_module.Unpickler``
  (its ``find_class`` turns names containing "Storage" into inert ``StorageType``
  tokens and otherwise calls ``super().find_class`` -- ours) and sets
  ``persistent_load`` on the instance to fetch tensor data from the archive.
* legacy non-zip format (``_use_new_zipfile_serialization=False``): ``_legacy_load``
  reads the magic number, protocol version, sys-info and storage-key list with
  ``pickle_module.load`` (ours: restricted too) and the main object with the same kind
  of ``Unpickler`` subclass as above.
* the ancient tar format (PyTorch < 0.4) and TorchScript archives (which ``torch.load``
  silently hands to ``torch.jit.load``) are refused before torch sees the file.

The unpickler is a subclass of the pure-Python ``pickle._Unpickler`` rather than the C
``pickle.Unpickler``: the C implementation's opcode handlers cannot be overridden, and
a restricted ``find_class`` alone still lets a file BUILD (``setattr``) onto the allowed
globals themselves -- e.g. rewrite ``torch._utils._rebuild_tensor_v2.__defaults__`` or
attributes of ``torch.Tensor`` for the rest of the process. Here BUILD is only honoured
on freshly created instances of a few data types, NEWOBJ requires a real class, and the
pickle extension-registry opcodes (which bypass ``find_class`` through a process-wide
cache) are refused. Checkpoint pickles are small (tensor bytes live outside them), so
the pure-Python speed is irrelevant next to reading the weights.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import stat
import sys
import tarfile
import types
from collections.abc import Callable
from typing import Any

import torch

from kiln.errors import CheckpointError

__all__ = ["ALLOWED_GLOBALS", "InertPlaceholder", "load_pickle_checkpoint"]


class InertPlaceholder:
    """Stands in for a known, harmless class that checkpoints reference but kiln never needs.

    PyTorch Lightning "full" checkpoints store their callback state as
    ``{"callbacks": {ModelCheckpoint: {...}}}`` -- the *class object* is the dict key.
    Such globals resolve to this class itself (so that key becomes ``InertPlaceholder``);
    should a file instead build an instance, it gets an ``InertPlaceholder()`` that
    ignores its constructor arguments and pickled state. It holds no data, defines no
    behaviour, and cannot be given attributes.
    """

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> InertPlaceholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "InertPlaceholder()"


# --------------------------------------------------------------------------------------
# The allowlist: "module.name" -> zero-argument resolver returning the object to hand to
# the unpickler. Resolvers never import or getattr anything named by the file.
# --------------------------------------------------------------------------------------


def _const(obj: Any) -> Callable[[], Any]:
    return lambda: obj


def _numpy_multiarray() -> types.ModuleType:
    try:
        from numpy._core import multiarray  # numpy >= 2 (pickles say numpy._core...)
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _numpy_scalar() -> Any:
    return _numpy_multiarray().scalar


def _numpy_reconstruct() -> Any:
    return _numpy_multiarray()._reconstruct


def _numpy_ndarray() -> Any:
    import numpy

    return numpy.ndarray


def _numpy_dtype_copy(obj: Any, align: bool = False, copy: bool = True) -> Any:
    """``numpy.dtype`` as pickles call it, but always a fresh copy.

    With ``copy=False`` numpy returns its shared built-in dtype singletons, and the
    BUILD that follows in the pickle would then run ``__setstate__`` on them.
    """
    import numpy

    return numpy.dtype(obj, bool(align), True)


def _numpy_dtype() -> Any:
    return _numpy_dtype_copy


def _build_resolvers() -> dict[str, Callable[[], Any]]:
    return {**_torch_resolvers(), **_python_resolvers()}


def _torch_resolvers() -> dict[str, Callable[[], Any]]:
    r: dict[str, Callable[[], Any]] = {}

    # Tensor / parameter rebuild functions (what Tensor.__reduce_ex__ emits).
    for fname in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_device_tensor_from_numpy",  # seen in some TPU/XLA-trained SD ckpts
    ):
        fn = getattr(torch._utils, fname, None)
        if fn is not None:
            r[f"torch._utils.{fname}"] = _const(fn)
    r["torch._tensor._rebuild_from_type_v2"] = _const(torch._tensor._rebuild_from_type_v2)
    # new_type arguments of _rebuild_from_type_v2 (tensors carrying python attributes).
    r["torch._tensor.Tensor"] = _const(torch.Tensor)
    r["torch.Tensor"] = _const(torch.Tensor)
    r["torch.nn.parameter.Parameter"] = _const(torch.nn.Parameter)
    r["torch.Size"] = _const(torch.Size)
    r["torch.device"] = _const(torch.device)
    r["torch.serialization._get_layout"] = _const(torch.serialization._get_layout)

    # Legacy typed storage classes. In both supported formats torch's own wrapper turns
    # these names into inert StorageType tokens before our find_class sees them; they
    # are listed so that the same names are accepted wherever else they appear.
    for sname in (
        "DoubleStorage",
        "FloatStorage",
        "HalfStorage",
        "BFloat16Storage",
        "LongStorage",
        "IntStorage",
        "ShortStorage",
        "CharStorage",
        "ByteStorage",
        "BoolStorage",
        "ComplexFloatStorage",
        "ComplexDoubleStorage",
    ):
        cls = getattr(torch, sname, None)
        if cls is not None:
            r[f"torch.{sname}"] = _const(cls)

    # torch dtype objects pickle as the global torch.<canonical name>.
    for dname in (
        "float32",
        "float64",
        "float16",
        "bfloat16",
        "complex32",
        "complex64",
        "complex128",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "bool",
        "uint16",
        "uint32",
        "uint64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
    ):
        dt = getattr(torch, dname, None)
        if isinstance(dt, torch.dtype) and str(dt) == f"torch.{dname}":
            r[f"torch.{dname}"] = _const(dt)
    return r


def _python_resolvers() -> dict[str, Callable[[], Any]]:
    r: dict[str, Callable[[], Any]] = {}
    # Containers and scalars. Under pickle protocol 2 (torch.save's default) sets are
    # written as __builtin__.set and non-empty bytes as _codecs.encode(str, "latin1");
    # the py2 names are mapped to builtins.* before the lookup, as stock pickle does.
    r["collections.OrderedDict"] = _const(collections.OrderedDict)
    for bname, obj in (
        ("set", set),
        ("frozenset", frozenset),
        ("slice", slice),
        ("complex", complex),
        ("bytes", bytes),
        ("bytearray", bytearray),
        ("int", int),
        ("float", float),
        ("bool", bool),
        ("str", str),
        ("list", list),
        ("tuple", tuple),
        ("dict", dict),
        ("range", range),
    ):
        r[f"builtins.{bname}"] = _const(obj)
    import _codecs

    r["_codecs.encode"] = _const(_codecs.encode)

    # numpy scalars (PyTorch Lightning writes e.g. np.float64 monitor values) pickle as
    # multiarray.scalar(numpy.dtype(...), raw bytes); numpy arrays as
    # multiarray._reconstruct(numpy.ndarray, ...) + BUILD. numpy 1.x writes numpy.core,
    # numpy 2.x numpy._core; both resolve to the installed numpy, imported lazily.
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        r[f"{mod}.scalar"] = _numpy_scalar
        r[f"{mod}._reconstruct"] = _numpy_reconstruct
    r["numpy.dtype"] = _numpy_dtype
    r["numpy.ndarray"] = _numpy_ndarray

    # PyTorch Lightning's ModelCheckpoint callback class (a dict key in SD "full" ckpts).
    for mod in (
        "pytorch_lightning.callbacks.model_checkpoint",
        "lightning.pytorch.callbacks.model_checkpoint",
    ):
        r[f"{mod}.ModelCheckpoint"] = _const(InertPlaceholder)
    return r


_RESOLVERS: dict[str, Callable[[], Any]] = _build_resolvers()

#: Every global a checkpoint may reference, as "module.name" strings.
ALLOWED_GLOBALS: frozenset[str] = frozenset(_RESOLVERS)


# --------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------


class _RefusedGlobal(Exception):
    def __init__(self, qualname: str, written_as: str | None = None) -> None:
        super().__init__(qualname)
        self.qualname = qualname
        self.written_as = written_as


class _RefusedOperation(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _printable(text: str, limit: int = 200) -> str:
    """Names come from the file: keep them on one line and reasonably short."""
    text = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj):
        name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        return f"the callable {getattr(obj, '__module__', None)}.{name}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


def _build_allowed(inst: Any) -> bool:
    """BUILD (``__setstate__`` / attribute update) is allowed only on fresh data objects."""
    if isinstance(inst, type):
        return False
    cls = type(inst)
    if cls is collections.OrderedDict or cls is InertPlaceholder:  # OrderedDict: _metadata
        return True
    if isinstance(inst, torch.Tensor):
        return True
    np = sys.modules.get("numpy")
    if np is not None and (cls is np.ndarray or isinstance(inst, np.dtype)):
        return True
    return False


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Pure-Python unpickler whose only source of globals is :data:`ALLOWED_GLOBALS`."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        sys.audit("pickle.find_class", module, name)
        if type(module) is not str or type(name) is not str:
            raise pickle.UnpicklingError("global names must be strings")
        written_as = f"{module}.{name}"
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        resolver = _RESOLVERS.get(qualname)
        if resolver is None:
            raise _RefusedGlobal(qualname, written_as if written_as != qualname else None)
        try:
            return resolver()
        except ImportError as exc:
            raise CheckpointError(
                f"the checkpoint stores {qualname}, which needs a module that is not "
                f"installed ({exc.name or exc})"
            ) from None

    # BUILD: refuse setattr/__setstate__ on classes, functions and other shared objects.
    def _load_build(self) -> None:
        inst = self.stack[-2]
        if not _build_allowed(inst):
            raise _RefusedOperation(f"it tries to set the state of {_describe(inst)}")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build

    # NEWOBJ / NEWOBJ_EX: cls.__new__(cls, ...) only for real classes (as _pickle checks).
    def _load_newobj(self) -> None:
        if not isinstance(self.stack[-2], type):
            raise _RefusedOperation("it applies NEWOBJ to something that is not a class")
        pickle._Unpickler.load_newobj(self)  # type: ignore[attr-defined]

    def _load_newobj_ex(self) -> None:
        if not isinstance(self.stack[-3], type):
            raise _RefusedOperation("it applies NEWOBJ_EX to something that is not a class")
        pickle._Unpickler.load_newobj_ex(self)  # type: ignore[attr-defined]

    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex

    # EXT1/2/4 look globals up in copyreg's process-wide registry and cache, around
    # find_class. torch never writes them.
    def _load_ext(self) -> None:
        raise _RefusedOperation("it uses the pickle extension registry (EXT opcodes)")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _load_ext
    del _op


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, /, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# What torch.load receives as pickle_module. It deliberately has no Pickler/dump.
_PICKLE_MODULE = types.ModuleType("kiln_restricted_pickle")
_PICKLE_MODULE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_PICKLE_MODULE.load = _restricted_load  # type: ignore[attr-defined]
_PICKLE_MODULE.loads = _restricted_loads  # type: ignore[attr-defined]
_PICKLE_MODULE.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _check_zip(fspath: str, display: str) -> None:
    """Refuse zips torch.load would not treat as a plain torch.save archive."""
    try:
        reader = torch._C.PyTorchFileReader(fspath)  # the parser torch.load itself uses
        records = set(reader.get_all_records())
        del reader
    except Exception as exc:
        raise CheckpointError(
            f"cannot load {display}: a zip archive, but truncated, corrupt, or not a "
            f"PyTorch checkpoint ({_one_line(exc)})"
        ) from exc
    if "constants.pkl" in records:
        # torch.load would silently pass this to torch.jit.load.
        raise CheckpointError(
            f"refusing to load {display}: it is a TorchScript archive (code, not just "
            f"weights); kiln only loads weights files"
        )
    if "data.pkl" not in records:
        raise CheckpointError(
            f"cannot load {display}: it is a zip archive without data.pkl, "
            f"not a torch.save checkpoint"
        )


def _is_tar(fspath: str) -> bool:
    """Mirror torch's own test for the pre-0.4 tar format (tarfile.open succeeds)."""
    try:
        with open(fspath, "rb") as f, tarfile.open(fileobj=f, mode="r:"):
            return True
    except Exception:
        return False


def load_pickle_checkpoint(path: str | os.PathLike) -> dict:
    """Load a pickle-based checkpoint (``torch.save`` zip or legacy format) safely.

    Returns the unpickled top-level dict (a Lightning checkpoint, or a bare state dict),
    with tensors on the CPU; zip-format files are memory-mapped. Raises
    :class:`CheckpointError` -- and nothing else -- for missing, empty, truncated,
    corrupt or non-checkpoint files, for TorchScript and pre-0.4 tar archives, and for
    any file whose pickle names a global outside :data:`ALLOWED_GLOBALS` (nothing the
    file names is imported or called in that case).
    """
    fspath = os.fsdecode(os.fspath(path))
    display = fspath

    try:
        st = os.stat(fspath)
    except FileNotFoundError:
        raise CheckpointError(f"cannot load {display}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot load {display}: {_one_line(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"cannot load {display}: not a regular file")
    if st.st_size == 0:
        raise CheckpointError(f"cannot load {display}: the file is empty (0 bytes)")
    try:
        with open(fspath, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot load {display}: {_one_line(exc)}") from None

    is_zip = magic == b"PK\x03\x04"  # the same test torch.serialization._is_zipfile makes
    if is_zip:
        _check_zip(fspath, display)
    elif _is_tar(fspath):
        raise CheckpointError(
            f"cannot load {display}: it is in the pre-0.4 PyTorch tar format, which kiln "
            f"does not support; re-save it with a current torch.save"
        )

    load_kwargs: dict[str, Any] = dict(
        map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE
    )
    try:
        if is_zip:
            obj = torch.load(fspath, mmap=True, **load_kwargs)
        else:
            # Passing an open file (not the path) also keeps torch.load from treating a
            # "*.safetensors" name specially. mmap is only supported for zip archives.
            with open(fspath, "rb") as f:
                obj = torch.load(f, mmap=False, **load_kwargs)
    except _RefusedGlobal as exc:
        written = (
            f" (written as '{_printable(exc.written_as)}')" if exc.written_as else ""
        )
        raise CheckpointError(
            f"refusing to load {display}: it references the global "
            f"'{_printable(exc.qualname)}'{written}, which a weights file never needs; "
            f"nothing from the file was executed"
        ) from None
    except _RefusedOperation as exc:
        raise CheckpointError(
            f"refusing to load {display}: {exc.what}, which a weights file never does; "
            f"nothing from the file was executed"
        ) from None
    except CheckpointError as exc:
        raise CheckpointError(f"cannot load {display}: {exc}") from None
    except Exception as exc:
        raise CheckpointError(
            f"cannot load {display}: truncated, corrupt, or not a PyTorch checkpoint "
            f"({_one_line(exc)})"
        ) from exc

    if not isinstance(obj, dict):
        raise CheckpointError(
            f"cannot load {display}: expected a checkpoint dict at the top level, "
            f"found {type(obj).__module__}.{type(obj).__qualname__}"
        )
    return obj
