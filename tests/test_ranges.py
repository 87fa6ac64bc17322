"""cpulist / layer-range parsing and formatting (lvllm_cli.ranges)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvllm_cli.ranges import (
    format_cpulist,
    format_layer_ranges,
    format_rank_lists,
    parse_cpulist,
    parse_layer_ranges,
    parse_rank_lists,
)


def _expand_reference(text: str) -> list[int]:
    """Independent reading of the kernel's cpulist format, item by item."""
    out = set()
    for item in filter(None, (x.strip() for x in text.split(","))):
        if "-" in item:
            a, b = item.split("-")
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(item))
    return sorted(out)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("  ", []),
        ("0", [0]),
        ("0-3,8", [0, 1, 2, 3, 8]),
        ("8,0-3", [0, 1, 2, 3, 8]),
        (" 1 , 3-4 ", [1, 3, 4]),
        ("2-2", [2]),
        ("0-1,1-2", [0, 1, 2]),
    ],
)
def test_parse_cpulist_examples(text, expected):
    assert parse_cpulist(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("0-", "'0-'"),
        ("-3", "'-3'"),
        ("a", "'a'"),
        ("1,,2", "empty item"),
        ("1,", "empty item"),
        ("5-3", "backwards"),
        ("1-2-3", "'1-2-3'"),
        ("²", "'²'"),
        ("0-99999999", "implausibly large"),
    ],
)
def test_parse_cpulist_errors_name_the_bad_part(text, fragment):
    with pytest.raises(ValueError) as e:
        parse_cpulist(text)
    assert fragment in str(e.value)


def test_format_cpulist_examples():
    assert format_cpulist([]) == ""
    assert format_cpulist([3]) == "3"
    assert format_cpulist([8, 0, 1, 2, 3]) == "0-3,8"
    assert format_cpulist([0, 2, 4]) == "0,2,4"
    assert format_cpulist([5, 5, 6]) == "5-6"
    with pytest.raises(ValueError):
        format_cpulist([-1])
    with pytest.raises(ValueError):
        format_cpulist([True])


cpu_sets = st.lists(st.integers(min_value=0, max_value=600), max_size=80)


@settings(max_examples=200, deadline=None, database=None)
@given(cpu_sets)
def test_cpulist_round_trip(cpus):
    text = format_cpulist(cpus)
    assert parse_cpulist(text) == sorted(set(cpus))
    # canonical: formatting again gives the same text, and no two ranges touch
    assert format_cpulist(parse_cpulist(text)) == text
    assert parse_cpulist(text) == _expand_reference(text)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 20)), max_size=12))
def test_parse_matches_reference_on_random_range_text(pairs):
    items = [f"{a}-{a + n}" if n else str(a) for a, n in pairs]
    random.Random(len(items)).shuffle(items)
    text = ",".join(items)
    assert parse_cpulist(text) == _expand_reference(text)


@settings(max_examples=200, deadline=None, database=None)
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=40))))
def test_layer_ranges_round_trip(case):
    n, layers = case
    text = format_layer_ranges(layers)
    assert parse_layer_ranges(text, n) == sorted(set(layers))


def test_layer_ranges_examples_and_errors():
    assert parse_layer_ranges("0-3,46-47", 48) == [0, 1, 2, 3, 46, 47]
    assert parse_layer_ranges("", 48) == []
    assert format_layer_ranges([46, 47, 0, 1, 2, 3]) == "0-3,46-47"
    with pytest.raises(ValueError, match=r"layer 48 is out of range; the model has 48 layers \(valid: 0-47\)"):
        parse_layer_ranges("40-48", 48)
    with pytest.raises(ValueError, match="runs backwards"):
        parse_layer_ranges("7-3", 48)
    with pytest.raises(ValueError, match="num_layers"):
        parse_layer_ranges("1", -1)
    with pytest.raises(ValueError, match="valid: none"):
        parse_layer_ranges("0", 0)


def test_rank_lists():
    assert parse_rank_lists("0-15|16-31") == [list(range(16)), list(range(16, 32))]
    assert format_rank_lists([[0, 1, 2], [4]]) == "0-2|4"
    assert parse_rank_lists("0|", 2) == [[0], []]
    with pytest.raises(ValueError, match="3 entries for 2 ranks"):
        parse_rank_lists("0|1|2", 2)
