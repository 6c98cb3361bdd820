"""Fine-tuning tasks on real DeepSpeed, peft and datasets: LoRA under ZeRO-3 on 2 gloo ranks
(adapter reload and merge), QLoRA / AdaLoRA under ZeRO-2, classification and NER on the embedded
stdlib tasks against their baselines, SFT loss masking and packing, early stopping, and the bad
inputs that must fail before training. The tests that train are `slow` (`make test-fast` leaves
them out); the distributed evaluation of these tasks has in-process unit tests (tests/test_units_tasks.py)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEBUG, REPO, debug_overrides, lmforge, losses

CONFIGS = REPO / "configs"
LOG = logging.getLogger("test")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evals(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(run_dir) if any(k.startswith("eval/") for k in m)}


def sft_args(run_dir: Path, cache: Path, base: Path, *extra: str) -> list:
    return [CONFIGS / "sft.yaml", *debug_overrides(run_dir, cache, f"model.init_from={base}", "eval.generate=0",
                                                   "data.seq_len=128", *extra)]


def eval_loss_outside(run_dir: Path, model) -> float:
    """The run's eval loss recomputed in this process on the run's own eval rows, with `model`."""
    from lmforge.training import tasks
    from lmforge.training.checkpoint import consolidate
    from lmforge.training.tasks.common import loss_sum

    cfg = consolidate.saved_config(consolidate.find_checkpoint(run_dir))
    meta = consolidate.source_meta(cfg.model.init_from)
    task = tasks.prepare(cfg, meta, LOG)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(task.eval), 8):
            inputs, targets = task.eval.batch(list(range(i, min(i + 8, len(task.eval)))))
            s, n = loss_sum(model(**inputs).logits, targets)
            total, count = total + s.item(), count + n
    return total / count


@pytest.fixture(scope="module")
def lora_zero3(tmp_path_factory, data_cache, base) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    lmforge("train", *sft_args(run_dir, data_cache, base, "finetune.method=lora", "parallel.zero_stage=3",
                               "train.steps=16", "train.lr=1e-2", "eval.interval=0", "checkpoint.interval=0",
                               "eval.early_stopping.metric=null"), "--nproc", "2")
    return run_dir


@pytest.mark.slow
def test_lora_zero3_trains_only_adapters(lora_zero3):
    ls = losses(lora_zero3)
    assert np.mean([ls[s] for s in (14, 15, 16)]) < np.mean([ls[s] for s in (1, 2, 3)]) - 0.05, ls
    ckpt = lora_zero3 / "checkpoints" / "step_16"
    # The DeepSpeed files hold only what trains: adapter weights (the frozen base is init_from's).
    states = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    names = [n for group in states["param_shapes"] for n in group] + list(states["module"] or {})
    assert names and all("lora_" in n for n in names), names[:5]
    from safetensors.torch import load_file

    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every adapter moved


@pytest.mark.slow
def test_lora_adapter_reloads_and_merges(lora_zero3):
    """peft reload of the saved adapter reproduces the run's own final eval loss (computed by the
    training engine on 2 ZeRO-3 ranks); the merged export gives the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmforge.training.checkpoint import consolidate

    ckpt = consolidate.find_checkpoint(lora_zero3)
    cfg = consolidate.saved_config(ckpt)
    base_dir = consolidate.resolve_source(cfg.model.init_from)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), ckpt / "adapter").eval()
    ran = evals(lora_zero3)[16]["eval/loss"]
    assert abs(eval_loss_outside(lora_zero3, peft_model) - ran) < 1e-5
    out = consolidate.to_hf(ckpt, lora_zero3.parent / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 500, (2, 32))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert not any("lora" in k for k in merged.state_dict())


# The debug model's dimensions are multiples of 64, as real models' are. An MLP 176 wide (not a
# multiple of 32) is one bitsandbytes' packed AVX512-BF16 path refuses at the first evaluation: QLoRA
# must train on it too (tests/test_cpu_paths.py, docs/cpu_paths.md).
ODD_SHAPES = ("model.overrides.intermediate_size=176",)


@pytest.fixture(scope="module")
def base_odd_shapes(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("base176") / "run"
    lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, "train.steps=10", "checkpoint.interval=0",
                                             "eval.interval=0", *ODD_SHAPES), "--nproc", "1")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "qlora-odd-shapes", "adalora"])
def test_qlora_and_adalora_zero2(tmp_path, data_cache, request, method):
    run_dir = tmp_path / "run"
    base = request.getfixturevalue("base_odd_shapes" if method == "qlora-odd-shapes" else "base")
    method = method.removesuffix("-odd-shapes")
    # QLoRA on one rank (the 4-bit base is what is new); AdaLoRA on two (its full gradients are
    # gathered from ZeRO-2's partitions and its masks written back into every rank's master copy)
    proc = lmforge("train", *sft_args(run_dir, data_cache, base, f"finetune.method={method}", "parallel.zero_stage=2",
                                      "train.steps=20", "train.lr=1e-2", "eval.interval=0", "checkpoint.interval=0",
                                      "eval.early_stopping.metric=null"), "--nproc", "1" if method == "qlora" else "2")
    if method == "qlora":  # the log says which bitsandbytes path ran (tests/test_cpu_paths.py covers both)
        path = re.search(r"qlora: 4-bit base layers run (.*)", proc.stderr).group(1)
        print(f"{request.node.name}: {path}")
        assert path.startswith("bitsandbytes CPU dequantize + fp32 matmul"), path
    ev = evals(run_dir)  # held-out loss of the responses, before and after (batch losses are noisy)
    assert ev[20]["eval/loss"] < ev[0]["eval/loss"] - 0.005, ev  # adapters start as a no-op: any fall is learning
    adapter = run_dir / "checkpoints" / "step_20" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    if method == "adalora":  # ranks were pruned: peft saves only the kept singular values (rank_pattern)
        from safetensors.torch import load_file

        e = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_E" in k]
        kept = sum(int(v.shape[0]) for v in e)
        assert config["rank_pattern"] and 0 < kept < config["init_r"] * len(e), (kept, len(e))
    from lmforge.training.checkpoint import consolidate

    assert type(consolidate.load_merged(run_dir / "checkpoints" / "step_20")).__name__ == "LlamaForCausalLM"


@pytest.mark.slow
def test_classification_beats_majority_baseline(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = lmforge("train", CONFIGS / "classification.yaml",
                   *debug_overrides(run_dir, data_cache, "train.steps=60", "eval.interval=30",
                                    "checkpoint.interval=30"), "--nproc", "2")
    final = evals(run_dir)[60]
    assert final["eval/accuracy"] > final["eval/majority_baseline"] + 0.3, final
    assert final["eval/macro_f1"] > 0.4, final
    assert "held-out accuracy:" in proc.stderr
    # `lmforge export --which best` → a plain transformers classifier with the run's own accuracy
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    out = Path(lmforge("export", run_dir, "--out", tmp_path / "export", "--which", "best").stdout.strip())
    assert "eval/accuracy" in (out / "README.md").read_text()
    from transformers import AutoModelForSequenceClassification

    from lmforge.training import tasks
    from lmforge.training.checkpoint import consolidate

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    cfg = consolidate.saved_config(run_dir / "checkpoints" / best["tag"])
    task = tasks.prepare(cfg, None, LOG)
    with torch.no_grad():
        preds = [model(**task.eval.batch([i])[0]).logits.argmax(-1).item() for i in range(len(task.eval))]
    accuracy = float(np.mean(np.array(preds) == task.eval.labels))
    assert model.config.id2label[0] == task.labels[0]
    assert abs(accuracy - evals(run_dir)[best["step"]]["eval/accuracy"]) < 1e-9


@pytest.mark.slow
def test_encoder_classifier_trains_and_exports(tmp_path, data_cache):
    """An encoder (a BERT config given as model.path) goes through the same task path: trains a few
    steps, exports, and plain transformers reproduces the run's eval accuracy. (Learning itself is
    measured in BENCHMARKS.md: a post-LN BERT from scratch needs ~70 steps to leave the majority class.)"""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from lmforge.training import tasks
    from lmforge.training.checkpoint import consolidate

    BertConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=256).save_pretrained(tmp_path / "bert")
    run_dir = tmp_path / "run"
    lmforge("train", CONFIGS / "classification.yaml",
            *debug_overrides(run_dir, data_cache, f"model.path={tmp_path / 'bert'}", "model.pretrained=false",
                             "train.steps=6", "eval.interval=0", "checkpoint.interval=0",
                             "eval.early_stopping.metric=null"), "--nproc", "1")
    out = Path(lmforge("export", run_dir, "--out", tmp_path / "export").stdout.strip())
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    task = tasks.prepare(consolidate.saved_config(consolidate.find_checkpoint(run_dir)), None, LOG)
    with torch.no_grad():
        preds = [model(**task.eval.batch([i])[0]).logits.argmax(-1).item() for i in range(len(task.eval))]
    assert abs(float(np.mean(np.array(preds) == task.eval.labels)) - evals(run_dir)[6]["eval/accuracy"]) < 1e-9


@pytest.mark.slow
def test_ner_beats_all_outside_baseline(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    lmforge("train", CONFIGS / "ner.yaml", *debug_overrides(run_dir, data_cache, "train.steps=40", "eval.interval=40",
                                                            "checkpoint.interval=40"), "--nproc", "1")
    final = evals(run_dir)[40]
    # tagging everything O (the majority tag) scores entity F1 0
    assert final["eval/entity_f1"] > 0.6 and final["eval/token_accuracy"] > 0.8, final


@pytest.mark.slow
def test_early_stopping_stops_and_keeps_the_best(tmp_path, data_cache):
    """lr ~0: the metric plateaus, so the first evaluation is the best and `patience` evaluations
    later the run stops; the best checkpoint survives checkpoint.keep=1 and a rerun does nothing."""
    run_dir = tmp_path / "run"
    args = [CONFIGS / "classification.yaml",
            *debug_overrides(run_dir, data_cache, "train.steps=100", "train.lr=1e-12", "train.warmup=0",
                             "eval.interval=3", "checkpoint.interval=0", "checkpoint.keep=1",
                             "eval.early_stopping.metric=eval/accuracy", "eval.early_stopping.patience=2",
                             "eval.early_stopping.min_delta=0.01"), "--nproc", "1"]
    proc = lmforge("train", *args)
    assert max(losses(run_dir)) == 9, "stops at the 2nd evaluation without improvement: step 9"
    assert "early stopping at step 9" in proc.stderr
    ckpts = run_dir / "checkpoints"
    assert json.loads((ckpts / "best.json").read_text())["tag"] == "step_3"
    assert (ckpts / "step_3" / "manifest.json").is_file() and (ckpts / "step_9" / "manifest.json").is_file()
    again = lmforge("train", *args)
    assert "nothing left to train" in again.stderr and max(losses(run_dir)) == 9


# --------------------------------------------------------------------------- SFT data, no ranks

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import datasets

    from lmforge.training.data import _train_tokenizer

    text = [p.read_text() for p in sorted((Path(json.__file__).parent).glob("*.py"))]
    return _train_tokenizer(datasets.Dataset.from_dict({"text": text}), 400, tmp_path_factory.mktemp("tok"))


def test_sft_loss_only_on_response_tokens(tokenizer):
    from lmforge.training.tasks.sft import BUILTIN_CHAT_TEMPLATE, sft_tokens

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is json?"},
            {"role": "assistant", "content": "A data format."}, {"role": "user", "content": "And yaml?"},
            {"role": "assistant", "content": "Another one."}]
    ids, trainable = sft_tokens(tokenizer, BUILTIN_CHAT_TEMPLATE, msgs)
    # the trained tokens are exactly the two answers, each with its EOS
    runs, cur = [], []
    for i, t in zip(ids, trainable):
        if t:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    eos = tokenizer.eos_token
    assert [tokenizer.decode(r) for r in runs] == [f"A data format.{eos}", f"Another one.{eos}"]


def test_sft_packing_keeps_records_apart(tokenizer):
    """Two records packed in one row give the same logits as each record alone, and no target
    crosses from one record into the next."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.training.config import load_config
    from lmforge.training.tasks import sft

    records = [{"prompt": "Summarise json.dumps.", "response": "Serialize obj to a JSON formatted str."},
               {"prompt": "Summarise json.loads.", "response": "Deserialize s to a Python object."}]
    cfg = load_config(CONFIGS / "sft.yaml", ["data.seq_len=128"])
    packed = sft.encode(cfg, tokenizer, records, LOG)
    single = sft.encode(cfg.model_copy(update={"data": cfg.data.model_copy(update={"packing": False})}),
                        tokenizer, records, LOG)
    assert len(packed) == 1 and len(single) == 2
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    # use_cache=False as in training (model.build): transformers only applies the packed-sequence
    # mask when there is no KV cache
    model = LlamaForCausalLM._from_config(conf, attn_implementation="sdpa").eval()
    inputs, targets = packed.batch([0])
    n0 = len(single.inputs[0])
    assert inputs["position_ids"][0, n0].item() == 0  # positions restart at the second record
    with torch.no_grad():
        together = model(**inputs).logits[0]
        for k, offset in ((0, 0), (1, n0)):
            alone_in, _ = single.batch([k])
            alone = model(**alone_in).logits[0]
            assert (together[offset:offset + alone.shape[0]] - alone).abs().max() < 1e-5
    assert torch.equal(targets[0, :n0], torch.from_numpy(single.targets[0]))


# --------------------------------------------------------------------------- bad input, before training

def _preflight(tmp_path: Path, cache: Path, config: Path, *overrides: str) -> str:
    from lmforge.training.config import ConfigError, load_config
    from lmforge.training.train import preflight

    with pytest.raises(ConfigError) as err:
        preflight(load_config(config, [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}", *overrides]), 1, LOG)
    return str(err.value)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tiny_base(tokenizer, tmp_path_factory) -> Path:
    """A Hugging Face Llama directory with its tokenizer: a model.init_from for preflight, which reads its
    config and tokenizer only (no training run needed to refuse bad inputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_bad_task_inputs_fail_before_training(tmp_path, data_cache, tiny_base):
    base = tiny_base
    cls = CONFIGS / "classification.yaml"
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"x = {i}", "label": "a" if i % 2 else "b"} for i in range(40)])
    unseen = _jsonl(tmp_path / "eval.jsonl", [{"text": "y = 1", "label": "c"}])
    assert "never has" in _preflight(tmp_path, data_cache, cls, f"data.paths=[{train}]", f"data.eval_paths=[{unseen}]")
    no_label = _jsonl(tmp_path / "nolabel.jsonl", [{"text": "y = 1", "category": "a"}] * 10)
    msg = _preflight(tmp_path, data_cache, cls, f"data.paths=[{no_label}]", "data.eval_paths=[]")
    assert "'label'" in msg and "category" in msg
    sft = CONFIGS / "sft.yaml"
    no_response = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "response": ""}] * 10)
    assert "non-empty" in _preflight(tmp_path, data_cache, sft, f"model.init_from={base}",
                                     f"data.paths=[{no_response}]", "data.eval_paths=[]")
    good = _jsonl(tmp_path / "sft_ok.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)])
    broken = tmp_path / "template.jinja"
    broken.write_text("{% for m in messages %}{{ m['text'].upper() }}{% endfor %}")
    assert "cannot render" in _preflight(tmp_path, data_cache, sft, f"model.init_from={base}", f"data.paths=[{good}]",
                                         "data.eval_paths=[]", f"data.chat_template={broken}")
    msg = _preflight(tmp_path, data_cache, sft, f"model.init_from={base}", f"data.paths=[{good}]",
                     "data.eval_paths=[]", "finetune.method=lora", "finetune.target_modules=[query_key_value]")
    assert "match no linear layer" in msg and "q_proj" in msg


@pytest.mark.slow
def test_sft_on_alpaca_records_with_chatml_on_two_ranks(tmp_path, data_cache, tiny_base):
    """End to end: alpaca records (some with input, some with a system prompt) and the chatml template,
    2 ranks under ZeRO-3: it trains, evaluates and generates."""
    rows = [{"instruction": f"Name the module of json.{f}.", "input": "Answer briefly." if i % 2 else "",
             "output": f"json.{f} lives in the json package.", **({"system": "Be terse."} if i % 3 == 0 else {})}
            for i, f in enumerate(["dumps", "loads", "dump", "load", "JSONDecoder", "JSONEncoder"] * 4)]
    path = _jsonl(tmp_path / "alpaca.jsonl", rows)
    run_dir = tmp_path / "run"
    proc = lmforge("train", CONFIGS / "sft.yaml", *debug_overrides(
        run_dir, data_cache, f"model.init_from={tiny_base}", f"data.paths=[{path}]", "data.eval_paths=[]",
        "data.format=alpaca", "data.chat_template=chatml", "data.seq_len=192", "train.steps=4",
        "checkpoint.interval=0", "eval.interval=4", "eval.generate=2", "eval.max_new_tokens=4"), "--nproc", "2")
    assert "records read as alpaca (data.format=alpaca)" in proc.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3, 4] and all(np.isfinite(list(losses(run_dir).values())))
    last = evals(run_dir)[4]
    assert np.isfinite(last["eval/loss"]) and "eval/bleu" in last


def test_bad_finetune_combinations_are_config_errors():
    from lmforge.training.config import ConfigError, load_config

    for overrides, words in ((["finetune.method=lora"], "model.init_from"),
                             (["model.init_from=/x", "finetune.method=qlora", "parallel.zero_stage=3"], "ZeRO-3"),
                             (["model.init_from=/x", "finetune.method=adalora", "parallel.zero_stage=3"], "zero_stage 1 or 2"),
                             (["task=ner", "parallel.tensor=2"], "data-parallel only"),
                             (["task=classification", "eval.early_stopping.metric=eval/bleu"], "eval/accuracy")):
        with pytest.raises(ConfigError, match=words):
            load_config(DEBUG, overrides)
