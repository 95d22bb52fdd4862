"""Downstream evaluation in the training loop: ranked multiple-choice and last-word tasks from local JSONL files.

A task file holds one JSON object a line, either

- multiple choice (HellaSwag / ARC / PIQA / Winogrande / MMLU style): ``{"context": str, "choices": [str, ...],
  "gold": int}`` — each choice is scored by the log-likelihood of its tokens after the context; ``acc`` takes the
  highest, ``acc_norm`` the highest per character of the choice (lm-evaluation-harness's ``acc`` and ``acc_norm``;
  ties go to the first choice, as its ``argmax``), or
- last word (LAMBADA style): ``{"context": str, "continuation": str}`` — ``acc`` is whether greedy decoding
  reproduces every token of the continuation, ``ppl`` is exp(−mean log-likelihood) over its tokens.

Tokenisation follows lm-evaluation-harness's: trailing spaces of the context move to the continuation, the pair is
encoded whole and the continuation is what the whole has beyond the context's own encoding; an empty context is
the EOS token. A context that does not fit ``model.seq_len`` loses its left end (the continuation is kept).

Scoring runs the model's own forward on the requests of this data-parallel rank's items (item i goes to rank
i mod dp); every rank runs the same number of batches (FSDP and expert parallelism gather inside the forward), and
the per-task sums (items, correct, correct by length, log-likelihood, tokens) are summed over the ranks in float64:
the same items give the same numbers on any layout. Scores are logged as ``<stem>_acc`` and ``<stem>_acc_norm``
(multiple choice) or ``<stem>_acc`` and ``<stem>_ppl`` (last word), ``<stem>`` the file's stem.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.errors import DataError


@dataclass
class Item:
    context: str
    choices: list[str] | None = None  # multiple choice
    gold: int | None = None
    continuation: str | None = None  # last word


@dataclass
class Task:
    name: str  # the file's stem: the metrics' prefix
    path: str
    kind: str  # "choice" | "last_word"
    items: list[Item] = field(default_factory=list)


def load_task(path: str | Path) -> Task:
    """A task file, checked whole: any line that is not a valid item is one ``DataError`` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval.tasks: {path} does not exist" if not path.exists() else
                        f"eval.tasks: {path} is not a file")
    task = Task(path.stem, str(path), "")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not JSON ({exc.msg})") from None
            item = _item(record, where)
            kind = "choice" if item.choices is not None else "last_word"
            if task.kind and kind != task.kind:
                raise DataError(f"{where}: a {kind.replace('_', '-')} item in a file of "
                                f"{task.kind.replace('_', '-')} items: one kind a file")
            task.kind = kind
            task.items.append(item)
    if not task.items:
        raise DataError(f"{path}: no items (one JSON object a line: context, choices, gold — or context, "
                        "continuation)")
    return task


def _item(record, where: str) -> Item:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    context = record.get("context")
    if not isinstance(context, str):
        raise DataError(f"{where}: 'context' must be a string")
    if "choices" in record:
        choices, gold = record["choices"], record.get("gold")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of strings")
        if len(choices) < 2:
            raise DataError(f"{where}: a multiple-choice item needs at least 2 choices, got {len(choices)}")
        if isinstance(gold, bool) or not isinstance(gold, int):
            raise DataError(f"{where}: 'gold' must be an integer (the index of the right choice)")
        if not 0 <= gold < len(choices):
            raise DataError(f"{where}: gold {gold} is out of range for {len(choices)} choices")
        if not all(choices):
            raise DataError(f"{where}: a choice is empty")
        return Item(context, choices=list(choices), gold=gold)
    continuation = record.get("continuation")
    if not isinstance(continuation, str) or not continuation:
        raise DataError(f"{where}: an item needs 'choices' and 'gold' (multiple choice) or a non-empty "
                        "'continuation' (last word)")
    return Item(context, continuation=continuation)


# --- encoding -------------------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's pair encoding: (context tokens, continuation tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    own = tokenizer.encode(context)
    return own, whole[len(own):]


@dataclass
class Request:
    item: int  # index in the task
    choice: int  # index of the choice (0 for a last-word item)
    context: list[int]
    continuation: list[int]


def requests_of(task: Task, tokenizer, vocab_size: int) -> list[Request]:
    out = []
    for i, item in enumerate(task.items):
        pieces = item.choices if item.choices is not None else [item.continuation]
        for j, piece in enumerate(pieces):
            context, continuation = encode_pair(tokenizer, item.context, piece)
            if not continuation:
                raise DataError(f"{task.path}: item {i + 1}'s {'choice ' + str(j) if item.choices else 'continuation'}"
                                " encodes to no tokens")
            top = max(context + continuation)
            if top >= vocab_size:
                raise DataError(f"{task.path}: the tokenizer gives id {top}, outside model.vocab_size "
                                f"({vocab_size}): the task is encoded with another tokenizer than the model's")
            out.append(Request(i, j, context, continuation))
    return out


# --- scoring --------------------------------------------------------------------------------------------------
def logits_scorer(forward):
    """``per_token`` of a model whose forward returns the whole logits (B, T, V) on this rank."""
    def per_token(tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(tokens)
        if hasattr(logits, "full_tensor"):  # a tensor-parallel head's vocab shards
            logits = logits.full_tensor()
        return token_scores(logits, targets)
    return per_token


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target (B, T) float64, whether it is the argmax (B, T) bool); 0 / False where the
    target is -100."""
    keep = targets >= 0
    safe = targets.clamp(min=0)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, safe[..., None])[..., 0].double()
    hit = logprobs.argmax(-1) == safe
    return torch.where(keep, picked, 0.0), hit & keep


def score(per_token, requests: list[Request], seq_len: int, batch_size: int, device, batches: int | None = None,
          width_multiple: int = 1, fixed_shape: tuple[int, int] | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether greedy decoding gives it) of each request, in order.
    ``per_token(tokens (B, T), targets (B, T), -100 outside the continuations) -> (log-probabilities, argmax hits)``
    (``logits_scorer`` for a plain forward). Longest first, padded on the right (causal: padding changes no earlier
    position). ``batches``: run at least this many forwards (extra ones on padding rows), so that every rank of a
    sharded model runs as many as the rank with the most; ``width_multiple``: tokens a row rounded up to a multiple
    of it (context parallelism's 2·cp chunks, sequence parallelism's tp shards); ``fixed_shape``: (rows, tokens)
    of every forward, the training shape (a pipeline's stages exchange buffers of the shapes they inferred)."""
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r].context) - len(requests[r].continuation))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    batch_size = fixed_shape[0] if fixed_shape else batch_size
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    while batches is not None and len(chunks) < batches:
        chunks.append([])
    for chunk in chunks:
        rows, spans = [], []
        for r in chunk:
            req = requests[r]
            whole = (req.context + req.continuation)[-(seq_len + 1):]
            n = min(len(req.continuation), len(whole) - 1)
            rows.append(whole)
            spans.append((len(whole) - 1 - n, n))
        width = -(-max((len(row) - 1 for row in rows), default=1) // width_multiple) * width_multiple
        height = max(len(rows), 1)
        if fixed_shape:
            height, width = fixed_shape
        tokens = torch.zeros(height, width, dtype=torch.long)
        targets = torch.full((height, width), -100, dtype=torch.long)
        for i, (row, (start, n)) in enumerate(zip(rows, spans)):
            tokens[i, :len(row) - 1] = torch.tensor(row[:-1])
            targets[i, start:start + n] = torch.tensor(row[-n:])
        logprob, hit = per_token(tokens.to(device), targets.to(device))
        logprob, hit = logprob.cpu(), hit.cpu()
        for i, (r, (start, n)) in enumerate(zip(chunk, spans)):
            results[r] = (float(logprob[i, start:start + n].sum()), bool(hit[i, start:start + n].all()))
    return results


SUMS = ("items", "correct", "correct_norm", "loglikelihood", "tokens")


def task_sums(task: Task, requests: list[Request], results: list[tuple[float, bool]]) -> torch.Tensor:
    """float64 (5,): items, correct, correct by length (multiple choice; greedy hits for last word), summed
    log-likelihood and continuation tokens (last word) of the scored requests' items."""
    by_item: dict[int, list[tuple[Request, tuple[float, bool]]]] = {}
    for req, res in zip(requests, results):
        by_item.setdefault(req.item, []).append((req, res))
    sums = torch.zeros(len(SUMS), dtype=torch.float64)
    for i, scored in by_item.items():
        item = task.items[i]
        sums[0] += 1
        if task.kind == "choice":
            lls = torch.tensor([res[0] for _, res in sorted(scored, key=lambda s: s[0].choice)], dtype=torch.float64)
            lengths = torch.tensor([float(len(c)) for c in item.choices], dtype=torch.float64)
            sums[1] += float(int(lls.argmax()) == item.gold)
            sums[2] += float(int((lls / lengths).argmax()) == item.gold)
        else:
            (req, (ll, greedy)), = scored
            sums[1] += float(greedy)
            sums[3] += ll
            sums[4] += len(req.continuation)
    return sums


def metrics_of(task: Task, sums: torch.Tensor) -> dict[str, float]:
    items = max(float(sums[0]), 1.0)
    if task.kind == "choice":
        return {f"{task.name}_acc": float(sums[1]) / items, f"{task.name}_acc_norm": float(sums[2]) / items}
    return {f"{task.name}_acc": float(sums[1]) / items,
            f"{task.name}_ppl": math.exp(min(-float(sums[3]) / max(float(sums[4]), 1.0), 50.0))}


def run_tokenizer(cfg):
    """The tokenizer the run's data was prepared with (``data.tokenizer``, else the prepared data's own)."""
    from pretrain.data.tokenizer import Tokenizer

    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    from pretrain.data.documents import open_documents

    path = cfg.data.path or cfg.data.sources[0]["path"]
    return open_documents(path, "train", on_bad_sample=cfg.data.on_bad_sample).tokenizer()


class Downstream:
    """The run's downstream tasks, encoded once (before step 1), scored on demand under the run's layout."""

    @classmethod
    def for_config(cls, cfg) -> Downstream | None:
        if not cfg.eval.tasks:
            return None
        return cls(cfg.eval.tasks, run_tokenizer(cfg), cfg.model.vocab_size, cfg.model.seq_len,
                   cfg.train.micro_batch_size)

    def __init__(self, paths: list[str], tokenizer, vocab_size: int, seq_len: int, batch_size: int):
        self.tasks = [load_task(p) for p in paths]
        names = [t.name for t in self.tasks]
        for name in names:
            if names.count(name) > 1:
                raise DataError(f"eval.tasks: two files named {name}: the metrics are named by the file's stem")
        self.requests = [requests_of(t, tokenizer, vocab_size) for t in self.tasks]
        self.seq_len, self.batch_size = seq_len, batch_size

    def evaluate(self, model, device, rank: int = 0, ranks: int = 1, reduce=None, max_reduce=None,
                 per_token=None, width_multiple: int = 1, fixed_shape: tuple[int, int] | None = None
                 ) -> dict[str, float]:
        """Every task on this rank's items (item i on rank i mod ``ranks``); ``reduce`` sums a float64 tensor over
        the ranks, ``max_reduce`` takes the maximum of an int64 one (None: one rank). ``per_token``: how this
        layout scores a batch (default: ``model``'s forward, whole logits); ``width_multiple``, ``fixed_shape``: as
        ``score``."""
        was_training = model.training
        model.eval()
        per_token = per_token or logits_scorer(model)
        values: dict[str, float] = {}
        try:
            with torch.no_grad():
                for task, requests in zip(self.tasks, self.requests):
                    mine = [r for r in requests if r.item % ranks == rank]
                    rows = fixed_shape[0] if fixed_shape else self.batch_size
                    count = torch.tensor(-(-len(mine) // rows), dtype=torch.int64, device=device)
                    batches = int(max_reduce(count)) if max_reduce is not None else None
                    results = score(per_token, mine, self.seq_len, self.batch_size, device, batches, width_multiple,
                                    fixed_shape)
                    sums = task_sums(task, mine, results).to(device)
                    if reduce is not None:
                        sums = reduce(sums)
                    values.update(metrics_of(task, sums.cpu()))
        finally:
            model.train(was_training)
        return values
