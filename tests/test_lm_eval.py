"""lm-evaluation-harness integration (pretrain/lm_eval_model.py, tools/evaluate.py): lm-eval's ``pretrain`` model on a
native checkpoint against lm-eval's own ``hf`` model on the exported folder — per-request log-likelihoods, rolling
log-likelihoods, greedy generations, and the tool's scores of a local task under both backends."""

import importlib.util
import json
import sys

import pytest
import torch

from pretrain.distributed import DistInfo
from pretrain.train import build_trainer

from .conftest import tiny_config

lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is in the dev set: pip install -e ".[dev]"')

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared):
    """A 2-step run of a tiny llama GPT (seq_len 64: some requests are cut on the left) and two task files made
    from the prepared data (the README's make_tasks), with their lm-eval YAMLs."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    cfg = tiny_config(tmp, "data.source=shards", f"data.path={prepared}", "model.vocab_size=512",
                      "model.seq_len=64", "train.steps=2", "checkpoint.interval=2")
    build_trainer(cfg, DistInfo()).fit()
    assert _tool("make_tasks").main(["--data", str(prepared), "--out", str(tmp / "tasks"), "--items", "24",
                                     "--split", "train"]) == 0
    return cfg, tmp / "tasks"


@pytest.fixture(scope="module")
def both(run, tmp_path_factory):
    """lm-eval's pretrain model on the checkpoint and lm-eval's hf model on its export (logits cache off, EOS the
    prefix of an empty context: as tools/evaluate.py --backend hf makes it)."""
    from lm_eval.models.huggingface import HFLM

    from pretrain.checkpoint import load_model
    from pretrain.checkpoint.hf import export_hf, run_tokenizer
    from pretrain.lm_eval_model import PretrainLM

    cfg, _ = run
    ours = PretrainLM(checkpoint=str(cfg.checkpoint_dir), batch_size=4)
    model, saved = load_model(cfg.checkpoint_dir)
    folder = export_hf(model, saved.model, tmp_path_factory.mktemp("hf") / "hf", run_tokenizer(saved))
    theirs = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4, logits_cache=False,
                  prefix_token_id=ours.eot_token_id)
    return ours, theirs


def _requests(tasks):
    pairs = []
    for line in (tasks / "next_line.jsonl").read_text().splitlines():
        item = json.loads(line)
        pairs += [(item["context"], choice) for choice in item["choices"]]
    for line in (tasks / "last_word.jsonl").read_text().splitlines():
        item = json.loads(line)
        pairs.append((item["context"], item["continuation"]))
    return pairs


def test_loglikelihoods_equal_lm_evals_hf_model_on_the_export(run, both):
    """Every request of both local tasks (shared contexts, cut contexts, one-token continuations): the same
    log-likelihood to 1e-4 and the same greedy flag; the shared-context scorer gives the one-request-a-row numbers."""
    from lm_eval.api.instance import Instance

    ours, theirs = both
    pairs = _requests(run[1])
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = ours.loglikelihood(instances, disable_tqdm=True)
    want = theirs.loglikelihood(instances, disable_tqdm=True)
    assert len(got) == len(pairs) > 100
    assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) <= 1e-4
    assert [a[1] for a in got] == [b[1] for b in want]
    assert any(len(ours.tok_encode(c + k)) > ours.max_length for c, k in pairs)  # some are cut on the left
    ours.shared = False
    try:
        alone = ours.loglikelihood(instances, disable_tqdm=True)
    finally:
        ours.shared = True
    assert max(abs(a[0] - b[0]) for a, b in zip(got, alone)) <= 1e-4


def test_rolling_loglikelihoods_and_greedy_generation_equal_lm_evals_hf_model(run, both):
    """loglikelihood_rolling over texts longer than seq_len (lm-eval's disjoint windows), and generate_until with a
    stop string and a token budget: the hf model's numbers and text."""
    from lm_eval.api.instance import Instance

    ours, theirs = both
    texts = [json.loads(line)["context"] for line in (run[1] / "last_word.jsonl").read_text().splitlines()[:6]]
    assert any(len(ours.tok_encode(t)) > 2 * ours.max_length for t in texts)
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = ours.loglikelihood_rolling(rolling, disable_tqdm=True)
    want = theirs.loglikelihood_rolling(rolling, disable_tqdm=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    generate = [Instance("generate_until", {}, (t[-60:], {"until": ["@@"], "max_gen_toks": 8, "do_sample": False}),
                         i) for i, t in enumerate(texts)]
    ours_text = ours.generate_until(generate, disable_tqdm=True)
    theirs_text = theirs.generate_until(generate, disable_tqdm=True)
    assert ours_text == theirs_text and any(ours_text)


def test_evaluate_tool_gives_one_score_under_every_backend(run, capsys, monkeypatch):
    """tools/evaluate.py on one checkpoint and the two task files: the in-loop scorer (JSONL), lm-eval's pretrain
    model (the task names through the YAMLs make_tasks wrote) and lm-eval's hf model on an export agree — the same
    accuracies, perplexities to 1e-4."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, tasks = run
    tool = _tool("evaluate")
    files = [str(tasks / "next_line.jsonl"), str(tasks / "last_word.jsonl")]
    results = []
    for extra in (files, ["next_line", "last_word", "--include-path", str(tasks)], [*files, "--backend", "hf"]):
        capsys.readouterr()
        assert tool.main(["--checkpoint", str(cfg.checkpoint_dir), "--json", "--batch-size", "4", "--tasks",
                          *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    native = results[0]
    assert set(native) == {"next_line", "last_word"} and set(native["next_line"]) == {"acc", "acc_norm"}
    for other in results[1:]:
        assert other["next_line"] == native["next_line"]
        assert other["last_word"]["acc"] == native["last_word"]["acc"]
        assert abs(other["last_word"]["ppl"] / native["last_word"]["ppl"] - 1) <= 1e-4


def test_bench_eval_runs_the_three_scorers_on_one_task(run, capsys):
    """tools/bench_eval.py (the README's scoring-speed table): the in-loop scorer shared and alone and lm-eval's hf
    model score the same items to the same accuracy (no timing is asserted)."""
    cfg, tasks = run
    assert _tool("bench_eval").main(["--checkpoint", str(cfg.checkpoint_dir), "--task", str(tasks / "next_line.jsonl"),
                                     "--items", "8", "--repeat", "1", "--batch-size", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] == 8 and out["requests"] == 32
    scorers = ("in-loop shared", "in-loop alone", "lm-eval hf")
    assert len({out[name]["acc"] for name in scorers}) == 1 and out["lm-eval hf"]["vs_lm_eval_hf"] == 1.0
    assert _tool("bench_eval").main(["--checkpoint", str(cfg.checkpoint_dir), "--task",
                                     str(tasks / "last_word.jsonl")]) == 2
    assert "a multiple-choice task" in capsys.readouterr().err


def test_bad_inputs_are_one_line(run, capsys, monkeypatch):
    """An unknown lm-eval task, and lm-eval not installed (the extra named), each one line and exit 2; the Python
    import says the same."""
    cfg, tasks = run
    tool = _tool("evaluate")
    assert tool.main(["--checkpoint", str(cfg.checkpoint_dir), "--tasks", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err
    assert "no_such_task_xyz: neither a .jsonl file nor a task lm-eval knows" in err and len(err.splitlines()) == 1
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of lm-eval fails as if it were not installed
    monkeypatch.delitem(sys.modules, "pretrain.lm_eval_model", raising=False)
    assert tool.main(["--checkpoint", str(cfg.checkpoint_dir), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert 'lm-evaluation-harness is not installed' in err and 'pip install -e ".[eval]"' in err
    assert len(err.splitlines()) == 1
    from pretrain.errors import UserError

    with pytest.raises(UserError, match=r'pip install -e "\.\[eval\]"'):
        import pretrain.lm_eval_model  # noqa: F401
    # the JSONL path needs no lm-eval
    assert tool.main(["--checkpoint", str(cfg.checkpoint_dir), "--tasks", str(tasks / "next_line.jsonl")]) == 0
