"""``memtrain export-decoder``: an HF-decoder run's trained LLM as a plain Hugging Face model, plus its encoder
and projector as a memtrain checkpoint (docs/reference.md §7: the decoder "converted back" for standard benchmarks).

    OUT/decoder/   config.json, model.safetensors, the LLM's tokenizer files and README.md (the model card): the
                   LLM with LoRA adapters merged; AutoModelForCausalLM.from_pretrained(OUT/decoder) loads it
                   (lm-eval, memtrain capability)
    OUT/memory/    model.safetensors (encoder.* and projector.* only), config.yaml, meta.json and the encoder's
                   tokenizer, as tokenizer.model and as tokenizer.json (AutoTokenizer.from_pretrained(OUT/memory)):
                   ``memtrain encode`` / ``generate`` read OUT (the LLM from OUT/decoder)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from memtrain.errors import UserError


def export_decoder(run: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Write the export of the run or checkpoint ``run`` to ``out_dir`` (built in a temporary directory beside
    it and renamed into place). Returns the paths and sizes written."""
    from safetensors.torch import save_file

    from memtrain.config import dump_config
    from memtrain.convert.tokenizer import save_hf_tokenizer
    from memtrain.hub import CARD_FILE, card_info, model_card, run_results
    from memtrain.inference import EXPORT_KEY, find_encoder_tokenizer, load_memory_model, read_run_checkpoint
    from memtrain.models.hf_memory import HFMemoryModel

    ck, cfg, meta = read_run_checkpoint(run)
    hf = cfg.model.hf_decoder
    if hf is None:
        raise UserError(
            f"{ck}: not an HF-decoder run (its model.hf_decoder is null); `memtrain convert` exports "
            "memtrain's own models"
        )
    if meta.get(EXPORT_KEY):
        raise UserError(f"{run}: is already an export")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (overwrite and (out / "memory" / "meta.json").is_file()):
        raise UserError(
            f"{out}: exists and is not empty; choose another --out"
            + ("" if overwrite else " or pass --overwrite to replace an earlier export")
        )
    tokenizer = find_encoder_tokenizer(ck, cfg, meta)
    model = load_memory_model(ck, cfg, meta, torch.device("cpu"))
    assert isinstance(model, HFMemoryModel)  # the model of a config with model.hf_decoder
    lora = hasattr(model.llm, "merge_and_unload")
    from transformers import AutoTokenizer

    dec_tok = AutoTokenizer.from_pretrained(hf.path, local_files_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        llm = model.merged_causal_lm()
        llm.save_pretrained(str(tmp / "decoder"), safe_serialization=True)
        dec_tok.save_pretrained(str(tmp / "decoder"))
        info = dict(card_info(meta), llm_class=type(llm).__name__)
        card = model_card(
            cfg,
            info,
            n_params=sum(p.numel() for p in model.parameters()),
            results=run_results(ck, meta.get("step"), label=cfg.run.name),
            transformers_class=type(llm).__name__,
        )
        (tmp / "decoder" / CARD_FILE).write_text(card)
        part = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("llm.")}
        (tmp / "memory").mkdir()
        save_file(part, str(tmp / "memory" / "model.safetensors"))
        export_cfg = cfg.model_copy(deep=True)
        assert export_cfg.model.hf_decoder is not None  # a copy of hf
        export_cfg.model.hf_decoder.path = str((out / "decoder").resolve())
        export_cfg.model.hf_decoder.mode = "full"  # the adapters are merged into the exported weights
        export_cfg.model.hf_decoder.gradient_checkpointing = False
        (tmp / "memory" / "config.yaml").write_text(dump_config(export_cfg))
        (tmp / "memory" / "meta.json").write_text(
            json.dumps(
                dict(
                    meta,
                    **{EXPORT_KEY: {"decoder_dir": "../decoder", "source": str(ck.resolve()), "lora_merged": lora}},
                ),
                indent=2,
            )
        )
        save_hf_tokenizer(tokenizer, tmp / "memory", cfg.model.chunk_len)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "root": str(out),
        "decoder": str(out / "decoder"),
        "memory": str(out / "memory"),
        "llm_class": type(llm).__name__,
        "llm_params": sum(p.numel() for p in llm.parameters()),
        "memory_params": sum(v.numel() for v in part.values()),
        "lora_merged": lora,
    }


def _cmd_export(args) -> int:
    out = export_decoder(args.run, args.out, overwrite=args.overwrite)
    print(
        f"{out['decoder']}: the trained LLM as a plain Hugging Face model ({out['llm_class']}, "
        f"{out['llm_params'] / 1e6:.2f}M params{', LoRA merged' if out['lora_merged'] else ''}; "
        "AutoModelForCausalLM.from_pretrained loads it)"
    )
    print(
        f"{out['memory']}: encoder + projector ({out['memory_params'] / 1e6:.2f}M params) as a memtrain checkpoint "
        f"(memtrain encode / generate read {out['root']})"
    )
    return 0


def register(subparsers) -> None:
    """Add ``export-decoder`` to the ``memtrain`` subcommands."""
    x = subparsers.add_parser(
        "export-decoder",
        help="write an HF-decoder run's LLM as a plain Hugging Face model (LoRA merged) plus its encoder + projector",
    )
    x.add_argument("run", help="run or checkpoint directory of a model.hf_decoder run")
    x.add_argument("--out", required=True, metavar="DIR", help="creates DIR/decoder and DIR/memory")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    x.set_defaults(func=_cmd_export)
