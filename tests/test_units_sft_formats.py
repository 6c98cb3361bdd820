"""SFT record shapes and chat templates, in process (no ranks, no hub): alpaca / ShareGPT / OpenAI
messages → conversations, detection from the first record's keys, bad records → ConfigError naming
the file, record and field; the named chat templates (chatml, llama-3, mistral-instruct): transformers'
assistant mask equals the prefix-rendering mask and covers exactly each answer and its end-of-turn token.

    PYTHONPATH=.pkg python -m pytest -q tests/test_units_sft_formats.py
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lmforge.training.chat_templates import TEMPLATES
from lmforge.training.config import ConfigError, load_config
from lmforge.training.tasks import common, sft

REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("test_units_sft_formats")

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]"]
CHAT = [{"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "content": "It serializes an object to a JSON string."},
        {"role": "user", "content": "And json.loads?"},
        {"role": "assistant", "content": "It parses a JSON string into an object."}]


def data_cfg(*overrides: str):
    return load_config(REPO / "configs" / "sft.yaml", ["data.paths=[x.jsonl]", *overrides]).data


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE (as lmforge trains one) with the templates' special tokens as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([m["content"] for m in CHAT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="</s>")


# --------------------------------------------------------------------------- record shapes

def test_each_schema_converts_to_a_conversation():
    cfg = data_cfg()
    user, bot = {"role": "user"}, {"role": "assistant"}
    assert sft.alpaca_rows(cfg, {"instruction": "Add.", "input": None, "output": "3"}) == [
        {**user, "content": "Add."}, {**bot, "content": "3"}]
    assert sft.alpaca_rows(cfg, {"instruction": "Add.", "input": "1 2", "output": "3", "system": "Be exact."}) == [
        {"role": "system", "content": "Be exact."}, {**user, "content": "Add.\n\n1 2"}, {**bot, "content": "3"}]
    share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                               {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                               {"from": "gpt", "value": "A2"}]}
    assert [(m["role"], m["content"]) for m in sft.sharegpt_rows(cfg, share)] == [
        ("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    top_system = {"conversations": share["conversations"][1:3], "system": "S"}  # LLaMA-Factory's column
    assert [m["role"] for m in sft.sharegpt_rows(cfg, top_system)] == ["system", "user", "assistant"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "!"}]},
             {"role": "assistant", "content": "A"}]
    assert sft.messages_rows(cfg, {"messages": CHAT}) == CHAT
    assert sft.messages_rows(cfg, {"messages": parts})[0] == {"role": "user", "content": "Q!"}
    # prompt/response records read as they always were
    assert sft.record_messages(cfg, {"prompt": "Q", "response": "A"}) == [{**user, "content": "Q"},
                                                                           {**bot, "content": "A"}]


@pytest.mark.parametrize("record,schema", [
    ({"instruction": "I", "input": "", "output": "O"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "sharegpt"),
    ({"messages": CHAT, "prompt": None}, "prompt"),  # messages first, prompt/response where a record lacks them
    ({"prompt": "Q", "response": "A", "messages": None}, "prompt")])
def test_detection_from_the_first_record(record, schema):
    cfg = data_cfg()
    assert sft.detect_schema(cfg, record) == schema
    out = sft.conversations(cfg, [record], lambda i: f"f record {i}")
    assert out == [{"messages": sft.SCHEMAS[schema](cfg, record)}]
    assert out[0]["messages"][-1]["role"] == "assistant"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_records_name_file_record_and_field(tmp_path):
    """Through the loader: two files, the bad record is the second file's record 1."""
    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    bad = {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}
    a = _jsonl(tmp_path / "a.jsonl", [good] * 3)
    b = _jsonl(tmp_path / "b.jsonl", [good, bad])
    cfg = load_config(REPO / "configs" / "sft.yaml", [f"data.paths=[{a},{b}]", f"data.eval_paths=[{a}]",
                                                      f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError) as err:
        sft.TASK.prepare(cfg, None, LOG)
    msg = str(err.value)
    assert f"{b} record 1: field 'conversations[1].from' is 'bot'" in msg and "\n" not in msg, msg
    ok_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"paths": [str(a)], "format": "sharegpt"})})
    train, held = common.load_splits(ok_cfg, LOG, lambda r, where: sft.conversations(ok_cfg.data, r, where))
    assert len(train) == 3 and train[0]["messages"][1] == {"role": "assistant", "content": "A"}

    d = data_cfg("data.format=alpaca")
    where = lambda i: f"x.jsonl record {i}"  # noqa: E731
    for rows, words in (([{"instruction": "I", "output": "O"}, {"instruction": "I", "output": ""}],
                         "x.jsonl record 1: field 'output' is missing or empty"),
                        ([{"instruction": 3, "output": "O"}], "record 0: field 'instruction' is a int, not a string")):
        with pytest.raises(ConfigError, match=words):
            sft.conversations(d, rows, where)
    with pytest.raises(ConfigError, match=r"record 0: field 'messages\[1\].role' is missing"):
        sft.conversations(data_cfg("data.format=messages"), [{"messages": [CHAT[1], {"content": "A"}]}], where)
    with pytest.raises(ConfigError, match="record 0: no assistant response"):
        sft.conversations(data_cfg("data.format=messages"), [{"messages": CHAT[:2]}], where)
    with pytest.raises(ConfigError, match="conversation schema for task=sft"):
        load_config(REPO / "configs" / "debug.yaml", ["data.format=alpaca"])


# --------------------------------------------------------------------------- chat templates and masks

def runs(tok, ids, mask) -> list[str]:
    """The decoded runs of consecutive masked tokens."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            out.append(cur)
            cur = []
    return [tok.decode(r) for r in out + ([cur] if cur else [])]


@pytest.mark.parametrize("name,eot", [("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>"),
                                      ("mistral-instruct", "</s>")])
def test_named_template_mask(tok, name, eot):
    """System + two turns render; transformers' {% generation %} mask == the prefix-rendering mask ==
    each answer's tokens and the token that ends the turn."""
    template = sft.chat_template(data_cfg(f"data.chat_template={name}"), tok)
    assert template == TEMPLATES[name] and sft.GENERATION_TAG.search(template)
    ids, mask = sft.sft_tokens(tok, template, CHAT)             # transformers' assistant mask
    p_ids, p_mask = sft.prefix_tokens(tok, template, CHAT)      # the prefix-rendering method
    assert ids.tolist() == p_ids.tolist() and mask.tolist() == p_mask.tolist()
    assert [r.strip() for r in runs(tok, ids, mask)] == [CHAT[2]["content"] + eot, CHAT[4]["content"] + eot]
    text = tok.decode(ids)
    assert CHAT[0]["content"] in text and text.count(eot) >= 2
    prompt = tok.apply_chat_template(CHAT[:4], chat_template=template, tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)  # the generation prompt is what precedes the answer


def test_jinja_file_and_inline_templates(tok, tmp_path):
    """data.chat_template as a file (with generation markers: transformers' mask) and inline (none: prefix method)."""
    marked = ("{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] + eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{{ '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    path = tmp_path / "t.jinja"
    path.write_text(marked)
    assert sft.chat_template(data_cfg(f"data.chat_template={path}"), tok) == marked
    plain = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert sft.chat_template(data_cfg().model_copy(update={"chat_template": plain}), tok) == plain
    answers = [CHAT[2]["content"] + "</s>", CHAT[4]["content"] + "</s>"]
    for template in (marked, plain):
        ids, mask = sft.sft_tokens(tok, template, CHAT)
        assert [r.strip() for r in runs(tok, ids, mask)] == answers
