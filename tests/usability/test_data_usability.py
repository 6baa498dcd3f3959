"""Data a newcomer writes: implicit-prompt pairs must share their history; SFT's default is unpacked (as in TRL)."""

import pytest

from posttrain.config import load_config
from posttrain.data.formats import validate_rows
from posttrain.errors import DataError
from posttrain.recipes.sft import SFTConfig


def _turn(role, content):
    return {"role": role, "content": content}


def test_implicit_prompt_pairs_must_share_their_history():
    same = [_turn("user", "Hi"), _turn("assistant", "Hello"), _turn("user", "Name?")]
    good = {"chosen": [*same, _turn("assistant", "Ada")], "rejected": [*same, _turn("assistant", "Bob")]}
    assert validate_rows([good], ["preference"], "pairs.jsonl") == "preference"
    bad = {"chosen": [*same, _turn("assistant", "Ada")],
           "rejected": [same[0], _turn("assistant", "Hey"), same[2], _turn("assistant", "Bob")]}
    with pytest.raises(DataError, match=r"pairs.jsonl: row 2: no 'prompt' column.*differ at turn 2"):
        validate_rows([good, bad], ["preference"], "pairs.jsonl")
    shorter = {"chosen": [*same, _turn("assistant", "Ada")], "rejected": [same[0], _turn("assistant", "Bob")]}
    with pytest.raises(DataError, match="differ at turn 2"):
        validate_rows([shorter], ["preference"], "pairs.jsonl")
    no_answer = {"chosen": [*same, _turn("assistant", "Ada")], "rejected": [*same, _turn("user", "?")]}
    with pytest.raises(DataError, match="column 'rejected': with no 'prompt' the last turn must be the assistant"):
        validate_rows([no_answer], ["preference"], "pairs.jsonl")
    # an explicit prompt makes the sides plain answers: nothing to compare
    explicit = {"prompt": same, "chosen": [_turn("assistant", "Ada")], "rejected": [_turn("assistant", "Bob")]}
    assert validate_rows([explicit], ["preference"], "pairs.jsonl") == "preference"


def test_sft_is_unpacked_by_default_and_says_what_micro_batch_size_counts():
    config = load_config(SFTConfig, None, ["train_file=x.jsonl"])
    assert config.packing is False
    from posttrain.config import config_help

    line = next(x for x in config_help(SFTConfig).splitlines() if x.strip().startswith("micro_batch_size"))
    assert "examples per forward/backward" in line and "packed rows" in line
