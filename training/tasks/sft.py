"""Supervised fine-tuning on conversations: records in one of the SCHEMAS (OpenAI `messages`, alpaca,
ShareGPT, `prompt`/`response`; data.format or detected), rendered with the chat template (a named
one of training/chat_templates.py, a Jinja file or text, the tokenizer's, or BUILTIN_CHAT_TEMPLATE);
the loss is on assistant tokens only. Metrics: response perplexity and BLEU (sacrebleu) of greedy
answers to eval.generate held-out prompts.

    lmforge train configs/debug.yaml --nproc 2     # a base model in runs/debug, then:
    lmforge train configs/sft.yaml --nproc 2
    lmforge train configs/sft.yaml --nproc 2 data.paths=[alpaca.json] data.eval_paths=[] data.chat_template=chatml

With data.packing several records share one row: position_ids restart at every record, which
transformers turns into a block-diagonal causal mask (attention never crosses a record; it does so
only without a KV cache, hence model.build's use_cache=False), and each record's targets are its
own, so no loss predicts the next record's first token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config, ConfigError, DataConfig
from .common import IGNORE, RecordTask, TaskData, gather, pad

if TYPE_CHECKING:
    import numpy as np
    import torch

# Used when the tokenizer has no chat template and data.chat_template is unset. The assistant turn
# ends with the EOS token, so the model learns to stop; its content and EOS are the trained span.
BUILTIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")

# What transformers looks for before it returns an assistant mask (utils/chat_template_utils.py).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class CausalExamples:
    """SFT rows: each is one or more records (packed); inputs/targets already shifted by one."""
    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    positions: list[np.ndarray]
    pad_id: int
    seq_len: int
    # eval split: the conversations eval.generate prompts come from (read with their own source's fields, so
    # a mixture's sources may name their columns differently)
    conversations: list[list[dict]] = field(default_factory=list)

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens of a row, padding excluded (throughput counts these)."""
        import numpy as np

        return float(np.mean([len(x) for x in self.inputs]))

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, indices) -> tuple[dict, torch.Tensor]:
        import numpy as np
        import torch

        rows = list(indices)
        n = max(len(self.inputs[i]) for i in rows)
        positions = np.zeros((len(rows), n), dtype=np.int64)
        for j, i in enumerate(rows):
            p = self.positions[i]
            positions[j, :len(p)] = p
            # padding counts up from 0 after the last record: its own "record", attended by nobody else
            positions[j, len(p):] = np.arange(n - len(p))
        return ({"input_ids": pad([self.inputs[i] for i in rows], self.pad_id),
                 "position_ids": torch.from_numpy(positions)},
                pad([self.targets[i] for i in rows], IGNORE))


# --------------------------------------------------------------------------- record shapes → conversations

class RowError(ValueError):
    """A record that does not fit its schema: the field (e.g. conversations[2].from) and why."""
    def __init__(self, field_name: str, why: str):
        super().__init__(f"field {field_name!r} {why}")


def _text(r: dict, key: str, required: bool = True, where: str | None = None) -> str:
    """r[key] as a string; a required one must be non-empty. Content given as OpenAI's list of
    {type: text, text} parts is joined."""
    v = r.get(key)
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in v):
        v = "".join(str(p.get("text") or "") for p in v)
    if v is None or v == "":
        if required:
            raise RowError(where or key, "is missing or empty")
        return ""
    if not isinstance(v, str):
        raise RowError(where or key, f"is a {type(v).__name__}, not a string")
    return v


def _turns(r: dict, key: str) -> list:
    v = r.get(key)
    if not isinstance(v, list) or not v:
        raise RowError(key, "is not a non-empty list of messages")
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise RowError(f"{key}[{i}]", f"is a {type(m).__name__}, not an object")
    return v


def messages_rows(cfg: DataConfig, r: dict) -> list[dict]:
    """OpenAI chat: data.messages_field = [{role, content}, ...] (system, multi-turn); other keys of a
    message (name, ...) stay for the template."""
    key = cfg.messages_field
    out = []
    for i, m in enumerate(_turns(r, key)):
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise RowError(f"{key}[{i}].role", "is missing (system, user or assistant)")
        out.append({**m, "role": role, "content": _text(m, "content", role == "assistant", f"{key}[{i}].content")})
    return out


def prompt_rows(cfg: DataConfig, r: dict) -> list[dict]:
    """data.prompt_field / data.response_field as one exchange, or data.messages_field where a record has it."""
    if r.get(cfg.messages_field) is not None:
        return messages_rows(cfg, r)
    prompt, response = r.get(cfg.prompt_field), r.get(cfg.response_field)
    if not prompt or not response:
        raise RowError(cfg.prompt_field if not prompt else cfg.response_field,
                       f"must be non-empty: a record has neither {cfg.messages_field!r} nor a non-empty "
                       f"{cfg.prompt_field!r} and {cfg.response_field!r} (keys: {sorted(r)})")
    return [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}]


def alpaca_rows(cfg: DataConfig, r: dict) -> list[dict]:
    """Alpaca: instruction, optional input (the user turn is instruction, a blank line, input), output,
    optional system."""
    instruction, extra = _text(r, "instruction"), _text(r, "input", required=False)
    output, system = _text(r, "output"), _text(r, "system", required=False)
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                   {"role": "assistant", "content": output}]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_rows(cfg: DataConfig, r: dict) -> list[dict]:
    """ShareGPT: conversations = [{from: human|gpt|system, value}, ...]; a top-level `system` string
    (LLaMA-Factory's variant) becomes the first message when the conversation has none."""
    msgs = []
    for i, m in enumerate(_turns(r, "conversations")):
        role = SHAREGPT_ROLES.get(m.get("from"))  # type: ignore[arg-type]
        if role is None:
            raise RowError(f"conversations[{i}].from", f"is {m.get('from')!r}, not one of {', '.join(SHAREGPT_ROLES)}")
        msgs.append({"role": role, "content": _text(m, "value", role == "assistant", f"conversations[{i}].value")})
    system = _text(r, "system", required=False)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


# data.format (or the detected shape) → the function turning one record into [{role, content}, ...]
SCHEMAS = {"messages": messages_rows, "alpaca": alpaca_rows, "sharegpt": sharegpt_rows, "prompt": prompt_rows}


def detect_schema(cfg: DataConfig, first: dict) -> str:
    """The schema of records whose data.format names a file type: from the first record's keys
    (keys with a value: datasets gives every record every column of its file)."""
    keys = {k for k, v in first.items() if v is not None}
    if cfg.messages_field in keys:
        return "prompt"  # messages, with prompt/response for records without them (as before formats)
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return "prompt"


def conversations(cfg: DataConfig, records: list[dict], where: Callable[[int], str], log=None) -> list[dict]:
    """Records of one file set → {data.messages_field: conversation} records; where(i) names record
    i (file and index) in the ConfigError of a record that does not fit."""
    from ..config import ROW_SCHEMAS

    schema = cfg.format if cfg.format in ROW_SCHEMAS else detect_schema(cfg, records[0])
    if log is not None:
        how = "" if cfg.format in ROW_SCHEMAS else f", detected from the keys of {where(0)}"
        log.info(f"sft: {len(records)} records read as {schema} (data.format={cfg.format}{how})")
    to_messages = SCHEMAS[schema]
    out = []
    for i, r in enumerate(records):
        try:
            msgs = to_messages(cfg, r)
        except RowError as e:
            raise ConfigError(f"sft: {where(i)}: {e} (data.format={cfg.format}, read as {schema})") from None
        if not any(m["role"] == "assistant" and m["content"] for m in msgs):
            raise ConfigError(f"sft: {where(i)}: no assistant response to learn (data.format={cfg.format}, "
                              f"read as {schema}): {json.dumps(msgs)[:200]}")
        out.append({cfg.messages_field: msgs})
    return out


def record_messages(cfg: DataConfig, r: dict) -> list[dict]:
    """A record's conversation: its data.messages_field, or data.prompt_field/response_field as two turns
    (records that `conversations` made, or written so)."""
    try:
        msgs = prompt_rows(cfg, r)
    except RowError as e:
        raise ConfigError(f"sft: a record does not fit: {e}") from None
    if not any(m.get("role") == "assistant" and m.get("content") for m in msgs):
        raise ConfigError(f"sft: a record has no assistant response to learn: {json.dumps(msgs)[:200]}")
    return msgs


# --------------------------------------------------------------------------- chat templates and masks

def chat_template(cfg: DataConfig, tok) -> str:
    """data.chat_template as a name (training/chat_templates.py), a file or inline Jinja; else the
    tokenizer's, else BUILTIN_CHAT_TEMPLATE."""
    from ..chat_templates import TEMPLATES

    if cfg.chat_template:
        if cfg.chat_template in TEMPLATES:
            return TEMPLATES[cfg.chat_template]
        p = Path(cfg.chat_template).expanduser()
        return p.read_text() if p.is_file() else cfg.chat_template
    return tok.chat_template or BUILTIN_CHAT_TEMPLATE


def _apply(tok, template: str, msgs: list[dict], **kwargs):
    try:
        return tok.apply_chat_template(msgs, chat_template=template, **kwargs)
    except Exception as e:  # jinja errors of every kind
        raise ConfigError(f"sft: the chat template cannot render {json.dumps(msgs)[:200]}: {e}") from None


def render(tok, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (as the template
    writes them, e.g. with EOS), found by rendering each prefix: the span of assistant turn i runs
    from the end of render(messages[:i], add_generation_prompt) to the end of render(messages[:i+1])."""
    def text(msgs, gen):
        return _apply(tok, template, msgs, tokenize=False, add_generation_prompt=gen)

    full = text(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start, end = len(text(messages[:i], True)), len(text(messages[:i + 1], False))
        head = text(messages[:i + 1], False)
        if not full.startswith(head) or not full[start:end].count(str(m["content"]).strip()):
            raise ConfigError("sft: the chat template does not render conversations prefix by prefix, so the "
                              "assistant tokens cannot be located; set data.chat_template")
        while end > start and full[end - 1].isspace():
            end -= 1  # the separator after a turn is the template's, not the answer's
        spans.append((start, end))
    return full, spans


def prefix_tokens(tok, template: str, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, trainable) from render's prefix spans: trainable[k] says token k overlaps an assistant turn."""
    import numpy as np

    full, spans = render(tok, template, messages)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    train = np.array([any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]], dtype=bool)
    return np.asarray(enc["input_ids"], dtype=np.int64), train


def sft_tokens(tok, template: str, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, trainable) where trainable[k] says token k lies in an assistant turn: transformers'
    assistant mask where the template marks `{% generation %}`, render's prefix spans otherwise."""
    import numpy as np

    if not GENERATION_TAG.search(template):
        return prefix_tokens(tok, template, messages)
    out = _apply(tok, template, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return np.asarray(out["input_ids"], dtype=np.int64), np.asarray(out["assistant_masks"], dtype=bool)


def encode(cfg: Config, tok, records: list[dict], log) -> CausalExamples:
    """Records → rows of ≤ data.seq_len tokens (several records per row with data.packing), targets
    only on assistant tokens."""
    import numpy as np

    template = chat_template(cfg.data, tok)
    L = cfg.data.seq_len
    pieces, truncated = [], 0
    for r in records:
        ids, trainable = sft_tokens(tok, template, record_messages(cfg.data, r))
        if len(ids) > L + 1:
            ids, trainable = ids[:L + 1], trainable[:L + 1]
            truncated += 1
        target = np.where(trainable[1:], ids[1:], IGNORE)
        if (target != IGNORE).any():
            pieces.append((ids[:-1], target))
    if truncated:
        log.warning(f"sft: {truncated} of {len(records)} records are longer than data.seq_len+1={L + 1} tokens "
                    "and were truncated")
    if not pieces:
        raise ConfigError("sft: no record keeps a response token within data.seq_len")
    rows: list[list[int]] = []
    if cfg.data.packing:  # greedy, in record order (deterministic): a row takes records while they fit
        used = L + 1
        for k, (inp, _) in enumerate(pieces):
            if used + len(inp) > L:
                rows.append([])
                used = 0
            rows[-1].append(k)
            used += len(inp)
    else:
        rows = [[k] for k in range(len(pieces))]
    inputs = [np.concatenate([pieces[k][0] for k in row]) for row in rows]
    targets = [np.concatenate([pieces[k][1] for k in row]) for row in rows]
    positions = [np.concatenate([np.arange(len(pieces[k][0])) for k in row]) for row in rows]
    return CausalExamples(inputs, targets, positions, tok.pad_token_id, L)


class Sft(RecordTask):
    name = "sft"
    recipe = "configs/sft.yaml"
    headline = "eval/ppl"
    causal = True
    auto_model = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    mixtures = True

    def metrics(self, cfg: Config) -> tuple[str, ...]:
        return ("eval/loss", "eval/ppl", "eval/bleu") if cfg.eval.generate else ("eval/loss", "eval/ppl")

    def texts(self, cfg: DataConfig, records: list[dict]):
        for r in records:
            msgs = r.get(cfg.messages_field) or [{"content": r.get(cfg.prompt_field, "")},
                                                  {"content": r.get(cfg.response_field, "")}]
            yield "\n".join(str(m.get("content", "")) for m in msgs)

    def rows(self, cfg: DataConfig, records: list[dict], where: Callable[[int], str], log) -> list[dict]:
        return conversations(cfg, records, where, log)

    def template(self, cfg: DataConfig, tok) -> str:
        return chat_template(cfg, tok)

    def examples(self, cfg: Config, tok, train: list[dict], held: list[dict], log):
        tr, ev = encode(cfg, tok, train, log), encode(cfg, tok, held, log)
        ev.conversations = [record_messages(cfg.data, r) for r in held]
        log.info(f"sft: {len(train)} training records in {len(tr)} rows of ≤{cfg.data.seq_len} tokens "
                 f"({'packed' if cfg.data.packing else 'one per row'}), {len(held)} eval records")
        return tr, ev, None

    def concat(self, parts: list[CausalExamples]) -> CausalExamples:
        return CausalExamples([x for p in parts for x in p.inputs], [x for p in parts for x in p.targets],
                              [x for p in parts for x in p.positions], parts[0].pad_id, parts[0].seq_len,
                              [c for p in parts for c in p.conversations])

    def scores(self, engine, data: TaskData, cfg: Config, groups, device, loss, predictions):
        out = {"eval/ppl": math.exp(min(loss, 50.0))}  # of the responses
        if cfg.eval.generate:
            out["eval/bleu"] = generation_bleu(engine, data, cfg, groups.dp_rank, groups.dp_size, device)
        return out


TASK = Sft()


def generation_bleu(engine, data: TaskData, cfg: Config, dp_rank: int, dp_size: int, device) -> float:
    """Greedy answers to the first eval.generate held-out prompts, scored with sacrebleu."""
    import torch

    tok, template = data.tokenizer, chat_template(cfg.data, data.tokenizer)
    jobs = []  # (prompt ids, reference)
    for msgs in data.eval.conversations[:cfg.eval.generate]:
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
        prompt = tok.apply_chat_template(msgs[:last], chat_template=template, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"][-(cfg.data.seq_len - cfg.eval.max_new_tokens):]
        jobs.append((ids, str(msgs[last]["content"])))
    per_rank = -(-len(jobs) // dp_size)
    mine = list(range(dp_rank * per_rank, min(len(jobs), (dp_rank + 1) * per_rank)))
    zero3 = engine.zero_optimization_stage() == 3
    answers = []
    for k in range(per_rank):  # the same number of generate calls on every rank (ZeRO-3 gathers in each)
        j = mine[k] if k < len(mine) else (mine[0] if mine else 0)
        ids = torch.tensor([jobs[j][0]], device=device)
        out = engine.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=cfg.eval.max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=stop_ids(cfg.data, tok), synced_gpus=zero3 and dp_size > 1)
        if k < len(mine):
            answers.append((j, tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()))
    gathered = sorted(a for part in gather(answers) for a in part)
    return bleu([a for _, a in gathered], [jobs[j][1] for j, _ in gathered])


def stop_ids(cfg: DataConfig, tok) -> list[int]:
    """The tokens generation stops at: EOS, and a named template's end-of-turn token where the
    tokenizer has it as one token (chatml's <|im_end|>, llama-3's <|eot_id|>). The template is the
    one the run renders with, by its text: named in data.chat_template or carried by the tokenizer
    (an earlier stage saved it there)."""
    from ..chat_templates import END_OF_TURN, TEMPLATES

    ids = [tok.eos_token_id]
    template = chat_template(cfg, tok)
    eot = next((END_OF_TURN.get(name) for name, text in TEMPLATES.items() if text == template), None)
    if eot and eot in tok.get_vocab():
        ids.append(tok.convert_tokens_to_ids(eot))
    return ids


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of hypotheses against one reference each, sacrebleu's defaults (13a
    tokenization, exponential smoothing), so scores compare with published sacrebleu numbers.

    Corpus BLEU pools n-gram counts over all sentences: a corpus made only of sentences shorter
    than 4 tokens has no 4-grams and scores 0 even when every hypothesis is exact. sacrebleu is
    imported here: only runs that score generations need it."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("bleu: no hypotheses")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
