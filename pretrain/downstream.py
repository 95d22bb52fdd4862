"""Downstream evaluation in the training loop: ranked multiple-choice and last-word tasks from local JSONL files.

A task file holds one JSON object a line, either

- multiple choice (HellaSwag / ARC / PIQA / Winogrande / MMLU style): ``{"context": str, "choices": [str, ...],
  "gold": int}`` — each choice is scored by the log-likelihood of its tokens after the context; ``acc`` takes the
  highest, ``acc_norm`` the highest per character of the choice (lm-evaluation-harness's ``acc`` and ``acc_norm``;
  ties go to the first choice, as its ``argmax``), or
- last word (LAMBADA style): ``{"context": str, "continuation": str}`` — ``acc`` is whether greedy decoding
  reproduces every token of the continuation, ``ppl`` is exp(−mean over the items of the continuation's
  log-likelihood) — lm-evaluation-harness's ``perplexity`` of LAMBADA (a word, not a token, the unit).

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


def write_task_yaml(path: str | Path, kind: str, folder: str | Path | None = None) -> Path:
    """lm-evaluation-harness's task of a task file (its local-file format: ``dataset_path: json``), named by the
    file's stem, written as ``<stem>.yaml`` in ``folder`` (default: beside the file), atomically: zero-shot, the
    context as is, each choice (continuation) right after it — ``acc`` / ``acc_norm`` (multiple choice) or ``acc``
    / ``perplexity`` (last word), as this module scores them. The data file is named by its absolute path."""
    path = Path(path).resolve()
    folder = Path(folder) if folder is not None else path.parent
    lines = [f"task: {path.stem}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(path))}", "test_split: test", "doc_to_text: context",
             'target_delimiter: ""']
    if kind == "choice":
        lines += ["output_type: multiple_choice", "doc_to_choice: choices", "doc_to_target: gold", "metric_list:",
                  "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
                  "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true"]
    else:
        lines += ["output_type: loglikelihood", "doc_to_target: continuation", "metric_list:",
                  "  - metric: perplexity", "    aggregation: perplexity", "    higher_is_better: false",
                  "  - metric: acc", "    aggregation: mean", "    higher_is_better: true"]
    out = folder / f"{path.stem}.yaml"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out


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
def logits_scorer(forward, select: bool = False):
    """``per_token`` of a model whose forward returns the whole logits (B, T, V) on this rank. ``select``: the
    forward takes ``logits_at`` (the GPT's: the head and the softmax only where a target is)."""
    def per_token(tokens: torch.Tensor, targets: torch.Tensor, documents: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        if not select:
            logits = forward(tokens, **(documents or {}))
            if hasattr(logits, "full_tensor"):  # a tensor-parallel head's vocab shards
                logits = logits.full_tensor()
            return token_scores(logits, targets)
        keep = targets >= 0
        logits = forward(tokens, **(documents or {}), logits_at=keep)
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()
        picked, hit = token_scores(logits, targets[keep])
        logprob = torch.zeros(targets.shape, dtype=torch.float64, device=targets.device)
        hits = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
        logprob[keep], hits[keep] = picked, hit
        return logprob, hits
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


@dataclass
class Segment:
    """One context and continuations after it, as one document of a row: ``shared`` input tokens (the context
    but its last token) at positions 0.., then each branch — the context's last token and the continuation but its
    last, the branch's targets the continuation — at the positions after the shared part, seeing the shared part and
    itself (``layers.Documents.branches``). A request that does not fit ``seq_len`` whole is a segment of its own,
    cut on the left as lm-eval cuts it."""
    shared: list[int]
    branches: list[tuple[int, list[int], list[int]]]  # (request, input tokens, targets)

    def __len__(self) -> int:
        return len(self.shared) + sum(len(b[1]) for b in self.branches)


def segments_of(requests: list[Request], seq_len: int, shared: bool) -> list[Segment]:
    """The segments of ``requests``: with ``shared``, the requests of one context token for token (the choices of
    an item) share one scoring of it, as many branches a segment as ``seq_len`` holds; else one a request."""
    out: list[Segment] = []
    by_context: dict[tuple[int, ...], Segment] = {}
    for r, req in enumerate(requests):
        whole = (req.context + req.continuation)[-(seq_len + 1):]
        n = min(len(req.continuation), len(whole) - 1)
        inputs, targets = whole[:-1], whole[-n:]
        cut = len(inputs) - n  # the shared part: inputs before the first scored position
        branch = (r, inputs[cut:], targets)
        fits = len(req.context) + len(req.continuation) - 1 <= seq_len
        if not (shared and fits):
            out.append(Segment(inputs[:cut], [branch]))
            continue
        key = tuple(req.context)
        segment = by_context.get(key)
        if segment is None or len(segment) + len(branch[1]) > seq_len:
            segment = by_context[key] = Segment(inputs[:cut], [])
            out.append(segment)
        segment.branches.append(branch)
    return out


def rows_of(segments: list[Segment], seq_len: int, pack: bool) -> list[list[Segment]]:
    """Rows of segments: with ``pack``, several a row up to ``seq_len`` tokens (first fit, longest first); else
    one a row, longest first."""
    order = sorted(segments, key=len, reverse=True)
    if not pack:
        return [[s] for s in order]
    rows: list[list[Segment]] = []
    room: list[int] = []
    for segment in order:
        for i, free in enumerate(room):
            if len(segment) <= free:
                rows[i].append(segment)
                room[i] -= len(segment)
                break
        else:
            rows.append([segment])
            room.append(seq_len - len(segment))
    return rows


def score(per_token, requests: list[Request], seq_len: int, batch_size: int, device, batches=None,
          width_multiple: int = 1, fixed_shape: tuple[int, int] | None = None, shared: bool = False
          ) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether greedy decoding gives it) of each request, in order.
    ``per_token(tokens (B, T), targets (B, T), -100 outside the continuations[, documents]) -> (log-probabilities,
    argmax hits)`` (``logits_scorer`` for a plain forward). ``shared``: the choices of one context share one
    scoring of it and several segments fill a row (``documents`` = the forward's ``document_ids``, ``positions``,
    ``branch_ids``; the dense reference attention) — the numbers of scoring each request alone, to rounding. Else
    one request a row, longest first, padded on the right (causal: padding changes no earlier position).
    ``batches``: run at least this many forwards (extra ones on padding rows), so that every rank of a sharded model
    runs as many as the rank with the most — an int, or a function of this rank's count giving it (a collective);
    ``width_multiple``: tokens a row rounded up to a multiple of it (context parallelism's 2·cp chunks, sequence
    parallelism's tp shards); ``fixed_shape``: (rows, tokens) of every forward, the training shape (a pipeline's
    stages exchange buffers of the shapes they inferred)."""
    rows = rows_of(segments_of(requests, seq_len, shared), seq_len, pack=shared)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    batch_size = fixed_shape[0] if fixed_shape else batch_size
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if callable(batches):
        batches = batches(len(chunks))
    while batches is not None and len(chunks) < batches:
        chunks.append([])
    for chunk in chunks:
        width = max((sum(len(s) for s in row) for row in chunk), default=1)
        width = -(-width // width_multiple) * width_multiple
        height = max(len(chunk), 1)
        if fixed_shape:
            height, width = fixed_shape
        tokens = torch.zeros(height, width, dtype=torch.long)
        targets = torch.full((height, width), -100, dtype=torch.long)
        if shared:
            ids = torch.full((height, width), -1, dtype=torch.long)  # padding: a document of its own
            positions = torch.zeros(height, width, dtype=torch.long)
            branch_ids = torch.zeros(height, width, dtype=torch.long)
        places = []  # (request, row, start, n)
        for i, row in enumerate(chunk):
            at = 0
            for d, segment in enumerate(row):
                m = len(segment.shared)
                tokens[i, at:at + m] = torch.tensor(segment.shared, dtype=torch.long)
                if shared:
                    ids[i, at:at + len(segment)] = d
                    positions[i, at:at + m] = torch.arange(m)
                start = at + m
                for b, (r, inputs, wanted) in enumerate(segment.branches, 1):
                    k, n = len(inputs), len(wanted)
                    tokens[i, start:start + k] = torch.tensor(inputs, dtype=torch.long)
                    targets[i, start + k - n:start + k] = torch.tensor(wanted, dtype=torch.long)
                    if shared:
                        positions[i, start:start + k] = torch.arange(m, m + k)
                        branch_ids[i, start:start + k] = b
                    places.append((r, i, start + k - n, n))
                    start += k
                at = start
        documents = None
        if shared:
            documents = {"document_ids": ids.to(device), "positions": positions.to(device),
                         "branch_ids": branch_ids.to(device)}
        logprob, hit = per_token(tokens.to(device), targets.to(device), *([documents] if documents else []))
        logprob, hit = logprob.cpu(), hit.cpu()
        for r, i, start, n in places:
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
            f"{task.name}_ppl": math.exp(min(-float(sums[3]) / items, 700.0))}


def run_tokenizer(cfg):
    """The tokenizer the run's data was prepared with (``data.tokenizer``, else the prepared data's own)."""
    from pretrain.data.tokenizer import Tokenizer

    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    from pretrain.data.documents import open_documents

    path = cfg.data.path or cfg.data.sources[0]["path"]
    return open_documents(path, "train", on_bad_sample=cfg.data.on_bad_sample).tokenizer()


def checkpoint_tokenizer(checkpoint, cfg, path: str | None = None):
    """The tokenizer to score ``checkpoint`` with: ``path``, else the run's (``run_tokenizer``) — a
    ``TokenizerError`` unless it is the one the checkpoint was trained with (its ``state.json``'s hash)."""
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.data.tokenizer import Tokenizer, TokenizerError

    tok = Tokenizer.load(path) if path else run_tokenizer(cfg)
    trained_on = json.loads((resolve_checkpoint(checkpoint, say=lambda line: None) / "state.json")
                            .read_text()).get("tokenizer_hash")
    if trained_on and getattr(tok, "hash", None) != trained_on:
        raise TokenizerError(f"tokenizer {path or 'of ' + (cfg.data.path or 'the data')} "
                             f"({str(getattr(tok, 'hash', '?'))[:12]}) is not the one {checkpoint} was "
                             f"trained with ({trained_on[:12]})")
    return tok


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
                 per_token=None, width_multiple: int = 1, fixed_shape: tuple[int, int] | None = None,
                 shared: bool = True, select: bool = False) -> dict[str, float]:
        """Every task on this rank's items (item i on rank i mod ``ranks``); ``reduce`` sums a float64 tensor over
        the ranks, ``max_reduce`` takes the maximum of an int64 one (None: one rank). ``per_token``: how this
        layout scores a batch (default: ``model``'s forward, whole logits); ``width_multiple``, ``fixed_shape``,
        ``shared`` (a context scored once for its choices; the layout's forward must take ``branch_ids``): as
        ``score``; ``select``: the default ``per_token`` computes logits only where a target is (``logits_scorer``)."""
        was_training = model.training
        model.eval()
        per_token = per_token or logits_scorer(model, select)
        values: dict[str, float] = {}

        def most(count: int) -> int | None:
            if max_reduce is None:
                return None
            return int(max_reduce(torch.tensor(count, dtype=torch.int64, device=device)))

        try:
            with torch.no_grad():
                for task, requests in zip(self.tasks, self.requests):
                    mine = [r for r in requests if r.item % ranks == rank]
                    results = score(per_token, mine, self.seq_len, self.batch_size, device, most, width_multiple,
                                    fixed_shape, shared and fixed_shape is None)
                    sums = task_sums(task, mine, results).to(device)
                    if reduce is not None:
                        sums = reduce(sums)
                    values.update(metrics_of(task, sums.cpu()))
        finally:
            model.train(was_training)
        return values
