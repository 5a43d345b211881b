"""AUTOMATIC1111's scripts (its `script_name` + `script_args`): X/Y/Z plot, SD upscale, Prompt matrix, Prompts
from file or textbox. Each front end builds the base `GenerationParams` as for a plain generation, then

    plan = scripts.prepare("x/y/z plot", script_args, base, Env(mode="txt2img", ...))   # checks; plans the runs
    output = scripts.run(plan, Runner(pipe, hooks, load_model))                       # grids first, then images

and saves or returns `output.results` through `kiln.output` as any other images (docs/scripts.md)."""
from __future__ import annotations

from ..errors import KilnError
from ..pipeline import GenerationParams
from . import prompt_matrix, prompts_file, sd_upscale, xyz
from .base import Arg, Bounds, Env, Output, Plan, Run, Runner, Script, check_runs

SCRIPTS: dict[str, Script] = {s.name: s for s in (prompt_matrix.SCRIPT, prompts_file.SCRIPT, sd_upscale.SCRIPT,
                                                   xyz.SCRIPT)}


def find(name: str) -> Script:
    """A script by A1111's title, case-insensitive (as A1111's API matches `script_name`)."""
    script = SCRIPTS.get(str(name).strip().lower())
    if script is None:
        raise KilnError(f"Script '{name}' not found; kiln has {', '.join(repr(s.title) for s in SCRIPTS.values())}")
    return script


def names(mode: str) -> list[str]:
    """The scripts of a mode, lowercase, as A1111's `/sdapi/v1/scripts` lists them."""
    return [name for name, s in SCRIPTS.items() if mode in s.modes]


def prepare(name: str, args, base: GenerationParams, env: Env) -> Plan:
    """Check `args` (A1111's positional list; missing trailing ones take their defaults) against the base
    parameters and plan every generation; a one-line `KilnError` says what is wrong."""
    script = find(name)
    if env.mode not in script.modes:
        raise KilnError(f"Script '{script.title}' runs in {' and '.join(script.modes)} only, not {env.mode}")
    spec = script.args(env.mode)
    if args is None:
        args = []
    if not isinstance(args, (list, tuple)):
        raise KilnError(f"script_args: expected a list, got {type(args).__name__}")
    if len(args) > len(spec):
        raise KilnError(f"script_args: '{script.title}' takes {len(spec)} arguments "
                        f"({', '.join(a.label for a in spec)}), got {len(args)}")
    args = list(args) + [a.value for a in spec[len(args):]]
    plan = script.prepare(args, base, env)
    check_runs(plan, env)
    return plan


def run(plan: Plan, runner: Runner) -> Output:
    runner.total = len(plan.runs)
    return SCRIPTS[plan.script].run(plan, runner)


def info() -> list[dict]:
    """A1111's `/sdapi/v1/script-info`: every script once per mode, with its arguments."""
    return [{"name": name, "is_alwayson": False, "is_img2img": mode == "img2img",
             "args": [a.info() for a in s.args(mode)]}
            for mode in ("txt2img", "img2img") for name, s in SCRIPTS.items() if mode in s.modes]


__all__ = ["SCRIPTS", "Arg", "Bounds", "Env", "Output", "Plan", "Run", "Runner", "Script", "find", "names",
           "prepare", "run", "info"]
