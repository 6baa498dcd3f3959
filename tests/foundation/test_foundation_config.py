import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.recipes.sft import SFTConfig


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: data.jsonl\nlr: 1.0e-4\npacking: false\n")
    config = load_config(SFTConfig, path, ["lr=3e-5", "--max_steps", "7", "lora_r=8"])
    assert config.train_file == "data.jsonl"
    assert config.lr == 3e-5 and config.max_steps == 7 and config.lora_r == 8 and config.packing is False


def test_unknown_key_in_file_suggests_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: d.jsonl\nlearning_rat: 1e-4\nmicro_batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, path)
    assert str(path) in str(e.value) and "learning_rat" in str(e.value)


def test_unknown_override_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'micro_batch_size'"):
        load_config(SFTConfig, None, ["train_file=x", "micro_batch_sise=4"])


@pytest.mark.parametrize("override, expected", [
    ("max_steps=2.5", "integer"), ("packing=maybe", "true or false"), ("lr=fast", "number"),
    ("micro_batch_size=0", ">= 1"),
])
def test_wrong_types_and_values(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(SFTConfig, None, ["train_file=x", override])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="train_file"):
        load_config(SFTConfig, None, [])
