"""Data formats: every kind of malformed file stops the run with a one-paragraph error naming file/row/column,
a non-zero exit, and nothing written."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.cli import main
from posttrain.data.formats import load_dataset_file, read_rows
from posttrain.data.tokenize import encode_preference, encode_sft
from posttrain.errors import DataError
from posttrain.models import tiny_tokenizer

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Answer: 4"}]}


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# (file name, writer, recipe, expected fragments of the message)
CASES = {
    "missing_column": (lambda p: _jsonl(p, [GOOD, {"prompt": "x"}]), "sft", ["row 2", "missing column 'messages'"]),
    "wrong_type": (lambda p: _jsonl(p, [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 7}]), "sft",
                   ["row 2", "column 'completion'", "expected a string, got int"]),
    "empty_completion": (lambda p: _jsonl(p, [{"prompt": "a", "completion": "  "}]), "sft",
                         ["row 1", "column 'completion'", "empty"]),
    "turn_without_role": (lambda p: _jsonl(p, [GOOD, GOOD, {"messages": [{"content": "hi"}]}]), "sft",
                          ["row 3", "column 'messages', turn 1", "no 'role'"]),
    "unknown_role": (lambda p: _jsonl(p, [{"messages": [{"role": "wizard", "content": "hi"}]}]), "sft",
                     ["row 1", "turn 1", "unknown role 'wizard'"]),
    "bad_json_line": (lambda p: _jsonl(p, [GOOD, '{"messages": [}']), "sft", ["row 2", "not valid JSON"]),
    "empty_file": (lambda p: p.write_text(""), "sft", ["no rows"]),
    "no_assistant_turn": (lambda p: _jsonl(p, [{"messages": [{"role": "user", "content": "hi"}]}]), "sft",
                          ["row 1", "no assistant turn"]),
    "content_not_string": (lambda p: _jsonl(p, [{"messages": [{"role": "user", "content": ["x"]}]}]), "sft",
                           ["row 1", "turn 1", "'content' must be a string"]),
    "mixed_plain_and_chat": (lambda p: _jsonl(p, [{"prompt": "a", "completion": "b"},
                                                  {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}]),
                             "sft", ["row 2", "mixes conversational and plain"]),
    "wrong_format_for_recipe": (lambda p: _jsonl(p, [{"text": "hello"}]), "dpo", ["row 1", "'prompt', 'chosen' and 'rejected'"]),
    "chosen_equals_rejected": (lambda p: _jsonl(p, [{"prompt": "q", "chosen": "a", "rejected": "a"}]), "dpo",
                               ["row 1", "identical"]),
    "null_value": (lambda p: _jsonl(p, [{"text": "ok"}, {"text": None}]), "sft", ["row 2", "column 'text'", "null"]),
    "row_not_object": (lambda p: p.write_text(json.dumps([GOOD, [1, 2]])), "sft", ["row 2", "list"]),
    "csv_extra_field": (lambda p: p.write_text("prompt,completion\na,b\nc,d,e\n"), "sft", ["row 2", "more fields"]),
    "parquet_wrong_type": (lambda p: pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", None]}), p), "sft",
                           ["row 2", "column 'completion'", "null"]),
    "unsupported_extension": (lambda p: p.write_text("x"), "sft", ["unsupported file type"]),
}
SUFFIX = {"bad_json_line": ".jsonl", "row_not_object": ".json", "csv_extra_field": ".csv",
          "parquet_wrong_type": ".parquet", "unsupported_extension": ".txt"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_file_gives_clear_error(name, tmp_path):
    writer, recipe, fragments = CASES[name]
    path = tmp_path / f"{name}{SUFFIX.get(name, '.jsonl')}"
    writer(path)
    with pytest.raises(DataError) as e:
        load_dataset_file(path, recipe)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("name", ["missing_column", "unknown_role", "bad_json_line"])
def test_cli_exits_nonzero_and_writes_nothing(name, tmp_path, capsys):
    writer, _, fragments = CASES[name]
    path = tmp_path / f"{name}.jsonl"
    writer(path)
    out_dir = tmp_path / "run"
    code = main(["sft", f"train_file={path}", "model=tiny", f"output_dir={out_dir}", "max_steps=1", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and fragments[0] in err
    assert not out_dir.exists()


def test_all_formats_read_from_every_file_type(tmp_path):
    rows = [{"prompt": "1+1?", "completion": "Answer: 2"}, {"prompt": "2+3?", "completion": "Answer: 5"}]
    _jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text("prompt,completion\n1+1?,Answer: 2\n2+3?,Answer: 5\n")
    import datasets
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv", "folder"):
        got, fmt = load_dataset_file(tmp_path / name, "sft")
        assert got == rows and fmt == "prompt_completion", name
    assert read_rows(tmp_path / "a.jsonl")[1]["completion"] == "Answer: 5"


def test_loss_mask_covers_only_assistant_tokens():
    tok = tiny_tokenizer()
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "Answer: 4"}, {"role": "user", "content": "and 3+3?"},
                        {"role": "assistant", "content": "Answer: 6"}]}
    ex = encode_sft(tok, row, "messages")
    full = tok.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode(ex["input_ids"]) == full  # same tokens the template gives
    targets = tok.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
    assert targets == "Answer: 4<|im_end|>\nAnswer: 6<|im_end|>\n"
    # prompt/completion conversational: only the completion's assistant turn is a target
    pc = {"prompt": row["messages"][:4], "completion": [{"role": "assistant", "content": "Answer: 6"}]}
    ex2 = encode_sft(tok, pc, "prompt_completion")
    assert ex2["input_ids"] == ex["input_ids"]
    assert tok.decode([t for t, m in zip(ex2["input_ids"], ex2["loss_mask"]) if m]) == "Answer: 6<|im_end|>\n"
    # plain text prompt/completion (TRL's convention: no template, EOS appended)
    ex3 = encode_sft(tok, {"prompt": "Q: 1+1\n", "completion": "A: 2"}, "prompt_completion")
    assert tok.decode([t for t, m in zip(ex3["input_ids"], ex3["loss_mask"]) if m]) == "A: 2<|im_end|>"


def test_preference_encoding_shares_the_prompt():
    tok = tiny_tokenizer()
    row = {"prompt": [{"role": "user", "content": "Who are you?"}],
           "chosen": [{"role": "assistant", "content": "I am Pico."}],
           "rejected": [{"role": "assistant", "content": "I am SmolLM."}]}
    enc = encode_preference(tok, row)
    assert tok.decode(enc["prompt_ids"]) == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(enc["chosen_ids"]) == "I am Pico.<|im_end|>\n"
    assert tok.decode(enc["rejected_ids"]) == "I am SmolLM.<|im_end|>\n"
    implicit = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
    assert encode_preference(tok, implicit) == enc
