"""Training: schedule, exact resume, multi-process equivalence, adapter export, and the mechanism
learning when to write on a synthetic recall task."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import spkv
from spkv.adapter import read_adapter_config
from spkv.cli import build_parser
from spkv.convert import predictors
from spkv.density import gate_density
from spkv.train.config import TrainConfig, bf16_is_fast
from spkv.train.loop import build_model, export_adapter, train
from spkv.train.schedule import HARDEN_ALPHA, density_penalty, density_target_at, lr_factor, phase_at, soft_end, temperature_at

from .tiny_models import randomize_gates, save_tiny_pretrained

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny pretrained checkpoint folder and a text file of its words."""
    root = tmp_path_factory.mktemp("train")
    model_dir = save_tiny_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    text = root / "corpus.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (3000,), generator=g)))
    return model_dir, text


def tiny_config(tiny_setup, out, **kw):
    model_dir, text = tiny_setup
    base = dict(model=str(model_dir), data=[str(text)], out=str(out), seq_len=32, batch_size=2, max_tokens=6 * 2 * 32,
                window=4, predictor_hidden=8, hard_fraction=0.5, anneal_steps=2, warmup_steps=2, bf16=False,
                checkpoint_every=1, train_llm="all", lr=1e-3)
    return TrainConfig(**{**base, **kw})


def trained_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def test_schedule_phases_and_lr():
    cfg = TrainConfig(seq_len=8, batch_size=1, max_tokens=8 * 100, hard_fraction=0.25, anneal_steps=10, warmup_steps=5)
    assert [phase_at(cfg, s)[0] for s in (0, 74, 75, 83, 84, 99)] == ["soft", "soft", "anneal", "anneal", "hard", "hard"]
    assert phase_at(cfg, 75)[1] == pytest.approx(0.1) and phase_at(cfg, 84)[1] == 1.0
    assert lr_factor(cfg, 0) == pytest.approx(0.2) and lr_factor(cfg, 5) == pytest.approx(1.0)
    assert lr_factor(cfg, 99) == pytest.approx(cfg.min_lr_ratio, abs=1e-3)


def test_hardening_mixes_in_the_hard_mask_while_the_predictors_train():
    cfg = TrainConfig(seq_len=8, batch_size=1, max_tokens=8 * 100, hard_fraction=0.2, harden_fraction=0.25, warmup_steps=5)
    assert soft_end(cfg) == 80
    assert [phase_at(cfg, s)[0] for s in (0, 59, 60, 79, 80, 99)] == ["soft", "soft", "anneal", "anneal", "hard", "hard"]
    alphas = [phase_at(cfg, s)[1] for s in range(60, 80)]
    assert alphas == sorted(alphas) and alphas[0] == pytest.approx(HARDEN_ALPHA / 20) and alphas[-1] == HARDEN_ALPHA
    assert phase_at(cfg, 80) == ("hard", 1.0)  # no second anneal from alpha 0 after hardening
    frozen_llm = TrainConfig(seq_len=8, batch_size=1, max_tokens=8 * 10, hard_fraction=0.0, harden_fraction=0.5,
                             train_llm="none", method="lkv")
    assert [phase_at(frozen_llm, s)[0] for s in range(10)] == ["soft"] * 5 + ["anneal"] * 5
    assert temperature_at(frozen_llm, 9) == pytest.approx(frozen_llm.temperature_end)
    with pytest.raises(ValueError, match="harden_fraction must be in"):
        TrainConfig(harden_fraction=1.0)
    with pytest.raises(ValueError, match="a control has none"):
        TrainConfig(control=True, harden_fraction=0.5)
    with pytest.raises(ValueError, match="a control has none"):
        TrainConfig(control=True, sinks=4)


def test_density_target_ramp():
    constant = TrainConfig(density_target=0.35, density_weight=1.0)
    assert density_target_at(constant, 0) == density_target_at(constant, 500) == 0.35
    ramp = TrainConfig(density_target=0.35, density_weight=1.0, density_ramp_steps=50)
    assert density_target_at(ramp, 0) == pytest.approx(1 - 0.65 / 50)
    assert density_target_at(ramp, 24) == pytest.approx(1 - 0.65 / 2)
    assert density_target_at(ramp, 49) == density_target_at(ramp, 70) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="density_ramp_steps"):
        TrainConfig(density_ramp_steps=10)


def test_density_penalty_one_or_two_sided():
    above = TrainConfig(density_target=0.35, density_weight=2.0)
    both = TrainConfig(density_target=0.35, density_weight=2.0, density_two_sided=True)
    for density, one, two in [(0.5, 0.3, 0.3), (0.2, 0.0, 0.3), (0.35, 0.0, 0.0)]:
        assert float(density_penalty(above, torch.tensor(density), 0)) == pytest.approx(one)
        assert float(density_penalty(both, torch.tensor(density), 0)) == pytest.approx(two)
    low = torch.tensor(0.2, requires_grad=True)
    density_penalty(both, low, 0).backward()
    assert float(low.grad) == pytest.approx(-2.0)  # below the target it pushes the density up
    with pytest.raises(ValueError, match="density_two_sided"):
        TrainConfig(density_two_sided=True)
    with pytest.raises(ValueError, match=r"density_target must be in \(0, 1\)"):
        TrainConfig(density_target=1.5, density_weight=1.0)


def test_a_resumed_run_keeps_its_precision(tmp_path, monkeypatch):
    """`spkv train --resume` without --bf16/--no-bf16 takes the run's own precision (started on
    another machine), not this machine's default; an explicit flag still wins (and a mismatch errors)."""
    import spkv.train
    from spkv.cli import main

    seen = []
    monkeypatch.setattr(spkv.train, "train", lambda cfg, resume, max_steps: seen.append(cfg) or tmp_path / "adapter")
    saved = not bf16_is_fast()  # the other precision than this machine's default
    (tmp_path / "train_config.json").write_text(json.dumps({"bf16": saved}))
    main(["train", "--out", str(tmp_path), "--resume"])
    main(["train", "--out", str(tmp_path)])  # a fresh run: this machine's default
    main(["train", "--out", str(tmp_path), "--resume", "--bf16" if not saved else "--no-bf16"])
    assert [cfg.bf16 for cfg in seen] == [saved, not saved, not saved]


def test_bf16_default_follows_the_hardware():
    assert TrainConfig().bf16 is bf16_is_fast()
    assert TrainConfig(bf16=True).bf16 is True and TrainConfig(bf16=False).bf16 is False
    parse = lambda *flags: build_parser().parse_args(["train", *flags]).bf16  # noqa: E731
    assert (parse(), parse("--bf16"), parse("--no-bf16")) == (None, True, False)


def test_config_errors():
    with pytest.raises(ValueError, match="train_llm"):
        TrainConfig(train_llm="some")
    with pytest.raises(ValueError, match="density_target and density_weight"):
        TrainConfig(density_weight=1.0)
    with pytest.raises(ValueError, match="control has no gates"):
        TrainConfig(control=True, density_target=0.2, density_weight=1.0)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_setup, tmp_path):
    straight = tiny_config(tiny_setup, tmp_path / "straight")
    train(straight)
    interrupted = tiny_config(tiny_setup, tmp_path / "interrupted")
    train(interrupted, max_steps=3)
    assert torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=False)["step"] == 3
    with pytest.raises(FileExistsError, match="--resume"):
        train(interrupted)
    log_path = tmp_path / "interrupted" / "log.jsonl"
    with open(log_path, "a") as f:  # a run killed after logging a step it had not checkpointed
        f.write(json.dumps({"step": 4, "killed": True}) + "\n" + '{"step": 5, "pha')  # and killed mid-line
    train(interrupted, resume=True)
    a, b = trained_state(tmp_path / "straight"), trained_state(tmp_path / "interrupted")
    assert a.keys() == b.keys() and any("spkv_predictor" in k for k in a)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6] and log[-1]["phase"] == "hard"
    assert not any("killed" in entry for entry in log)  # the resumed run logs step 4 once, its own
    with pytest.raises(ValueError, match="different settings"):
        train(tiny_config(tiny_setup, tmp_path / "interrupted", lr=5e-4), resume=True)


@pytest.mark.parametrize("method", ["spkv", "lkv"])
def test_hardening_trains_the_frozen_llms_predictors_to_the_end(tiny_setup, tmp_path, method):
    """With a frozen LLM (no hard part), hardening runs the last steps near-hard and the predictors
    keep learning through them."""
    extra = dict(method="lkv", budget=0.5) if method == "lkv" else dict(density_target=0.5, density_weight=1.0)
    cfg = tiny_config(tiny_setup, tmp_path / method, train_llm="none", hard_fraction=0.0, harden_fraction=0.5, sinks=2, **extra)
    train(cfg, max_steps=3)  # the soft part: steps 1-3
    soft = trained_state(tmp_path / method)
    train(cfg, resume=True)  # the hardening: steps 4-6
    hardened = trained_state(tmp_path / method)
    log = [json.loads(line) for line in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["soft"] * 3 + ["anneal"] * 3 and log[-1]["alpha"] == HARDEN_ALPHA
    assert soft.keys() == hardened.keys() and all("spkv_predictor" in k for k in soft)  # the LLM is not trained
    assert any(not torch.equal(soft[k], hardened[k]) for k in soft)
    assert read_adapter_config(tmp_path / method / "adapter")["spkv"]["sinks"] == 2


def test_two_processes_match_one(tiny_setup, tmp_path):
    """DDP over 2 CPU processes (gloo) computes the same steps as one process with the same global batch."""
    one = tiny_config(tiny_setup, tmp_path / "one", max_tokens=3 * 2 * 32)
    train(one)
    model_dir, text = tiny_setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "spkv.cli", "train",
           "--model", str(model_dir), "--data", str(text), "--out", str(tmp_path / "two"), "--seq-len", "32", "--batch-size", "2",
           "--max-tokens", str(3 * 2 * 32), "--window", "4", "--predictor-hidden", "8", "--hard-fraction", "0.5",
           "--anneal-steps", "2", "--warmup-steps", "2", "--no-bf16", "--checkpoint-every", "1", "--train-llm", "all", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = trained_state(tmp_path / "one"), trained_state(tmp_path / "two")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


@pytest.mark.parametrize("control", [False, True])
def test_exported_lora_adapter_reproduces_the_trained_model(tiny_setup, tmp_path, control):
    cfg = tiny_config(tiny_setup, tmp_path, train_llm="lora", lora_rank=4, control=control)
    model, _, base_state, _ = build_model(cfg)
    with torch.no_grad():  # stand in for training: move LoRA and predictors away from their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    core = model.get_base_model()
    if not control:
        spkv.update_config(core, phase="hard")
    ids = torch.randint(2, 62, (1, 24))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    export_adapter(cfg, model, base_state, tmp_path / "adapter")
    fresh, _ = spkv.load_model(cfg.model)
    spkv.load_adapter(fresh, tmp_path / "adapter")
    assert fresh.spkv_config.threshold == (0.0 if control else cfg.threshold)
    with torch.no_grad():
        got = fresh(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, expected, atol=2e-3), (got - expected).abs().max()  # low-rank factors stored in bf16


def test_gemma3_trains_a_gate_on_its_full_attention_layer_only(tiny_setup, tmp_path):
    """Gemma 3 interleaves sliding-window layers (left as they are) with full-attention ones (gated):
    a LoRA run end to end, then the exported adapter must reproduce the trained model in a fresh one."""
    model_dir = save_tiny_pretrained(tmp_path / "gemma3", family="gemma3")
    cfg = tiny_config((model_dir, tiny_setup[1]), tmp_path / "run", train_llm="lora", lora_rank=4, window=8)
    adapter = train(cfg)
    trained = trained_state(tmp_path / "run")
    gated = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in trained if "spkv_predictor" in k})
    assert gated == [3]  # tiny Gemma 3: layers 0-2 sliding, layer 3 full attention
    fresh, _ = spkv.load_model(str(model_dir))
    spkv.load_adapter(fresh, adapter)
    assert sorted(predictors(fresh)) == gated
    model, _, _, _ = build_model(cfg)  # the same LoRA model, given the trained weights
    model.load_state_dict(trained, strict=False)
    spkv.update_config(model.get_base_model(), phase="hard")
    ids = torch.randint(2, 62, (1, 24))
    model.eval()
    with torch.no_grad():
        expected, got = model(input_ids=ids, use_cache=False).logits, fresh(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, expected, atol=2e-3), (got - expected).abs().max()


def test_train_benchmark_smoke(tiny_setup, tmp_path, monkeypatch):
    from spkv.bench.train_step import run_train_bench, write_train_bench

    result = run_train_bench(model=str(tiny_setup[0]), seq_len=16, steps=2, warmup=0, train_llm="all", bf16=False)
    assert [r["run"] for r in result["rows"]] == ["plain fine-tuning", "SP-KV (soft phase)"]
    assert all(len(r["step_s"]) == 2 and r["median_step_s"] > 0 for r in result["rows"]) and result["spkv_over_plain"] > 0
    assert "SP-KV / plain" in write_train_bench(result, tmp_path).read_text()
    import spkv.bench.train_step as train_step

    teachers = []
    real = train_step.step_loss
    monkeypatch.setattr(train_step, "step_loss", lambda cfg, model, teacher, *a, **k: teachers.append(
        (cfg.method, teacher is not None)) or real(cfg, model, teacher, *a, **k))
    # longer than the window (128): a frozen LLM learns only through out-of-window pairs
    result = run_train_bench(model=str(tiny_setup[0]), seq_len=160, steps=1, warmup=0, train_llm="all", bf16=False, lkv=True)
    lkv = result["rows"][2]
    assert lkv["run"].startswith("LKV") and lkv["train_llm"] == "none" and lkv["distill"] and result["lkv_over_plain"] > 0
    assert teachers == [("spkv", False), ("spkv", False), ("lkv", True)]  # only LKV's step runs its teacher
    assert "LKV / plain" in write_train_bench(result, tmp_path).read_text()


# ---- the mechanism learns when to write ------------------------------------------------------

SLOTS, VALUES, FILLERS, LENGTH, WINDOW, FACTS = 4, 8, 24, 48, 8, 3
FACT0 = 2
QUERY0 = FACT0 + SLOTS * VALUES
FILL0 = QUERY0 + SLOTS


def recall_batch(g: torch.Generator, n: int) -> torch.Tensor:
    """Fillers with a few (slot, value) fact tokens early on; the second-to-last token asks for a slot,
    the last is the answer: the fact of that slot, far outside the local window."""
    ids = FILL0 + torch.randint(0, FILLERS, (n, LENGTH), generator=g)
    rows = torch.arange(n)
    slots = torch.stack([torch.randperm(SLOTS, generator=g)[:FACTS] for _ in range(n)])
    values = torch.randint(0, VALUES, (n, FACTS), generator=g)
    where = torch.stack([torch.randperm(LENGTH - 2 * WINDOW, generator=g)[:FACTS] for _ in range(n)])
    facts = FACT0 + slots * VALUES + values
    for j in range(FACTS):
        ids[rows, where[:, j]] = facts[:, j]
    ask = torch.randint(0, FACTS, (n,), generator=g)
    ids[:, -2] = QUERY0 + slots[rows, ask]
    ids[:, -1] = facts[rows, ask]
    return ids


def train_recall(gated: bool, steps: int, seed: int = 0) -> tuple[float, float | None]:
    """Train a tiny model from scratch with the library's schedule; returns (accuracy, density at tau)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=FILL0 + FILLERS, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    cfg = TrainConfig(seq_len=LENGTH, batch_size=32, max_tokens=LENGTH * 32 * steps, hard_fraction=0.25,
                      anneal_steps=steps // 10, window=WINDOW, density_target=0.15, density_weight=0.1)
    if gated:
        spkv.convert(model, spkv.SPKVConfig(window=WINDOW, phase="soft", predictor_hidden=32))
    pred = [p for m in predictors(model).values() for p in m.parameters()]
    llm = [p for p in model.parameters() if all(p is not q for q in pred)]
    groups = [{"params": llm, "lr": 3e-3, "weight_decay": 0.0}] + (
        [{"params": pred, "lr": 1.5e-2, "weight_decay": 0.1, "predictor": True}] if pred else [])
    optimizer = torch.optim.AdamW(groups)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        phase, alpha = phase_at(cfg, step)
        if gated:
            spkv.update_config(model, phase=phase, anneal_alpha=alpha)
        for group in optimizer.param_groups:
            if group.get("predictor") and phase != "soft":
                group["lr"] = 0.0
        ids = recall_batch(g, 32)
        with spkv.record_gates(model) as gates:
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, -2], ids[:, -1])
        if gated and phase == "soft":
            kept, counted = gate_density(gates, cfg.threshold, WINDOW, soft=True)
            loss = loss + density_penalty(cfg, (kept / counted).mean(), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ids = recall_batch(torch.Generator().manual_seed(1234), 512)
    with torch.no_grad(), spkv.record_gates(model) as gates:
        logits = model(input_ids=ids, use_cache=False).logits
    accuracy = float((logits[:, -2].argmax(-1) == ids[:, -1]).float().mean())
    if not gated:
        return accuracy, None
    kept, counted = gate_density(gates, 0.5, WINDOW)
    return accuracy, float((kept / counted).mean())


@pytest.mark.slow  # trains 4 tiny models from scratch: minutes (about 50 on 2 loaded cores)
def test_sp_kv_learns_when_to_write_on_synthetic_recall():
    """Medians over 3 seeds: one tiny run's density is chaotic (exploratory runs, not saved: 0.07 to
    0.30 over seeds, and float rounding of another attention kernel moved it as much); the median
    is what the recipe does."""
    dense_accuracy, _ = train_recall(gated=False, steps=STEPS)
    runs = [train_recall(gated=True, steps=STEPS, seed=seed) for seed in range(3)]
    accuracy, density = (statistics.median(values) for values in zip(*runs))
    assert dense_accuracy > 0.95
    assert density <= 0.20, f"out-of-window density {density:.3f}"
    assert accuracy >= dense_accuracy - ACCURACY_GAP, f"SP-KV {accuracy:.3f} vs full attention {dense_accuracy:.3f}"


# Exploratory prototype runs (not saved) gave: full attention 100%, SP-KV about 93% at about 10% density. The gap is wider than the
# issue's "a few points": facts whose gate ends the soft phase below tau are lost for good (see the
# closing note of the training issue), so the bound is 8 points until the recipe closes that gap.
STEPS, ACCURACY_GAP = 1200, 0.08


def test_data_mix_replaces_a_seeded_share_of_rows(tiny_setup, tmp_path):
    """synthetic_fraction turns the seeded slots into long-range sequences of the same length;
    the others stay the packed text, and the mix is the same on every call (a resume replays it)."""
    from spkv.data.synthetic import is_synthetic
    from spkv.train.loop import packed_sequences, training_sequence

    cfg = tiny_config(tiny_setup, tmp_path, seq_len=128, synthetic_fraction=0.5)
    model, tokenizer, _, _ = build_model(cfg)
    data = packed_sequences(cfg, tokenizer, tmp_path / "packed")
    flags = [is_synthetic(cfg.seed, slot, cfg.synthetic_fraction) for slot in range(40)]
    assert 0 < sum(flags) < 40
    for slot, synthetic in enumerate(flags):
        row = slot % len(data)
        ids = training_sequence(cfg, data, row, slot, tokenizer)
        assert ids.shape == (1, 128)
        assert torch.equal(ids[0], data[row].long()) != synthetic
        if synthetic:
            assert int(ids[0, -1]) == tokenizer.eos_token_id
        assert torch.equal(ids, training_sequence(cfg, data, row, slot, tokenizer))
    with pytest.raises(ValueError, match="synthetic_fraction"):
        tiny_config(tiny_setup, tmp_path, synthetic_fraction=1.0)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_setup, tmp_path):
    from spkv.train.loop import step_loss

    ids = torch.randint(2, 60, (1, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        cfg = tiny_config(tiny_setup, tmp_path, activation_checkpointing=checkpointing, density_target=0.3, density_weight=1.0)
        model, _, _, _ = build_model(cfg)
        assert model.is_activation_checkpointing == checkpointing  # else the comparison below proves nothing
        loss, _ = step_loss(cfg, model, None, ids, 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("spkv_predictor" in n for n in grads_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_long_sequence_mix_run_end_to_end(tiny_setup, tmp_path):
    cfg = tiny_config(tiny_setup, tmp_path / "mix", seq_len=128, max_tokens=2 * 2 * 128, synthetic_fraction=0.5,
                      activation_checkpointing=True)
    adapter = train(cfg)
    assert (adapter / "adapter.safetensors").is_file()
    assert len((tmp_path / "mix" / "log.jsonl").read_text().splitlines()) == 2
    # train_config.json names the training tokens by hash: equal for runs on the same data, not otherwise
    control = tiny_config(tiny_setup, tmp_path / "control", seq_len=128, max_tokens=2 * 2 * 128, control=True)
    train(control)
    other = tiny_config(tiny_setup, tmp_path / "other", seq_len=64, max_tokens=2 * 2 * 64)
    train(other)
    sha = {name: json.loads((tmp_path / name / "train_config.json").read_text())["packed_data_sha256"]
           for name in ("mix", "control", "other")}
    assert sha["mix"] == sha["control"] != sha["other"] and len(sha["mix"]) == 64


@pytest.mark.parametrize("family,train_llm,bf16", [("llama", "all", False), ("gemma3", "all", False), ("llama", "lora", False),
                                                   ("gemma3", "none", True)])
def test_chunked_loss_equals_the_whole_sequence_loss_and_gradients(family, train_llm, bf16, tmp_path):
    """--loss-chunk: the same CE, distillation KL and gradients as the whole-sequence logits (Gemma's
    logit soft-capping included, at a cap the logits reach; through peft's wrapper; under bf16
    autocast), on a batch of 2, with chunks that do not divide the sequence."""
    from spkv.train.loop import step_loss

    extra = {"final_logit_softcapping": 0.2} if family == "gemma3" else {}  # |logits| / cap up to ~1: tanh bends
    path = save_tiny_pretrained(tmp_path / family, family=family, **extra)
    ids = torch.randint(3, 60, (2, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for chunk in (0, 7):
        cfg = TrainConfig(model=str(path), out=str(tmp_path / f"run{chunk}"), seq_len=40, batch_size=2, max_tokens=80,
                          window=8, predictor_hidden=8, density_target=0.3, density_weight=1.0, distill_weight=1.0,
                          loss_chunk=chunk, train_llm=train_llm, bf16=bf16)
        model, _, _, teacher = build_model(cfg)
        randomize_gates(model.get_base_model() if train_llm == "lora" else model)  # gates that drop pairs: a student unlike its teacher
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, stats = step_loss(cfg, model, teacher, ids, 0)
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    assert stats_a["kl"] > 1e-6  # ~1e-8 with untouched gates: a KL near 0 would compare nothing
    # the KL is a small difference of large terms: matmuls over other row counts round differently
    # and move it by ~1e-4 of itself on some BLAS builds; bf16 rounds the logits themselves
    atol, kl_rel = (1e-5, 1e-3) if not bf16 else (2e-3, 5e-2)
    assert torch.allclose(loss_a, loss_b, atol=atol)
    assert stats_a["ce"] == pytest.approx(stats_b["ce"], abs=atol) and stats_a["kl"] == pytest.approx(stats_b["kl"], rel=kl_rel)
    assert grads_a.keys() == grads_b.keys() and any("spkv_predictor" in n for n in grads_a)
    if train_llm == "all":
        assert any("lm_head" in n or "embed_tokens" in n for n in grads_a)  # the head's gradient flows through the chunks
    elif train_llm == "lora":
        assert any("lora_" in n for n in grads_a)
    for name in grads_a:
        if bf16:  # bf16 has 8 bits of mantissa: compare directions and sizes
            assert (grads_a[name] - grads_b[name]).norm() <= 2e-2 * grads_a[name].norm(), name
        else:
            assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_chunked_loss_refuses_a_head_it_cannot_reproduce(tmp_path):
    from transformers import AutoModelForCausalLM

    from spkv.train.chunked_loss import chunked_loss

    model = AutoModelForCausalLM.from_pretrained(save_tiny_pretrained(tmp_path / "llama"))
    model.config.final_logit_softcapping = 0.01  # the forward ignores it; the chunked head would apply it
    ids = torch.randint(3, 60, (1, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cannot reproduce"):
        chunked_loss(model, model, ids, 4)
    with pytest.raises(ValueError, match="loss_chunk"):
        TrainConfig(model="x", out=str(tmp_path), loss_chunk=-1)
