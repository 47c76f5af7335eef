"""memtrain models as Hugging Face Hub folders: save_pretrained -> from_pretrained gives the same outputs,
``memtrain export`` with its model card and both tokenizers, MemoryReader.from_pretrained, and the refusals of
damaged or foreign folders (one line naming the file). Pushing needs a network: only the offline refusal is
tested here."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import corpus, shm_retry, tiny_config, tiny_llm, tiny_raw, trained_run

import yaml
from memtrain.cli import main
from memtrain.config import config_from_dict
from memtrain.data.tokenizer import Tokenizer
from memtrain.errors import UserError
from memtrain.inference import MemoryReader
from memtrain.models import Autoencoder, MemoryModel, MemtrainModel, build_model


def tiny_model(tiny_data, kind: str = "memory", seed: int = 0):
    """A randomly initialised yaml/tiny.yaml model of ``kind`` over the tiny tokenizer's vocabulary."""
    raw = tiny_raw(tiny_data.shards, tiny_data.shards.parent / "unused")
    objective = {"memory": "causal", "autoencoder": "reconstruction", "clm": "causal"}[kind]
    model = dict(raw["model"], kind=kind, **({"n_chunks": 1} if kind == "autoencoder" else {}))
    raw.update(model=model, objective={"weights": {objective: 1.0}}, curriculum=[])
    cfg = config_from_dict(raw)
    torch.manual_seed(seed)
    return build_model(cfg.model, Tokenizer.load(tiny_data.tokenizer).vocab_size).eval(), cfg


@pytest.mark.parametrize("kind", ["memory", "autoencoder", "clm"])
def test_save_pretrained_then_from_pretrained_gives_identical_outputs(tmp_path, tiny_data, kind):
    model, cfg = tiny_model(tiny_data, kind)
    tok = Tokenizer.load(tiny_data.tokenizer)
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok, config=cfg)
    names = {p.name for p in out.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "README.md",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    info = json.loads((out / "config.json").read_text())
    assert info["model_type"] == "memtrain" and info["memtrain_version"] and info["kind"] == kind
    assert info["config"]["model"]["kind"] == kind and info["vocab_size"] == tok.vocab_size
    back = MemtrainModel.from_pretrained(out)
    assert type(back) is type(model)
    a, b = model.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    n = cfg.model.chunk_len if kind == "autoencoder" else cfg.model.seq_len
    ids = torch.randint(0, tok.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.logits(model(ids)), back.logits(back(ids)))
    assert isinstance(type(model).from_pretrained(out), type(model))
    other = MemoryModel if kind != "memory" else Autoencoder
    with pytest.raises(UserError, match=f"config.json: holds a {type(model).__name__}, not a {other.__name__}"):
        other.from_pretrained(out)


def test_export_command_card_and_memory_reader_from_pretrained(tmp_path, tiny_data, capsys):
    from memtrain.engine.trainer import train

    run = tmp_path / "run"
    shm_retry(train, tiny_config(tiny_data.shards, run, "train.steps=2", "train.eval_every=0", "train.ckpt_every=0"))
    assert main(["eval", str(run), "--batches", "1", "--out", str(run / "eval")]) == 0
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--name", "tiny-memory"]) == 0
    assert f"{out}: memory model" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "memtrain" and {"memtrain", "memory-model", "mixer"} <= set(front["tags"])
    assert "# tiny-memory" in card and 'MemoryReader.from_pretrained("tiny-memory")' in card
    assert "### Evaluation at the end of training" in card and "### Evaluation (eval)" in card
    assert "| causal |" in card and "```yaml" in card and "kind: memory" in card and "at commit" in card
    reader, ref = MemoryReader.from_pretrained(out), MemoryReader.from_checkpoint(run)
    text = json.loads(tiny_data.corpus.read_text().splitlines()[3])["text"][:300]
    doc, ref_doc = reader.encode([text])[0], ref.encode([text])[0]
    assert torch.equal(doc.memories, ref_doc.memories) and doc.spans == ref_doc.spans
    a = reader.generate(doc, "The", max_new_tokens=5, stop_at_eos=False)
    assert a.token_ids == ref.generate(ref_doc, "The", max_new_tokens=5, stop_at_eos=False).token_ids
    # the memtrain commands read an export folder like a run
    src = tmp_path / "docs.txt"
    src.write_text(text)
    assert main(["encode", str(out), "--input", str(src), "--out", str(tmp_path / "mem.safetensors")]) == 0
    # exporting again replaces the export as a whole; a folder that is not an export is never touched
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "# tiny\n" in (out / "README.md").read_text() and not list(tmp_path.glob(".export.*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "mine")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_hf_decoder_memory_model_exports_both_tokenizers_and_generates_the_same(tmp_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained_run(tmp_path_factory)  # LoRA: merged into the exported LLM
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    ref = MemoryReader.from_checkpoint(run)
    text = corpus(tmp_path_factory)[1][5]["text"][:400]
    enc_tok = AutoTokenizer.from_pretrained(out)
    assert enc_tok(text)["input_ids"] == ref.tokenizer.encode([text])[0]
    dec_tok = AutoTokenizer.from_pretrained(out / "decoder")
    assert dec_tok.encode(text) == ref.decoder_tokenizer.encode(text)
    llm = AutoModelForCausalLM.from_pretrained(out / "decoder")
    assert not any("lora" in k for k in llm.state_dict())
    card = (out / "README.md").read_text()
    assert "llm-decoder" in card and "LlamaForCausalLM" in card
    reader = MemoryReader.from_pretrained(out)
    assert reader.is_hf and reader.encoder_sha256() == ref.encoder_sha256()
    doc, ref_doc = reader.encode([text])[0], ref.encode([text])[0]
    assert torch.equal(doc.memories, ref_doc.memories)
    a = reader.generate(doc, "The", 8, stop_at_eos=False)
    assert a.token_ids == ref.generate(ref_doc, "The", 8, stop_at_eos=False).token_ids


def test_damaged_or_foreign_folders_are_refused_naming_the_file(tmp_path, tiny_data, tmp_path_factory):
    model, cfg = tiny_model(tiny_data)
    tok = Tokenizer.load(tiny_data.tokenizer)
    good = model.save_pretrained(tmp_path / "good", tokenizer=tok, config=cfg)

    def damaged(name: str, change) -> str:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return str(folder)

    ae, _ = tiny_model(tiny_data, "autoencoder")
    (tmp_path / "empty").mkdir()
    cases = [
        (str(tmp_path / "empty"), "config.json: missing; expected a memtrain export"),
        (str(tiny_llm(tmp_path_factory)), "config.json: model_type 'llama', expected 'memtrain'"),
        (damaged("badjson", lambda f: (f / "config.json").write_text("{")), "config.json: not valid JSON"),
        (
            damaged(
                "noconfig", lambda f: (f / "config.json").write_text('{"model_type": "memtrain", "format_version": 1}')
            ),
            "config.json: no 'config' (dict) in it",
        ),
        (
            damaged("cut", lambda f: (f / "model.safetensors").write_bytes(b"\x08" + b"\0" * 20)),
            "model.safetensors: unreadable weights",
        ),
        (
            damaged(
                "other",
                lambda f: shutil.copyfile(
                    ae.save_pretrained(tmp_path / "ae", tokenizer=tok) / "model.safetensors", f / "model.safetensors"
                ),
            ),
            "model.safetensors: weights do not fit this model config",
        ),
        (damaged("notok", lambda f: (f / "tokenizer.model").unlink()), "tokenizer.model: tokenizer model not found"),
        # a pickle beside missing safetensors weights is never read
        (
            damaged("pickle", lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin")),
            "model.safetensors: missing",
        ),
        (str(tmp_path / "no" / "such" / "folder"), "no such folder"),
    ]
    for path, needle in cases:
        with pytest.raises(UserError) as err:
            MemtrainModel.from_pretrained(path)
        assert needle in str(err.value) and "\n" not in str(err.value), (path, str(err.value))
    with pytest.raises(UserError, match="a clm model; memory inference needs a memory model"):
        clm, clm_cfg = tiny_model(tiny_data, "clm")
        MemoryReader.from_pretrained(clm.save_pretrained(tmp_path / "clm", tokenizer=tok, config=clm_cfg))


def test_save_refuses_a_tokenizer_of_another_vocabulary_and_writes_nothing(tmp_path, tiny_data, other_data):
    model, cfg = tiny_model(tiny_data)
    with pytest.raises(UserError, match="a tokenizer of 420 pieces, but the model's vocabulary is 400"):
        model.save_pretrained(tmp_path / "m", tokenizer=Tokenizer.load(other_data.tokenizer), config=cfg)
    assert not list(tmp_path.iterdir())


def test_the_hub_needs_a_network_to_download_and_to_push(tmp_path, tiny_data, monkeypatch, capsys):
    """In huggingface_hub's offline mode a repository id cannot be downloaded and a push cannot upload: both end
    in one line; the export folder itself is written before the push."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    from memtrain.engine.checkpoint import save_checkpoint

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reset_sessions()
    with pytest.raises(UserError, match="memtrain-test/nothing: no such local folder, and the Hub download failed"):
        MemoryReader.from_pretrained("memtrain-test/nothing")
    model, cfg = tiny_model(tiny_data)
    tok = Tokenizer.load(tiny_data.tokenizer)
    meta = {"kind": "memory", "vocab_size": tok.vocab_size, "tokenizer_sha256": tok.sha256, "step": 1}
    save_checkpoint(tmp_path / "run", 1, model, {"step": 1}, yaml.safe_dump(cfg.model_dump(mode="json")), meta, keep=1)
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--push", "memtrain-test/nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--push memtrain-test/nothing: the upload failed" in err[0], err
    assert (out / "model.safetensors").is_file()
    reset_sessions()
