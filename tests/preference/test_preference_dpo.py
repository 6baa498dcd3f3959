"""DPO through the recipe path on tiny models: log 2 at the start, the σ(r̂_l − r̂_w) gradient weight, TR-DPO syncs,
cached = live reference, LoRA-disabled reference = frozen base, exact resume, clear errors on bad files."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from posttrain.config import load_config
from posttrain.data.pairs import encode_pairs, pair_sequences, sequence_batch, sequence_logps
from posttrain.errors import ConfigError, DataError
from posttrain.losses.dpo import dpo_loss
from posttrain.models import apply_lora, tiny_model, tiny_tokenizer
from posttrain.models.forward import TokenLogps
from posttrain.models.reference import effective_weights, reference_kind, reference_logps_fn, sync_reference
from posttrain.recipes.dpo import DPOConfig, run
from posttrain.train.checkpoint import load_state
from posttrain.train.logging import read_metrics

LOG2 = math.log(2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two threads per process oversubscribe a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = torch.randint(0, 30, (2,), generator=g).tolist()
        extra = " really" * int(torch.randint(0, 4, (1,), generator=g))  # variable lengths
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "chosen": [{"role": "assistant", "content": f"It is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"I{extra} think {a + b + 1}."}]})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, name, **kw):
    train = tmp_path / "train.jsonl"
    if not train.exists():
        _write(train, _rows())
        _write(tmp_path / "eval.jsonl", _rows(4, seed=9))
    base = dict(train_file=str(train), eval_file=str(tmp_path / "eval.jsonl"), model="tiny", max_steps=4,
                micro_batch_size=2, grad_accum_steps=2, lr=3e-3, max_length=96, progress=False, tensorboard=False,
                output_dir=str(tmp_path / name))
    base.update(kw)
    config = DPOConfig(**base)
    config.validate()
    return config


def _metrics(run_dir):
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def _train_losses(run_dir):
    return [r["train/loss"] for r in _metrics(run_dir) if "train/loss" in r]


def _pairs(n=6):
    tok = tiny_tokenizer()
    pairs, _ = encode_pairs(_rows(n), tok, 128, "mem")
    return pairs, tok


def test_recipe_loss_is_exactly_log2_when_policy_equals_reference(tmp_path):
    for name, kw in (("cached", {}), ("live", {"precompute_ref_logps": False}), ("lora", {"lora_r": 4})):
        run(_config(tmp_path, name, max_steps=1, **kw))
        first = next(r for r in _metrics(tmp_path / name) if "train/loss" in r)
        assert first["train/loss"] == pytest.approx(LOG2, abs=1e-7), name
        assert first["train/rewards/margins"] == 0.0 and first["train/rewards/accuracies"] == 0.0


def test_sft_term_adds_the_winners_token_mean_nll(tmp_path):
    """First step, policy = reference: DPO + w·NLL = log 2 + w × (Idea 1's loss on the same batch)."""
    run(_config(tmp_path, "idea1", max_steps=1, loss="idea1"))
    run(_config(tmp_path, "rpo", max_steps=1, sft_weight=0.5))
    nll = _train_losses(tmp_path / "idea1")[0]
    assert nll > 1.0  # a random tiny model: a few nats per token
    assert _train_losses(tmp_path / "rpo")[0] == pytest.approx(LOG2 + 0.5 * nll, abs=1e-6)
    with pytest.raises(ConfigError, match="sft_weight"):
        load_config(DPOConfig, None, ["train_file=x", "sft_weight=-1"])


def test_sequence_logps_packed_and_padded_equal_a_per_sequence_loop():
    pairs, tok = _pairs(4)
    model = tiny_model(seed=3)
    seqs = pair_sequences(pairs, [0, 1, 2, 3])
    fn = TokenLogps(model, chunk_size=5)
    packed = sequence_batch(seqs, tok.pad_token_id, pack_length=128)
    padded = sequence_batch(seqs, tok.pad_token_id, pack_length=None)
    assert packed.input_ids.shape[0] < len(seqs)  # something was packed
    expected = []
    for s in seqs:  # one sequence, plain logits, its answer tokens only
        ids = torch.tensor([s["input_ids"]])
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)  # [T-1, V]
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
        expected.append((picked * torch.tensor(s["loss_mask"][1:])).sum())
    expected = torch.stack(expected)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(fn, packed), expected, atol=2e-5, rtol=1e-6)
        torch.testing.assert_close(sequence_logps(fn, padded), expected, atol=2e-5, rtol=1e-6)
    assert packed.last.shape == (8, 2)


def test_per_pair_gradient_weight_is_sigmoid_of_implicit_reward_gap():
    """∇L = −β/B Σ_b σ(r̂_l − r̂_w) (∇log π(y_w) − ∇log π(y_l)) (DPO Eq. 8 / the notes), with ∇log π of each
    sequence taken from its own forward."""
    pairs, tok = _pairs(3)
    beta = 0.5
    policy, ref = tiny_model(seed=1), tiny_model(seed=2)
    index = [0, 1, 2]
    batch = sequence_batch(pair_sequences(pairs, index), tok.pad_token_id, pack_length=128)
    logps = sequence_logps(TokenLogps(policy), batch)
    with torch.no_grad():
        ref_logps = sequence_logps(TokenLogps(ref), batch)
    out = dpo_loss(logps[:3], logps[3:], ref_logps[:3], ref_logps[3:], beta=beta)
    params = [p for p in policy.parameters()]
    got = torch.autograd.grad(out.loss, params)
    weight = torch.sigmoid(out.rejected_rewards - out.chosen_rewards)  # [B]
    assert weight.min() > 0.01 and (weight.max() - weight.min()) > 1e-3  # non-trivial, different per pair

    def grad_of(seq):
        b = sequence_batch([seq], tok.pad_token_id, pack_length=None)
        return torch.autograd.grad(sequence_logps(TokenLogps(policy), b)[0], params)

    expected = [torch.zeros_like(p) for p in params]
    for b, i in enumerate(index):
        for e, gw, gl in zip(expected, grad_of(pairs[i]["chosen"]), grad_of(pairs[i]["rejected"])):
            e -= beta / 3 * weight[b] * (gw - gl)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-6, rtol=1e-4)


def test_cached_and_live_reference_give_identical_losses(tmp_path):
    run(_config(tmp_path, "cached"))
    run(_config(tmp_path, "live", precompute_ref_logps=False))
    a, b = _metrics(tmp_path / "cached"), _metrics(tmp_path / "live")
    assert a[0]["ref/kind"] == "policy" and b[0]["ref/kind"] == "copy"  # no reference network when cached
    keys = ["train/loss", "train/rewards/margins", "train/rewards/chosen", "eval/loss", "eval/rewards/accuracies"]
    for ra, rb in zip(a[1:], b[1:]):
        for k in keys:
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], abs=1e-6), k
    assert _train_losses(tmp_path / "cached")[-1] < LOG2 - 0.05  # it learned something


@pytest.mark.parametrize("precompute", [True, False])
def test_hard_sync_at_step_tau_makes_reference_equal_policy(tmp_path, precompute):
    name = f"hard-{precompute}"
    run(_config(tmp_path, name, max_steps=5, ref_sync_steps=2, ref_sync_alpha=1.0, save_steps=2, keep_last=5,
                precompute_ref_logps=precompute))
    losses = _train_losses(tmp_path / name)
    # steps 1, 3 and 5 start right after a sync (or at the start): the loss is log 2 exactly; steps 2, 4 are not
    assert losses[0] == pytest.approx(LOG2, abs=1e-7)
    assert losses[2] == pytest.approx(LOG2, abs=1e-7) and losses[4] == pytest.approx(LOG2, abs=1e-7)
    assert abs(losses[1] - LOG2) > 1e-3 and abs(losses[3] - LOG2) > 1e-3
    ckpt = tmp_path / name / "checkpoints" / "step-00000002"
    extra = load_state(ckpt)["extra"]
    assert extra["ref_syncs"] == 1
    policy = tiny_model()
    policy.load_state_dict(_hf_weights(ckpt / "model"), strict=False)  # lm_head is tied
    tok = tiny_tokenizer()
    pairs, _ = encode_pairs(_rows(), tok, 96, "mem")
    with torch.no_grad():
        b = sequence_batch(pair_sequences(pairs, list(range(12))), tok.pad_token_id, pack_length=None)
        logps = sequence_logps(TokenLogps(policy.eval()), b)
    if precompute:  # the cache after the sync is the policy's own log-probs
        chosen, rejected = extra["ref_cache"]["train"]
        torch.testing.assert_close(chosen, logps[:12], atol=2e-5, rtol=0)
        torch.testing.assert_close(rejected, logps[12:], atol=2e-5, rtol=0)
    else:  # the reference network's weights are the policy's
        for k, v in policy.state_dict().items():
            assert torch.equal(extra["ref_state"][k], v), k


def _hf_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_soft_sync_mixes_weights_and_lora_syncs_merged_weights(tmp_path):
    alpha = 0.25
    run(_config(tmp_path, "soft", max_steps=3, ref_sync_steps=2, ref_sync_alpha=alpha, save_steps=2, keep_last=5))
    extra = load_state(tmp_path / "soft" / "checkpoints" / "step-00000002")["extra"]
    theta2 = _hf_weights(tmp_path / "soft" / "checkpoints" / "step-00000002" / "model")
    theta0 = tiny_model().state_dict()
    for k in theta2:
        torch.testing.assert_close(extra["ref_state"][k], alpha * theta2[k] + (1 - alpha) * theta0[k],
                                   atol=1e-7, rtol=0, msg=k)
    # LoRA: the synced reference holds W + s·B·A, which is what peft's merge_and_unload computes
    model = apply_lora(tiny_model(), r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    ref = tiny_model(seed=5)
    sync_reference(ref, model, 1.0)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(ref.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    assert set(effective_weights(model)) == {n for n, _ in tiny_model().named_parameters()}


def test_lora_reference_with_adapters_disabled_equals_frozen_base():
    pairs, tok = _pairs(4)
    base = tiny_model(seed=0)
    policy = apply_lora(tiny_model(seed=0), r=4, alpha=8)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # adapters that change the outputs
    batch = sequence_batch(pair_sequences(pairs, [0, 1, 2, 3]), tok.pad_token_id, pack_length=128)
    with reference_logps_fn("base", policy, None, 1024) as ref_fn:
        ref = sequence_logps(ref_fn, batch)
    with torch.no_grad():
        frozen = sequence_logps(TokenLogps(base), batch)
        live = sequence_logps(TokenLogps(policy), batch)
    assert torch.equal(ref, frozen)
    assert (live - frozen).abs().max() > 1e-2  # the adapters are active outside the context
    assert policy.training  # the context restored train mode


def test_reference_kind_table():
    assert reference_kind(precompute=True, lora=False, sync_steps=0, sync_alpha=0.6) == "policy"
    assert reference_kind(precompute=True, lora=False, sync_steps=4, sync_alpha=1.0) == "policy"
    assert reference_kind(precompute=True, lora=False, sync_steps=4, sync_alpha=0.6) == "copy"
    assert reference_kind(precompute=True, lora=True, sync_steps=0, sync_alpha=0.6) == "base"
    assert reference_kind(precompute=False, lora=True, sync_steps=0, sync_alpha=0.6) == "base"
    assert reference_kind(precompute=False, lora=False, sync_steps=0, sync_alpha=0.6) == "copy"
    assert reference_kind(precompute=False, lora=True, sync_steps=2, sync_alpha=1.0) == "copy"


@pytest.mark.parametrize("kw", [dict(ref_sync_steps=2, ref_sync_alpha=1.0),
                                dict(ref_sync_steps=2, ref_sync_alpha=0.5, lora_r=4)], ids=["hard-cached", "soft-lora"])
def test_resume_split_run_equals_one_run(tmp_path, kw):
    one = _config(tmp_path, "one", max_steps=6, save_steps=3, keep_last=5, **kw)
    run(one)
    # the second run starts from the first run's step-3 checkpoint (its cache and reference state come with it)
    two_dir = tmp_path / "two"
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step-00000003", two_dir / "checkpoints" / "step-00000003")
    two = _config(tmp_path, "two", max_steps=6, save_steps=3, keep_last=5, **kw)
    run(two, resume="latest")
    a, b = _hf_weights(tmp_path / "one" / "final"), _hf_weights(two_dir / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _train_losses(tmp_path / "one")[3:] == _train_losses(two_dir)  # steps 4-6 identical
    ea = load_state(tmp_path / "one" / "checkpoints" / "step-00000006")["extra"]
    eb = load_state(two_dir / "checkpoints" / "step-00000006")["extra"]
    assert ea["ref_syncs"] == eb["ref_syncs"] == 2


def test_bad_preference_files_give_clear_errors_before_writing(tmp_path):
    out = tmp_path / "never"

    def fails(rows, match, raw=None):
        path = tmp_path / "bad.jsonl"
        path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=match):
            run(_config(tmp_path, "never", train_file=str(path)))
        assert not out.exists()

    good = _rows(3)
    fails([good[0], {"prompt": good[1]["prompt"], "chosen": good[1]["chosen"]}], r"bad.jsonl: row 2: missing column 'rejected'")
    fails([good[0], {**good[1], "rejected": good[1]["chosen"]}], r"row 2: 'chosen' and 'rejected' are identical")
    fails([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
          r"row 1 has columns \['messages'\]; this recipe expects 'prompt', 'chosen' and 'rejected'")
    fails(None, r"row 2 \(line 2\) is not valid JSON", raw=json.dumps(good[0]) + "\n{oops\n")
    fails([{**good[0], "chosen": [{"role": "assistant", "content": 3}]}], r"row 1, column 'chosen', turn 1")
    with pytest.raises(DataError, match="lost its chosen or rejected answer to truncation"):
        run(_config(tmp_path, "never", max_length=8))
    assert not out.exists()
    with pytest.raises(ConfigError, match="key 'loss' must be one of"):
        load_config(DPOConfig, None, [f"train_file={tmp_path / 'train.jsonl'}", "loss=dpo"])
    with pytest.raises(ConfigError, match="label_smoothing' applies only to loss=sigmoid"):
        load_config(DPOConfig, None, ["train_file=x", "loss=ipo", "label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="ref_sync_alpha"):
        load_config(DPOConfig, None, ["train_file=x", "ref_sync_alpha=0"])


def test_ddp_two_processes_equal_one_process_with_soft_sync(tmp_path):
    """2 ranks × 1 micro-batch = 1 rank × 2 micro-batches, through a distributed cache and a soft TR-DPO sync."""
    import os
    import subprocess
    import sys

    _config(tmp_path, "unused")  # writes the data files
    args = [f"train_file={tmp_path / 'train.jsonl'}", f"eval_file={tmp_path / 'eval.jsonl'}", "model=tiny",
            "max_steps=3", "lr=1e-3", "max_length=96", "progress=false", "tensorboard=false", "max_grad_norm=0",
            "ref_sync_steps=2", "ref_sync_alpha=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    one = subprocess.run([sys.executable, "-m", "posttrain.cli", "dpo", *args, "micro_batch_size=2",
                          "grad_accum_steps=2", f"output_dir={tmp_path / 'one'}"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29547", "-m", "posttrain.cli", "dpo",
                          *args, "micro_batch_size=2", "grad_accum_steps=1", f"output_dir={tmp_path / 'two'}"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _hf_weights(tmp_path / "one" / "final"), _hf_weights(tmp_path / "two" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    la = [r.get("train/loss", r.get("eval/loss")) for r in _metrics(tmp_path / "one")[1:]]
    lb = [r.get("train/loss", r.get("eval/loss")) for r in _metrics(tmp_path / "two")[1:]]
    assert lb == pytest.approx(la, abs=1e-6) and len(la) == 4
