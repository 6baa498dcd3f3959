"""Answer extraction on hostile text: lists, tuples, bare decimals, Unicode minus, ranges, fractions, markdown."""

import pytest

from posttrain.rewards.text import final_answer_line, last_number


@pytest.mark.parametrize("text,expected", [
    ("1,2,3", "3"),  # a list, not 123
    ("(1,2)", "2"),  # a tuple, not 12
    ("[4, 5]", "5"),
    (".5", "0.5"),  # a bare decimal, not 5
    ("-.5", "-0.5"),
    ("\u22125", "-5"),  # Unicode minus sign
    ("x = (\u22123)", "-3"),
    ("\uff0d7", "-7"),  # full-width hyphen-minus
    ("1,234", "1234"),  # thousands separators
    ("1,234,567.0 legs", "1234567"),
    ("1,23", "23"),  # not a thousands group: two numbers
    ("total: 1,234.0 legs", "1234"),
    ("2.50", "2.50"),
    ("-0.0", "0"),
    ("from -4.0 to -7", "-7"),
    ("pages 3-5", "5"),  # a range: the hyphen is not a sign
    ("f(x)-2", "2"),
    ("5 - 2 = 3", "3"),
    ("It is 3.", "3"),  # sentence full stop
    ("about 10%", "10"),
    ("1/2", "1/2"),  # a fraction stays a fraction
    ("-3/4", "-3/4"),
    ("\\frac{1}{2}", "1/2"),
    ("so \\dfrac{-3}{4} it is", "-3/4"),
    ("on 2/3/2024", "2024"),  # a date is not a fraction
    ("\u0664\u0662", "42"),  # Arabic-Indic digits
    ("v2 is 7", "7"),
    ("00012", "12"),  # leading zeros
    ("007.50", "7.50"),
    ("1e5", "100000"),  # scientific notation
    ("2.5e-3", "0.0025"),
    ("1,0000", "0"),  # not a thousands group: "1" and "0000"
    ("none", None),
    ("", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("work\n**Answer:** 42", "42"),
    ("**Answer: 42**", "42"),
    ("## Answer: 42", "42"),
    ("Answer: *42*", "42"),
    ("*Answer*: 42", "42"),
    ("__Answer__: 1/2", "1/2"),
    ("- Answer: 5", "5"),
    ("> answer : -3", "-3"),
    ("answer\uff1a 7", "7"),  # full-width colon
    ("Answer: 4\nbut wait", None),  # still strict: the answer line must be the last line
    ("The answer: 4", None),
    ("**Answer:**", None),
    ("Answer:", None),
])
def test_final_answer_line_with_markdown(text, expected):
    assert final_answer_line(text) == expected
