"""Task specifications: parse_classes and format_classes."""
from __future__ import annotations

import random

import pytest

from modellego.data.tasks import format_classes, parse_classes
from modellego.errors import UnknownNameError, UserError

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGITS = tuple(str(i) for i in range(10))


@pytest.mark.parametrize("spec,want", [
    ("0-2", [0, 1, 2]),
    ("3,5,7", [3, 5, 7]),
    ("7,5,3", [7, 5, 3]),  # in the order written
    ("4-4", [4]),
    ("0-1,5,7-9", [0, 1, 5, 7, 8, 9]),
    ("8-9,0-1", [8, 9, 0, 1]),
    (" 1 , 2 ", [1, 2]),
    ("2 - 4", [2, 3, 4]),
    ("0-9", list(range(10))),
])
def test_indices_and_ranges(spec: str, want: list[int]) -> None:
    assert parse_classes(spec, DIGITS) == want
    assert parse_classes(spec, FASHION) == want


@pytest.mark.parametrize("spec,want", [
    ("Trouser", [1]),
    ("trouser,PULLOVER", [1, 2]),
    ("T-shirt/top", [0]),  # a name with '-' is not a range
    ("t-shirt/top,ankle boot", [0, 9]),
    ("Bag,0,2-3", [8, 0, 2, 3]),
    (" Sneaker ,Sandal", [7, 5]),
])
def test_names_case_insensitive_and_mixed(spec: str, want: list[int]) -> None:
    assert parse_classes(spec, FASHION) == want


def test_digit_names_are_indices() -> None:
    assert parse_classes("3,1-2", DIGITS) == [3, 1, 2]


@pytest.mark.parametrize("spec,match", [
    ("", "empty item"),
    ("1,,2", "empty item"),
    ("1,", "empty item"),
    (" , ", "empty item"),
    ("3-1", "empty class range"),
    ("10", "out of range"),
    ("8-11", r"classes \[10, 11\] are out of range: there are 10 classes \(0-9\)"),
    ("1,1", "duplicate"),
    ("0-2,1", r"duplicate classes in '0-2,1': \[1\]"),
    ("Trouser,1", "duplicate"),
    ("-1", "unknown class"),
    ("1-2-3", "unknown class"),
    ("1.5", "unknown class"),
    ("²", "unknown class"),  # a digit to str.isdigit, not to int()
    ("١", "unknown class"),
    ("T-shirt", "unknown class"),
])
def test_errors_are_user_errors(spec: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        parse_classes(spec, FASHION)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'Trouser'") as e:
        parse_classes("Trousers", FASHION)
    assert "Known: " in str(e.value) and "Ankle boot" in str(e.value)
    assert isinstance(e.value, KeyError) and not str(e.value).startswith("'")  # no KeyError quoting


@pytest.mark.parametrize("classes,want", [
    ([0, 1, 2, 5], "0-2,5"),
    ([], ""),
    ([3], "3"),
    ([3, 4], "3-4"),
    ([5, 1, 2], "5,1-2"),
    ([2, 1, 0], "2,1,0"),
    ([0, 2, 4, 5, 6, 9], "0,2,4-6,9"),
])
def test_format_classes(classes: list[int], want: str) -> None:
    assert format_classes(classes) == want


def test_format_then_parse_round_trips() -> None:
    rng = random.Random(0)
    for _ in range(200):
        classes = rng.sample(range(10), rng.randint(1, 10))
        if rng.random() < 0.5:
            classes.sort()
        assert parse_classes(format_classes(classes), DIGITS) == classes
