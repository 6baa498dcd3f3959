"""Models: the embedded SmolLM2 (converted once from its GGUF), local folders, tiny models, LoRA, clear errors."""

import pytest
import torch

from posttrain.cli import main
from posttrain.errors import ModelNotFoundError
from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
from posttrain.models import load_model
from posttrain.models.loading import embedded_checkpoint, resolve


def test_embedded_smollm2_is_the_real_model():
    folder = embedded_checkpoint()
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    model, tok = load_model("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    ids = encode_prompts(tok, [[{"role": "user", "content": "What is the capital of France?"}]])
    out = HFGenerator(model, tok).generate(ids, SamplingParams(max_new_tokens=12, temperature=0.0))
    assert "Paris" in out.texts[0]


def test_missing_models_name_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="Nothing is downloaded"):
        resolve("meta-llama/Llama-3-8B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(tmp_path / "empty")


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model("tiny:hidden=16,layers=1")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model(tmp_path / "m")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert tok2.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "<|im_start|>user\nx<|im_end|>\n"


def test_lora_sft_saves_merged_final_and_resumes(tmp_path):
    import json

    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(12)))
    args = ["sft", f"train_file={data}", "model=tiny", "lora_r=4", "max_steps=4", "micro_batch_size=2", "lr=1e-2",
            "progress=false", "tensorboard=false", "lr_schedule=constant"]  # constant: stopping early keeps the same lr
    assert main([*args, f"output_dir={tmp_path / 'full'}"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'split'}", "save_steps=2", "max_steps=2"]) == 0
    # a second invocation with max_steps=4 resumes the LoRA run from its step-2 checkpoint
    assert main([*args, f"output_dir={tmp_path / 'split'}", "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in a  # merged: plain transformers names, no lora_ tensors
    assert not any("lora" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    base, _ = load_model("tiny")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert (tmp_path / "full" / "final" / "adapter" / "adapter_config.json").exists()
