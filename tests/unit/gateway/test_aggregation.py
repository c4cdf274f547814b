"""Answers the gateway puts together from several backends' answers: ModelStatistics summed
across backends (`control.add_statistics`), and a shadow's answer held against the
primary's (`shadow.compare`). Both on real protobuf messages."""

from __future__ import annotations

import random
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.gateway.control import add_statistics
from kapi.gateway.shadow import compare

DURATIONS = [
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
]
RESPONSE_DURATIONS = ["compute_infer", "compute_output", "success", "fail", "empty_response"]


def statistics(seed: int, batch_sizes: list[int], response_keys: list[str]) -> pb.ModelStatistics:
    """A ModelStatistics as one backend reports it, with every count and ns filled."""
    rng = random.Random(seed)
    stats = pb.ModelStatistics(
        name="fashion",
        version="3",
        last_inference=rng.randint(1, 10**12),
        inference_count=rng.randint(1, 10**6),
        execution_count=rng.randint(1, 10**6),
    )
    for field in DURATIONS:
        duration = getattr(stats.inference_stats, field)
        duration.count, duration.ns = rng.randint(1, 10**6), rng.randint(1, 10**12)
    for size in batch_sizes:
        batch = stats.batch_stats.add(batch_size=size)
        for field in ("compute_input", "compute_infer", "compute_output"):
            getattr(batch, field).count = rng.randint(1, 1000)
            getattr(batch, field).ns = rng.randint(1, 10**9)
    for key in response_keys:
        for field in RESPONSE_DURATIONS:
            duration = getattr(stats.response_stats[key], field)
            duration.count, duration.ns = rng.randint(1, 1000), rng.randint(1, 10**9)
    return stats


def copy(stats: pb.ModelStatistics) -> pb.ModelStatistics:
    duplicate = pb.ModelStatistics()
    duplicate.CopyFrom(stats)
    return duplicate


def sum_of(first: object, second: object, field: str) -> tuple[int, int]:
    one, other = getattr(first, field), getattr(second, field)
    return one.count + other.count, one.ns + other.ns


def pair(duration: object) -> tuple[int, int]:
    return duration.count, duration.ns  # type: ignore[attr-defined]


def test_counts_and_durations_are_summed() -> None:
    first = statistics(1, [1], ["0"])
    second = statistics(2, [1], ["0"])
    total = copy(first)

    add_statistics(total, second)

    assert (total.name, total.version) == ("fashion", "3")
    assert total.inference_count == first.inference_count + second.inference_count
    assert total.execution_count == first.execution_count + second.execution_count
    for field in DURATIONS:
        assert pair(getattr(total.inference_stats, field)) == sum_of(
            first.inference_stats, second.inference_stats, field
        ), field


@pytest.mark.parametrize(("mine", "theirs"), [(100, 900), (900, 100), (500, 500), (7, 0)])
def test_last_inference_is_the_latest_of_the_two(mine: int, theirs: int) -> None:
    total = pb.ModelStatistics(name="m", last_inference=mine)

    add_statistics(total, pb.ModelStatistics(name="m", last_inference=theirs))

    assert total.last_inference == max(mine, theirs)


def test_batch_statistics_merge_by_batch_size_and_new_sizes_are_appended() -> None:
    first = statistics(3, [1, 4, 16], [])
    second = statistics(4, [8, 4, 32], [])
    total = copy(first)

    add_statistics(total, second)

    assert [batch.batch_size for batch in total.batch_stats] == [1, 4, 16, 8, 32]
    merged = {batch.batch_size: batch for batch in total.batch_stats}
    one = {batch.batch_size: batch for batch in first.batch_stats}
    other = {batch.batch_size: batch for batch in second.batch_stats}
    for field in ("compute_input", "compute_infer", "compute_output"):
        assert pair(getattr(merged[4], field)) == sum_of(one[4], other[4], field)
        assert pair(getattr(merged[1], field)) == pair(getattr(one[1], field))
        assert pair(getattr(merged[8], field)) == pair(getattr(other[8], field))


def test_response_statistics_merge_by_key() -> None:
    first = statistics(5, [], ["0", "1"])
    second = statistics(6, [], ["1", "2"])
    total = copy(first)

    add_statistics(total, second)

    assert set(total.response_stats) == {"0", "1", "2"}
    for field in RESPONSE_DURATIONS:
        assert pair(getattr(total.response_stats["0"], field)) == pair(
            getattr(first.response_stats["0"], field)
        )
        assert pair(getattr(total.response_stats["1"], field)) == sum_of(
            first.response_stats["1"], second.response_stats["1"], field
        )
        assert pair(getattr(total.response_stats["2"], field)) == pair(
            getattr(second.response_stats["2"], field)
        )


def test_what_is_merged_in_is_copied_not_shared() -> None:
    total = statistics(7, [1], ["0"])
    more = statistics(8, [2], ["1"])
    add_statistics(total, more)
    merged = copy(total)

    more.batch_stats[0].compute_infer.count += 1_000
    more.response_stats["1"].success.count += 1_000
    more.inference_stats.success.count += 1_000

    assert total == merged


def test_merging_into_an_empty_message_gives_the_other() -> None:
    more = statistics(9, [1, 2], ["0"])
    total = pb.ModelStatistics(name="fashion", version="3")

    add_statistics(total, more)

    assert total == more


def test_merging_many_backends_in_any_order_gives_the_same_sums() -> None:
    rng = random.Random(10)
    reports = [
        statistics(
            seed,
            rng.sample([1, 2, 4, 8, 16], rng.randint(0, 5)),
            rng.sample(["0", "1", "2"], rng.randint(0, 3)),
        )
        for seed in range(20, 26)
    ]

    def merged(order: list[pb.ModelStatistics]) -> pb.ModelStatistics:
        total = copy(order[0])
        for report in order[1:]:
            add_statistics(total, report)
        return total

    forward = merged(reports)
    backward = merged(reports[::-1])

    assert forward.inference_count == sum(r.inference_count for r in reports)
    assert forward.last_inference == max(r.last_inference for r in reports)
    assert forward.inference_stats == backward.inference_stats
    assert dict(forward.response_stats) == dict(backward.response_stats)
    by_size = {batch.batch_size: batch for batch in backward.batch_stats}
    assert len(by_size) == len(forward.batch_stats)
    assert all(by_size[batch.batch_size] == batch for batch in forward.batch_stats)
    expected_ns = sum(
        b.compute_infer.ns for r in reports for b in r.batch_stats if b.batch_size == 4
    )
    assert sum(b.compute_infer.ns for b in forward.batch_stats if b.batch_size == 4) == (
        expected_ns
    )


MERGE_UNDER_WARNINGS_AS_ERRORS = """
from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.gateway.control import add_statistics

total, more = pb.ModelStatistics(name="m"), pb.ModelStatistics(name="m", inference_count=2)
more.batch_stats.add(batch_size=1).compute_infer.count = 3
add_statistics(total, more)
assert total.inference_count == 2 and total.batch_stats[0].compute_infer.count == 3
"""


def test_merging_works_where_deprecation_warnings_are_errors() -> None:
    # A fresh interpreter: protobuf stops warning after its first 100 uses of label.
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", MERGE_UNDER_WARNINGS_AS_ERRORS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr


# Shadow comparison ------------------------------------------------------------------------

DATATYPES = {
    "FP32": np.float32,
    "FP16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
}


def response(*outputs: tuple[str, str, np.ndarray]) -> bytes:
    """A serialized ModelInferResponse with raw output contents, as a backend answers."""
    message = pb.ModelInferResponse(model_name="fashion", model_version="3")
    for name, datatype, array in outputs:
        data = np.ascontiguousarray(array, dtype=DATATYPES[datatype])
        message.outputs.add(name=name, datatype=datatype, shape=list(data.shape))
        message.raw_output_contents.append(data.tobytes())
    return message.SerializeToString()


def bytes_response(name: str, items: list[bytes]) -> tuple[str, str, bytes]:
    raw = b"".join(len(item).to_bytes(4, "little") + item for item in items)
    return name, "BYTES", raw


def with_bytes(answer: bytes, name: str, items: list[bytes]) -> bytes:
    message = pb.ModelInferResponse.FromString(answer)
    _, datatype, raw = bytes_response(name, items)
    message.outputs.add(name=name, datatype=datatype, shape=[len(items)])
    message.raw_output_contents.append(raw)
    return message.SerializeToString()


LOGITS = np.array(
    [[0.1, 0.7, 0.2], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]], dtype=np.float32
)


def test_identical_answers_agree_on_every_row() -> None:
    answer = response(("logits", "FP32", LOGITS))

    assert compare(answer, answer) == (4, 4, 0.0)


def test_top1_agreement_counts_the_rows_whose_argmax_matches() -> None:
    shadow = LOGITS + np.float32(0.01)  # argmax kept...
    shadow[2] = [0.6, 0.3, 0.1]  # ...but for row 2
    shadow[1] = [0.5, 0.49, 0.01]  # a closer call, same answer

    rows, agreeing, difference = compare(
        response(("logits", "FP32", LOGITS)), response(("logits", "FP32", shadow))
    )

    assert (rows, agreeing) == (4, 3)
    assert difference == 0.0  # classifier outputs are judged by top-1 only


def test_rows_are_every_leading_index_of_a_classifier_output() -> None:
    rng = np.random.default_rng(3)
    primary = rng.standard_normal((2, 5, 10)).astype(np.float32)
    shadow = primary.copy()
    shadow[1, 4] = -shadow[1, 4]  # one row's top class changes

    rows, agreeing, _ = compare(
        response(("scores", "FP32", primary)), response(("scores", "FP32", shadow))
    )

    assert (rows, agreeing) == (10, 9)


def test_fp16_classifier_outputs_are_compared_by_top1() -> None:
    shadow = LOGITS[::-1].copy()

    rows, agreeing, _ = compare(
        response(("logits", "FP16", LOGITS)), response(("logits", "FP16", shadow))
    )

    top = np.argmax(LOGITS, axis=1)
    assert (rows, agreeing) == (4, int(np.count_nonzero(top == top[::-1])))


def test_integer_outputs_give_the_largest_absolute_difference() -> None:
    primary = np.array([3, -5, 7, 2**30, 0, 9], dtype=np.int32)
    shadow = np.array([3, 7, 7, 2**30 - 1, 0, 10], dtype=np.int32)

    rows, agreeing, difference = compare(
        response(("labels", "INT32", primary)), response(("labels", "INT32", shadow))
    )

    assert (rows, agreeing) == (0, 0)
    assert difference == 12.0


def test_int32_differences_do_not_overflow() -> None:
    primary = np.array([np.iinfo(np.int32).min], dtype=np.int32)
    shadow = np.array([np.iinfo(np.int32).max], dtype=np.int32)

    _, _, difference = compare(response(("x", "INT32", primary)), response(("x", "INT32", shadow)))

    assert difference == float(2**32 - 1)


def test_a_float_output_with_one_value_per_row_gives_its_difference() -> None:
    primary = np.array([[0.25], [0.5]], dtype=np.float32)
    shadow = np.array([[0.25], [0.125]], dtype=np.float32)

    assert compare(response(("p", "FP32", primary)), response(("p", "FP32", shadow))) == (
        0,
        0,
        0.375,
    )


def test_several_outputs_are_matched_by_name_whatever_their_order() -> None:
    labels = np.array([1, 0, 2, 0], dtype=np.int32)
    primary = response(("logits", "FP32", LOGITS), ("labels", "INT32", labels))
    shadow = response(
        ("extra", "UINT8", np.zeros(3)),  # an output only the shadow has: ignored
        ("labels", "INT32", labels + 2),
        ("logits", "FP32", LOGITS),
    )

    assert compare(primary, shadow) == (4, 4, 2.0)


def test_bytes_outputs_are_not_compared() -> None:
    primary = with_bytes(response(("logits", "FP32", LOGITS)), "names", [b"cat", b"dog"])
    shadow = with_bytes(response(("logits", "FP32", LOGITS)), "names", [b"owl", b"eel"])

    assert compare(primary, shadow) == (4, 4, 0.0)


def test_empty_outputs_compare_as_nothing() -> None:
    empty = np.zeros((0,), dtype=np.int32)

    assert compare(response(("x", "INT32", empty)), response(("x", "INT32", empty))) == (
        0,
        0,
        0.0,
    )


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        (response(("logits", "FP32", LOGITS[:3])), r"'logits': FP32\[4, 3\] against FP32\[3, 3\]"),
        (response(("logits", "FP32", LOGITS.T)), r"FP32\[4, 3\] against FP32\[3, 4\]"),
        (response(("logits", "FP32", LOGITS.reshape(12))), r"against FP32\[12\]"),
        (response(("logits", "FP16", LOGITS)), r"FP32\[4, 3\] against FP16\[4, 3\]"),
        (response(("scores", "FP32", LOGITS)), "the shadow has no output 'logits'"),
        (pb.ModelInferResponse().SerializeToString(), "no output 'logits'"),
    ],
    ids=["fewer rows", "transposed", "flattened", "another datatype", "renamed", "empty"],
)
def test_answers_that_cannot_be_compared_raise_value_error(shadow: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compare(response(("logits", "FP32", LOGITS)), shadow)


def test_a_missing_second_output_is_found_after_the_first_compares() -> None:
    labels = np.array([1, 0, 2, 0], dtype=np.int32)
    primary = response(("logits", "FP32", LOGITS), ("labels", "INT32", labels))

    with pytest.raises(ValueError, match="no output 'labels'"):
        compare(primary, response(("logits", "FP32", LOGITS)))


def test_a_nan_in_the_shadow_is_not_read_as_agreement() -> None:
    primary = np.array([1.0, 2.0], dtype=np.float32)
    shadow = np.array([1.0, np.nan], dtype=np.float32)

    _, _, difference = compare(
        response(("y", "FP32", primary[:, None])), response(("y", "FP32", shadow[:, None]))
    )

    assert difference != 0.0


def test_bf16_classifier_outputs_are_compared_by_top1() -> None:
    shadow = LOGITS + np.float32(0.01)

    rows, agreeing, _ = compare(
        response(("logits", "BF16", LOGITS)), response(("logits", "BF16", shadow))
    )

    assert (rows, agreeing) == (4, 4)
