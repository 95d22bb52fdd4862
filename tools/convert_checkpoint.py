#!/usr/bin/env python3
"""Convert between our checkpoints and Hugging Face model directories (see pretrain/checkpoint/hf.py).

    python tools/convert_checkpoint.py --to hf --input runs/gpt_tiny/checkpoints --output hf/gpt_tiny
    python tools/convert_checkpoint.py --to native --input hf/gpt_tiny --output runs/from_hf/checkpoints

``--to hf`` takes a checkpoint directory (its newest complete step) or a step directory and writes config.json,
safetensors weights and the tokenizer (the run's, or --tokenizer). ``--to native`` writes a model-only checkpoint
(step 0) and ``OUTPUT/train.toml``, the config that continues pretraining it:
``python -m pretrain.train --config OUTPUT/train.toml --set data.path=DATA``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint.hf import is_hf_export, is_native_import  # noqa: E402
from pretrain.checkpoint.manager import CheckpointError  # noqa: E402
from pretrain.checkpoint.session import IMPORT_CONFIG  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.files import check_output, disk_error  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, choices=("hf", "native"),
                        help="hf: our checkpoint -> a Hugging Face directory; native: a Hugging Face directory -> a "
                             "model-only checkpoint and the train.toml that continues it")
    parser.add_argument("--input", required=True,
                        help="--to hf: a checkpoint directory (its newest complete step) or one step directory; "
                             "--to native: a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="directory to write (refused if it holds anything else)")
    parser.add_argument("--tokenizer", help="sentencepiece model to ship with the HF export (default: the run's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory (only one this tool wrote)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read HF pytorch_model.bin (with torch.load(weights_only=True))")
    args = parser.parse_args(argv)
    try:
        if args.to == "hf":
            from pretrain.checkpoint import load_model
            from pretrain.checkpoint.hf import export_hf, run_tokenizer

            check_output(Path(args.output), [args.input], args.overwrite, "Hugging Face export", is_hf_export,
                         CheckpointError)  # before reading anything
            model, cfg = load_model(args.input)
            out = export_hf(model, cfg.model, args.output, run_tokenizer(cfg, args.tokenizer), overwrite=args.overwrite,
                            inputs=[args.input])
            print(f"wrote {out} ({cfg.model.arch}/{cfg.model.flavor}, {sum(p.numel() for p in model.parameters()):,} "
                  "parameters)")
        else:
            from pretrain.checkpoint.hf import import_hf, save_native

            check_output(Path(args.output), [args.input], args.overwrite, "model-only checkpoint (--to native)",
                         is_native_import, CheckpointError)  # before reading anything
            model, model_cfg = import_hf(args.input, allow_pickle=args.allow_pickle)
            path = save_native(model, model_cfg, args.output, overwrite=args.overwrite, inputs=[args.input])
            print(f"wrote {path} ({model_cfg.hf_architecture or model_cfg.arch}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters); continue pretraining it with:\n"
                  f"  python -m pretrain.train --config {path.parent / IMPORT_CONFIG} --set data.path=DATA\n"
                  "(DATA: a directory from tools/prepare_data.py, tokenized with this model's tokenizer)")
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk: the temporary output is already removed
        if disk_error(exc) is None:
            raise
        print(f"error: {disk_error(exc, args.output)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
