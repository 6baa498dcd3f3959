"""Generation backends behind the `Generator` interface: the torch engine (sampler.HFGenerator) and vLLM for GPUs.

`make_generator("hf" | "vllm", ...)` is what a recipe calls; it never imports vLLM unless asked to.

VLLMGenerator maps SamplingParams onto vLLM's and converts its outputs into the same `Rollouts`. It asks vLLM for
the log-prob of each sampled token under the *processed* distribution (`logprobs_mode="processed_logprobs"`, vLLM ≥
0.10.2: after temperature and top-k/top-p), which is what sampler.py returns too. It cannot be exercised on this
CPU-only machine; the mapping is written against vLLM's documented offline API (`LLM.generate` with token-id prompts,
`SamplingParams(n=..., logprobs=0)`, `CompletionOutput.token_ids / logprobs / finish_reason / stop_reason`).
Differences from HFGenerator: vLLM samples with its own RNG (a seed gives reproducible but different draws), and the
cost counters report the prompt tokens once per prompt and one decode token per generated token (vLLM's prefix
cache may compute fewer).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.generation.sampler import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, HFGenerator, Rollouts, SamplingParams


class VLLMGenerator:
    """Rollouts from a vLLM engine. `model_path`: a local HF checkpoint folder; extra kwargs go to `vllm.LLM`.

    After a policy update, call `load_weights(model)` to push the new weights into the engine.
    """

    def __init__(self, model_path: str, *, tokenizer=None, dtype: str = "auto", gpu_memory_utilization: float = 0.5,
                 seed: int = 0, **llm_kwargs: Any):
        try:
            import vllm
        except ImportError as e:
            raise ConfigError(
                "generation backend 'vllm' needs the vllm package (a CUDA GPU machine): pip install vllm; "
                "or use backend 'hf', the torch engine, which runs anywhere") from e
        self._vllm = vllm
        self.llm = vllm.LLM(model=str(model_path), dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                            logprobs_mode="processed_logprobs", **llm_kwargs)
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else self.tokenizer.eos_token_id)

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy a torch model's weights into an in-process engine (same architecture; merge LoRA adapters first),
        e.g. after each RL step. This is the path TRL's colocate mode uses; the prefix cache is reset after."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights(list(model.state_dict().items()))
        self.llm.reset_prefix_cache()

    def _params(self, params: SamplingParams, n: int):
        kwargs: dict[str, Any] = dict(
            n=n, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_k=params.top_k if params.top_k > 0 else -1, top_p=params.top_p, stop=list(params.stop) or None,
            seed=params.seed, logprobs=0, skip_special_tokens=True)
        if params.stop_token_ids is not None:
            kwargs["stop_token_ids"] = list(params.stop_token_ids)
            kwargs["ignore_eos"] = True  # only the given stop tokens end a completion, as in HFGenerator
        return self._vllm.SamplingParams(**kwargs)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, n: int = 1) -> Rollouts:
        if params.return_raw_logps:
            raise ConfigError("backend 'vllm' returns only the sampled distribution's log-probs; compute the "
                              "temperature-1 log-probs with a teacher-forced pass (models.forward.TokenLogps)")
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
                                    self._params(params, n), use_tqdm=False)
        tokens, logps, texts, finish = [], [], [], []
        for request in outputs:
            for out in request.outputs:
                ids = list(out.token_ids)
                tokens.append(ids)
                logps.append([step[t].logprob for step, t in zip(out.logprobs, ids)])
                texts.append(out.text)
                if out.finish_reason == "length":
                    finish.append(FINISH_LENGTH)
                elif isinstance(out.stop_reason, str):
                    finish.append(FINISH_STOP)
                else:
                    finish.append(FINISH_EOS)
        N, T = len(tokens), max(len(t) for t in tokens)
        ids_t = torch.full((N, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((N, T), dtype=torch.long)
        logps_t = torch.zeros((N, T), dtype=torch.float32)
        for i, (t, lp) in enumerate(zip(tokens, logps)):
            ids_t[i, :len(t)], mask[i, :len(t)], logps_t[i, :len(t)] = torch.tensor(t), 1, torch.tensor(lp)
        return Rollouts(prompt_ids=[list(p) for p in prompt_ids], completion_ids=ids_t, completion_mask=mask,
                        logps=logps_t, raw_logps=None, texts=texts, finish_reasons=finish, n=n,
                        prefill_tokens=sum(len(p) for p in prompt_ids), decode_tokens=int(mask.sum()) - N,
                        wall_s=time.perf_counter() - start, pad_token_id=self.pad_token_id)


def make_generator(backend: str, model=None, tokenizer=None, *, model_path: str | None = None, **kwargs: Any):
    """'hf': HFGenerator(model, tokenizer); 'vllm': VLLMGenerator(model_path) (needs a saved checkpoint folder)."""
    if backend == "hf":
        if model is None:
            raise ConfigError("backend 'hf' needs a loaded model")
        return HFGenerator(model, tokenizer, **kwargs)
    if backend == "vllm":
        if model_path is None:
            raise ConfigError("backend 'vllm' needs model_path, a local checkpoint folder (save_pretrained output)")
        return VLLMGenerator(model_path, tokenizer=tokenizer, **kwargs)
    raise ConfigError(f"unknown generation backend {backend!r}; expected 'hf' or 'vllm'")
