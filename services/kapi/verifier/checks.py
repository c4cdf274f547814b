"""The requirements spec as executable checks. Each check is a plugin: a name, and a function
from the spec and the evidence to outcomes, one per requirement it covers, each with the
threshold taken from the spec, the value measured and a verdict.

    accuracy     accuracy.min on the test split
    reference    accuracy.max_drop_vs_reference and accuracy.min_top1_agreement, against
                 the fp32 reference on the same inputs
    budgets      latency_p95_ms, throughput_min_rps, max_weights_kb and max_memory_mb of the
                 target whose profile the variant is for
    robustness   robustness.min_accuracy under each perturbation given
    formal       formal.min_certified_fraction at each ε

A requirement the evidence cannot settle (a budget for a profile this machine is not, an
operator the formal verifier cannot bound) fails with the reason: a report passes only when
every requirement was checked and met.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from kapi.core.errors import KapiError
from kapi.core.hardware import detect_profiles
from kapi.core.requirements import Requirements
from kapi.verifier.evidence import Evidence

Verdict = Literal["pass", "fail", "not measured", "not verifiable"]


@dataclass(frozen=True)
class Outcome:
    check: str  # the plugin
    requirement: str  # the spec's field, e.g. "targets[cpu-x86_64-avx2].latency_p95_ms"
    threshold: float
    measured: float | None
    verdict: Verdict
    detail: str = ""


Check = Callable[[Requirements, Evidence], Iterator[Outcome]]
CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        CHECKS[name] = function
        return function

    return register


def at_least(
    check: str, requirement: str, threshold: float, measured: float, detail: str = ""
) -> Outcome:
    verdict: Verdict = "pass" if measured >= threshold else "fail"
    return Outcome(check, requirement, threshold, measured, verdict, detail)


def at_most(
    check: str, requirement: str, threshold: float, measured: float, detail: str = ""
) -> Outcome:
    verdict: Verdict = "pass" if measured <= threshold else "fail"
    return Outcome(check, requirement, threshold, measured, verdict, detail)


def run_checks(spec: Requirements, evidence: Evidence) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for function in CHECKS.values():
        outcomes.extend(function(spec, evidence))
    return outcomes


@check("accuracy")
def accuracy(spec: Requirements, evidence: Evidence) -> Iterator[Outcome]:
    if spec.accuracy is None or spec.accuracy.min is None:
        return
    measured = evidence.accuracy()
    if measured is None:
        yield Outcome(
            "accuracy",
            "accuracy.min",
            spec.accuracy.min,
            None,
            "not measured",
            "the test set has no labels",
        )
        return
    samples = len(evidence.tests.images)
    yield at_least(
        "accuracy", "accuracy.min", spec.accuracy.min, measured, f"{samples} test samples"
    )


@check("reference")
def reference(spec: Requirements, evidence: Evidence) -> Iterator[Outcome]:
    wanted = spec.accuracy
    if wanted is None or (wanted.max_drop_vs_reference, wanted.min_top1_agreement) == (None, None):
        return
    ref = evidence.reference_logits
    fields = [
        ("accuracy.max_drop_vs_reference", wanted.max_drop_vs_reference),
        ("accuracy.min_top1_agreement", wanted.min_top1_agreement),
    ]
    if ref is None:
        for field, threshold in fields:
            if threshold is not None:
                yield Outcome(
                    "reference",
                    field,
                    threshold,
                    None,
                    "not measured",
                    "no fp32 reference to compare with (--reference)",
                )
        return
    if wanted.max_drop_vs_reference is not None:
        ours, theirs = evidence.accuracy(), evidence.accuracy(ref)
        if ours is None or theirs is None:
            yield Outcome(
                "reference",
                fields[0][0],
                wanted.max_drop_vs_reference,
                None,
                "not measured",
                "the test set has no labels",
            )
        else:
            detail = f"accuracy {ours:.4f} vs the reference's {theirs:.4f}"
            yield at_most(
                "reference", fields[0][0], wanted.max_drop_vs_reference, theirs - ours, detail
            )
    if wanted.min_top1_agreement is not None:
        agreement = float((evidence.logits.argmax(1) == ref.argmax(1)).mean())
        yield at_least("reference", fields[1][0], wanted.min_top1_agreement, agreement)


@check("budgets")
def budgets(spec: Requirements, evidence: Evidence) -> Iterator[Outcome]:
    target = next((t for t in spec.targets if t.profile == evidence.profile), None)
    if target is None:
        return
    where = f"targets[{target.profile}]"
    here = evidence.profile in detect_profiles()
    timed = [
        ("latency_p95_ms", target.latency_p95_ms),
        ("throughput_min_rps", target.throughput_min_rps),
        ("max_memory_mb", target.max_memory_mb),
    ]
    for field, threshold in timed:
        if threshold is None:
            continue
        if not here:
            yield Outcome(
                "budgets",
                f"{where}.{field}",
                threshold,
                None,
                "not measured",
                f"this machine is not a {evidence.profile}",
            )
        elif field == "latency_p95_ms":
            yield at_most(
                "budgets",
                f"{where}.{field}",
                threshold,
                evidence.timing.latency_p95_ms,
                "batch 1, one thread",
            )
        elif field == "max_memory_mb":
            yield at_most(
                "budgets",
                f"{where}.{field}",
                threshold,
                evidence.timing.peak_memory_mb,
                "peak resident, runtime included",
            )
        else:
            rps, batch = evidence.throughput
            yield at_least(
                "budgets", f"{where}.{field}", threshold, rps, f"best at batch {batch}, every core"
            )
    if target.max_weights_kb is not None:
        yield at_most(
            "budgets",
            f"{where}.max_weights_kb",
            target.max_weights_kb,
            evidence.artifact.size_bytes / 1024,
            "the artifact's bytes",
        )


@check("robustness")
def robustness(spec: Requirements, evidence: Evidence) -> Iterator[Outcome]:
    wanted = spec.robustness
    if wanted is None:
        return
    given = [
        ("gaussian_noise_std", wanted.gaussian_noise_std),
        ("brightness_delta", wanted.brightness_delta),
        ("shift_pixels", wanted.shift_pixels),
    ]
    for kind, amount in given:
        if amount is None:
            continue
        requirement = f"robustness.min_accuracy @ {kind}={amount:g}"
        try:
            measured, worst = evidence.perturbed_accuracy(kind, float(amount))
        except KapiError as exc:
            yield Outcome(
                "robustness", requirement, wanted.min_accuracy, None, "not measured", exc.message
            )
            continue
        yield at_least("robustness", requirement, wanted.min_accuracy, measured, f"worst: {worst}")


@check("formal")
def formal(spec: Requirements, evidence: Evidence) -> Iterator[Outcome]:
    wanted = spec.formal
    if wanted is None:
        return
    try:
        result = evidence.certificates(list(wanted.epsilons))
    except KapiError as exc:
        verdict: Verdict = "not verifiable" if "not verifiable" in exc.message else "not measured"
        for eps in wanted.epsilons:
            yield Outcome(
                "formal",
                f"formal.min_certified_fraction @ eps={eps:g}",
                wanted.min_certified_fraction,
                None,
                verdict,
                exc.message,
            )
        return
    for eps in wanted.epsilons:
        row = result[f"{eps:g}"]
        detail = f"{row['certified']} of {row['samples']} certified ({row['method']})"
        yield at_least(
            "formal",
            f"formal.min_certified_fraction @ eps={eps:g}",
            wanted.min_certified_fraction,
            row["certified_fraction"],
            detail,
        )
