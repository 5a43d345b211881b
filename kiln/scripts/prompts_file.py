"""A1111's "Prompts from file or textbox": one generation per line. A line is a prompt, or (starting with `--`)
options as A1111 reads them: `--prompt "a cat" --negative_prompt "blurry" --steps 10 --cfg_scale 5 --seed 3 …`.

script_args as A1111 1.10's scripts/prompts_from_file.py: [checkbox_iterate ("Iterate seed every line"),
checkbox_iterate_batch ("Use same random seed for all lines"), prompt_position ("start" or "end": where a line's
prompt goes when the request has a prompt too), prompt_txt (the lines)]."""
from __future__ import annotations

import shlex

from ..errors import KilnError
from ..pipeline import GenerationParams
from ..samplers import parse
from .base import Arg, Env, Output, Plan, Run, Runner, Script, as_bool, as_choice, as_number, random_seed, \
    with_params

TITLE = "Prompts from file or textbox"

# A1111's line options → (GenerationParams field, type); the options A1111 has that kiln refuses, and why
OPTIONS = {"prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "seed": ("seed", int),
           "subseed": ("subseed", int), "subseed_strength": ("subseed_strength", float),
           "seed_resize_from_w": ("seed_resize_from_w", int), "seed_resize_from_h": ("seed_resize_from_h", int),
           "sampler_name": ("sampler", str), "scheduler": ("schedule", str), "batch_size": ("batch_size", int),
           "n_iter": ("n_iter", int), "steps": ("steps", int), "cfg_scale": ("cfg_scale", float),
           "width": ("width", int), "height": ("height", int), "tiling": ("seamless", bool),
           "restore_faces": ("restore_faces", bool), "sd_model": ("model", str)}
REFUSED = {"outpath_samples": "a request never names a server path", "outpath_grids": "a request never names a "
           "server path", "styles": "kiln has no prompt styles", "sampler_index": "use --sampler_name",
           "prompt_for_display": "kiln shows the prompt it used", "do_not_save_samples": "kiln saves as the front "
           "end says", "do_not_save_grid": "kiln saves as the front end says"}


def args(mode: str) -> list[Arg]:
    return [Arg("Iterate seed every line", False), Arg("Use same random seed for all lines", False),
            Arg("Insert prompts at the", "start", choices=("start", "end")), Arg("List of prompt inputs", "")]


def parse_line(line: str, where: str) -> dict:
    """`--option value …` as A1111's `cmdargs`: --prompt and --negative_prompt take every word up to the next
    option; every other option one value."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise KilnError(f"{where}: {e}") from None
    out, i = {}, 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise KilnError(f"{where}: expected an option starting with --, got {word!r}")
        tag = word[2:]
        if tag in REFUSED:
            raise KilnError(f"{where}: --{tag} is not supported ({REFUSED[tag]})")
        if tag not in OPTIONS:
            raise KilnError(f"{where}: unknown option --{tag}")
        if i + 1 >= len(words):
            raise KilnError(f"{where}: --{tag} needs a value")
        field, kind = OPTIONS[tag]
        i += 1
        if kind is str and tag in ("prompt", "negative_prompt"):
            value = [words[i]]
            while i + 1 < len(words) and not words[i + 1].startswith("--"):
                i += 1
                value.append(words[i])
            out[field] = " ".join(value)
        else:
            out[field] = _value(words[i], kind, f"{where}: --{tag}")
        i += 1
    return out


def _value(text: str, kind, what: str):
    if kind is bool:
        return text.lower() == "true"  # as A1111: anything else is false
    return as_number(text, what, kind) if kind in (int, float) else text


def apply_line(base: GenerationParams, opts: dict, position: str, env: Env, where: str) -> Run:
    """The base parameters with a line's options; a line's prompt joins the request's (at `position`)."""
    opts = dict(opts)
    model = opts.pop("model", None)
    if model is not None:
        found = env.find_model(model) if env.find_model else None
        if found is None:
            raise KilnError(f"{where}: unknown checkpoint {model!r}")
        model = found
    if opts.pop("restore_faces", False):
        raise KilnError(f"{where}: kiln has no face restoration")
    for field in ("prompt", "negative_prompt"):
        own, old = opts.get(field), getattr(base, field)
        if own and old and isinstance(old, str):
            opts[field] = f"{own} {old}" if position == "start" else f"{old} {own}"
    w, h = opts.pop("seed_resize_from_w", None), opts.pop("seed_resize_from_h", None)
    if w is not None or h is not None:
        old = base.seed_resize_from or (None, None)
        size = (w if w is not None else old[0], h if h is not None else old[1])
        if None in size:
            raise KilnError(f"{where}: seed resize needs both --seed_resize_from_w and --seed_resize_from_h")
        opts["seed_resize_from"] = size if min(size) > 0 else None
    if "sampler" in opts or "schedule" in opts:
        try:
            spec, schedule = parse(opts.get("sampler", base.sampler), opts.get("schedule", base.schedule),
                                   lenient=True)
        except ValueError as e:
            raise KilnError(f"{where}: {e}") from None
        opts.update(sampler=spec.name, schedule=schedule)
    if "subseed_strength" in opts and opts["subseed_strength"] and base.subseed is None and "subseed" not in opts:
        opts["subseed"] = random_seed()
    return Run(with_params(base, **opts), model)


def prepare(a: list, base: GenerationParams, env: Env) -> Plan:
    iterate, same_random, position, text = a
    iterate, same_random = as_bool(iterate, "checkbox_iterate"), as_bool(same_random, "checkbox_iterate_batch")
    position = as_choice(position, "prompt_position", ("start", "end"))
    if not isinstance(text, str):
        raise KilnError(f"prompt_txt: expected the lines as text, got {type(text).__name__}")
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise KilnError("prompts from file: the text holds no prompts")
    # A1111: a random seed stays random per line unless the lines share one (or iterate from one)
    fresh = env.seed_random and not (iterate or same_random)
    seed, runs = base.seed, []
    for n, line in lines:
        where = f"line {n}"
        # A1111 reads a line as options only when that parses; kiln when it starts with -- (and then it must)
        opts = parse_line(line, where) if line.startswith("--") else {"prompt": line}
        run = apply_line(base, opts, position, env, where)
        if "seed" not in opts:
            run.params = with_params(run.params, seed=random_seed() if fresh else seed)
        runs.append(run)
        if iterate:
            seed += base.batch_size * base.n_iter
    return Plan("prompts from file or textbox", runs)


def run(plan: Plan, runner: Runner) -> Output:
    return Output([runner.generate(r) for r in plan.runs])


SCRIPT = Script(TITLE, ("txt2img", "img2img"), args, prepare, run)
