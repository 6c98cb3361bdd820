"""What the preference tasks (dpo, orpo, reward) share: pair records → token rows, batches of
[chosen..., rejected...], the per-pair terms each task's loss is made of, the reference pass, and
an evaluation over every held-out pair.

    python -m lmforge.training.embedded preference /tmp/pref       # pairs built from the stdlib
    lmforge train configs/dpo.yaml --nproc 2                        # after configs/sft_pref.yaml

Records (TRL's formats): `prompt` (data.prompt_field) / `chosen` / `rejected` strings; or `chosen` /
`rejected` message lists with a `prompt` message list (or string), or without one (the shared
leading messages are the prompt). Every pair is rendered with the run's chat template (the SFT
ones: sft.chat_template), the loss counts the final assistant turn only. A malformed pair (empty
answer, chosen identical to rejected, a prompt that leaves no room within data.seq_len) is a
ConfigError naming its file and record, in preflight.

The losses are TRL's formulas (tests/test_units_preference_losses.py runs TRL's own code on
the same log-probabilities); each task computes per-pair terms, which give the loss, the train/*
scalars (step_metrics) and the eval/* metrics alike.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..config import Config, ConfigError, DataConfig
from .common import IGNORE, RecordTask, TaskData, eval_batches, gather, pad

if TYPE_CHECKING:
    import numpy as np
    import torch

CHOSEN, REJECTED = "chosen", "rejected"


# --------------------------------------------------------------------------- examples

@dataclass
class PairExamples:
    """Token rows of preference pairs: inputs and targets of prompt + answer, targets only on the
    answer (shifted by one for the log-prob tasks). `ref`: (n, 2) summed reference log-probs of
    (chosen, rejected), once computed."""
    chosen_inputs: list[np.ndarray]
    chosen_targets: list[np.ndarray]
    rejected_inputs: list[np.ndarray]
    rejected_targets: list[np.ndarray]
    pad_id: int
    ref: np.ndarray | None = None

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens of a pair (both answers with their prompt), padding excluded."""
        import numpy as np

        return float(np.mean([len(c) + len(r) for c, r in zip(self.chosen_inputs, self.rejected_inputs)]))

    def __len__(self) -> int:
        return len(self.chosen_inputs)

    def fingerprint(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for rows in (self.chosen_inputs, self.chosen_targets, self.rejected_inputs, self.rejected_targets):
            for r in rows:
                h.update(len(r).to_bytes(4, "little"))
                h.update(r.tobytes())
        return h.digest()

    def batch(self, indices) -> tuple[dict, dict]:
        """B pairs as 2B rows, the chosen answers first: ({input_ids, attention_mask}, {labels, ref})."""
        import numpy as np
        import torch

        rows = list(indices)
        inputs = [self.chosen_inputs[i] for i in rows] + [self.rejected_inputs[i] for i in rows]
        n = max(len(x) for x in inputs)
        targets = {"labels": pad([self.chosen_targets[i] for i in rows] + [self.rejected_targets[i] for i in rows],
                                 IGNORE, n),
                   "ref": torch.from_numpy(self.ref[rows]) if self.ref is not None else None}
        mask = pad([np.ones(len(x), dtype=np.int64) for x in inputs], 0, n)
        return {"input_ids": pad(inputs, self.pad_id, n), "attention_mask": mask}, targets


# --------------------------------------------------------------------------- records → pairs

def _messages(v, field: str) -> list[dict]:
    """A message list (content read as sft reads it: a string, or OpenAI's text parts joined), or a
    string as one user turn."""
    from .sft import _text

    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    if not isinstance(v, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in v):
        raise ValueError(f"field {field!r} is neither a string nor a list of {{role, content}} messages")
    return [{**m, "content": _text(m, "content", False, f"{field}[{i}].content")} for i, m in enumerate(v)]


def pair_row(cfg: DataConfig, r: dict) -> dict:
    """One record → {"prompt": messages, "chosen": messages, "rejected": messages} (the answers: the
    messages after the prompt, the last an assistant turn); ValueError saying what is wrong."""
    chosen, rejected, prompt = r.get(CHOSEN), r.get(REJECTED), r.get(cfg.prompt_field)
    for key, v in ((CHOSEN, chosen), (REJECTED, rejected)):
        if v is None or v == "" or v == []:
            raise ValueError(f"field {key!r} is missing or empty (keys: {sorted(k for k, x in r.items() if x is not None)})")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError(f"fields {CHOSEN!r} and {REJECTED!r} must both be strings or both message lists")
    if isinstance(chosen, str):
        if not isinstance(prompt, str):
            raise ValueError(f"field {cfg.prompt_field!r} (data.prompt_field) must be a string beside string answers")
        answers = {CHOSEN: [{"role": "assistant", "content": chosen}],
                   REJECTED: [{"role": "assistant", "content": rejected}]}
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        c, rj = _messages(chosen, CHOSEN), _messages(rejected, REJECTED)
        if prompt is not None:
            prompt_msgs = _messages(prompt, cfg.prompt_field)
        else:  # implicit prompt: the messages both conversations start with
            k = 0
            while k < min(len(c), len(rj)) - 1 and c[k] == rj[k]:
                k += 1
            prompt_msgs, c, rj = c[:k], c[k:], rj[k:]
        answers = {CHOSEN: c, REJECTED: rj}
    for key, msgs in answers.items():
        last = msgs[-1] if msgs else {}
        if last.get("role") != "assistant":
            raise ValueError(f"field {key!r}: the answer must end with an assistant message, got {json.dumps(msgs)[:120]}")
        content = last.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"field {key!r}: the answer is empty")
    if answers[CHOSEN] == answers[REJECTED]:
        raise ValueError(f"fields {CHOSEN!r} and {REJECTED!r} are identical: the pair prefers nothing")
    return {"prompt": prompt_msgs, CHOSEN: answers[CHOSEN], REJECTED: answers[REJECTED]}


def answer_tokens(tok, template: str, msgs: list[dict], turns: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, answer mask) of the conversation: the mask marks the tokens of its last `turns`
    assistant turns (the answer's; as the template writes them, e.g. with EOS), from sft's assistant mask."""
    import numpy as np

    from .sft import sft_tokens

    ids, trainable = sft_tokens(tok, template, msgs)
    starts = np.flatnonzero(trainable & ~np.concatenate([[False], trainable[:-1]]))  # first token of each turn
    if len(starts) < turns:
        raise ValueError("the chat template renders no assistant tokens for the answer")
    answer = trainable.copy()
    answer[:starts[-turns]] = False
    return ids, answer


def encode_pairs(cfg: Config, tok, rows: list[dict], log, shift: bool = True) -> PairExamples:
    """Pair rows → token rows of ≤ data.seq_len inputs (answers cut at the end if longer). shift: the
    inputs predict the next token (log-probs); else they are the whole rendered conversation, as a
    reward model reads it (and plain transformers, from apply_chat_template's text, or TRL)."""
    import numpy as np

    from .sft import chat_template

    template, L = chat_template(cfg.data, tok), cfg.data.seq_len
    longest = L + 1 if shift else L  # tokens of a conversation that give L inputs
    out: dict[str, tuple[list, list]] = {CHOSEN: ([], []), REJECTED: ([], [])}
    cut = 0
    for r in rows:
        for side in (CHOSEN, REJECTED):
            turns = sum(m.get("role") == "assistant" for m in r[side])
            try:
                ids, answer = answer_tokens(tok, template, r["prompt"] + r[side], turns)
            except (ValueError, ConfigError) as e:
                raise ConfigError(f"{cfg.task}: {r['where']}: {e}") from None
            start = int(np.argmax(answer))
            if start > longest - 1:  # the first answer token must be a target within the L inputs
                raise ConfigError(f"{cfg.task}: {r['where']}: the prompt is {start} tokens, leaving no room for the "
                                  f"answer within data.seq_len={L}: shorten it or raise data.seq_len")
            if len(ids) > longest:
                cut += 1
                ids, answer = ids[:longest], answer[:longest]
            if shift:  # without a prompt the first token has nothing before it to predict it
                inputs, target = ids[:-1], np.where(answer[1:], ids[1:], IGNORE)
            else:
                inputs, target = ids, np.where(answer, ids, IGNORE)
            out[side][0].append(inputs.astype(np.int64))
            out[side][1].append(target.astype(np.int64))
    if cut:
        log.warning(f"{cfg.task}: {cut} of {2 * len(rows)} answers with their prompt are longer than "
                    f"data.seq_len{'+1' if shift else ''}={longest} tokens and were cut at the end")
    return PairExamples(*out[CHOSEN], *out[REJECTED], tok.pad_token_id)


# --------------------------------------------------------------------------- log-probs and losses

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each row's target tokens, their number), fp32; IGNORE targets excluded."""
    import torch

    mask = labels != IGNORE
    logits = logits.float()
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps.sum(-1), mask.sum(-1)


def dpo_losses(loss: str, beta: float, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
               chosen_tokens, rejected_tokens, simpo_gamma: float = 0.5):
    """(per-pair losses, chosen rewards, rejected rewards) of TRL's DPOTrainer (sigmoid, ipo, hinge) and
    CPOTrainer (simpo, with cpo_alpha 0): log-probs summed over each answer's tokens."""
    import torch
    import torch.nn.functional as F

    if loss == "simpo":  # reference-free, length-normalised (TRL's CPO with loss_type="simpo")
        chosen, rejected = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens
        logits = (chosen - rejected) - simpo_gamma / beta
        return -F.logsigmoid(beta * logits), beta * chosen.detach(), beta * rejected.detach()
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss == "ipo":  # TRL averages the log-ratios over each answer's tokens (with the IPO authors' blessing)
        ipo = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (ipo - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo.loss {loss!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_terms(beta: float, chosen_mean_logps, rejected_mean_logps):
    """(per-pair odds-ratio terms beta * log sigmoid(log odds ratio), chosen rewards, rejected rewards,
    log odds ratios) of TRL's ORPOTrainer.odds_ratio_loss; the loss is NLL(chosen) - mean(terms)."""
    import torch.nn.functional as F

    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return beta * F.logsigmoid(log_odds), beta * chosen.detach(), beta * rejected.detach(), log_odds


def reward_losses(chosen_scores, rejected_scores):
    """Bradley–Terry: -log sigmoid(r_chosen - r_rejected) per pair (TRL's RewardTrainer without margin)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen_scores - rejected_scores)


@dataclass
class Terms:
    """A micro batch's loss and its per-pair values. score: what the model itself prefers by (its
    log-prob of the answer, or a reward model's scalar), accuracy counts chosen > rejected by it."""
    loss: torch.Tensor             # the training loss (scalar, with gradient)
    losses: torch.Tensor           # per pair (for eval/loss)
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    chosen_score: torch.Tensor
    rejected_score: torch.Tensor
    chosen_logp: torch.Tensor | None = None
    rejected_logp: torch.Tensor | None = None


# What a pair contributes to the metrics: name → its per-pair value from Terms (None: not this task).
STATS: dict[str, Callable[[Terms], "torch.Tensor | None"]] = {
    "accuracy": lambda t: (t.chosen_score > t.rejected_score).double(),
    "reward_accuracy": lambda t: (t.chosen_reward > t.rejected_reward).double(),
    "reward_margin": lambda t: (t.chosen_reward - t.rejected_reward).double(),
    "chosen_reward": lambda t: t.chosen_reward.double(),
    "rejected_reward": lambda t: t.rejected_reward.double(),
    "chosen_logp": lambda t: None if t.chosen_logp is None else t.chosen_logp.detach().double(),
    "rejected_logp": lambda t: None if t.rejected_logp is None else t.rejected_logp.detach().double(),
}


# --------------------------------------------------------------------------- the shared task

class PreferenceTask(RecordTask):
    """A preference task: a subclass sets its attributes and terms(); the rest is here."""
    causal = True
    peft_task_type = "CAUSAL_LM"
    auto_model = "AutoModelForCausalLM"
    headline = "eval/accuracy"
    logps = True  # its metrics include the answers' log-probs

    def __init__(self):
        self._sums = None  # train/* sums since the last step_metrics(), on the device
        self.settings: Config | None = None  # the run's config, from prepare_run

    def metrics(self, cfg: Config) -> tuple[str, ...]:
        keys = [k for k in STATS if self.logps or not k.endswith("_logp")]
        return ("eval/loss", *(f"eval/{k}" for k in keys if k != "reward_accuracy" or self.logps))

    def validate(self, cfg: Config) -> None:
        if cfg.distill.teacher is not None:
            raise ValueError(f"distill.teacher: task={cfg.task} learns from preference pairs, not from a teacher's "
                             "next-token distribution; distil in an sft or pretrain run")

    # ---- data
    def documents(self, cfg: Config) -> DataConfig:
        """The pairs as documents for the deployment tools' calibration and perplexity (tools/artifact.py):
        the chosen answers (what the model is trained to produce), in the model's own tokenizer."""
        from .common import embedded_paths

        tokenizer = cfg.data.tokenizer or cfg.model.path
        if cfg.model.init_from:
            from ..checkpoint.consolidate import source_meta

            tokenizer = str(source_meta(cfg.model.init_from))
        return cfg.data.model_copy(update={"text_field": CHOSEN, "tokenizer": tokenizer,
                                           "paths": embedded_paths(cfg.data, cfg.data.paths),
                                           "eval_paths": embedded_paths(cfg.data, cfg.data.eval_paths)})

    def texts(self, cfg: DataConfig, records: list[dict]):
        for r in records:
            for m in r["prompt"] + r[CHOSEN] + r[REJECTED]:
                yield str(m.get("content", ""))

    def rows(self, cfg: DataConfig, records: list[dict], where: Callable[[int], str], log) -> list[dict]:
        out = []
        for i, r in enumerate(records):
            try:
                row = pair_row(cfg, r)
            except ValueError as e:
                raise ConfigError(f"{self.name}: {where(i)}: {e}") from None
            out.append({**row, "where": where(i)})
        return out

    def template(self, cfg: DataConfig, tok) -> str:
        from .sft import chat_template

        return chat_template(cfg, tok)

    def examples(self, cfg: Config, tok, train: list[dict], held: list[dict], log):
        # log-prob tasks predict each next token; a reward model reads the whole conversation
        tr, ev = (encode_pairs(cfg, tok, rows, log, shift=self.logps) for rows in (train, held))
        log.info(f"{cfg.task}: {len(tr)} training pairs, {len(ev)} held-out pairs, {tr.tokens_per_row:.0f} tokens "
                 f"per pair on average (data.seq_len {cfg.data.seq_len})")
        return tr, ev, self.head_labels()

    def head_labels(self) -> list[str] | None:
        return None

    # ---- the run
    def prepare_run(self, engine, data: TaskData, cfg: Config, groups, device, log) -> None:
        self.settings, self._sums = cfg, None

    def model_inputs(self, inputs: dict, targets: dict, device, groups=None) -> tuple[dict, dict]:
        return ({k: v.to(device) for k, v in inputs.items()},
                {k: v.to(device) if v is not None else None for k, v in targets.items()})

    def terms(self, logits: torch.Tensor, targets: dict) -> Terms:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: dict) -> torch.Tensor:
        import torch

        t = self.terms(logits, targets)
        values = [STATS[k](t) for k in self.train_keys()]
        row = torch.stack([v.sum() for v in values] + [torch.tensor(float(len(t.losses)), dtype=torch.float64,
                                                                    device=t.losses.device)])
        self._sums = row if self._sums is None else self._sums + row
        return t.loss

    def train_keys(self) -> list[str]:
        return [k.split("/", 1)[1] for k in self.metrics(self.settings) if k != "eval/loss"]

    def step_metrics(self) -> dict[str, float]:
        import torch

        if self._sums is None:
            return {}
        sums, self._sums = self._sums, None
        torch.distributed.all_reduce(sums)
        n = max(sums[-1].item(), 1.0)
        return {f"train/{k}": (v / n) for k, v in zip(self.train_keys(), sums[:-1].tolist())}

    def evaluate(self, engine, data: TaskData, cfg: Config, groups, device) -> dict[str, float]:
        import numpy as np

        keys = [k.split("/", 1)[1] for k in self.metrics(cfg)]

        def per_pair(logits, targets, n_real):
            t = self.terms(logits, targets)
            cols = [t.losses.detach().double()] + [STATS[k](t) for k in keys[1:]]
            return [tuple(float(c[j]) for c in cols) for j in range(n_real)]

        values = np.array(over_pairs(self, engine, data.eval, cfg.train.micro_batch_size, groups, device, per_pair))
        return {f"eval/{k}": float(values[:, j].mean()) for j, k in enumerate(keys)}


def over_pairs(task, engine, examples: PairExamples, micro: int, groups, device,
               per_pair: Callable, progress: str | None = None) -> list[tuple]:
    """per_pair(logits, targets, n_real) over every pair of `examples`, in eval mode without
    gradients, sharded over the data-parallel ranks with equal batch counts (ZeRO-3 needs every
    rank in every forward); every rank gets all pairs' values, in order. `progress`: a progress
    bar's name on rank 0."""
    import torch
    from tqdm import tqdm

    with torch.no_grad():
        was_training = engine.module.training
        engine.eval()
        mine = []
        batches = eval_batches(len(examples), micro, groups.dp_rank, groups.dp_size)
        for indices in tqdm(batches, desc=progress, unit="batch", mininterval=1.0,
                            disable=progress is None or groups.rank != 0):
            real = [i for i in indices if i >= 0]
            inputs, targets = examples.batch([i if i >= 0 else 0 for i in indices])
            kwargs, on_device = task.model_inputs(inputs, targets, device)
            logits = engine(**kwargs).logits
            mine += list(zip(real, per_pair(logits, on_device, len(real))))
        engine.train(was_training)
    return [v for _, v in sorted(p for part in gather(mine) for p in part)]


# --------------------------------------------------------------------------- the reference log-probs

def reference_key(cfg: Config, data: TaskData) -> str:
    """What the reference log-probs depend on: the starting weights (file contents), the model config
    and precision, and the tokenized pairs (so the data, template and seq_len)."""
    from ..checkpoint import file_hash  # the manifests' content hash

    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps({"model": cfg.model.model_dump(mode="json"), "precision": cfg.train.precision,
                         "seed": cfg.train.seed}, sort_keys=True).encode())
    for f in weight_files(cfg):
        h.update(f"{f.name}:{f.stat().st_size}:{file_hash(f)}".encode())
    h.update(data.train.fingerprint())
    h.update(data.eval.fingerprint())
    return h.hexdigest()


def weight_files(cfg: Config) -> list[Path]:
    """The files holding the starting weights (model.init_from, consolidated, or model.path)."""
    src = None
    if cfg.model.init_from:
        from ..checkpoint.consolidate import resolve_source

        src = resolve_source(cfg.model.init_from)
    elif cfg.model.path and cfg.model.pretrained:
        src = Path(cfg.model.path).expanduser()
    if src is None:
        return []
    return sorted(p for p in src.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))


def cached_reference(task: PreferenceTask, engine, data: TaskData, cfg: Config, groups, device, log) -> None:
    """Set data.train.ref / data.eval.ref: the starting model's summed log-probs of every answer,
    read from the data cache or computed once (one forward pass over all pairs, no gradients) and
    cached there, keyed by reference_key."""
    import numpy as np
    import torch

    box = [None, None]  # rank 0 reads the cache and sends what it found: data.cache_dir may be node-local
    if groups.rank == 0:
        key = reference_key(cfg, data)
        path = cfg.data.resolved_cache_dir() / "reference_logps" / f"{key}.npy"
        box = [str(path), np.load(path) if path.is_file() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    path, ref = Path(box[0]), box[1]
    if ref is not None:
        log.info(f"reference log-probs of {len(ref)} pairs read from {path}")
    else:
        t0 = time.perf_counter()

        def logps(logits, targets, n_real):
            s, _ = sequence_logps(logits, targets["labels"])
            b = len(s) // 2
            return [(float(s[j]), float(s[b + j])) for j in range(n_real)]

        bar = "reference log-probs" if cfg.logging.progress else None
        ref = np.array([v for split in (data.train, data.eval) for v in
                        over_pairs(task, engine, split, cfg.train.micro_batch_size, groups, device, logps, bar)],
                       dtype=np.float64)
        if groups.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, ref)
            tmp.replace(path)
        log.info(f"reference log-probs of {len(ref)} pairs computed in {time.perf_counter() - t0:.1f} s "
                 f"(one forward pass, no gradients) and cached in {path}")
    data.train.ref, data.eval.ref = ref[:len(data.train)], ref[len(data.train):]
