"""The YAML layer: the event-level reader builds exactly the tree the node-based one builds.

``read_plain`` reads plain documents straight from parser events; everything else goes through
composed nodes and ``_Builder``. Both must give the same ``Item`` tree, problems and value
count, with libyaml and with the pure-Python parser. Also the line layout of block sequences.
"""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from udpbindd import yamlsrc
from udpbindd.yamlsrc import Item, block_entries, lines_only, read, read_plain

HAS_LIBYAML = hasattr(yaml, "CSafeLoader")
PARSERS = [
    pytest.param(
        True, id="libyaml", marks=pytest.mark.skipif(not HAS_LIBYAML, reason="no libyaml")
    ),
    pytest.param(False, id="pure"),
]


@pytest.fixture(params=PARSERS)
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run the test with libyaml, and again with the pure-Python parser alone."""
    if not request.param:
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    return bool(request.param)


def shape(item: Item | None) -> object:
    """An Item tree as plain data, with NaN made comparable."""
    if item is None:
        return None
    value = item.value
    if isinstance(value, dict):
        value = {key: shape(child) for key, child in value.items()}
    elif isinstance(value, list):
        value = [shape(child) for child in value]
    elif isinstance(value, float) and math.isnan(value):
        value = "NaN"
    return (type(value).__name__, value, item.line, item.key_line)


def by_nodes(text: str) -> tuple[object, list[yamlsrc.Problem], int]:
    node = yamlsrc._compose(text)
    if node is None:
        return None, [], 0
    builder = yamlsrc._Builder("t.yaml")
    return shape(builder.convert(node, "", 0)), builder.problems, builder.count


def assert_same_as_nodes(text: str) -> bool:
    """Check read_plain against the node builder; False when the text is not plain."""
    plain = read_plain(text, "t.yaml")
    if plain is None:
        return False
    assert (shape(plain.root), plain.problems, plain.values) == by_nodes(text)
    return True


ATOMS = [
    "a", "b", "listeners", "port", "name", "1", "0x1F", "1.5", ".nan", "yes", "no", "~",
    "null", "''", '"x"', "<<", "=", "2001-01-01", "2001-13-45", "1:20", "!!int x", "&a", "*a",
    "[", "]", "{", "}", ",", ": ", "- ", "\n", "\n  ", "\n    ", " #c", "? ", "|", ">", "'q'",
    "1e3", "0o17", "-.inf", "True", "x: y", "[a, b]", "{a: 1, a: 2}", "{[a]: 1}", "{{a: 1}: 2}",
    "yes: 1", "1: 2", "--- ", "...", "é", "!!binary aGk=", "2001-01-01 10:00:00",
    "0", "010", "09", "1_000", "+5", "-7", "65535", "\u0663", "\uff11", "123456789012345678901",
]  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(ATOMS), min_size=1, max_size=16).map("".join))
def test_plain_documents_read_as_composed(text: str) -> None:
    for libyaml in (True, False):
        saved = getattr(yaml, "CSafeLoader", None)
        if not libyaml and saved is not None:
            del yaml.CSafeLoader
        try:
            if libyaml and saved is None:
                continue
            assert_same_as_nodes(text)
        finally:
            if saved is not None:
                yaml.CSafeLoader = saved


@pytest.mark.parametrize(
    "text",
    [
        "listeners:\n  - {name: a, port: 1, port: 2}\n  - [x, {y: z}]\n",
        "a: 1\nb: {c: [1, 2, {d: e}], 'f': \"g\"}\nyes: 2\n[x]: 3\n{y: 1}: 4\nc: <<\nd: =\n",
        "listeners:\n  - name: a\n    interface: '*'\n    port: 1\n    allow: [10.0.0.0/8]\n",
        "x: !!int 3\n",
        "x: &a 1\ny: *a\n",
        "x: {<<: {a: 1}}\n",
        "a: 1\n---\nb: 2\n",
        "a: [\n",
        "",
        "# only a comment\n",
        "- 1\n- 2000-02-30\n- 12:30:00\n",
    ],
)
def test_examples_read_as_composed(text: str, parser: bool) -> None:
    del parser
    assert_same_as_nodes(text)


# Plain decimal integers take a short cut past the resolver; every neighbouring form must
# still read as YAML 1.1 says (octal, sexagesimal, underscores, signs, non-ASCII digits).
INTEGER_FORMS = ["0", "7", "010", "08", "00", "1_000", "+5", "-0", "65536", "1:30", "0x10"]
INTEGER_FORMS += ["\u0663", "\uff11\uff12", "12345678901234567890123", "1.0", "1e3"]
INTEGER_FORMS += ["9" * 18, "1" * 19, "1" * 5000]  # the last: more digits than int() takes


@pytest.mark.parametrize("form", INTEGER_FORMS)
def test_integers_read_as_composed(form: str, parser: bool) -> None:
    del parser
    assert assert_same_as_nodes(f"listeners:\n  - {{port: {form}, name: '{form}'}}\n")


@pytest.mark.parametrize(
    "text",
    ["x: &a 1\ny: *a\n", "x: !!str 1\n", "x: ! 1\n", "x: {<<: {a: 1}}\n", "a: 1\n---\nb: 2\n",
     "a: [\n", "[" * 70 + "]" * 70 + "\n"],
)  # fmt: skip
def test_what_is_not_plain_goes_through_nodes(text: str, parser: bool) -> None:
    del parser
    assert read_plain(text, "t.yaml") is None
    assert read(text, "t.yaml").plain is False


def test_a_plain_document_says_so() -> None:
    document = read("listeners:\n  - {port: 1}\n", "t.yaml")
    assert document.plain
    assert document.values == 4  # the mapping, the list, the entry and its port


def test_first_line_and_depth_place_a_part_of_a_file() -> None:
    part = read_plain("  - {port: 1}\n  - port: 2\n", "t.yaml", first_line=10, depth=1)
    assert part is not None
    assert shape(part.root) == (
        "list",
        [
            ("dict", {"port": ("int", 1, 10, 10)}, 10, 0),
            ("dict", {"port": ("int", 2, 11, 11)}, 11, 0),
        ],
        10,
        0,
    )
    deep = "[" * 65 + "]" * 65  # depths 0..64 alone, 1..65 one level down in a file
    assert read_plain(deep, "t.yaml") is not None
    assert read_plain(deep, "t.yaml", depth=1) is None


def test_equal_strings_are_shared() -> None:
    part = read_plain("- {a: size, b: 'size'}\n- {a: size, b: \"size\"}\n", "t.yaml")
    assert part is not None
    assert isinstance(part.root, Item)
    rows = [entry.value for entry in part.root.value]  # type: ignore[attr-defined]
    assert rows[0]["a"].value is rows[1]["a"].value
    assert rows[0]["b"].value is rows[1]["b"].value


# ---------------------------------------------------------------------------------------------
# the line layout of a block sequence


def test_block_entries_flow_and_block() -> None:
    text = (
        "head: 1\n"
        "listeners:\n"
        "  - {name: a}\n"
        "  # a comment\n"
        "\n"
        "  - name: b\n"
        "    port: 2\n"
        "  -\n"
        "    name: c\n"
        "metrics: {}\n"
    )
    start = text.index("  - {")
    entries = block_entries(text, start)
    assert entries is not None
    assert entries.column == 2
    assert entries.starts == [start, text.index("  - name: b"), text.index("  -\n")]
    assert entries.end == text.index("metrics")
    assert block_entries(text, start, entries.end, column=2) == entries
    assert block_entries(text, start, entries.end, column=4) is None
    assert block_entries(text, start, len(text)) is None  # "metrics" is in no entry
    assert block_entries(text, 0) is None  # not an entry's line


def test_block_entries_without_indentation_and_at_the_end() -> None:
    text = "listeners:\n- a\n- b\n  # c\n-\n"
    entries = block_entries(text, 11)
    assert entries is not None
    assert entries.column == 0
    assert [text[start] for start in entries.starts] == ["-", "-", "-"]
    assert entries.end == len(text)
    # "---" and "-x" start no entry; a tab is not indentation.
    assert block_entries("- a\n---\n", 0) == yamlsrc.Entries(0, [0], 4)
    assert block_entries("- a\n-x\n", 0) == yamlsrc.Entries(0, [0], 4)
    assert block_entries("- a\n\t- b\n", 0) == yamlsrc.Entries(0, [0], 4)


def test_lines_only() -> None:
    assert lines_only("a\nb\n")
    for mark in ("\r", "\x85", "\u2028", "\u2029"):
        assert not lines_only(f"a{mark}b")
