"""The gateway's route and config models: what they accept, what they refuse and how the
refusal names the field; and `load_config`, whose errors name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kapi.core.errors import InvalidArgument
from kapi.gateway.discovery import BackendSpec
from kapi.gateway.routes import (
    DEFAULT_POLICY,
    GatewayConfig,
    Route,
    Shadow,
    load_config,
    parse_address,
)
from pydantic import ValidationError

DOCUMENTED = """\
backends:
  - {address: "10.0.0.5:8001", profile: nvidia-sm90}
  - {address: "edge-1:8001", profile: rpi5, weight: 0.5}
routes:
  fashion:
    split: {"3": 90, "4": 10}          # percent (any positive weights)
    shadow: {version: "5", fraction: 0.1}
    hardware: [gpu, edge]              # preferred first, then any backend
    policy: least-outstanding          # round-robin, weighted, consistent-hash
    hash_parameter: session            # for consistent-hash: a request parameter
"""


def refusal(model: type[Any], document: dict[str, Any]) -> tuple[tuple[object, ...], str]:
    """Where and why `model` refuses `document` (its first error)."""
    with pytest.raises(ValidationError) as raised:
        model.model_validate(document)
    error = raised.value.errors()[0]
    return tuple(error["loc"]), str(error["msg"])


def write(tmp_path: Path, text: str | bytes, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# Routes -----------------------------------------------------------------------------------


def test_a_route_defaults_to_no_split_no_shadow_any_hardware_and_the_default_policy() -> None:
    route = Route()

    assert (route.split, route.shadow, route.hardware) == ({}, None, [])
    assert route.policy == DEFAULT_POLICY == "least-outstanding"
    assert route.hash_parameter is None


@pytest.mark.parametrize("policy", ["least-outstanding", "round-robin", "weighted"])
def test_every_policy_is_accepted_by_name(policy: str) -> None:
    assert Route(policy=policy).policy == policy


def test_consistent_hashing_with_a_parameter_is_accepted() -> None:
    route = Route(policy="consistent-hash", hash_parameter="session")

    assert route.hash_parameter == "session"


@pytest.mark.parametrize(
    "hardware", [["gpu"], ["edge", "cpu"], ["nvidia-sm75", "nvidia-sm90", "rpi5", "gpu"]]
)
def test_hardware_classes_and_profiles_are_accepted_in_order(hardware: list[str]) -> None:
    assert Route(hardware=hardware).hardware == hardware


INVALID_ROUTES = {
    "an unknown policy": ({"policy": "fastest"}, ("policy",), "unknown policy 'fastest'"),
    "consistent-hash without hash_parameter": (
        {"policy": "consistent-hash"},
        (),
        "consistent-hash policy needs hash_parameter",
    ),
    "consistent-hash with an empty hash_parameter": (
        {"policy": "consistent-hash", "hash_parameter": ""},
        (),
        "needs hash_parameter",
    ),
    "a version that is not an integer": ({"split": {"v3": 50}}, ("split",), "got 'v3'"),
    "a fractional version": ({"split": {"1.5": 50}}, ("split",), "positive integer"),
    "version zero": ({"split": {"0": 50}}, ("split",), "got '0'"),
    "a negative version": ({"split": {"-2": 50}}, ("split",), "got '-2'"),
    "a zero weight": ({"split": {"3": 0, "4": 10}}, ("split", "3"), "greater than 0"),
    "a negative weight": ({"split": {"3": -1}}, ("split", "3"), "greater than 0"),
    "a weight that is not a number": ({"split": {"3": "lots"}}, ("split", "3"), "number"),
    "unknown hardware": ({"hardware": ["gpu", "tpu"]}, ("hardware",), "unknown hardware 'tpu'"),
    "a malformed nvidia profile": ({"hardware": ["nvidia-smx"]}, ("hardware",), "nvidia-smx"),
    "an unknown field": ({"colour": "red"}, ("colour",), "Extra inputs are not permitted"),
    "a shadow without a target": ({"shadow": {"fraction": 0.5}}, ("shadow",), "needs a version"),
}


@pytest.mark.parametrize(
    ("document", "where", "why"), INVALID_ROUTES.values(), ids=INVALID_ROUTES.keys()
)
def test_invalid_routes_are_refused_naming_the_field(
    document: dict[str, Any], where: tuple[object, ...], why: str
) -> None:
    location, message = refusal(Route, document)

    assert location == where
    assert why in message


# Shadows ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        {"fraction": 1.0, "version": "5"},
        {"fraction": 0.001, "backend": "10.0.0.9:8001"},
        {"fraction": 0.5, "version": "2", "backend": "edge-1:8001"},
    ],
)
def test_a_shadow_with_a_target_and_a_fraction_in_range_is_accepted(
    document: dict[str, Any],
) -> None:
    shadow = Shadow.model_validate(document)

    assert shadow.fraction == document["fraction"]


INVALID_SHADOWS = {
    "no target": ({"fraction": 0.5}, (), "needs a version, a backend, or both"),
    "fraction 0": ({"fraction": 0, "version": "2"}, ("fraction",), "greater than 0"),
    "a negative fraction": ({"fraction": -0.1, "version": "2"}, ("fraction",), "greater than 0"),
    "fraction above 1": ({"fraction": 1.5, "version": "2"}, ("fraction",), "less than or equal"),
    "no fraction": ({"version": "2"}, ("fraction",), "Field required"),
    "a version that is not an integer": (
        {"fraction": 0.5, "version": "latest"},
        ("version",),
        "got 'latest'",
    ),
    "an unknown field": ({"fraction": 0.5, "version": "2", "share": 1}, ("share",), "Extra"),
}


@pytest.mark.parametrize(
    ("document", "where", "why"), INVALID_SHADOWS.values(), ids=INVALID_SHADOWS.keys()
)
def test_invalid_shadows_are_refused_naming_the_field(
    document: dict[str, Any], where: tuple[object, ...], why: str
) -> None:
    location, message = refusal(Shadow, document)

    assert location == where
    assert why in message


# The config -------------------------------------------------------------------------------


def test_the_documented_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, DOCUMENTED))

    assert [entry.spec() for entry in config.backends] == [
        BackendSpec("10.0.0.5:8001", "nvidia-sm90", None, 1.0),
        BackendSpec("edge-1:8001", "rpi5", None, 0.5),
    ]
    route = config.routes["fashion"]
    assert route.split == {"3": 90.0, "4": 10.0}
    assert route.shadow == Shadow(version="5", fraction=0.1)
    assert (route.hardware, route.policy, route.hash_parameter) == (
        ["gpu", "edge"],
        "least-outstanding",
        "session",
    )


def test_an_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == GatewayConfig()


INVALID_CONFIGS = {
    "an unknown top-level field": ({"backend": []}, ("backend",), "Extra"),
    "an address without a port": (
        {"backends": [{"address": "host"}]},
        ("backends", 0, "address"),
        "HOST:PORT",
    ),
    "a port out of range": (
        {"backends": [{"address": "h:70000"}]},
        ("backends", 0, "address"),
        "HOST:PORT",
    ),
    "a bad http address": (
        {"backends": [{"address": "h:1", "http_address": "h:x"}]},
        ("backends", 0, "http_address"),
        "HOST:PORT",
    ),
    "an unknown profile": (
        {"backends": [{"address": "h:1", "profile": "gpu"}]},
        ("backends", 0, "profile"),
        "unknown hardware profile 'gpu'",
    ),
    "a zero backend weight": (
        {"backends": [{"address": "h:1", "weight": 0}]},
        ("backends", 0, "weight"),
        "greater than 0",
    ),
    "an unknown backend field": (
        {"backends": [{"address": "h:1", "zone": "a"}]},
        ("backends", 0, "zone"),
        "Extra",
    ),
    "an invalid route": (
        {"routes": {"fashion": {"policy": "fastest"}}},
        ("routes", "fashion", "policy"),
        "unknown policy",
    ),
}


@pytest.mark.parametrize(
    ("document", "where", "why"), INVALID_CONFIGS.values(), ids=INVALID_CONFIGS.keys()
)
def test_invalid_configs_are_refused_naming_the_field(
    document: dict[str, Any], where: tuple[object, ...], why: str
) -> None:
    location, message = refusal(GatewayConfig, document)

    assert location == where
    assert why in message


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("10.0.0.5:8001", ("10.0.0.5", 8001)),
        ("edge-1.local:1", ("edge-1.local", 1)),
        ("[::1]:8001", ("::1", 8001)),
        ("[fe80::1]:65535", ("fe80::1", 65535)),
    ],
)
def test_addresses_parse_to_host_and_port(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["host", "host:", ":8001", "host:0", "host:65536", "h:8o01"])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(address)


def test_a_missing_file_is_invalid_argument_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(InvalidArgument) as raised:
        load_config(path)

    assert str(path) in raised.value.message
    assert "No such file" in raised.value.message


def test_a_directory_is_invalid_argument_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read the gateway config") as raised:
        load_config(tmp_path)

    assert str(tmp_path) in raised.value.message


@pytest.mark.parametrize(
    "text", ["routes: {fashion: [unclosed\n", "backends:\n  - a\n - b\n", "key: value: other\n"]
)
def test_a_file_that_is_not_yaml_is_invalid_argument_naming_it(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(InvalidArgument) as raised:
        load_config(path)

    assert f"the gateway config {path} is not YAML" in raised.value.message


def test_invalid_content_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "routes:\n  fashion:\n    split: {'3': 0}\n  shoes:\n    hardware: [tpu]\n",
    )

    with pytest.raises(InvalidArgument) as raised:
        load_config(path)

    message = raised.value.message
    assert message.startswith(f"the gateway config {path}: ")
    assert "routes.fashion.split.3: Input should be greater than 0" in message
    assert "routes.shoes.hardware: Value error, unknown hardware 'tpu'" in message
    assert isinstance(raised.value.__cause__, ValidationError)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_a_document_that_is_not_a_mapping_names_the_config(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(InvalidArgument, match="config: ") as raised:
        load_config(path)

    assert str(path) in raised.value.message


def test_a_file_that_is_not_text_is_invalid_argument_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xff\xfe\x00r\x00o\x00u\x00t\x00e\x00s\x00")

    with pytest.raises(InvalidArgument) as raised:
        load_config(path)

    assert str(path) in raised.value.message


# ARABIC-INDIC DIGIT ONE and FULLWIDTH DIGIT THREE pass (int() reads them as 1 and 3);
# SUPERSCRIPT TWO is refused, but by int(), with its message rather than the route's.
@pytest.mark.parametrize("version", ["\u0661", "\uff13", "\u00b2"])
def test_a_version_in_other_digits_is_refused(version: str) -> None:
    with pytest.raises(ValidationError, match="positive integer"):
        Route(split={version: 1.0})


def test_an_infinite_split_weight_is_refused(tmp_path: Path) -> None:
    # Accepted, it sends every draw to the split's last version: inf < inf is false.
    path = write(tmp_path, "routes:\n  m:\n    split: {'3': .inf, '4': 1}\n")

    with pytest.raises(InvalidArgument, match=r"routes\.m\.split\.3"):
        load_config(path)


def test_a_version_with_leading_zeros_is_refused_or_normalised() -> None:
    try:
        route = Route(split={"007": 1.0})
    except ValidationError:
        return

    assert set(route.split) == {"7"}
