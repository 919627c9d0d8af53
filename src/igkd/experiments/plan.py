"""A study's plan of runs: the methods, students and seeds it trains, in which order, and how its runs are paired.

The command line's lists (``--methods``, ``--students``, ``--seeds``) are parsed here, and
:func:`build_plan` turns them into one entry per run (run id, method, student, run, seed,
subset seed, parameters and compression factor) in the order the executor trains them:
seed-major, so that a study stopped half-way is still balanced across methods.
"""

from __future__ import annotations

from igkd.distill import METHODS, PAPER_METHODS
from igkd.errors import IgkdError

#: Seeds of independent Monte Carlo runs: run r of the i-th method (in METHODS order) uses r + i * STRIDE.
INDEPENDENT_STRIDE = 1000


# -- the command line's lists -----------------------------------------------------------------------


def methods_of_one_cache() -> list[str]:
    """``--methods all``: every method that can run in one study, i.e. all but those whose overlay needs a
    cache other than IG maps (``kd_saliency``, a saliency cache: a study has one cache, so it runs by name
    in a study of its own)."""
    from igkd.distill.controls import expected_attribution_method

    return [m for m, preset in METHODS.items() if expected_attribution_method(preset.get("overlay_maps", "ig")) == "ig"]


def parse_methods(text: str | list[str]) -> list[str]:
    """``paper`` (the paper's eight methods), ``all`` (every method that can run in one study:
    :func:`methods_of_one_cache`) or a comma-separated list of method names (order kept, repeats dropped)."""
    items = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if items == ["paper"]:
        return list(PAPER_METHODS)
    if items == ["all"]:
        return methods_of_one_cache()
    unknown = [m for m in items if m not in METHODS]
    if unknown or not items:
        problem = f"unknown method {unknown[0]!r}" if unknown else "no methods given"
        raise IgkdError(f"{problem}: use paper, all or a comma-separated list of {', '.join(METHODS)}")
    return list(dict.fromkeys(items))


def parse_students(text: str | list[str]) -> list[str]:
    """``all`` or a comma-separated list of students (k3 ... k17), as ``k<n>``, ordered by size (largest first)."""
    from igkd.models import STUDENT_KS, parse_model_name

    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if [s.lower() for s in items] == ["all"]:
        return [f"k{k}" for k in STUDENT_KS]
    ks = []
    for item in items:
        k = parse_model_name(item)
        if k == 0:
            raise IgkdError("the teacher is not a student: list students k3 ... k17")
        ks.append(k)
    if not ks:
        raise IgkdError("no students given: use all or a comma-separated list such as k3,k5,k17")
    return [f"k{k}" for k in sorted(set(ks))]


def one_student(student: str) -> list[str]:
    """The one student of an ablation, Monte Carlo or tune study: a family name, or ``external`` (--student-arch)."""
    if str(student).strip().lower() == "external":
        return ["external"]
    students = parse_students(student)
    if len(students) != 1:
        raise IgkdError(f"this study trains one student, got {', '.join(students)}: use igkd sweep-cf for several")
    return students


def at_least_one(value: int, what: str) -> int:
    if value < 1:
        raise IgkdError(f"{what} must be at least 1, got {value}")
    return value


# -- the plan ---------------------------------------------------------------------------------------


def student_params(student: str, dataset, width: float, config=None) -> int:
    """Parameters of a family student, or of the external one ``config`` names (student ``external``)."""
    from igkd.models import build_model, count_parameters

    if student == "external":
        from igkd.models.external import build_external

        return count_parameters(build_external(config.student_arch, config.student_arch_args, dataset.num_classes,
                                               input_shape=tuple(dataset.train.images.shape[1:])))
    return count_parameters(build_model(student, num_classes=dataset.num_classes, width=width))


def reference_params(teacher: dict | None, dataset) -> tuple[int, str]:
    """Parameters the compression factor divides: the teacher file's, else the family teacher's."""
    if teacher is not None:
        return teacher["params"], "the teacher file"
    return student_params("teacher", dataset, 1.0), "the family's MobileNetV2 teacher (no --teacher given)"


def _plan_entry(run_id: str, method: str, student: str, run: int, seed: int, subset_seed: int, params: int, reference: int) -> dict:
    return {
        "run_id": run_id,
        "method": method,
        "student": student,
        "run": run,
        "seed": seed,
        "subset_seed": subset_seed,
        "params": params,
        "cf": round(reference / params, 2),
    }


def _independent_seed(method: str, run: int) -> int:
    return run + INDEPENDENT_STRIDE * list(METHODS).index(method)


def build_plan(kind: str, methods: list[str], students: list[str], runs: list[int], subset: float, independent: bool, params: dict, reference: int) -> list[dict]:
    """Every run of the study, seed-major: run r of every student and method before run r + 1."""
    plan = []
    for r in runs:
        for student in students:
            for method in methods:
                if kind == "montecarlo":
                    seed = _independent_seed(method, r) if independent else r
                    run_id = f"{method}-r{r}"
                elif kind == "sweep-cf":
                    seed, run_id = r, f"{student}-{method}-s{r}"
                else:
                    seed, run_id = r, f"{method}-s{r}"
                plan.append(_plan_entry(run_id, method, student, r, seed, seed, params[student], reference))
    return plan


def pairing(kind: str, subset: float, independent: bool) -> tuple[bool, str]:
    """Whether run r of every method is paired (same seed and data), and the sentence study.json records for it."""
    if independent:
        return False, "each method's run r has its own seed and subset (r + 1000 x method index): unpaired, Welch's t-test"
    if kind == "montecarlo":
        return True, f"run r of every method uses seed r and the same stratified {subset:g} subset (subset_seed r)"
    if kind == "sweep-cf":
        return True, "for each student, seed r is shared by every method (full training split)"
    return True, "run r of every method uses seed r on the full training split (minus validation)"
