"""Go-style durations (controller/kit/durations.py), one of the two value syntaxes of
manifests; tests/kit/test_quantity.py covers the other."""

from __future__ import annotations

import pytest

from controller.kit.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("2m30s", 150.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("1m500ms", 60.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("", 0.0),
        (" 10m ", 600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "10 minutes",
        "10",
        "m",
        "-5s",
        "1h 30m",
        "10M",
        "1w",
        "1y",
        "1m1",
        "s10",
        "1.5.5m",
        "PT10M",
        "10min",
        "soon",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration \(examples: 30s, 10m, 1h30m\)"):
        parse_duration(text)
