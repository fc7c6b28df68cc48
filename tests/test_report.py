from pathlib import Path

from t2r.evaluation.markdown import replace_section


def test_sections_are_replaced_in_place_and_the_rest_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nHand-written intro.\n")
    replace_section(path, "one", "first", "One")
    replace_section(path, "two", "second", "Two")
    replace_section(path, "one", "first, again", "One")
    text = path.read_text()
    assert text.count("<!-- one:start -->") == 1 and "first, again" in text and "first\n" not in text
    assert text.index("## One") < text.index("## Two") and "Hand-written intro." in text
