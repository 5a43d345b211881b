"""`kiln batch`: many prompts → PNGs + a JSONL manifest, in-process or on Ray Data, resumable and lossless.

Every row becomes one image rendered alone (batch of one) from a seed derived from the row, never from the
worker: the output is the same however the rows are split. Workers write PNGs atomically (temp file + rename)
to the output folder; only the driver writes the manifest, one line per finished row, so a crash loses nothing
that was written and a re-run skips rows whose manifest entry and file exist. At the end the manifest is
rewritten in row order.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import KilnError
from ..output.files import Destination as Output
from ..pipeline.params import GenerationParams, scalar_fields

# Row fields: GenerationParams' own (one image each: no batches, no init image), and the spellings accepted for
# them (CompVis flags, A1111 names).
ROW_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "sampler", "schedule", "cfg_scale", "width", "height",
              "eta", "s_noise", "clip_skip", "subseed", "subseed_strength", "seamless", "tile", "hires_scale",
              "hires_upscaler", "hires_steps", "hires_strength")
FIELDS = {**{k: v for k, v in scalar_fields().items() if k in ROW_FIELDS}, "id": str}
ALIASES = {"negative": "negative_prompt", "scale": "cfg_scale", "cfg": "cfg_scale", "W": "width", "H": "height",
           "ddim_steps": "steps", "sampler_name": "sampler", "scheduler": "schedule", "n": None}
# ControlNet units of a row, as `kiln txt2img`'s flags: one unit per `controlnet` (a list in JSONL rows for several;
# the run's `--controlnet` when the row names none), each other field once (every unit) or once per unit
CONTROL_FIELDS = {"controlnet": ("model", str), "control_image": ("image", str), "control_weight": ("weight", float),
                  "control_start": ("start", float), "control_end": ("end", float),
                  "control_preprocessor": ("module", str), "control_mode": ("control_mode", str),
                  "control_resize": ("resize_mode", str), "control_res": ("processor_res", int),
                  "control_threshold_a": ("threshold_a", float), "control_threshold_b": ("threshold_b", float)}
ALWAYS = ("prompt", "negative_prompt", "seed", "steps", "sampler", "schedule", "cfg_scale", "width", "height")
MANIFEST = "manifest.jsonl"
Defaults = GenerationParams  # a run's defaults (`kiln batch`'s flags); each row's fields override them


# ---------------------------------------------------------------------------------------------- reading rows
def read_rows(path) -> list[dict]:
    """`[{"row": i, "raw": {...}}` or `{"row": i, "error": "..."}]` from a text (one prompt per line), JSONL or
    CSV file. Blank lines are not rows; a line that cannot be parsed is a row with an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KilnError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise KilnError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise KilnError(f"{path}: cannot read it ({e.strerror})") from None
    suffix = path.suffix.lower()
    rows = []
    if suffix in (".jsonl", ".ndjson"):
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict):
                    raise ValueError("a row must be a JSON object")
                rows.append({"raw": raw})
            except ValueError as e:
                rows.append({"error": f"not a JSON object: {e}", "raw": {"line": line[:200]}})
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "prompt" not in [f.strip() for f in reader.fieldnames]:
            raise KilnError(f"{path}: a CSV file needs a header row with a 'prompt' column")
        for rec in reader:
            raw = {k.strip(): v for k, v in rec.items() if k is not None and v not in (None, "")}
            if None in rec:
                rows.append({"error": "more values than columns", "raw": raw})
            else:
                rows.append({"raw": raw})
    else:
        rows = [{"raw": {"prompt": line.strip()}} for line in text.splitlines() if line.strip()]
    if not rows:
        raise KilnError(f"{path}: holds no rows")
    for i, r in enumerate(rows):
        r["row"] = i
    return rows


def _value(kind, value):
    if kind is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in ("true", "false", "1", "0", "yes", "no"):
            return value if isinstance(value, bool) else text in ("true", "1", "yes")
        raise ValueError
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError
    v = kind(value.strip() if isinstance(value, str) and kind is not str else value)
    if kind is float and not math.isfinite(v):
        raise ValueError
    return v


def row_units(control: dict, folder: Path, default_models: list[str]) -> list[dict]:
    """The ControlNet units of a row (its `control_*` fields) as ControlUnit fields, files resolved against the
    prompts file's folder and checked; KilnError names what is wrong."""
    from ..pipeline.control import ControlUnit

    listed = {k: v if isinstance(v, list) else [v] for k, v in control.items()}
    models = listed.pop("controlnet", None) or default_models
    if not models:
        raise KilnError("control_image needs a ControlNet: a controlnet field, or kiln batch --controlnet FILE")
    if "control_image" not in listed:
        raise KilnError("controlnet needs a control_image")
    units = [{} for _ in models]
    for key, values in [("controlnet", models), *listed.items()]:
        field, kind = CONTROL_FIELDS[key]
        if len(values) not in (1, len(units)):
            raise KilnError(f"{key} has {len(values)} values for {len(units)} ControlNet units: give one (for "
                            "every unit) or one per unit")
        for k, unit in enumerate(units):
            try:
                unit[field] = _value(kind, values[k if len(values) > 1 else 0])
            except (TypeError, ValueError):
                raise KilnError(f"{key}: {values!r} is not a valid {kind.__name__}") from None
            if field in ("model", "image"):
                path = Path(unit[field]).expanduser()
                path = path if path.is_absolute() else folder / path
                if not path.is_file():
                    raise KilnError(f"{key} {unit[field]}: no such file")
                unit[field] = str(path.resolve())
    for k, unit in enumerate(units):
        ControlUnit(**unit).check(k)
    return units


def row_params(raw: dict, row: int, defaults: GenerationParams, folder: Path = Path("."),
               controlnets: list[str] = ()) -> dict:
    """Validated generation parameters of one row (`GenerationParams` fields); KilnError names what is wrong.
    A row without a seed takes the run's seed + its row index; a row with `control_*` fields gets `controlnets`
    (ControlUnit fields, paths resolved against `folder`, the prompts file's)."""
    params = {}
    control = {k: v for k, v in raw.items() if k in CONTROL_FIELDS}
    raw = {k: v for k, v in raw.items() if k not in CONTROL_FIELDS}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name is None:
            continue
        if name not in FIELDS:
            raise KilnError(f"unknown field {key!r} (known: {', '.join(FIELDS)})")
        kind = FIELDS[name]
        try:
            params[name] = _value(kind, value)
        except (TypeError, ValueError):
            raise KilnError(f"{key}: {value!r} is not a valid {kind.__name__}") from None
    if "prompt" not in params:
        raise KilnError("the row has no prompt")
    out = {k: params.get(k, getattr(defaults, k)) for k in ALWAYS}
    out["seed"] = params.get("seed", defaults.seed + row)
    out["cfg_scale"] = params.get("cfg_scale", defaults.scale)
    out.update({k: v for k, v in params.items() if k not in out})
    if control:
        out["controlnets"] = row_units(control, folder, list(controlnets))
    if not 0 <= out["seed"] < 2 ** 63:
        raise KilnError(f"seed must be between 0 and 2^63-1, got {out['seed']}")
    return out


def plan(rows: list[dict], defaults: GenerationParams, folder: Path = Path("."), controlnets=()) -> list[dict]:
    """Tasks: `{"row", "params"}` for good rows, `{"row", "error"}` for rows that cannot run."""
    tasks = []
    for r in rows:
        if "error" in r:
            tasks.append({"row": r["row"], "error": r["error"]})
            continue
        try:
            tasks.append({"row": r["row"], "params": row_params(r["raw"], r["row"], defaults, folder, controlnets)})
        except KilnError as e:
            tasks.append({"row": r["row"], "error": str(e)})
    return tasks


# ---------------------------------------------------------------------------------------------- output
def image_name(row: int) -> str:
    return f"images/{row:06d}.png"


def load_manifest(out: Output) -> dict[int, dict]:
    """Entries by row (the last line for a row wins); damaged lines (a crash mid-write) are ignored."""
    data = out.read(MANIFEST)
    entries = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            e = json.loads(line)
            entries[int(e["row"])] = e
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def finished(out: Output, entries: dict[int, dict], retry_errors: bool) -> set[int]:
    done = set()
    for row, e in entries.items():
        if e.get("status") == "ok" and e.get("file") and out.exists(e["file"]):
            done.add(row)
        elif e.get("status") == "error" and not retry_errors:
            done.add(row)
    return done


# ---------------------------------------------------------------------------------------------- rendering
class RowRenderer:
    """Loads the pipeline once; renders tasks to PNG files. Used in-process and as the Ray actor's body."""

    def __init__(self, ckpt: str, outdir: str, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, pid_dir: str | None = None):
        import torch

        from ..pipeline import load

        if threads:
            torch.set_num_threads(threads)
        self.pipe = load(ckpt, device=device, precision=precision)
        self.out = Output(outdir)
        if pid_dir:  # lets an operator (or a test) see which processes render
            Path(pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(pid_dir) / f"{os.getpid()}").write_text(str(os.getpid()))

    def render(self, task: dict) -> dict:
        from ..output import png_bytes

        row = task["row"]
        entry = {"row": row, "id": None, "file": None, "seed": None, "params": None, "status": "error",
                 "error": task.get("error")}
        if "error" in task:
            return entry
        params = dict(task["params"])
        entry["id"] = params.pop("id", None)
        entry["seed"], entry["params"] = params["seed"], params
        try:
            from ..pipeline.control import ControlUnit

            units = [ControlUnit(**u) for u in params.get("controlnets", ())]
            result = self.pipe.txt2img(**{**params, "controlnets": units})
        except KilnError as e:
            entry["error"] = str(e)
            return entry
        except MemoryError:
            entry["error"] = "out of memory"
            return entry
        name = image_name(row)
        self.out.write_atomic(name, png_bytes(result.images[0], result.infotexts[0]))
        entry.update(file=name, status="ok", error=None)
        return entry

    def __call__(self, batch: dict) -> dict:
        """Ray Data batch: {"task": [json, ...]} → {"entry": [json, ...]}."""
        import numpy as np

        entries = [json.dumps(self.render(json.loads(str(t))), sort_keys=True) for t in batch["task"]]
        return {"entry": np.array(entries, dtype=object)}


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Summary:
    rows: int
    skipped: int
    ok: int
    errors: int
    seconds: float


def run_batch(prompts_file, outdir, *, ckpt: str, defaults: GenerationParams | None = None, ray_address=None,
              use_ray: bool = False, workers: int = 1, device: str = "auto", precision: str = "auto",
              retry_errors: bool = False, progress: bool = True, pid_dir: str | None = None,
              threads_per_worker: int | None = None, controlnets=()) -> Summary:
    """`controlnets`: the ControlNet files of rows that name a control image but no `controlnet`."""
    from tqdm.auto import tqdm

    start = time.time()
    defaults = defaults or GenerationParams()
    tasks = plan(read_rows(prompts_file), defaults, Path(prompts_file).resolve().parent,
                 [str(Path(f).resolve()) for f in controlnets])
    out = Output(outdir)
    entries = load_manifest(out)
    done = finished(out, entries, retry_errors)
    todo = [t for t in tasks if t["row"] not in done]
    bar = tqdm(total=len(todo), desc="rows", unit="row", disable=not progress)

    def record(entry: dict):
        entries[entry["row"]] = entry
        out.append(MANIFEST, json.dumps(entry, sort_keys=True) + "\n")
        bar.update(1)

    if todo:
        if use_ray:
            _run_ray(todo, out, ckpt, ray_address, workers, device, precision, record, pid_dir, threads_per_worker)
        else:
            renderer = RowRenderer(ckpt, out.location, device, precision, threads=threads_per_worker,
                                   pid_dir=pid_dir)
            for task in todo:
                record(renderer.render(task))
    bar.close()
    out.sweep("images")  # what a worker killed mid-write left (Ray restarted it and rewrote its row)
    # the final manifest: one line per row, in row order
    rows = sorted(entries.values(), key=lambda e: e["row"])
    out.write_atomic(MANIFEST, "".join(json.dumps(e, sort_keys=True) + "\n" for e in rows).encode("utf-8"))
    ok = sum(1 for e in rows if e.get("status") == "ok")
    return Summary(len(tasks), len(tasks) - len(todo), ok, len(rows) - ok, time.time() - start)


def _run_ray(todo, out, ckpt, address, workers, device, precision, record, pid_dir, threads):
    try:
        import ray
    except ImportError:
        raise KilnError("--ray needs Ray: pip install 'ray[data,serve]'") from None
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    per_worker_cpus = 1 if gpus else max(1, int(cpus // max(workers, 1)))
    # A worker that takes every core fights Ray's own processes (OpenMP threads spin-waiting): on 2 cores, one
    # worker ran 24 rows in 52 s with 2 threads and in 25 s with 1. Leave a core to Ray in that case.
    default_threads = max(1, min(per_worker_cpus, int(cpus) - 1))
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        RowRenderer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if gpus else 0,
        num_cpus=per_worker_cpus,
        fn_constructor_kwargs=dict(ckpt=str(Path(ckpt).resolve()) if "://" not in str(ckpt) else ckpt,
                                   outdir=out.location, device="cuda" if gpus else device, precision=precision,
                                   threads=threads or default_threads, pid_dir=pid_dir))
    # Ray Data restarts an actor that dies and retries its unfinished rows (its defaults for actor pools:
    # max_restarts=-1, max_task_retries=-1); a retried row rewrites the same file atomically.
    seen = set()
    for item in ds.iter_rows():
        entry = json.loads(item["entry"])
        if entry["row"] not in seen:  # a retried row may come back twice: record it once
            seen.add(entry["row"])
            record(entry)
