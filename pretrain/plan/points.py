"""Published training runs (``shared/data/published-training-points.csv`` columns) as planner inputs.

Each row becomes (Shape, Layout, GPU, seq, global batch, published TFLOP/s per GPU) or a reason it is skipped:
the model shape (layers, hidden, heads; ffn and vocab defaulted by family) or a recognised model name, the
sequence length, the global batch, the GPU type and count, and a published throughput (TFLOP/s per GPU, or
tokens/s per GPU converted with the model's FLOPs per token). The layout defaults to what the source's framework
does when a column is empty (Megatron: distributed optimizer; llm-foundry: FSDP full shard; no TP/PP/CP/EP), and
so does the precision (every framework in the file trains in bf16 unless told otherwise); fp16 runs on the same
tensor cores at the same peak as bf16 on A100 / H100 / B200 and is read as bf16. A point records what was
assumed (``Point.assumed``) and ``validate`` counts it.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from pretrain.plan.hardware import GPU, gpu
from pretrain.plan.speed import Layout, Shape

CALIBRATION = Path(__file__).parent / "data" / "published-training-points.csv"


@dataclass
class Point:
    id: str
    shape: Shape
    layout: Layout
    gpu: GPU
    seq: int
    global_batch: int
    tflops: float  # published model TFLOP/s per GPU
    source: str = ""
    assumed: tuple[str, ...] = ()  # what an empty or differently-named column was read as


class Skip(ValueError):
    """Why a row cannot be predicted (its message is the reason)."""


def _number(text: str) -> float | None:
    """'4096', '8K', '1.34B', '64862437376' -> float; '' / 'n/a' -> None."""
    t = (text or "").strip().replace(",", "")
    if not t or t.lower() in ("n/a", "na", "-", "none"):
        return None
    m = re.fullmatch(r"([0-9.]+)\s*([kKmMbBtT]?)", t)
    if not m:
        return None
    scale = {"": 1, "k": 1024, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1)) * scale


def _int(row: dict, key: str, default: int | None = None) -> int | None:
    v = _number(row.get(key, ""))
    return default if v is None else int(round(v))


# model families: gated FFN (SwiGLU) or not, and the FFN width when the row leaves it out
def _family(row: dict, hidden: int) -> tuple[bool, int]:
    name = (row.get("model", "") + " " + row.get("model_family", "")).lower()
    ffn = _int(row, "ffn_hidden")
    if "mpt" in name or "gpt3" in name or "gpt-3" in name or "nemotron" in name or "bert" in name:
        return False, ffn or 4 * hidden
    gated = True  # llama-like: Llama, Mixtral, Qwen, DeepSeek, nanotron's
    return gated, ffn or int(8 * hidden / 3 / 256 + 0.999) * 256


# what a framework does when the row leaves a column empty (matched on the framework column, lower case)
FRAMEWORK_DEFAULTS = {"megatron": {"precision": "bf16"}, "nemo": {"precision": "bf16"},
                      "foundry": {"precision": "amp_bf16"}, "nanotron": {"precision": "bf16"}}


def _default(row: dict, column: str) -> str | None:
    framework = row.get("framework", "").lower()
    return next((d[column] for key, d in FRAMEWORK_DEFAULTS.items() if key in framework and column in d), None)


def _precision(text: str) -> str | None:
    t = text.lower()
    if "fp8" in t:
        return "fp8"
    if "bf16" in t or "fp16" in t or "float16" in t or not t:  # fp16: bf16's tensor cores and peak
        return "bf16"
    return None


def _zero(row: dict) -> int:
    z = row.get("zero_or_fsdp", "").lower()
    if "full_shard" in z:
        return 3
    if "shard_grad_op" in z:
        return 2
    m = re.search(r"zero-(\d)", z)
    if m:
        return int(m.group(1))
    if "fsdp column=" in z:  # Megatron-Bridge: FSDP > 0 means FSDP, 0 the distributed optimizer
        n = _number(z.split("column=")[1].split()[0])
        return 3 if n else 1
    return 3 if "foundry" in row.get("framework", "").lower() else 1


# recognised model names (published configs) for rows that name the model but not its shape:
# layers, hidden, heads, kv_heads, ffn (per expert for MoE), vocab, experts, top-k, head_dim (0: hidden / heads)
MODELS = {
    "qwen3_30b_a3b": (48, 2048, 32, 4, 768, 151936, 128, 8, 128),
    "qwen3_235b_a22b": (94, 4096, 64, 4, 1536, 151936, 128, 8, 128),
    "mixtral_8x7b": (32, 4096, 32, 8, 14336, 32000, 8, 2, 0),
    "mixtral_8x22b": (56, 6144, 48, 8, 16384, 32768, 8, 2, 0),
    "llama3_8b": (32, 4096, 32, 8, 14336, 128256, 0, 0, 0),
    "llama3_70b": (80, 8192, 64, 8, 28672, 128256, 0, 0, 0),
    "llama3.1_405b": (126, 16384, 128, 8, 53248, 128256, 0, 0, 0),
}


def _known_model(row: dict) -> Shape | None:
    key = re.sub(r"[\s-]+", "_", row.get("model", "").strip().lower())
    for name, (layers, hidden, heads, kv, ffn, vocab, experts, topk, head_dim) in MODELS.items():
        if key.startswith(name):
            return Shape(layers, hidden, heads, kv, ffn, vocab, True, experts, topk, ffn if experts else 0,
                         head_dim_=head_dim)
    return None


def parse(row: dict) -> Point:
    """One CSV row as a Point, or Skip with the reason."""
    known = _known_model(row)
    layers, hidden, heads = _int(row, "layers"), _int(row, "hidden"), _int(row, "heads")
    if not (layers and hidden and heads) and known is None:
        raise Skip("no model shape (layers, hidden, heads)")
    seq = _int(row, "seq_len")
    if not seq:
        raise Skip("no sequence length")
    if not row.get("gpu_type", "").strip():
        raise Skip("no GPU type")
    try:
        device = gpu(row["gpu_type"])
    except ValueError:
        raise Skip(f"unknown GPU type {row['gpu_type']!r}") from None
    gpus = _int(row, "gpu_count")
    if not gpus:
        nodes = _int(row, "nodes")
        gpus = nodes * device.gpus_per_node if nodes else None
    if not gpus:
        raise Skip("no GPU count")
    assumed = []
    stated = row.get("precision", "").strip()
    if not stated:
        stated = _default(row, "precision")
        if stated is None:
            raise Skip("precision not stated (and no framework default)")
        assumed.append(f"precision {stated} (framework default)")
    precision = _precision(stated)
    if precision is None:
        raise Skip(f"precision {stated!r} not modelled")
    if "16" in stated and "bf16" not in stated.lower():
        assumed.append("fp16 read as bf16")
    batch = _int(row, "global_batch_seqs")
    if not batch and _int(row, "global_batch_tokens"):
        batch = _int(row, "global_batch_tokens") // seq
    if not batch:
        raise Skip("no global batch")
    name = (row.get("model", "") + " " + row.get("notes", "")).lower()
    if "deepseek" in name and "v3" in name or "mla" in name:
        raise Skip("multi-head latent attention (DeepSeek-V3) not modelled")
    if known is not None:
        shape = known
    else:
        gated, ffn = _family(row, hidden)
        experts = _int(row, "moe_experts", 0) or 0
        topk = _int(row, "moe_topk", 0) or 0
        if experts and not topk:
            raise Skip("MoE without its top-k")
        shape = Shape(layers, hidden, heads, _int(row, "kv_heads") or heads, ffn, _int(row, "vocab") or 32000,
                      gated, experts, topk, ffn if experts else 0)
    tp, pp, cp = _int(row, "tp", 1), _int(row, "pp", 1), _int(row, "cp", 1)
    vpp = _int(row, "vpp", 1) or 1
    ep = _int(row, "ep", 1) or 1
    if gpus % (tp * pp * cp):
        raise Skip(f"{gpus} GPUs not divisible by tp × pp × cp = {tp * pp * cp}")
    ac_text = row.get("activation_checkpointing", "").strip().lower()
    ac = "full" if ac_text in ("true", "full", "yes", "1") else "selective" if "selective" in ac_text else "none"
    layout = Layout(gpus, tp, pp, vpp, cp, ep, _zero(row), ac, _int(row, "micro_batch", 1) or 1, precision)
    tflops = _number(row.get("tflops_per_gpu", ""))
    if tflops is None:
        tokens = _number(row.get("tokens_per_sec_per_gpu", ""))
        if tokens is None and _number(row.get("tokens_per_sec_total", "")):
            tokens = _number(row["tokens_per_sec_total"]) / gpus
        if tokens is None:
            raise Skip("no published throughput")
        tflops = tokens * shape.flops_per_token(seq) / 1e12
    return Point(row.get("point_id", "?"), shape, layout, device, seq, batch, tflops, row.get("framework", ""),
                 tuple(assumed))


def load(path: str | Path) -> tuple[list[Point], list[tuple[str, str]]]:
    """The predictable points of a CSV and (id, reason) for the rest."""
    points, skipped = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                points.append(parse(row))
            except Skip as why:
                skipped.append((row.get("point_id", "?"), str(why)))
    return points, skipped
