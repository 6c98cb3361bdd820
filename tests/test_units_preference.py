"""The preference data path and its distributed evaluation, in process: records (string, TRL
conversational with an explicit or implicit prompt) → pairs → token rows whose targets are exactly
the final assistant turn, malformed pairs → ConfigError naming file and record (through
tasks.prepare), PairExamples batches, and on in-process gloo ranks (tests/harness.py) dpo's
evaluate, over_pairs, the cached reference log-probs and step_metrics, and reward's evaluate, each
equal on 2 ranks, on 1 rank and by a plain loop; reference_key follows the weights and the data.
The loss formulas against TRL's own code are tests/test_units_preference_losses.py.

    PYTHONPATH=.pkg python -m pytest -q tests/test_units_preference.py --durations=0
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import run_ranks
from test_units_tasks import Engine  # what the tasks use of a DeepSpeed engine
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training import tasks
from lmforge.training.config import ConfigError, load_config
from lmforge.training.parallel import RankGroups
from lmforge.training.tasks import preference
from lmforge.training.tasks.common import IGNORE, TaskData
from lmforge.training.tasks.preference import PairExamples
from lmforge.training.chat_templates import TEMPLATES
from lmforge.training.tasks.sft import BUILTIN_CHAT_TEMPLATE, chat_template

REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("test_units_preference")
# 11 eval pairs, micro batch 4: on 2 ranks 6 + 5 pairs, so rank 1's last batch has a padding pair
VOCAB, N_TRAIN, N_EVAL, MICRO = 40, 7, 11, 4


def dpo_cfg(*overrides: str):
    return load_config(REPO / "configs" / "debug.yaml", ["task=dpo", "data.paths=[x.jsonl]", *overrides])


# --------------------------------------------------------------------------- records → pairs → token rows

SYSTEM = {"role": "system", "content": "Answer in one line."}
Q1 = {"role": "user", "content": "What does json.dumps do?"}
A1 = {"role": "assistant", "content": "It serializes an object to a JSON string."}
Q2 = {"role": "user", "content": "And json.loads?"}
GOOD, BAD = "It parses a JSON string into an object.", "It deletes the file."


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


# record → (the prompt messages, the chosen answer text, the rejected answer text)
RECORDS = {
    "strings": ({"prompt": Q2["content"], "chosen": GOOD, "rejected": BAD},
                [{"role": "user", "content": Q2["content"]}]),
    "explicit": ({"prompt": [SYSTEM, Q1], "chosen": [bot(A1["content"])], "rejected": [bot(BAD)]}, [SYSTEM, Q1]),
    "prompt_string": ({"prompt": Q1["content"], "chosen": [bot(GOOD)], "rejected": [bot(BAD)]},
                      [{"role": "user", "content": Q1["content"]}]),
    # implicit: the shared leading messages (an earlier assistant turn among them) are the prompt
    "implicit": ({"chosen": [SYSTEM, Q1, A1, Q2, bot(GOOD)], "rejected": [SYSTEM, Q1, A1, Q2, bot(BAD)]},
                 [SYSTEM, Q1, A1, Q2]),
}


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE as lmforge trains one, with chatml's markers as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "</s>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([m["content"] for m in (SYSTEM, Q1, A1, Q2, bot(GOOD), bot(BAD))] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="</s>", eos_token="</s>", pad_token="</s>")


def answer_runs(targets: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) runs of positions with a target."""
    on = np.concatenate([[False], targets != IGNORE, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(on))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


@pytest.mark.parametrize("template,end", [(None, "</s>"), ("chatml", "<|im_end|>")])
def test_records_to_pairs_target_the_final_answer_only(tok, template, end):
    task = tasks.get("dpo")
    cfg = dpo_cfg("data.seq_len=256", *([f"data.chat_template={template}"] if template else []))
    records = [r for r, _ in RECORDS.values()]
    rows = task.rows(cfg.data, records, lambda i: f"pairs.jsonl record {i}", LOG)
    assert [r["where"] for r in rows] == [f"pairs.jsonl record {i}" for i in range(len(records))]
    for row, (record, prompt) in zip(rows, RECORDS.values()):
        assert row["prompt"] == prompt
        chosen = record["chosen"] if isinstance(record["chosen"], str) else record["chosen"][-1]["content"]
        rejected = record["rejected"] if isinstance(record["rejected"], str) else record["rejected"][-1]["content"]
        assert row["chosen"] == [bot(chosen)] and row["rejected"] == [bot(rejected)]

    encoded = preference.encode_pairs(cfg, tok, rows, LOG)
    assert len(encoded) == len(records) and encoded.pad_id == tok.pad_token_id
    rendered = chat_template(cfg.data, tok)
    for i, (_, prompt) in enumerate(RECORDS.values()):
        starts = []
        for side in ("chosen", "rejected"):
            inputs, targets = getattr(encoded, f"{side}_inputs")[i], getattr(encoded, f"{side}_targets")[i]
            assert len(inputs) == len(targets) and inputs.dtype == targets.dtype == np.int64
            (lo, hi), = answer_runs(targets)  # one run: the final assistant turn, not the earlier one in the prompt
            answer = rows[i][side][-1]["content"]
            assert tok.decode(targets[lo:hi]) == answer + end, (i, side)
            assert targets[lo:hi - 1].tolist() == inputs[lo + 1:hi].tolist()  # shifted: target k is input k+1
            # what precedes the answer is the prompt as the template renders it with the generation prompt
            text = tok.apply_chat_template(prompt, chat_template=rendered, tokenize=False, add_generation_prompt=True)
            assert tok.decode(inputs[:lo + 1]) == text, (i, side)
            starts.append(lo)
        assert starts[0] == starts[1]
        assert encoded.chosen_inputs[i][:starts[0] + 1].tolist() == encoded.rejected_inputs[i][:starts[0] + 1].tolist()


def test_conversations_that_differ_before_the_last_turn_train_every_answer_turn(tok):
    """Implicit prompt [u, A1, u2, X] vs [u, B1, u2, X]: the answers are everything after the shared u, so
    both of their assistant turns are targets (not only X, which would make the two rows' targets equal)."""
    cfg = dpo_cfg("data.seq_len=256")
    q2 = {"role": "user", "content": "And json.loads?"}
    record = {"chosen": [Q1, bot(GOOD), q2, bot("Same.")], "rejected": [Q1, bot(BAD), q2, bot("Same.")]}
    row, = tasks.get("dpo").rows(cfg.data, [record], lambda i: f"f record {i}", LOG)
    assert row["prompt"] == [Q1] and row["chosen"] == [bot(GOOD), q2, bot("Same.")]
    encoded = preference.encode_pairs(cfg, tok, [row], LOG)
    for side, first in (("chosen", GOOD), ("rejected", BAD)):
        targets = getattr(encoded, f"{side}_targets")[0]
        runs = answer_runs(targets)
        assert [tok.decode(targets[lo:hi]) for lo, hi in runs] == [first + "</s>", "Same.</s>"], (side, runs)


def test_a_long_answer_is_cut_at_the_end_keeping_the_prompt(tok, caplog):
    L = 48
    cfg = dpo_cfg(f"data.seq_len={L}")
    long = " ".join(["It parses a JSON string into an object."] * 30)
    rows = tasks.get("dpo").rows(cfg.data, [{"prompt": "And json.loads?", "chosen": long, "rejected": BAD}],
                                 lambda i: f"f record {i}", LOG)
    full = preference.encode_pairs(dpo_cfg("data.seq_len=512"), tok, rows, LOG)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        cut = preference.encode_pairs(cfg, tok, rows, LOG)
    assert f"dpo: 1 of 2 answers with their prompt are longer than data.seq_len+1={L + 1} tokens" in caplog.text
    assert len(full.chosen_inputs[0]) > L + 1 and len(cut.chosen_inputs[0]) == L
    (lo, hi), = answer_runs(cut.chosen_targets[0])
    (full_lo, _), = answer_runs(full.chosen_targets[0])
    assert lo == full_lo < L - 4 and hi == L  # the prompt whole, the answer up to the last position
    assert cut.chosen_inputs[0].tolist() == full.chosen_inputs[0][:L].tolist()
    assert cut.chosen_targets[0].tolist() == full.chosen_targets[0][:L].tolist()
    assert long.startswith(tok.decode(cut.chosen_targets[0][lo:hi]).rstrip())
    # the short rejected answer is whole
    assert cut.rejected_inputs[0].tolist() == full.rejected_inputs[0].tolist()
    assert tok.decode(cut.rejected_targets[0][cut.rejected_targets[0] != IGNORE]) == BAD + "</s>"
    # a reward model's rows (the whole conversation) are cut to data.seq_len tokens
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        whole = preference.encode_pairs(cfg, tok, rows, LOG, shift=False)
    assert f"dpo: 1 of 2 answers with their prompt are longer than data.seq_len={L} tokens" in caplog.text
    assert whole.chosen_inputs[0].tolist() == full.chosen_inputs[0][:L].tolist()


def test_a_prompt_of_exactly_seq_len_tokens_leaves_room_only_for_a_shifted_row(tok):
    """The first answer token must be a target within the L inputs: a log-prob row (inputs ids[:-1],
    targets ids[1:]) still has it at a prompt of exactly L tokens; a reward row (inputs ids[:L]) needs
    the prompt to be at most L - 1."""
    cfg = dpo_cfg("data.seq_len=512")
    rows = tasks.get("dpo").rows(cfg.data, [{"prompt": Q2["content"], "chosen": GOOD, "rejected": BAD}],
                                 lambda i: f"f record {i}", LOG)
    (start, _), = answer_runs(preference.encode_pairs(cfg, tok, rows, LOG, shift=False).chosen_targets[0])
    at = dpo_cfg(f"data.seq_len={start}")  # the prompt is exactly data.seq_len tokens
    (lo, hi), = answer_runs(preference.encode_pairs(at, tok, rows, LOG).chosen_targets[0])
    assert (lo, hi) == (start - 1, start)  # the last input predicts the first answer token
    with pytest.raises(ConfigError, match=f"the prompt is {start} tokens, leaving no room for the answer within "
                                          f"data.seq_len={start}"):
        preference.encode_pairs(at, tok, rows, LOG, shift=False)
    (lo, hi), = answer_runs(preference.encode_pairs(dpo_cfg(f"data.seq_len={start + 1}"), tok, rows, LOG,
                                                    shift=False).chosen_targets[0])
    assert (lo, hi) == (start, start + 1)


def test_generation_stops_at_the_end_of_turn_of_the_template_the_tokenizer_carries(tok):
    """A stage that inherits its template through the tokenizer (data.chat_template unset) stops as
    one that names it."""
    from lmforge.training.tasks.sft import stop_ids

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    tok2 = copy.deepcopy(tok)  # the module's tokenizer stays template-free
    tok2.chat_template = TEMPLATES["chatml"]
    assert stop_ids(dpo_cfg().data, tok2) == [tok.eos_token_id, im_end]
    assert stop_ids(dpo_cfg("data.chat_template=chatml").data, tok) == [tok.eos_token_id, im_end]
    assert stop_ids(dpo_cfg().data, tok) == [tok.eos_token_id]


# --------------------------------------------------------------------------- malformed pairs, through prepare

def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD_PAIRS = [{"prompt": f"What does json.{f} do?", "chosen": f"json.{f} converts JSON.", "rejected": "No idea."}
              for f in ("dumps", "loads", "dump", "load")]


def _prepare(tmp_path: Path, train: list[dict], held: list[dict], *overrides: str):
    a, b = _jsonl(tmp_path / "train.jsonl", train), _jsonl(tmp_path / "eval.jsonl", held)
    cfg = dpo_cfg(f"data.paths=[{a}]", f"data.eval_paths=[{b}]", f"data.cache_dir={tmp_path / 'cache'}", *overrides)
    return a, b, (lambda: tasks.prepare(cfg, None, LOG))


def test_good_pairs_prepare(tmp_path):
    _, _, prepare = _prepare(tmp_path, GOOD_PAIRS, GOOD_PAIRS[:3])
    data = prepare()
    assert isinstance(data.train, PairExamples) and (len(data.train), len(data.eval)) == (4, 3)
    assert data.summary["task"] == "dpo" and data.labels is None
    c, r = data.eval.chosen_targets[1], data.eval.rejected_targets[1]
    assert data.tokenizer.decode(c[c != IGNORE]) == "json.loads converts JSON." + data.tokenizer.eos_token
    assert data.tokenizer.decode(r[r != IGNORE]) == "No idea." + data.tokenizer.eos_token


@pytest.mark.parametrize("template", [None, "chatml", "mistral-instruct"])
def test_reward_rows_are_the_whole_conversation_as_plain_transformers_renders_it(tmp_path, template):
    """A reward model reads its score at the last token of what it is given: its rows are the whole
    rendered conversation (not shifted as the log-prob tasks' are), and the prepared tokenizer (saved
    with every checkpoint and export) carries the template, so that a user's
    tok(tok.apply_chat_template(conversation, tokenize=False)) gives the same ids."""
    over = ["task=reward", "data.seq_len=256", *([f"data.chat_template={template}"] if template else [])]
    _, _, prepare = _prepare(tmp_path, GOOD_PAIRS, GOOD_PAIRS[:3], *over)
    data = prepare()
    tok = data.tokenizer
    assert tok.chat_template == (TEMPLATES[template] if template else BUILTIN_CHAT_TEMPLATE)
    for i, pair in enumerate(GOOD_PAIRS[:3]):
        for side in ("chosen", "rejected"):
            conversation = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair[side]}]
            text = tok.apply_chat_template(conversation, tokenize=False)
            inputs, targets = getattr(data.eval, f"{side}_inputs")[i], getattr(data.eval, f"{side}_targets")[i]
            assert inputs.tolist() == tok(text, add_special_tokens=False).input_ids, (i, side)
            (lo, hi), = answer_runs(targets)  # unshifted: target k is input k, on the answer
            assert targets[lo:hi].tolist() == inputs[lo:hi].tolist()
            assert tok.decode(targets[lo:hi]).lstrip().startswith(pair[side])
    dpo = _prepare(tmp_path, GOOD_PAIRS, GOOD_PAIRS[:3], *over[1:])[2]()  # the log-prob rows: one token shorter
    assert [len(x) + 1 for x in dpo.eval.chosen_inputs] == [len(x) for x in data.eval.chosen_inputs]


@pytest.mark.parametrize("bad,split,index,words", ids=["empty", "blank", "identical", "missing", "no_prompt", "mix",
                                                      "not_assistant", "long_prompt"], argvalues=[
    ({"prompt": "Q", "chosen": "", "rejected": "B"}, "eval", 2, "field 'chosen' is missing or empty"),
    ({"prompt": "Q", "chosen": "A", "rejected": "   "}, "train", 1, "field 'rejected': the answer is empty"),
    ({"prompt": "Q", "chosen": "Same.", "rejected": "Same."}, "eval", 2,
     "fields 'chosen' and 'rejected' are identical: the pair prefers nothing"),
    ({"prompt": "Q", "chosen": "A"}, "train", 1, "field 'rejected' is missing or empty"),
    ({"chosen": "A", "rejected": "B"}, "train", 1, "field 'prompt' (data.prompt_field) must be a string"),
    # a column of strings and one of message lists (Arrow takes no mix within a column: the record alone)
    ({"prompt": "Q", "chosen": "A", "rejected": [bot("B")]}, "eval", 0,
     "fields 'chosen' and 'rejected' must both be strings or both message lists"),
    # implicit prompt: the rejected conversation ends with the user's turn
    ({"chosen": [Q1, bot("A")], "rejected": [Q1, Q2]}, "eval", 0,
     "field 'rejected': the answer must end with an assistant message"),
    ({"prompt": " ".join(f"w{i}" for i in range(80)), "chosen": "A", "rejected": "B"}, "train", 1,
     "leaving no room for the answer within data.seq_len=64: shorten it or raise data.seq_len"),
])
def test_malformed_pair_names_file_record_and_problem(tmp_path, bad, split, index, words):
    if index == 0:
        train, held = GOOD_PAIRS, [bad]
    elif split == "train":
        train, held = GOOD_PAIRS[:index] + [bad] + GOOD_PAIRS[index:], GOOD_PAIRS
    else:
        train, held = GOOD_PAIRS, GOOD_PAIRS[:index] + [bad] + GOOD_PAIRS[index:]
    a, b, prepare = _prepare(tmp_path, train, held, "data.seq_len=64")
    with pytest.raises(ConfigError) as err:
        prepare()
    msg = str(err.value)
    assert msg.startswith(f"dpo: {a if split == 'train' else b} record {index}: "), msg
    assert words in msg and "\n" not in msg, msg


def test_content_given_as_text_parts_reads_as_sft_reads_it():
    cfg = dpo_cfg()
    parts = lambda *texts: [{"type": "text", "text": t} for t in texts]  # noqa: E731
    record = {"prompt": [{"role": "user", "content": parts("What does ", "json.dumps do?")}],
              "chosen": [{"role": "assistant", "content": parts(GOOD)}], "rejected": [bot(BAD)]}
    row, = tasks.get("dpo").rows(cfg.data, [record], lambda i: f"f record {i}", LOG)
    assert row["prompt"] == [Q1] and row["chosen"] == [bot(GOOD)]


# --------------------------------------------------------------------------- batches

def test_pair_batch_is_chosen_first_right_padded_with_the_reference():
    rows = lambda *lens: [np.arange(1, n + 1, dtype=np.int64) * k for k, n in enumerate(lens, 1)]  # noqa: E731
    ci, ri = rows(3, 5, 2), rows(4, 1, 6)
    ct = [np.where(np.arange(len(x)) > 0, x + 100, IGNORE) for x in ci]
    rt = [np.where(np.arange(len(x)) > 0, x + 200, IGNORE) for x in ri]
    ref = np.array([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])
    examples = PairExamples(ci, ct, ri, rt, pad_id=7, ref=ref)
    inputs, targets = examples.batch([2, 0])
    assert sorted(inputs) == ["attention_mask", "input_ids"] and sorted(targets) == ["labels", "ref"]
    order = [ci[2], ci[0], ri[2], ri[0]]  # 2B rows: the chosen answers, then the rejected ones, in the same order
    assert inputs["input_ids"].shape == (4, 6) and inputs["input_ids"].dtype == torch.int64
    for k, (x, t) in enumerate(zip(order, [ct[2], ct[0], rt[2], rt[0]])):
        n = len(x)
        assert inputs["input_ids"][k].tolist() == x.tolist() + [7] * (6 - n)
        assert inputs["attention_mask"][k].tolist() == [1] * n + [0] * (6 - n)
        assert targets["labels"][k].tolist() == t.tolist() + [IGNORE] * (6 - n)
    assert targets["ref"].tolist() == [[-5.0, -6.0], [-1.0, -2.0]]
    assert examples.tokens_per_row == pytest.approx((3 + 4 + 5 + 1 + 2 + 6) / 3)
    assert PairExamples(ci, ct, ri, rt, pad_id=0).batch([1])[1]["ref"] is None  # no reference pass (yet)


# ------------------------------------------------------------------ on ranks: evaluate, reference, step_metrics

class CausalTiny(torch.nn.Module):
    """A causal LM of the running mean of the embeddings: token t's logits depend on tokens ≤ t only,
    so right padding and the batch a row is in change nothing."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.size(1) + 1).view(1, -1, 1)
        return self.head(h)


class TinyScore(torch.nn.Module):
    """A reward model: a scalar of the masked mean of the embeddings, padding-invariant."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.emb, self.head = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, 1)

    def forward(self, input_ids, attention_mask=None):
        m = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).unsqueeze(-1).float()
        return self.head((self.emb(input_ids) * m).sum(1) / m.sum(1))




class Lines:
    """A log that keeps its lines."""

    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)

    warning = debug = info


def pairs(n: int, seed: int) -> PairExamples:
    """n pairs of a random prompt (2-5 tokens) and two random answers (1-6 tokens each)."""
    rng = np.random.default_rng(seed)
    out = {"chosen": ([], []), "rejected": ([], [])}
    for _ in range(n):
        prompt = rng.integers(1, VOCAB, size=int(rng.integers(2, 6)))
        for side in out:
            ids = np.concatenate([prompt, rng.integers(1, VOCAB, size=int(rng.integers(1, 7)))])
            out[side][0].append(ids[:-1])
            out[side][1].append(np.where(np.arange(len(ids) - 1) >= len(prompt) - 1, ids[1:], IGNORE))
    return PairExamples(*out["chosen"], *out["rejected"], pad_id=0)


def task_data() -> TaskData:
    return TaskData(tokenizer=None, train=pairs(N_TRAIN, 1), eval=pairs(N_EVAL, 2), vocab_size=VOCAB, eos_id=0,
                    pad_id=0)


def rank_cfg(cache_dir: str):
    return dpo_cfg(f"data.cache_dir={cache_dir}", f"train.micro_batch_size={MICRO}",
                   f"train.global_batch_size={2 * MICRO}")


def dpo_on_ranks(cache_dir: str) -> dict:
    """On each rank: the reference pass (the starting model: seed 1), evaluate and over_pairs with the
    trained model (seed 2), two training micro batches and step_metrics, the reference read back."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg, data, task, cpu = rank_cfg(cache_dir), task_data(), tasks.get("dpo"), torch.device("cpu")
    groups, log = RankGroups.of(cfg, rank, world), Lines()
    task.prepare_run(Engine(CausalTiny(1)), data, cfg, groups, cpu, log)
    out = {"ref_train": data.train.ref.copy(), "ref_eval": data.eval.ref.copy()}
    policy = CausalTiny(2)
    policy.train()
    out["eval"] = task.evaluate(Engine(policy), data, cfg, groups, cpu)
    out["mode_kept"] = policy.training

    def logps(logits, targets, n_real):
        s, n = preference.sequence_logps(logits, targets["labels"])
        b = len(s) // 2
        return [(float(s[j]), float(s[b + j]), int(n[j]), int(n[b + j])) for j in range(n_real)]
    out["over_pairs"] = preference.over_pairs(task, Engine(policy), data.eval, MICRO, groups, cpu, logps)

    # this rank's share of the training pairs in two micro batches (of different sizes)
    share = np.array_split(np.arange(N_TRAIN), world)[rank].tolist()
    out["batches"] = [share[:2], share[2:]]
    out["losses"] = []
    for indices in out["batches"]:
        kwargs, targets = task.model_inputs(*data.train.batch(indices), cpu)
        out["losses"].append(task.loss(policy(**kwargs), targets).item())
    out["step"], out["step_again"] = task.step_metrics(), task.step_metrics()

    reward = tasks.get("reward")  # no reference, no log-probs: its own metrics
    reward.prepare_run(Engine(TinyScore()), data, cfg, groups, cpu, log)
    out["reward_eval"] = reward.evaluate(Engine(TinyScore()), data, cfg, groups, cpu)

    # again with the same pairs: read from the cache (a different model proves it is not recomputed)
    again = task_data()
    task.prepare_run(Engine(CausalTiny(3)), again, cfg, groups, cpu, log)
    out["ref_read"] = np.concatenate([again.train.ref, again.eval.ref])
    # one token of one eval pair changed: another key, computed anew
    changed = task_data()
    changed.eval.chosen_inputs[3] = changed.eval.chosen_inputs[3].copy()
    changed.eval.chosen_inputs[3][0] = (changed.eval.chosen_inputs[3][0] + 1) % VOCAB
    task.prepare_run(Engine(CausalTiny(1)), changed, cfg, groups, cpu, log)
    out["ref_changed"] = np.concatenate([changed.train.ref, changed.eval.ref])
    out["log"] = log.lines
    torch.distributed.barrier()  # rank 0 writes the cache file after the pass; the others do not wait for it
    out["files"] = sorted(p.name for p in (Path(cache_dir) / "reference_logps").iterdir())
    return out


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache1")
    return run_ranks(dpo_on_ranks, 1, str(cache))[0], cache


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache2")
    return run_ranks(dpo_on_ranks, 2, str(cache)), cache


def plain_logps(model, examples: PairExamples) -> np.ndarray:
    """(n, 2) summed log-probs of each pair's chosen and rejected answer, one row at a time."""
    out = []
    with torch.no_grad():
        for i in range(len(examples)):
            row = []
            for inputs, targets in ((examples.chosen_inputs[i], examples.chosen_targets[i]),
                                    (examples.rejected_inputs[i], examples.rejected_targets[i])):
                lp = F.log_softmax(model(torch.from_numpy(inputs)[None])[0].double(), -1)
                keep = targets != IGNORE
                row.append(lp[torch.from_numpy(np.flatnonzero(keep)), torch.from_numpy(targets[keep])].sum().item())
            out.append(row)
    return np.array(out)


def plain_dpo(examples: PairExamples, beta: float) -> dict[str, np.ndarray]:
    """Per-pair DPO (sigmoid) values by hand: policy seed 2 against reference seed 1."""
    pol, ref = plain_logps(CausalTiny(2), examples), plain_logps(CausalTiny(1), examples)
    rc, rr = beta * (pol[:, 0] - ref[:, 0]), beta * (pol[:, 1] - ref[:, 1])
    return {"loss": np.log1p(np.exp(-(rc - rr))), "accuracy": (pol[:, 0] > pol[:, 1]).astype(float),
            "reward_accuracy": (rc > rr).astype(float), "reward_margin": rc - rr, "chosen_reward": rc,
            "rejected_reward": rr, "chosen_logp": pol[:, 0], "rejected_logp": pol[:, 1], "pol": pol, "ref": ref}


def test_evaluate_and_over_pairs_on_two_ranks_equal_one_rank_and_a_plain_loop(one_rank, two_ranks):
    (r0, r1), (one, _) = two_ranks[0], one_rank
    beta = rank_cfg("x").dpo.beta
    want = plain_dpo(task_data().eval, beta)
    assert 0 < want["accuracy"].mean() < 1 and 0 < want["reward_accuracy"].mean() < 1  # the metrics can tell
    keys = ["loss", "accuracy", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
            "chosen_logp", "rejected_logp"]
    assert list(one["eval"]) == [f"eval/{k}" for k in keys] == list(tasks.get("dpo").metrics(rank_cfg("x")))
    assert r0["eval"] == r1["eval"]  # the same on every rank
    for k in keys:  # float32 log-probs: batching moves their last bits
        assert r0["eval"][f"eval/{k}"] == pytest.approx(one["eval"][f"eval/{k}"], rel=1e-6, abs=1e-6), k
        assert r0["eval"][f"eval/{k}"] == pytest.approx(want[k].mean(), rel=1e-5, abs=1e-6), k
    assert r0["mode_kept"] and r1["mode_kept"] and one["mode_kept"]
    # every pair's values, in order, on every rank (the padding pair of rank 1 left out)
    assert r0["over_pairs"] == r1["over_pairs"] and len(r0["over_pairs"]) == N_EVAL
    got = np.array(r0["over_pairs"])
    np.testing.assert_allclose(got[:, :2], np.array(one["over_pairs"])[:, :2], rtol=1e-6)
    np.testing.assert_allclose(got[:, :2], want["pol"], rtol=1e-5)
    ev = task_data().eval
    assert got[:, 2].tolist() == [int((t != IGNORE).sum()) for t in ev.chosen_targets]
    assert got[:, 3].tolist() == [int((t != IGNORE).sum()) for t in ev.rejected_targets]


def test_reward_evaluate_on_two_ranks_equals_one_rank_and_a_plain_loop(one_rank, two_ranks):
    (r0, r1), (one, _) = two_ranks[0], one_rank
    model, ev = TinyScore(), task_data().eval
    with torch.no_grad():
        sc, sr = (np.array([model(torch.from_numpy(x)[None]).item() for x in rows])
                  for rows in (ev.chosen_inputs, ev.rejected_inputs))
    want = {"loss": np.log1p(np.exp(-(sc - sr))).mean(), "accuracy": (sc > sr).mean(),
            "reward_margin": (sc - sr).mean(), "chosen_reward": sc.mean(), "rejected_reward": sr.mean()}
    assert 0 < want["accuracy"] < 1
    assert r0["reward_eval"] == r1["reward_eval"]
    assert list(r0["reward_eval"]) == [f"eval/{k}" for k in want] == list(tasks.get("reward").metrics(rank_cfg("x")))
    for k, value in want.items():
        assert r0["reward_eval"][f"eval/{k}"] == pytest.approx(one["reward_eval"][f"eval/{k}"], rel=1e-6, abs=1e-6), k
        assert r0["reward_eval"][f"eval/{k}"] == pytest.approx(value, rel=1e-5, abs=1e-6), k


def test_cached_reference_writes_reads_and_keys_by_data(one_rank, two_ranks):
    data = task_data()
    ref = np.concatenate([plain_logps(CausalTiny(1), data.train), plain_logps(CausalTiny(1), data.eval)])
    for outs, cache in ((two_ranks[0], two_ranks[1]), ([one_rank[0]], one_rank[1])):
        key = preference.reference_key(rank_cfg(str(cache)), data)
        path = cache / "reference_logps" / f"{key}.npy"
        assert path.is_file()
        np.testing.assert_allclose(np.load(path), ref, rtol=1e-5)
        for out in outs:
            assert out["ref_train"].shape == (N_TRAIN, 2) and out["ref_eval"].shape == (N_EVAL, 2)
            np.testing.assert_allclose(np.concatenate([out["ref_train"], out["ref_eval"]]), ref, rtol=1e-5)
            np.testing.assert_array_equal(out["ref_read"], np.load(path))  # read back, not recomputed by seed 3
            assert f"reference log-probs of {N_TRAIN + N_EVAL} pairs computed in" in out["log"][1]
            assert f"reference log-probs of {N_TRAIN + N_EVAL} pairs read from {path}" in out["log"][3]
            assert "computed in" in out["log"][5] and len(out["files"]) == 2 and path.name in out["files"]
            changed = out["ref_changed"]  # only pair N_TRAIN + 3's chosen answer has another value
            assert changed[N_TRAIN + 3, 0] != pytest.approx(ref[N_TRAIN + 3, 0])
            np.testing.assert_allclose(np.delete(changed, N_TRAIN + 3, 0), np.delete(ref, N_TRAIN + 3, 0), rtol=1e-5)


def test_reference_key_follows_weights_config_and_data(tmp_path):
    cfg, data = dpo_cfg(), task_data()
    assert preference.weight_files(cfg) == []
    key = preference.reference_key(cfg, data)
    assert preference.reference_key(cfg, task_data()) == key  # a fresh tokenization of the same pairs
    for split, field in (("train", "rejected_targets"), ("eval", "chosen_inputs")):
        other = task_data()
        rows = getattr(getattr(other, split), field)
        rows[2] = rows[2].copy()
        rows[2][-1] = (rows[2][-1] + 1) % VOCAB  # one token
        assert preference.reference_key(cfg, other) != key, (split, field)
    assert preference.reference_key(dpo_cfg("model.overrides={num_hidden_layers: 1}"), data) != key
    # model.path: the weight files' contents
    (tmp_path / "model.safetensors").write_bytes(bytes(64))
    (tmp_path / "notes.txt").write_text("not weights")
    on_path = dpo_cfg(f"model.path={tmp_path}", "model.preset=null")
    assert preference.weight_files(on_path) == [tmp_path / "model.safetensors"]
    first = preference.reference_key(on_path, data)
    assert first != key and preference.reference_key(on_path, data) == first
    (tmp_path / "notes.txt").write_text("other notes")
    assert preference.reference_key(on_path, data) == first
    (tmp_path / "model.safetensors").write_bytes(bytes(63) + b"\x01")  # same size, one byte changed
    assert preference.reference_key(on_path, data) != first


def test_step_metrics_are_all_reduced_means_of_the_pairs(one_rank, two_ranks):
    beta = rank_cfg("x").dpo.beta
    want = plain_dpo(task_data().train, beta)
    outs = two_ranks[0] + [one_rank[0]]
    assert sorted(i for out in two_ranks[0] for b in out["batches"] for i in b) == list(range(N_TRAIN))
    keys = ["accuracy", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
            "rejected_logp"]
    for out in outs:
        assert list(out["step"]) == [f"train/{k}" for k in keys]
        for k in keys:  # the mean over all 7 pairs of both ranks' micro batches
            assert out["step"][f"train/{k}"] == pytest.approx(want[k].mean(), rel=1e-5, abs=1e-6), k
        assert out["step_again"] == {}
        for indices, loss in zip(out["batches"], out["losses"]):  # loss(): the mean over the batch's pairs
            assert loss == pytest.approx(want["loss"][indices].mean(), rel=1e-5)
    assert two_ranks[0][0]["step"] == two_ranks[0][1]["step"]


def test_a_reward_model_whose_config_names_another_pad_scores_padded_rows_as_unpadded(tmp_path):
    """A model directory whose config.json names a pad id other than the tokenizer's (the id the
    batches are padded with): the built reward model pools by the tokenizer's, so a right-padded row
    is scored at its own last token, as alone; its embedding keeps the checkpoint's padding_idx; a
    causal LM keeps its own pad id."""
    from transformers import LlamaConfig

    from lmforge.training.model import build, hf_config

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, pad_token_id=7).save_pretrained(tmp_path)
    model_cfg = dpo_cfg(f"model.path={tmp_path}", "model.pretrained=false").model

    def built(task, labels):
        torch.manual_seed(0)
        return build(model_cfg, hf_config(model_cfg, 64, 3, labels=labels), {"zero_optimization": {"stage": 0}},
                     "eager", torch.float32, task=task, pad_id=3).eval()

    assert built("dpo", None).config.pad_token_id == 7
    model = built("reward", ["reward"])
    assert model.config.pad_token_id == 3 and model.config.num_labels == 1
    assert model.get_input_embeddings().padding_idx == 7
    short, long = [10, 11, 12], [20, 21, 22, 23, 24, 25]
    batch = PairExamples([np.array(short)], [np.array(short)], [np.array(long)], [np.array(long)], pad_id=3)
    inputs, _ = batch.batch([0])
    with torch.no_grad():
        padded = model(**inputs).logits[:, 0]
        alone = [model(input_ids=torch.tensor([r])).logits[0, 0] for r in (short, long)]
    assert inputs["input_ids"][0].tolist() == short + [3] * 3
    assert torch.allclose(padded, torch.stack(alone), atol=1e-6), (padded, alone)
