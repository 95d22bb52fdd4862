"""In-loop downstream evaluation (pretrain/downstream.py): the scorer against a hand computation, the task files'
bad inputs, and the trainer's in-loop scores — which must not perturb training."""

import json

import pytest
import torch

from pretrain.distributed import DistInfo
from pretrain.downstream import (
    Downstream,
    encode_pair,
    load_task,
    logits_scorer,
    requests_of,
    score,
    task_sums,
)
from pretrain.errors import ConfigError, DataError
from pretrain.train import build_trainer

from .conftest import tiny_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


class Chars:
    """A character tokenizer: 'a'.. -> 1.., space 27, EOS 0."""
    eos_id = 0

    def encode(self, text):
        return [27 if c == " " else ord(c) - ord("a") + 1 for c in text]


TABLE = torch.randn(28, 28, generator=torch.Generator().manual_seed(0))


def bigram(tokens):
    """A fixed bigram model: the logits after token t are TABLE[t]."""
    return TABLE[tokens]


def ll(context: str, continuation: str) -> float:
    """The hand computation: sum of log p(next | previous) over the continuation's characters."""
    ids = Chars().encode(context + continuation)
    lp = torch.log_softmax(TABLE, -1)
    start = len(context)
    return sum(float(lp[ids[i - 1], ids[i]]) for i in range(start, len(ids)))


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_scores_equal_a_hand_computation_with_ties_lengths_and_truncation(tmp_path):
    """3 items: acc picks the highest log-likelihood, acc_norm the highest per character (lm-eval's definitions);
    two equal choices go to the first; a context longer than seq_len loses its left end, as lm-eval cuts it."""
    items = [{"context": "the cat", "choices": [" sat", " ran away", " is"], "gold": 1},
             {"context": "ab", "choices": [" zz", " zz"], "gold": 1},  # a tie: the first wins, so wrong
             {"context": "abcdefghijklmnopqrstuvwxyz", "choices": [" q", " xy"], "gold": 0}]
    task = load_task(write(tmp_path / "toy.jsonl", items))
    seq_len = 10  # " ran away" (9 characters) keeps one context character before it
    requests = requests_of(task, Chars(), 28)
    results = score(logits_scorer(bigram), requests, seq_len, batch_size=2, device="cpu")
    for req, (got, _) in zip(requests, results):
        item = items[req.item]
        context, choice = item["context"], item["choices"][req.choice]
        whole = (context + choice)[-(seq_len + 1):]  # the window the scorer sees, continuation kept
        torch.testing.assert_close(got, ll(whole[:len(whole) - len(choice)], choice), rtol=0, atol=1e-5)
    sums = task_sums(task, requests, results)
    expected_acc, expected_norm = 0, 0
    for item in items:
        lls = [ll(item["context"][-(seq_len + 1 - len(c)):] if len(item["context"] + c) > seq_len + 1 else
                  item["context"], c) for c in item["choices"]]
        expected_acc += int(max(range(len(lls)), key=lambda j: (lls[j], -j)) == item["gold"])
        norm = [x / len(c) for x, c in zip(lls, item["choices"])]
        expected_norm += int(max(range(len(norm)), key=lambda j: (norm[j], -j)) == item["gold"])
    assert sums[0] == 3 and sums[1] == expected_acc and sums[2] == expected_norm
    assert sums[1] <= 2  # the tied item is wrong whatever the model


def test_last_word_accuracy_and_perplexity(tmp_path):
    task = load_task(write(tmp_path / "lamb.jsonl", [{"context": "abc", "continuation": " de"},
                                                    {"context": "", "continuation": "xy"}]))
    assert task.kind == "last_word"
    requests = requests_of(task, Chars(), 28)
    assert requests[1].context == [0]  # an empty context is the EOS token
    results = score(logits_scorer(bigram), requests, 16, 4, "cpu")
    greedy = [all(int(TABLE[a].argmax()) == b for a, b in zip(r.context[-1:] + r.continuation[:-1], r.continuation))
              for r in requests]
    assert [g for _, g in results] == greedy
    sums = task_sums(task, requests, results)
    total = ll("abc", " de") + float(sum(torch.log_softmax(TABLE, -1)[a, b] for a, b in ((0, 24), (24, 25))))
    torch.testing.assert_close(float(sums[3]), total, rtol=0, atol=1e-5)
    assert sums[4] == 5  # " de" and "xy": 3 + 2 tokens


@pytest.mark.parametrize("flavor", ["llama", "gpt2"])
def test_a_shared_context_scored_once_gives_each_requests_own_numbers(tmp_path, flavor):
    """Prefix trees (a context once, its choices as branches, several contexts a row) against each request scored
    alone: the same log-likelihoods to rounding and the same greedy flags — rotary and learned positions, requests
    too long to share (cut on the left alone), one-token contexts, more choices than one row holds."""
    from pretrain.downstream import Request, rows_of, segments_of
    from pretrain.models import build_model

    cfg = tiny_config(tmp_path, "model.seq_len=24", flavor=flavor)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(4, cfg.model.vocab_size, (n,), generator=g).tolist()

    requests = []
    for item, (context, lengths) in enumerate([(9, [3, 5, 1, 4]), (1, [2, 6]), (20, [3, 8]), (5, [7] * 5),
                                               (14, [2, 2, 3]), (30, [4, 2])]):
        shared_context = ids(context)
        requests += [Request(item, j, shared_context, ids(n)) for j, n in enumerate(lengths)]
    segments = segments_of(requests, cfg.model.seq_len, shared=True)
    rows = rows_of(segments, cfg.model.seq_len, pack=True)
    assert len(segments) < len(requests) and len(rows) < len(segments)  # shared and packed
    assert all(sum(len(s) for s in row) <= cfg.model.seq_len for row in rows)
    with torch.no_grad():
        alone = score(logits_scorer(model), requests, cfg.model.seq_len, 4, "cpu")
        together = score(logits_scorer(model), requests, cfg.model.seq_len, 4, "cpu", shared=True)
        selected = score(logits_scorer(model, select=True), requests, cfg.model.seq_len, 4, "cpu", shared=True)
    for got in (together, selected):  # the head everywhere, or only where a target is (logits_at)
        assert [hit for _, hit in got] == [hit for _, hit in alone]
        torch.testing.assert_close([ll for ll, _ in got], [ll for ll, _ in alone], rtol=0, atol=1e-5)


def test_encode_pair_moves_the_contexts_trailing_space():
    assert encode_pair(Chars(), "ab ", "c") == ([1, 2], [27, 3])


@pytest.mark.parametrize("lines, message", [
    (['{"context": "a", "choices": ["b", "c"], "gold": 0}', "{not json"], r"bad\.jsonl:2: not JSON"),
    (['{"context": "a", "choices": ["b"], "gold": 0}'], r"bad\.jsonl:1: a multiple-choice item needs at least 2"),
    (['{"context": "a", "choices": ["b", "c"], "gold": 2}'], r"bad\.jsonl:1: gold 2 is out of range for 2 choices"),
    (['{"context": "a", "choices": ["b", "c"], "gold": true}'], r"bad\.jsonl:1: 'gold' must be an integer"),
    (['{"choices": ["b", "c"], "gold": 0}'], r"bad\.jsonl:1: 'context' must be a string"),
    (['{"context": "a", "choices": ["b", "c"], "gold": 0}', '{"context": "a", "continuation": "b"}'],
     r"bad\.jsonl:2: a last-word item in a file of choice items"),
    (['{"context": "a"}'], r"bad\.jsonl:1: an item needs 'choices' and 'gold'"),
    ([], r"bad\.jsonl: no items"),
])
def test_a_bad_task_file_is_one_line_naming_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_task(path)


def test_missing_file_and_tokenizer_mismatch(tmp_path):
    with pytest.raises(DataError, match=r"eval.tasks: .*nope.jsonl does not exist"):
        load_task(tmp_path / "nope.jsonl")
    task = load_task(write(tmp_path / "t.jsonl", [{"context": "zz", "choices": [" a", " b"], "gold": 0}]))
    with pytest.raises(DataError, match=r"the tokenizer gives id 27, outside model.vocab_size \(20\): the task is "
                                        "encoded with another tokenizer than the model's"):
        requests_of(task, Chars(), 20)


def _task_file(tmp_path, prepared, n=12):
    from pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer.load(prepared / "tokenizer.model")
    assert tok.vocab_size <= 512
    records = [{"context": f"def f{i}(x):\n    return", "choices": [" x", " None", f" x + {i}", " self"], "gold": i % 4}
               for i in range(n)]
    return write(tmp_path / "code_mc.jsonl", records)


def test_in_loop_scores_are_logged_and_do_not_perturb_training(tmp_path, prepared):
    """Two tasks every 2 steps and at the end: the metrics carry <stem>_acc / _acc_norm / _ppl beside the loss, and
    the run's losses and final parameters equal those of the same run without them."""
    from pretrain.metrics import read_metrics

    mc = _task_file(tmp_path, prepared)
    lw = write(tmp_path / "code_lw.jsonl", [{"context": "import o", "continuation": "s"},
                                            {"context": "def ", "continuation": "__init__"}])
    base = ("data.source=shards", f"data.path={prepared}", "model.vocab_size=512", "train.steps=4",
            "model.seq_len=32", "logging.interval=1")
    runs = {}
    for name, extra in (("plain", ()), ("tasks", (f"eval.tasks=['{mc}', '{lw}']", "eval.downstream_interval=2"))):
        torch.manual_seed(0)
        cfg = tiny_config(tmp_path / name, *base, *extra)
        trainer = build_trainer(cfg, DistInfo())
        losses = trainer.fit()
        runs[name] = (losses, {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}, cfg)
    assert runs["plain"][0] == runs["tasks"][0]
    assert all(torch.equal(runs["plain"][1][k], v) for k, v in runs["tasks"][1].items())
    rows = [r for r in read_metrics(runs["tasks"][2].logging.run_dir) if "code_mc_acc" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert 0 <= r["code_mc_acc"] <= 1 and 0 <= r["code_mc_acc_norm"] <= 1
        assert 0 <= r["code_lw_acc"] <= 1 and r["code_lw_ppl"] > 1
        assert r["code_mc_acc"] * 12 == round(r["code_mc_acc"] * 12)  # a count of the 12 items


def test_downstream_scores_split_over_ranks_sum_to_one_process(tmp_path, prepared):
    """Items split i mod ranks and the per-task sums added give one process's numbers exactly (the reduction the
    trainer does over data-parallel ranks; every rank runs as many batches as the busiest)."""
    from pretrain.models import build_model

    mc = _task_file(tmp_path, prepared, n=7)
    cfg = tiny_config(tmp_path, "data.source=shards", f"data.path={prepared}", "model.vocab_size=512",
                      f"eval.tasks=['{mc}']")
    downstream = Downstream.for_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    whole = downstream.evaluate(model, "cpu")
    parts, calls = [], []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, tokens, **documents):
            calls.append(tokens.shape[0])
            return self.inner(tokens, **documents)

    for rank in range(3):
        sums = []
        downstream.evaluate(Counting(), "cpu", rank, 3, reduce=lambda s, sums=sums: sums.append(s) or s,
                            max_reduce=lambda c: torch.tensor(5))
        parts.append(sums[0])
    total = sum(parts)
    assert total[0] == 7 and len(calls) == 15  # 5 forwards a rank, whatever its share
    from pretrain.downstream import metrics_of

    assert metrics_of(downstream.tasks[0], total) == whole


def test_config_refusals(tmp_path):
    with pytest.raises(ConfigError, match="eval.tasks needs a tokenizer to encode the tasks"):
        tiny_config(tmp_path, "eval.tasks=['x.jsonl']")
    with pytest.raises(ConfigError, match='it needs model.arch = "gpt"'):
        tiny_config(tmp_path, "eval.tasks=['x.jsonl']", "data.tokenizer=t.model", arch="bert")
    with pytest.raises(ConfigError, match="eval.downstream_interval must be >= 0"):
        tiny_config(tmp_path, "eval.downstream_interval=-1")


def test_two_task_files_with_one_stem_are_refused(tmp_path):
    record = [{"context": "a", "choices": [" b", " c"], "gold": 0}]
    (tmp_path / "x").mkdir()
    paths = [str(write(tmp_path / "t.jsonl", record)), str(write(tmp_path / "x" / "t.jsonl", record))]
    with pytest.raises(DataError, match="eval.tasks: two files named t: the metrics are named by the file's stem"):
        Downstream(paths, Chars(), 28, 16, 2)


def test_plot_metrics_draws_the_downstream_panels(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - s, "lr": 1e-3, "tokens_per_s": 100.0, "step_time_s": 0.1} for s in (1, 2)]
    rows[1].update({"hella_acc": 0.3, "hella_acc_norm": 0.35, "lamb_acc": 0.1, "lamb_ppl": 40.0, "val_ppl": 9.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    from plot_metrics import downstream_keys

    assert downstream_keys({"run": rows}) == (["hella_acc", "hella_acc_norm", "lamb_acc"], ["lamb_ppl"])
    done = subprocess.run([sys.executable, str(root / "tools" / "plot_metrics.py"), str(run), "--out",
                           str(tmp_path / "p.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.png").stat().st_size > 0


def test_evaluate_tool_scores_a_checkpoint_as_the_loop_did(tmp_path, prepared, small_corpus, capsys):
    """tools/evaluate.py on the checkpoint a run saved gives the scores the run logged at that step; a tokenizer
    other than the run's is one line naming both hashes; a bad task file one line naming it."""
    import importlib.util

    from pretrain.data.prepare import prepare
    from pretrain.metrics import read_metrics

    mc = _task_file(tmp_path, prepared, n=10)
    cfg = tiny_config(tmp_path, "data.source=shards", f"data.path={prepared}", "model.vocab_size=512",
                      "model.seq_len=32", "train.steps=2", "checkpoint.interval=2", f"eval.tasks=['{mc}']")
    build_trainer(cfg, DistInfo()).fit()
    logged = next(r for r in read_metrics(cfg.logging.run_dir) if "code_mc_acc" in r)
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    checkpoints = str(cfg.checkpoint_dir)
    capsys.readouterr()  # the run's own lines
    assert tool.main(["--checkpoint", checkpoints, "--tasks", str(mc), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {"code_mc": {"acc": logged["code_mc_acc"], "acc_norm": logged["code_mc_acc_norm"]}}

    other = tmp_path / "other"
    prepare([str(p) for p in sorted(small_corpus.iterdir())[:5]], other, vocab_size=400, val_fraction=0.0,
            progress=False)
    assert tool.main(["--checkpoint", checkpoints, "--tasks", str(mc), "--tokenizer",
                      str(other / "tokenizer.model")]) == 2
    assert "is not the one" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b"], "gold": 0}\n')
    assert tool.main(["--checkpoint", checkpoints, "--tasks", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {bad}:1: a multiple-choice item needs at least 2 choices, "
                                               "got 1")


def test_a_stop_signal_during_downstream_evaluation_saves_and_resumes_exactly(tmp_path, prepared):
    """A stop signal arriving while the tasks are scored (step 2 of 4): the run still logs that step's scores,
    saves at step 2 and stops as preempted; a new run resumes there and ends with the uninterrupted run's losses,
    and scores the tasks again at its last step."""
    from pretrain.metrics import read_metrics

    mc = _task_file(tmp_path, prepared, n=6)
    base = ("data.source=shards", f"data.path={prepared}", "model.vocab_size=512", "train.steps=4",
            "model.seq_len=32", "logging.interval=1", f"eval.tasks=['{mc}']", "eval.downstream_interval=2",
            "checkpoint.interval=100")
    straight = build_trainer(tiny_config(tmp_path / "straight", *base), DistInfo())
    expected = straight.fit()

    cfg = tiny_config(tmp_path / "stopped", *base)
    trainer = build_trainer(cfg, DistInfo())
    scoring = trainer.downstream.evaluate

    def interrupted(*args, **kwargs):
        trainer.stop_requested = True  # the signal handler's effect, mid-evaluation
        return scoring(*args, **kwargs)

    trainer.downstream.evaluate = interrupted
    losses = trainer.fit()
    assert trainer.preempted and trainer.step == 2 and losses == expected[:2]
    assert (cfg.checkpoint_dir / "latest").read_text().strip() == "step-00000002"
    resumed = build_trainer(tiny_config(tmp_path / "stopped", *base), DistInfo())
    assert resumed.fit()[-2:] == expected[2:]
    steps = [r["step"] for r in read_metrics(cfg.logging.run_dir) if "code_mc_acc" in r]
    assert steps == [2, 4]


def test_make_tasks_builds_valid_files_from_the_held_out_split_and_summarize_shows_scores(tmp_path, prepared):
    """tools/make_tasks.py (what the demo scores): two files of the documented format from the val split, seeded;
    the run summary lists the scores a run logged."""
    import importlib.util

    from pretrain.metrics import summarize

    spec = importlib.util.spec_from_file_location("make_tasks", ROOT / "tools" / "make_tasks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--data", str(prepared), "--out", str(tmp_path / "a"), "--items", "30"]) == 0
    assert tool.main(["--data", str(prepared), "--out", str(tmp_path / "b"), "--items", "30"]) == 0
    mc, lw = load_task(tmp_path / "a" / "next_line.jsonl"), load_task(tmp_path / "a" / "last_word.jsonl")
    assert (mc.kind, lw.kind) == ("choice", "last_word") and len(mc.items) == 30 and len(lw.items) >= 10
    assert all(len(item.choices) == 4 for item in mc.items)
    yaml = (tmp_path / "a" / "next_line.yaml").read_text()  # lm-eval's task of the same file (tests/test_lm_eval.py)
    assert "output_type: multiple_choice" in yaml and str((tmp_path / "a" / "next_line.jsonl").resolve()) in yaml
    assert "output_type: loglikelihood" in (tmp_path / "a" / "last_word.yaml").read_text()
    assert (tmp_path / "a" / "next_line.jsonl").read_text() == (tmp_path / "b" / "next_line.jsonl").read_text()
    assert tool.main(["--data", str(prepared), "--out", str(tmp_path / "c"), "--items", "0"]) == 2

    cfg = tiny_config(tmp_path, "data.source=shards", f"data.path={prepared}", "model.vocab_size=512",
                      "train.steps=2", "logging.interval=1",
                      f"eval.tasks=['{tmp_path / 'a' / 'next_line.jsonl'}', '{tmp_path / 'a' / 'last_word.jsonl'}']")
    build_trainer(cfg, DistInfo()).fit()
    text = summarize(cfg.logging.run_dir)
    line = next(line for line in text.splitlines() if line.strip().startswith("tasks"))
    assert "next_line_acc " in line and "next_line_acc_norm" in line and "last_word_ppl" in line
