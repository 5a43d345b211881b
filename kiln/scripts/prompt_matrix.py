"""A1111's "Prompt matrix": `a photo|red|in the rain` makes every combination of the optional parts (2^k images)
and a grid labelled with the parts each row and column uses (unused parts grey, struck through).

script_args as A1111's scripts/prompt_matrix.py: [put_at_start, different_seeds, prompt_type ("positive" or
"negative"), variations_delimiter ("comma" or "space"), margin_size]. Every image takes the request's seed (seed + i
with different_seeds); A1111 sets n_iter itself here, and so does kiln (one generation per combination)."""
from __future__ import annotations

import math

from ..errors import KilnError
from ..pipeline import GenerationParams
from .base import Arg, Env, Output, Plan, Run, Runner, Script, as_bool, as_choice, as_number, image_result, \
    watermarked, with_params
from .grid import Label, annotate, image_grid

TITLE = "Prompt matrix"


def args(mode: str) -> list[Arg]:
    return [Arg("Set at prompt start", False), Arg("Random seeds", False),
            Arg("Prompt type", "positive", choices=("positive", "negative")),
            Arg("Joining char", "comma", choices=("comma", "space")), Arg("Grid margins", 0, 0, 500, 2)]


def combinations(text: str, at_start: bool, delimiter: str) -> list[str]:
    """Combination c holds the optional part n when bit n of c is set, as A1111 numbers them."""
    parts = text.split("|")
    out = []
    for c in range(2 ** (len(parts) - 1)):
        chosen = [t.strip().strip(",") for n, t in enumerate(parts[1:]) if c & (1 << n)]
        out.append(delimiter.join(chosen + [parts[0]] if at_start else [parts[0]] + chosen))
    return out


def prepare(a: list, base: GenerationParams, env: Env) -> Plan:
    at_start, different, kind, joiner, margin = a
    at_start, different = as_bool(at_start, "put_at_start"), as_bool(different, "different_seeds")
    kind = as_choice(kind, "prompt_type", ("positive", "negative"))
    delimiter = ", " if as_choice(joiner, "variations_delimiter", ("comma", "space")) == "comma" else " "
    text = base.prompt if kind == "positive" else base.negative_prompt
    text = text[0] if isinstance(text, list) else text
    parts = text.split("|")
    if len(parts) > 13:  # 2^12 images: nobody means this
        raise KilnError(f"prompt matrix: {len(parts) - 1} optional parts make {2 ** (len(parts) - 1)} images")
    runs = []
    for i, combo in enumerate(combinations(text, at_start, delimiter)):
        field = "prompt" if kind == "positive" else "negative_prompt"
        runs.append(Run(with_params(base, **{field: combo}, seed=base.seed + (i if different else 0), batch_size=1,
                                    n_iter=1)))
    return Plan("prompt matrix", runs, dict(parts=[p.strip() for p in parts],
                                            margin=as_number(margin, "margin_size", int, 0, 500)))


def run(plan: Plan, runner: Runner) -> Output:
    results = [runner.generate(r) for r in plan.runs]
    images = [r.images[0] for r in results]
    optional = plan.data["parts"][1:]
    across = math.ceil(len(optional) / 2)  # the first half of the parts label the columns, the rest the rows
    grid = image_grid(images, rows=1 << (len(optional) // 2))

    def labels(parts):
        return [[Label(t, bool(pos & (1 << i))) for i, t in enumerate(parts)] for pos in range(1 << len(parts))]

    grid = annotate(grid, images[0].width, images[0].height, labels(optional[:across]), labels(optional[across:]),
                    plan.data["margin"])
    grid = watermarked(grid, plan.runs[0].params, runner.pipe)
    return Output([image_result(grid, results[0].infotexts[0], results[0]), *results], 1)


SCRIPT = Script(TITLE, ("txt2img", "img2img"), args, prepare, run)
