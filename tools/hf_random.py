#!/usr/bin/env python3
"""Write a Hugging Face model directory shaped like a published model, with random weights: the import / continue /
export path of "Start from a Hugging Face model" (README) tried without hub access.

    python tools/hf_random.py --like llama-3.2-1b --layers 2 --output hf/llama-3.2-1b-random
    python tools/hf_random.py --list

The shapes are those of the published config.json files (hidden size, heads, head_dim, kv heads, vocab, RoPE and
its scaling, biases, tied embeddings, experts); ``--layers`` keeps the widths and cuts the depth. No tokenizer is
written: prepare data with tools/prepare_data.py --vocab-size (ids below the model's vocab) for such a model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # name -> (model_type, config fields)
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000,
                                   eos_token_id=128001)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0,
                                   rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
                                   max_window_layers=24, bos_token_id=151643, eos_token_id=151643)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                                 bos_token_id=151643, eos_token_id=151645)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                                        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)),
    "mistral-7b-v0.3": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
                                        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                                        sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
                                        eos_token_id=2)),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--like", choices=sorted(SHAPES), help="the published model whose shape to copy")
    parser.add_argument("--layers", type=int, default=0, help="keep this many layers (default: all of them)")
    parser.add_argument("--output", help="directory to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--list", action="store_true", help="print the shapes it knows and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (kind, fields) in sorted(SHAPES.items()):
            print(f"{name:16s} {kind:10s} layers {fields['num_hidden_layers']}, hidden {fields['hidden_size']}, "
                  f"heads {fields['num_attention_heads']}/{fields['num_key_value_heads']}, vocab {fields['vocab_size']}")
        return 0
    if not args.like or not args.output:
        parser.error("--like and --output are required (or --list)")
    out = Path(args.output)
    if out.exists():
        print(f"error: {out} exists: choose a new directory", file=sys.stderr)
        return 2
    try:
        import torch
        import transformers
    except ImportError:
        print("error: tools/hf_random.py needs transformers: pip install -e '.[hf]'", file=sys.stderr)
        return 2
    kind, fields = SHAPES[args.like]
    fields = dict(fields)
    if args.layers:
        fields["num_hidden_layers"] = args.layers
        if "max_window_layers" in fields:
            fields["max_window_layers"] = args.layers
    config = transformers.AutoConfig.for_model(kind, **fields)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)  # as the Hub stores them
    tmp = out.with_name(f".{out.name}.tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    print(f"wrote {out}: {type(model).__name__} shaped like {args.like}, {fields['num_hidden_layers']} layers, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters (random)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
