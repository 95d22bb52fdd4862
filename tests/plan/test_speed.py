"""The throughput model: a hand-computed point, the validate command's output and errors, the calibration goal."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.plan.__main__ import main
from pretrain.plan.hardware import gpu
from pretrain.plan.points import CALIBRATION, load
from pretrain.plan.speed import Constants, Layout, Shape, estimate

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["point_id", "framework", "model", "model_family", "layers", "hidden", "heads", "vocab", "seq_len",
           "global_batch_seqs", "micro_batch", "gpu_type", "gpu_count", "precision", "activation_checkpointing",
           "tflops_per_gpu"]
DENSE = {"framework": "test", "model": "MPT-tiny", "model_family": "dense decoder (MPT)", "layers": "2",
         "hidden": "1024", "heads": "8", "vocab": "1000", "seq_len": "1024", "global_batch_seqs": "8",
         "micro_batch": "8", "gpu_type": "a100_80gb", "gpu_count": "1", "precision": "amp_bf16",
         "activation_checkpointing": "False"}


def fixture(tmp_path: Path) -> Path:
    rows = [{**DENSE, "point_id": "dense_a", "tflops_per_gpu": "120"},
            {**DENSE, "point_id": "dense_b", "tflops_per_gpu": "150"},
            {**DENSE, "point_id": "no_shape", "layers": "", "model": "something", "tflops_per_gpu": "100"},
            {**DENSE, "point_id": "tpu", "gpu_type": "TPU v5p", "tflops_per_gpu": "100"}]
    path = tmp_path / "points.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_one_gpu_dense_point_by_hand():
    """MPT-style, 2 layers × d 1024 (ffn 4096, not gated), vocab 1000, seq 1024, 8 sequences on one A100 80GB:
    N_matmul = 2·(4·1024² + 2·1024·4096) + 1024·1000 = 26,189,824; FLOPs/token = 6N + 12·2·8·128·1024 =
    182,304,768; step FLOPs = ×8192 = 1.49344e12, of which attention 2.06158e12 / 10. Time = linear / (280 T ·
    0.88 · 1024/(1024+510)) + attention / (280 T · 0.51) + 8192·2·1024·250 B / 2.039 TB/s = 11.327 ms →
    131.85 TFLOP/s (no TP, PP, DP: nothing else)."""
    k = Constants(bf16_efficiency=0.88, fp8_efficiency=0.68, attention_efficiency=0.51, width_half=510,
                  memory_bytes=250, tp_exposed=0.14, dp_overlap=1.0)
    shape = Shape(2, 1024, 8, 8, 4096, 1000, gated=False)
    e = estimate(shape, Layout(1, micro_batch=8), gpu("a100_80gb"), 1024, 8, k)
    assert e.step_s == pytest.approx(0.0113270619, rel=1e-8)
    assert e.tflops_per_gpu == pytest.approx(131.8471347, rel=1e-8)
    assert set(v for key, v in e.parts.items() if key != "compute") == {0.0}



def test_document_masking_shortens_attention_not_the_model_flops(tmp_path):
    """With packed documents the step computes density × attention's dense FLOPs (the point above: 2.06158e11 of
    attention at 280 T · 0.51); MFU's FLOPs stay dense. The planner takes the density from plan.mean_doc_len
    (or synthetic documents' length), causal (L + 1) / (T + 1), bidirectional L / T."""
    from pretrain.plan.search import planned_density
    from pretrain.plan.speed import attention_density

    from ..conftest import tiny_config

    k = Constants(bf16_efficiency=0.88, fp8_efficiency=0.68, attention_efficiency=0.51, width_half=510,
                  memory_bytes=250, tp_exposed=0.14, dp_overlap=1.0)
    shape, layout = Shape(2, 1024, 8, 8, 4096, 1000, gated=False), Layout(1, micro_batch=8)
    dense = estimate(shape, layout, gpu("a100_80gb"), 1024, 8, k)
    packed = estimate(shape, layout, gpu("a100_80gb"), 1024, 8, k, density=0.25)
    assert dense.step_s - packed.step_s == pytest.approx(0.75 * 2.06158e11 / (280e12 * 0.51), rel=1e-4)
    assert packed.tflops_per_gpu * packed.step_s == pytest.approx(dense.tflops_per_gpu * dense.step_s, rel=1e-9)
    assert attention_density(1024, 255) == 256 / 1025 and attention_density(1024, 256, causal=False) == 0.25
    assert attention_density(1024, 0) == attention_density(1024, 4096) == 1.0
    cfg = tiny_config(tmp_path, "model.seq_len=64", "data.document_mask=true", "plan.mean_doc_len=15")
    assert planned_density(cfg) == pytest.approx(16 / 65)
    assert planned_density(tiny_config(tmp_path, "model.seq_len=64", "data.document_mask=true")) == 17 / 65
    assert planned_density(tiny_config(tmp_path, "model.seq_len=64", "plan.mean_doc_len=15")) == 1.0
    assert tiny_config(tmp_path, "plan.mean_doc_len=15").inert() == [
        "plan.mean_doc_len = 15 has no effect: data.document_mask = false"]

def test_validate_prints_a_row_per_point_skips_by_reason_and_the_summary_line(tmp_path, capsys, monkeypatch):
    import pretrain.plan.speed as speed

    monkeypatch.setattr(speed.estimate, "__defaults__", (Constants(
        bf16_efficiency=0.88, fp8_efficiency=0.68, attention_efficiency=0.51, width_half=510, memory_bytes=250,
        tp_exposed=0.14, dp_overlap=1.0), 1.0))
    assert main(["validate", "--points", str(fixture(tmp_path))]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out if line.startswith("dense_")}
    assert rows["dense_a"] == ["120.0", "131.8", "+9.9%"] and rows["dense_b"] == ["150.0", "131.8", "-12.1%"]
    assert "skipped 1: no model shape (layers, hidden, heads)" in out
    assert "skipped 1: unknown GPU type 'TPU v5p'" in out
    # |errors| 0.0987, 0.1210: median their mean, p90 linear between them
    assert out[-1] == "median |error| 11.0% p90 11.9% over 2 points (2 skipped)"


def test_fp16_and_unstated_precision_are_predicted_and_counted(tmp_path, capsys):
    """A held-out-style fp16 row is read as bf16 (same tensor cores), a row without a precision takes its
    framework's default (bf16) — both predicted like the stated bf16 row, and validate says what it assumed; a
    precision nobody models is still skipped by name, and an unstated one from an unknown framework too."""
    from pretrain.plan.points import load

    rows = [{**DENSE, "point_id": "stated", "tflops_per_gpu": "120"},
            {**DENSE, "point_id": "fp16", "precision": "amp_fp16", "tflops_per_gpu": "120"},
            {**DENSE, "point_id": "unstated", "precision": "", "framework": "llm-foundry", "tflops_per_gpu": "120"},
            {**DENSE, "point_id": "int4", "precision": "int4", "tflops_per_gpu": "120"},
            {**DENSE, "point_id": "nobody", "precision": "", "framework": "unknown", "tflops_per_gpu": "120"}]
    path = tmp_path / "points.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    points, skipped = load(path)
    by_id = {p.id: p for p in points}
    assert set(by_id) == {"stated", "fp16", "unstated"}
    assert by_id["fp16"].layout.precision == by_id["unstated"].layout.precision == "bf16"
    assert by_id["fp16"].assumed == ("fp16 read as bf16",)
    assert by_id["unstated"].assumed == ("precision amp_bf16 (framework default)",)
    assert dict(skipped) == {"int4": "precision 'int4' not modelled",
                             "nobody": "precision not stated (and no framework default)"}
    assert main(["validate", "--points", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "assumed 1: fp16 read as bf16" in out and "assumed 1: precision amp_bf16 (framework default)" in out
    assert out[-1].endswith("over 3 points (2 skipped)")
    assert out[-2].endswith("over the 1 points that state everything the model reads")


@pytest.mark.parametrize("content, message", [
    (None, "points file not found"),
    ("point_id,layers\nx,\n", "no predictable point"),
    (b"\xff\xfe\x00binary", "is not a CSV of published points"),
])
def test_validate_bad_input_is_one_line(tmp_path, content, message):
    path = tmp_path / "p.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "pretrain.plan", "validate", "--points", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_calibration_file_meets_the_goal():
    """median ≤ 15 %, p90 ≤ 35 % over ≥ 120 published points with the shipped constants (7 of them)."""
    from pretrain.plan.speed import median_p90

    points, skipped = load(CALIBRATION)
    errors = [estimate(p.shape, p.layout, p.gpu, p.seq, p.global_batch).tflops_per_gpu / p.tflops - 1
              for p in points]
    med, p90 = median_p90(errors)
    assert len(points) >= 120 and med <= 0.15 and p90 <= 0.35, (len(points), med, p90)


def test_gpu_names_and_overrides():
    assert gpu("H100 (DGX-H100)").name == "h100" and gpu("a100_40gb").hbm_gib == 40
    assert gpu("h200", {"network_gb_s": 25}).network_gb_s == 25
    with pytest.raises(ValueError, match="unknown GPU 'v100'"):
        gpu("v100")
    with pytest.raises(ValueError, match="unknown GPU field"):
        gpu("h100", {"tflops": 1})
