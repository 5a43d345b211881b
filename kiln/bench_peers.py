"""`kiln bench --peers`: kiln against diffusers, OpenVINO (optimum-intel) and stable-diffusion.cpp on a CPU.

Every player runs the same protocol on the same weights file (random full-size SD 1.5 by default, see
`kiln.bench`): txt2img, Euler, CFG 7.5, one image, the same prompt and seed, in fp32 and, where the CPU has native
bf16 (AVX512-BF16 or AMX), in bf16. Each player runs in a fresh process: load (reported, not in the end-to-end
figure), one warm-up generation, then the median of `repeat` end-to-end generations (prompt encoding, sampling and
decode), one 1-step generation from which the time of a step is derived, and the process' peak RSS.

The peers are benchmark extras, never run-time dependencies of kiln: OpenVINO and stable-diffusion.cpp each live in
their own virtual environment under ~/.cache/kiln/peers/<player>/venv, created on first use with pinned versions;
kiln and diffusers (a test dependency) run in the current interpreter. This module's top level imports no torch and
nothing of kiln's torch code, so the peer venvs run it (`python -m kiln.bench_peers --player X`) with their own
packages only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .cache import cache_dir
from .errors import KilnError

PLAYERS = ("kiln", "diffusers", "openvino", "sdcpp")
PRECISIONS = ("fp32", "bf16")
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 42
CFG = 7.5
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# What each peer venv gets, pinned: versions that install and work together on Python 3.11 (torch 2.13 is the CPU
# build on this index; optimum-intel needs torch and diffusers for the export and the pipeline class, and its
# huggingface-hub < 1.22 rules out diffusers >= 0.42, which wants hub >= 1.32).
VENV_PACKAGES = {
    "openvino": ["optimum-intel==2.2.0", "optimum==2.3.0", "openvino==2026.4.1", "openvino-tokenizers==2026.4.1.0",
                 "nncf==3.4.0", "torch==2.13.0", "diffusers==0.39.0", "transformers==5.5.4",
                 "huggingface-hub==1.21.0", "numpy"],
    "sdcpp": ["stable-diffusion-cpp-python==0.4.7", "numpy"],
}
# optimum-intel pulls torchvision, whose PyPI wheel does not load against the local torch 2.13.0+cpu build
# ("operator torchvision::nms does not exist") and then breaks `from transformers import AutoProcessor`, which
# optimum.intel imports; nothing here needs torchvision, so it goes.
VENV_REMOVE = {"openvino": ["torchvision"]}
# stable-diffusion.cpp is a C++ source build: for this CPU's own instruction set (AVX512, AVX512-BF16).
VENV_ENV = {"sdcpp": {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}}
VERSION_OF = {"kiln": ("torch",), "diffusers": ("diffusers", "transformers", "torch"),
              "openvino": ("optimum-intel", "openvino", "diffusers", "transformers", "torch"),
              "sdcpp": ("stable-diffusion-cpp-python",)}


def peers_dir() -> Path:
    return cache_dir("peers")


# ---------------------------------------------------------------- options and the CPU

def parse_list(text: str, allowed, what: str) -> list[str]:
    """`a,b` → ["a", "b"], each one of `allowed`, no repeats, in the order given."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise KilnError(f"{what}: {','.join(bad) or 'nothing'} is not one of {','.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise KilnError(f"--sizes: {text!r} is not a comma-separated list of pixel sizes") from None
    if not sizes or any(s < 64 or s % 64 for s in sizes):
        raise KilnError(f"--sizes: {text!r}: each size must be a multiple of 64 (stable-diffusion.cpp's rule)")
    return list(dict.fromkeys(sizes))


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and which of `CPU_FLAGS` it has (from /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def native_bf16(cpu: dict) -> bool:
    return cpu["flags"]["avx512_bf16"] or cpu["flags"]["amx_bf16"]


def check_options(opt, cpu: dict) -> dict:
    """The validated plan: players, sizes, precisions, steps, repeat, threads."""
    if str(getattr(opt, "device", "auto")) not in ("auto", "cpu"):
        raise KilnError("--peers compares CPU implementations: leave --device out (or use --device cpu)")
    players = parse_list(opt.peers, PLAYERS, "--peers")
    default = "fp32,bf16" if native_bf16(cpu) else "fp32"
    precisions = parse_list(opt.precisions or default, PRECISIONS, "--precisions")
    if "bf16" in precisions and not native_bf16(cpu):
        raise KilnError("--precisions bf16: this CPU has no native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo); "
                        "emulated bf16 is slower than fp32 and says nothing")
    if opt.steps < 2 or opt.repeat < 1 or opt.threads < 0:
        raise KilnError("--steps must be at least 2 (a step's time is derived against a 1-step run), --repeat at "
                        "least 1, --threads at least 0")
    threads = opt.threads or len(os.sched_getaffinity(0))
    return dict(players=players, sizes=parse_sizes(opt.sizes), precisions=precisions, steps=opt.steps,
                repeat=opt.repeat, threads=threads)


# ---------------------------------------------------------------- the players (each in its own process)

def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _versions(player: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSION_OF[player]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def load_kiln(opt):
    import torch

    from .pipeline import load

    torch.set_num_threads(opt.threads)
    # "autocast" is bf16 on a CPU with native bf16 (kiln.pipeline.devices), "full" is fp32.
    pipe = load(opt.weights, device="cpu", precision="full" if opt.precision == "fp32" else "autocast")
    if opt.precision == "bf16" and pipe.dtype != torch.bfloat16:
        raise KilnError(f"kiln chose {pipe.dtype} for --precision autocast, not bf16")

    def generate(steps):
        return pipe.txt2img(PROMPT, negative_prompt="", steps=steps, sampler="euler", cfg_scale=CFG,
                            width=opt.size, height=opt.size, seed=SEED).pixels[0]
    return generate


def diffusers_pipeline(weights, dtype):
    """diffusers' StableDiffusionPipeline from the CompVis file (kiln.bench's hub-free build), with Euler."""
    import torch
    from diffusers import EulerDiscreteScheduler

    from .bench import _diffusers_pipeline, cache_dir

    pipe = _diffusers_pipeline(weights, torch.device("cpu"), dtype, cache_dir() / "tokenizer")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def _diffusers_style(pipe, opt, generator):
    """A generate(steps) for a pipeline with diffusers' call signature (diffusers and optimum-intel's)."""
    import numpy as np

    def generate(steps):
        image = pipe(prompt=PROMPT, negative_prompt="", height=opt.size, width=opt.size, num_inference_steps=steps,
                     guidance_scale=CFG, generator=generator(), output_type="np").images[0]
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return generate


def load_diffusers(opt):
    import torch

    torch.set_num_threads(opt.threads)
    pipe = diffusers_pipeline(opt.weights, torch.float32 if opt.precision == "fp32" else torch.bfloat16)
    return _diffusers_style(pipe, opt, lambda: torch.Generator().manual_seed(SEED))


def load_openvino(opt):
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    torch.set_num_threads(opt.threads)  # the scheduler's arithmetic; the models run in OpenVINO's own threads
    config = {"INFERENCE_PRECISION_HINT": "f32" if opt.precision == "fp32" else "bf16",
              "INFERENCE_NUM_THREADS": str(opt.threads)}
    pipe = OVStableDiffusionPipeline.from_pretrained(opt.ir, compile=False, ov_config=config)
    pipe.reshape(batch_size=1, height=opt.size, width=opt.size, num_images_per_prompt=1)  # static shapes
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    return _diffusers_style(pipe, opt, lambda: torch.Generator().manual_seed(SEED))


def load_sdcpp(opt):
    import numpy as np
    from stable_diffusion_cpp import StableDiffusion

    sd = StableDiffusion(model_path=str(opt.weights), wtype="f32" if opt.precision == "fp32" else "bf16",
                         n_threads=opt.threads, verbose=False)

    def generate(steps):
        images = sd.generate_image(prompt=PROMPT, negative_prompt="", width=opt.size, height=opt.size,
                                   cfg_scale=CFG, sample_method="euler", sample_steps=steps, seed=SEED)
        return np.asarray(images[0].convert("RGB"))
    return generate


LOADERS = {"kiln": load_kiln, "diffusers": load_diffusers, "openvino": load_openvino, "sdcpp": load_sdcpp}


def run_player(opt) -> dict:
    """The protocol, in this process: load, warm-up, median of `repeat` generations, a 1-step one, peak RSS."""
    import numpy as np

    t = time.perf_counter()
    generate = LOADERS[opt.player](opt)
    load_s = time.perf_counter() - t
    image = generate(opt.steps)  # warm-up: first-call allocations, oneDNN primitive creation
    times = []
    for _ in range(opt.repeat):
        t = time.perf_counter()
        image = generate(opt.steps)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    generate(1)
    one_step_s = time.perf_counter() - t
    if opt.image_out:
        np.save(opt.image_out, np.asarray(image))
    e2e = statistics.median(times)
    return dict(load_s=load_s, e2e_s=e2e, times=times, one_step_s=one_step_s,
                step_s=max(e2e - one_step_s, 0.0) / (opt.steps - 1), peak_bytes=_peak_rss(),
                versions=_versions(opt.player))


def export_openvino(opt) -> None:
    """The diffusers folder → OpenVINO IR (once per weights file), in the openvino venv, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from optimum.intel import OVStableDiffusionPipeline

    # load_in_8bit=False: optimum-intel may otherwise compress big models' weights to int8 on export.
    pipe = OVStableDiffusionPipeline.from_pretrained(opt.folder, export=True, compile=False, load_in_8bit=False)
    tmp = Path(str(opt.ir) + ".tmp")
    pipe.save_pretrained(tmp)
    tmp.replace(opt.ir)


def save_diffusers_folder(opt) -> None:
    """The CompVis file as a diffusers folder (`save_pretrained`), for optimum-intel's exporter."""
    import torch

    pipe = diffusers_pipeline(opt.weights, torch.float32)
    tmp = Path(str(opt.folder) + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.replace(opt.folder)


def _worker_main(argv) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kiln.bench_peers")
    p.add_argument("--player", choices=PLAYERS + ("diffusers-folder", "openvino-export"), required=True)
    p.add_argument("--weights", type=Path)
    p.add_argument("--folder", type=Path, help="the diffusers folder (diffusers-folder, openvino-export)")
    p.add_argument("--ir", type=Path, help="the OpenVINO IR folder (openvino, openvino-export)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--image-out", default=None)
    opt = p.parse_args(argv)
    if opt.player == "diffusers-folder":
        return save_diffusers_folder(opt)
    if opt.player == "openvino-export":
        return export_openvino(opt)
    print("KILN_PEER " + json.dumps(run_player(opt)), flush=True)


# ---------------------------------------------------------------- the driver (in kiln's process)

def player_python(player: str) -> str:
    """The interpreter that runs `player`: this one for kiln and diffusers, else the player's venv, made (or
    brought to the pinned packages) once: a marker file records the packages it was made with."""
    if player not in VENV_PACKAGES:
        return sys.executable
    venv = peers_dir() / player / "venv"
    python, marker = venv / "bin" / "python", venv / "kiln-peer-packages.txt"
    wanted = "\n".join(VENV_PACKAGES[player] + [f"-{p}" for p in VENV_REMOVE.get(player, [])])
    if marker.is_file() and marker.read_text() == wanted:
        return str(python)
    print(f"kiln bench: setting up {venv} ({' '.join(VENV_PACKAGES[player])}; once)", file=sys.stderr)
    if not python.is_file():
        _check_call([sys.executable, "-m", "venv", str(venv)], f"python -m venv {venv}")
    _check_call([str(python), "-m", "pip", "install", "-q", *VENV_PACKAGES[player]],
                f"pip install {' '.join(VENV_PACKAGES[player])} in {venv}", env=VENV_ENV.get(player))
    if VENV_REMOVE.get(player):
        _check_call([str(python), "-m", "pip", "uninstall", "-y", "-q", *VENV_REMOVE[player]],
                    f"pip uninstall {' '.join(VENV_REMOVE[player])} in {venv}")
    marker.write_text(wanted)
    return str(python)


def _last_line(text: str) -> str:
    """The last non-empty line of a process' output: the error itself, for a one-line message."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _check_call(cmd, what, env=None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        raise KilnError(f"kiln bench: {what} failed: {_last_line(r.stderr or r.stdout)}")


def _worker(python: str, args: list[str], env=None) -> subprocess.CompletedProcess:
    # PYTHONPATH: the peer venvs run this very module from kiln's source tree, without installing kiln.
    root = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return subprocess.run([python, "-m", "kiln.bench_peers", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})})


def openvino_ir(weights: Path) -> Path:
    """The OpenVINO IR of `weights`, exported once and cached under peers/openvino/<hash of the file's identity>."""
    st = weights.stat()
    key = hashlib.sha256(f"{weights.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = peers_dir() / "openvino" / key
    folder, ir = root / "diffusers", root / "ir"
    if not ir.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        steps = [(sys.executable, "diffusers-folder", folder), (player_python("openvino"), "openvino-export", ir)]
        for python, step, out in steps:
            if out.is_dir():
                continue
            print(f"kiln bench: {step} → {out} (once)", file=sys.stderr)
            r = _worker(python, ["--player", step, "--weights", str(weights), "--folder", str(folder),
                                 "--ir", str(ir)], env={"HF_HUB_OFFLINE": "1"})
            if r.returncode:
                raise KilnError(f"kiln bench: {step} failed: {_last_line(r.stderr)}")
        shutil.rmtree(folder)  # 4.3 GB, only the exporter's input
    return ir


def bench_weights(path) -> Path:
    """--weights, or kiln bench's random full-size SD 1.5 file (written once)."""
    from .bench import cache_dir, random_weights

    if path:
        if not Path(path).is_file():
            raise KilnError(f"--weights {path}: no such file")
        return Path(path)
    weights = cache_dir() / "sd15-random-fp32.safetensors"
    if not weights.is_file():
        print(f"kiln bench: writing random full-size SD 1.5 weights to {weights} (once; 4.3 GB)", file=sys.stderr)
    return random_weights(weights)


def run_peer(player, weights, size, precision, plan, image_out) -> dict:
    """One player at one (size, precision) in a fresh process; a failure is recorded, not raised."""
    try:
        python = player_python(player)
        extra = ["--ir", str(openvino_ir(weights))] if player == "openvino" else []
    except KilnError as e:
        return {"error": str(e)}
    r = _worker(python, ["--player", player, "--weights", str(weights), "--precision", precision, "--size",
                         str(size), "--steps", str(plan["steps"]), "--repeat", str(plan["repeat"]), "--threads",
                         str(plan["threads"]), "--image-out", str(image_out), *extra],
                env={"OMP_NUM_THREADS": str(plan["threads"])})
    lines = [line for line in r.stdout.splitlines() if line.startswith("KILN_PEER ")]
    if r.returncode or not lines:
        return {"error": f"exit {r.returncode}: {_last_line(r.stderr or r.stdout)}", "stderr": r.stderr[-3000:]}
    return json.loads(lines[-1][len("KILN_PEER "):])


def bench_peers(opt) -> dict:
    cpu = cpu_info()
    plan = check_options(opt, cpu)
    weights = bench_weights(opt.weights)
    work = peers_dir() / "run"
    work.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu, "weights": str(weights), **plan, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "results": []}
    for size in plan["sizes"]:
        for precision in plan["precisions"]:
            runs = {}
            for player in plan["players"]:
                print(f"kiln bench: {player} {size}x{size} {precision} …", file=sys.stderr)
                runs[player] = run_peer(player, weights, size, precision, plan, work / f"{player}.npy")
            report["results"].append({"size": size, "precision": precision, "runs": runs})
    print(format_peers(report))
    if opt.json:
        Path(opt.json).write_text(json.dumps(report, indent=2))
    return report


def format_peers(rep) -> str:
    """A table per (size, precision): load, end-to-end median, s/step, peak RSS, kiln/peer (> 1: kiln faster)."""
    flags = " ".join(f"{f}{'+' if on else '-'}" for f, on in rep["cpu"]["flags"].items())
    out = [f"kiln bench --peers: SD 1.5 txt2img, Euler, CFG {CFG}, {rep['steps']} steps, 1 image, "
           f"{rep['threads']} threads, median of {rep['repeat']} after 1 warm-up",
           f"CPU: {rep['cpu']['model']} ({flags})"]
    versions = {}
    for res in rep["results"]:
        for player, run in res["runs"].items():
            versions.setdefault(player, run.get("versions"))
    for player, v in versions.items():
        if v:
            out.append(f"  {player}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    for res in rep["results"]:
        out += ["", f"{res['size']}x{res['size']} {res['precision']}",
                f"{'player':12}{'load s':>9}{'e2e s':>9}{'s/step':>9}{'peak RSS GB':>13}{'kiln/peer':>11}"]
        kiln = res["runs"].get("kiln", {})
        for player, run in res["runs"].items():
            if "error" in run:
                out.append(f"{player:12}  failed: {run['error']}")
                continue
            ratio = f"{run['e2e_s'] / kiln['e2e_s']:.2f}x" if "e2e_s" in kiln and player != "kiln" else ""
            out.append(f"{player:12}{run['load_s']:>9.1f}{run['e2e_s']:>9.2f}{run['step_s']:>9.3f}"
                       f"{run['peak_bytes'] / 1e9:>13.2f}{ratio:>11}")
    return "\n".join(out)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
