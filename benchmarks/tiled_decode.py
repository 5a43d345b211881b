"""Peak memory and time of a large VAE decode, whole vs tiled, each in a fresh process.

    python benchmarks/tiled_decode.py [--ckpt FILE] [--size 2048]

Default model: the embedded demo model (f = 4, so 2048² pixels are 512² latents). Peak memory is the process's
VmHWM (CPU) or torch.cuda.max_memory_allocated (CUDA), minus the same process's peak right after loading.
"""
import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import resource, sys
# fail cleanly instead of swapping or being killed
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[4]) << 30, int(sys.argv[4]) << 30))
import json, sys, time, torch, kiln
from kiln.demo.report import EMBEDDED
ckpt, size, mode = sys.argv[1] or str(EMBEDDED), int(sys.argv[2]), sys.argv[3]
pipe = kiln.load(ckpt, device="auto", precision="full")
def hwm():
    if pipe.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
base = hwm()
f = pipe.cfg.downscale
z = torch.randn(1, pipe.cfg.latent_channels, size // f, size // f, generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
try:
    with torch.no_grad():
        x = pipe.decode_latents(z.to(pipe.device), tile=mode)
except (RuntimeError, MemoryError) as e:
    print(json.dumps(dict(mode=mode, size=size, error="out of memory (16 GiB address-space limit): " + str(e)[:80])))
    sys.exit(0)
dt = time.perf_counter() - t0
print(json.dumps(dict(mode=mode, size=size, seconds=round(dt, 2), peak_mib=round(hwm() - base, 1),
                      finite=bool(torch.isfinite(x).all()))))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--limit-gib", type=int, default=16, help="address-space limit of each child process")
    opt = ap.parse_args()
    rows = []
    for mode in ("off", "on"):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, opt.ckpt, str(opt.size), mode, str(opt.limit_gib)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
            rows.append(dict(mode=mode, size=opt.size, error=last[:200]))
        else:
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        rows[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"| decode {opt.size}x{opt.size} | seconds | peak MiB above the loaded model |")
    rows = [dict(r, peak_mib=r["peak_mib"]) if "peak_mib" in r else r for r in rows]
    print("|---|---|---|")
    for r in rows:
        label = "whole" if r["mode"] == "off" else "tiled"
        print(f"| {label} | {r.get('seconds', '-')} | {r.get('peak_mib', r.get('error'))} |")
    if all("peak_mib" in r for r in rows):
        print(f"tiled/whole peak memory ratio: {rows[1]['peak_mib'] / max(rows[0]['peak_mib'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
