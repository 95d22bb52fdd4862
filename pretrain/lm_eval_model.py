"""lm-evaluation-harness's ``pretrain`` model: any native checkpoint, scored by any lm-eval task, without an export.

    import pretrain.lm_eval_model  # registers the model "pretrain" (needs pip install -e ".[eval]")
    from lm_eval import simple_evaluate
    simple_evaluate(model="pretrain", model_args="checkpoint=runs/gpt_tiny/checkpoints,batch_size=16",
                    tasks=["hellaswag"])

or ``PretrainLM(checkpoint=...)`` as ``model=``, or ``tools/evaluate.py --backend native`` with lm-eval task names.
The checkpoint loads through ``load_model`` (any saved layout, consolidated); the tokenizer is the run's (its data's,
or ``tokenizer=``, checked against the hash the checkpoint was trained with).

- ``loglikelihood``: lm-eval's pair encoding (its ``TemplateLM``), then the in-loop scorer (``pretrain/downstream.py``:
  the choices of one context share one scoring of it, several contexts a row; a request longer than the model's
  ``seq_len`` is cut on the left alone, as lm-eval's ``hf`` model cuts it);
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``seq_len`` tokens, each scored as above;
- ``generate_until``: greedy (or sampled, with ``do_sample`` and a ``temperature``) decoding of at most
  ``max_gen_toks`` tokens after the context cut to ``seq_len - max_gen_toks`` on the left, stopped at EOS or a
  stop string, the text cut before the first stop string — as lm-eval's ``hf`` model does.

An empty context (and the first rolling window) is conditioned on EOS, the token that ends every training document
(lm-eval's ``hf`` model takes the tokenizer's BOS unless given ``prefix_token_id``, as ``tools/evaluate.py --backend
hf`` gives it).
"""

from __future__ import annotations

import contextlib

import torch

from pretrain.downstream import Request, checkpoint_tokenizer, logits_scorer, score
from pretrain.errors import UserError

EXTRA = 'pip install -e ".[eval]"'
try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # an optional extra
    raise UserError(f"lm-evaluation-harness is not installed ({exc.name or exc}): {EXTRA}") from None


class PretrainLM(TemplateLM):
    """lm-eval's model ``pretrain``: ``checkpoint`` (a step or checkpoint directory), ``tokenizer`` (default: the
    run's), ``batch_size`` (rows a forward), ``device``, ``dtype`` (float32 | bfloat16: autocast), ``shared``
    (score a context once for its choices), ``max_gen_toks``. ``model``, ``cfg``, ``tok``: a model in memory instead
    of a checkpoint (its config and tokenizer)."""

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, batch_size: int | str = 8,
                 device: str = "cpu", dtype: str = "float32", shared: bool | str = True, max_gen_toks: int | str = 256,
                 model=None, cfg=None, tok=None, max_batch_size=None, **unused):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise UserError("the pretrain model needs checkpoint=DIR (a step or checkpoint directory)")
            from pretrain.checkpoint import load_model

            model, cfg = load_model(checkpoint)
            tok = checkpoint_tokenizer(checkpoint, cfg, tokenizer)
        if cfg.model.arch != "gpt":
            raise UserError(f"{checkpoint or 'the model'} is a {cfg.model.arch} model; lm-eval scores a gpt")
        if str(batch_size).startswith("auto"):
            batch_size = 16
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        self._device = torch.device(device)
        self.model, self.cfg, self.tokenizer_ = model.to(self.device).eval(), cfg, tok
        self.dtype = dtype
        self.shared = str(shared).lower() not in ("false", "0", "no")
        self.max_gen_toks = int(max_gen_toks)
        self.per_token = logits_scorer(self.model, select=True)

    # --- TemplateLM's tokenizer interface ---
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def max_length(self) -> int:
        return self.cfg.model.seq_len

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer_.decode([tokens] if isinstance(tokens, int) else list(tokens))

    def _autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        vocab = self.cfg.model.vocab_size
        requests = []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise UserError("lm-eval asked for the log-likelihood of a continuation that encodes to no tokens")
            top = max(context + continuation)
            if top >= vocab:
                raise UserError(f"the tokenizer gives id {top}, outside the model's vocab_size ({vocab}): not the "
                                "model's tokenizer")
            requests.append(Request(i, 0, list(context), list(continuation)))
        with torch.no_grad(), self._autocast():
            return score(self.per_token, requests, self.max_length, self.batch_size, self.device, shared=self.shared)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (pair, _, _), result in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, request in enumerate(requests):
            (string,) = request.args
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self._score(windows)):
            totals[r] += ll
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            until.append(eos_text)
            budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            text = self._generate(self.tok_encode(context) or [self.prefix_token_id], budget, until,
                                  temperature if sample else 0.0)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            out.append(text)
        return out

    def _generate(self, context: list[int], budget: int, until: list[str], temperature: float) -> str:
        room = max(self.max_length - budget, 1)
        tokens = torch.tensor([context[-room:]], dtype=torch.long, device=self.device)
        new: list[int] = []
        with torch.no_grad(), self._autocast():
            for _ in range(budget):
                logits = self.model(tokens[:, -self.max_length:])[:, -1, :].float()
                if temperature > 0:
                    token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))
                else:
                    token = int(logits.argmax(-1))
                if token == self.eot_token_id:
                    break
                new.append(token)
                tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)
                text = self.tok_decode(new)
                if any(stop and stop in text for stop in until):
                    break
        return self.tok_decode(new)


try:
    register_model("pretrain")(PretrainLM)
except ValueError:  # this module imported a second time (a reload): lm-eval keeps the first class
    pass
