"""Kubernetes quantities (controller/kit/quantity.py), one of the two value syntaxes of
manifests; tests/kit/test_durations.py covers the other."""

from __future__ import annotations

from decimal import Decimal

import pytest

from controller.kit.quantity import cpu_millis, memory_bytes, parse_quantity

KI, MI, GI = 2**10, 2**20, 2**30


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", Decimal(1)),
        ("0", Decimal(0)),
        ("250m", Decimal("0.25")),
        ("0.5", Decimal("0.5")),
        (".5", Decimal("0.5")),
        ("1.", Decimal(1)),
        ("+2", Decimal(2)),
        (" 3 ", Decimal(3)),
        (" 1Gi\n", Decimal(GI)),
        ("100n", Decimal("1e-7")),
        ("100u", Decimal("1e-4")),
        ("2k", Decimal(2000)),
        ("1M", Decimal(10**6)),
        ("1.5G", Decimal("1.5e9")),
        ("1T", Decimal(10**12)),
        ("1P", Decimal(10**15)),
        ("1E", Decimal(10**18)),
        ("1Ki", Decimal(KI)),
        ("512Mi", Decimal(512 * MI)),
        ("1.5Gi", Decimal(3 * GI // 2)),
        ("1Ti", Decimal(2**40)),
        ("1Pi", Decimal(2**50)),
        ("1Ei", Decimal(2**60)),  # Fixed bug: "Ei" is read as an exponent "E" + "i"
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("5e-3", Decimal("0.005")),
        ("2e+2", Decimal(200)),
        (4, Decimal(4)),
        (0.25, Decimal("0.25")),
        (1e21, Decimal(10**21)),
    ],
)
def test_parse_quantity(text: str | int | float, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "lots",
        "1.5.2Gi",
        "",
        ".",
        "Gi",
        "1 Gi",
        "1gi",
        "1KI",
        "1K",  # kilo is lowercase k
        "1mi",
        "1e",
        "1e3Gi",
        "0x10",
        "1,5",
        "--1",
    ],
)
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
        parse_quantity(text)


def test_parse_quantity_error_gives_examples() -> None:
    with pytest.raises(ValueError, match=r"examples: 250m, 1, 0\.5, 512Mi, 2Gi"):
        parse_quantity("lots")


@pytest.mark.parametrize(
    ("text", "millis"),
    [
        ("250m", 250),
        ("1", 1000),
        (1, 1000),
        ("0.1", 100),
        ("1.5", 1500),
        ("100u", 1),  # a fraction of a millicore rounds up, never down to nothing
        ("1500u", 2),
        ("2k", 2_000_000),
        (0.25, 250),
    ],
)
def test_cpu_millis(text: str | int | float, millis: int) -> None:
    assert cpu_millis(text) == millis


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512Mi", 512 * MI),
        ("8Gi", 8 * GI),
        ("1.5Gi", 3 * GI // 2),
        ("1Ki", KI),
        ("1G", 10**9),
        ("1e3", 1000),
        ("128974848", 128974848),
        (1024, 1024),
        ("0.5", 1),  # a fraction of a byte rounds up
        ("1m", 1),
    ],
)
def test_memory_bytes(text: str | int | float, size: int) -> None:
    assert memory_bytes(text) == size


def test_memory_comparisons_the_planner_makes() -> None:
    assert memory_bytes("16Gi") > memory_bytes("8Gi")
    assert memory_bytes("1Gi") > memory_bytes("1G")
    assert memory_bytes("1000Mi") < memory_bytes("1Gi")
    assert cpu_millis("1") == cpu_millis("1000m")
