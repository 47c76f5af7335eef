"""Memory inference: memory files, generation from memories (greedy, sampled, KV cache vs recomputation), the
saving report, the exported decoder, memtrain's own decoders, and bad memory files."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import corpus, shm_retry, trained_run

from memtrain.cli import main
from memtrain.errors import UserError
from memtrain.inference import MemoryReader, load_memories, save_memories


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return MemoryReader.from_checkpoint(trained_run(tmp_path_factory))


@pytest.fixture(scope="module")
def docs(tmp_path_factory, reader):
    records = corpus(tmp_path_factory)[1][:3]
    return reader.encode([r["text"][:500] for r in records], [r["id"] for r in records])


def test_encode_and_memory_file_round_trip(tmp_path, reader, docs):
    for d in docs:
        assert d.memories.shape == (len(d.spans), 32) and d.memories.dtype == torch.float32
        assert d.spans[0][0] == 0 and d.spans[-1][1] == len(d.text)
        assert "".join(d.text[s:e] for s, e in d.spans) == d.text
    path = save_memories(tmp_path / "mem.safetensors", docs, reader.memory_metadata())
    back, meta = load_memories(path)
    assert [d.doc_id for d in back] == [d.doc_id for d in docs]
    for a, b in zip(docs, back):
        assert torch.equal(a.memories, b.memories) and a.spans == b.spans and a.text == b.text
    assert meta["memory_width"] == "32" and meta["encoder_sha256"] == reader.encoder_sha256()
    assert meta["chunk_len"] == "16" and meta["decoder_chunk_len"] == "12" and "decoder_tokenizer_sha256" in meta
    reader.check_memory_file(meta, str(path))  # its own memories pass


def test_greedy_is_deterministic_and_the_kv_cache_matches_recomputation(reader, docs):
    a = reader.generate(docs[0], "The", max_new_tokens=12, stop_at_eos=False)
    b = reader.generate(docs[0], "The", max_new_tokens=12, stop_at_eos=False)
    c = reader.generate(docs[0], "The", max_new_tokens=12, stop_at_eos=False, use_cache=False)
    assert len(a.token_ids) == 12 and a.token_ids == b.token_ids == c.token_ids
    assert (a.cache, c.cache) == ("kv", "recompute")
    assert a.memories_used == min(len(docs[0].spans), 3)
    assert a.input_positions == 1 + a.memories_used + len(reader.prompt_ids("The"))  # BOS, memories, prompt
    assert a.text == reader.decoder_tokenizer.decode(a.token_ids)
    s1 = reader.generate(docs[0], "The", 12, greedy=False, temperature=1.5, top_p=0.95, seed=7, stop_at_eos=False)
    s2 = reader.generate(docs[0], "The", 12, greedy=False, temperature=1.5, top_p=0.95, seed=7, stop_at_eos=False)
    assert s1.token_ids == s2.token_ids  # the same seed gives the same sample
    others = {
        tuple(reader.generate(docs[0], "The", 12, greedy=False, temperature=1.5, seed=s, stop_at_eos=False).token_ids)
        for s in range(3)
    }
    assert len(others) > 1
    # the memories matter: other memories, other logits
    x = reader.model.prefix_embeddings(docs[0].memories[None, -3:])
    y = reader.model.prefix_embeddings(docs[1].memories[None, -3:])
    assert not torch.allclose(x, y)
    with pytest.raises(UserError, match="--top-p"):
        reader.generate(docs[0], "The", 4, greedy=False, top_p=0.0)


def test_generate_through_transformers_equals_a_plain_greedy_loop(reader, docs):
    """HF decoders generate through transformers' generate(inputs_embeds=...): greedy tokens equal a plain
    loop that recomputes the LLM over [BOS, memories, prompt, new tokens] and takes the argmax, with and
    without the KV cache; its options (beams, repetition penalty, top-k, stop strings) apply."""
    model = reader.model
    m = docs[0].memories[-3:]
    x = torch.cat(
        [model.prefix_embeddings(m[None]), model.token_embeddings(torch.tensor([reader.prompt_ids("The")]))], 1
    )
    expect = []
    with torch.no_grad():
        for _ in range(12):
            h = model.backbone()(inputs_embeds=x, position_ids=torch.arange(x.shape[1])[None]).last_hidden_state
            token = int(model.logits(h[0, -1]).argmax())
            expect.append(token)
            x = torch.cat([x, model.token_embeddings(torch.tensor([[token]]))], 1)
    for use_cache in (True, False):
        got = reader.generate(docs[0], "The", max_new_tokens=12, stop_at_eos=False, use_cache=use_cache)
        assert got.token_ids == expect, use_cache
    beams = reader.generate(docs[0], "The", 12, stop_at_eos=False, num_beams=3)
    penalised = reader.generate(docs[0], "The", 12, stop_at_eos=False, repetition_penalty=5.0)
    assert len(beams.token_ids) == len(penalised.token_ids) == 12
    assert len(set(penalised.token_ids)) >= len(set(expect))
    top1 = reader.generate(docs[0], "The", 12, greedy=False, temperature=2.0, top_k=1, stop_at_eos=False, seed=3)
    assert top1.token_ids == expect  # sampling from the single most likely token is greedy
    stop = reader._decode(expect[3:5])
    cut = reader.generate(docs[0], "The", 12, stop_at_eos=False, stop=(stop,))
    assert cut.text.endswith(stop) and len(cut.token_ids) < 12 and cut.token_ids == expect[: len(cut.token_ids)]


def test_encode_and_generate_commands_report_the_saving(tmp_path, tmp_path_factory, capsys):
    run = trained_run(tmp_path_factory)
    records = corpus(tmp_path_factory)[1][3:5]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:400]}) + "\n" for r in records))
    mem = tmp_path / "mem.safetensors"
    assert main(["encode", str(run), "--input", str(src), "--out", str(mem)]) == 0
    assert f"{mem}: 2 document(s)" in capsys.readouterr().out
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "generate",
                str(run),
                "--memories",
                str(mem),
                "--doc",
                records[0]["id"],
                "--prompt",
                "The",
                "--max-new-tokens",
                "6",
                "--repeats",
                "1",
                "--num-beams",
                "2",
                "--repetition-penalty",
                "1.2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "prompt tokens replaced by memories" in printed and "ms saved" in printed
    r = json.loads(out.read_text())
    assert r["memories_used"] == 3 and r["text_tokens_replaced"] > r["memories_used"]
    assert r["positions_with_full_text"] - r["positions_with_memories"] == r["text_tokens_replaced"] - 3
    assert r["prompt_tokens_saved"] == r["text_tokens_replaced"] - 3
    assert r["seconds_with_memories"] > 0 and r["seconds_with_full_text"] > 0 and r["cache"] == "kv"
    # one-line errors
    assert main(["generate", str(run), "--memories", str(mem), "--doc", "nope"]) == 2
    assert "no document 'nope'" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                str(run),
                "--memories",
                str(mem),
                "--doc",
                records[0]["id"],
                "--greedy",
                "--temperature",
                "0.7",
            ]
        )
        == 2
    )
    assert "choose greedy decoding or sampling" in capsys.readouterr().err


def test_bad_memory_files_are_one_line_errors(tmp_path, reader, docs):
    meta = reader.memory_metadata()
    wide = [type(d)(d.doc_id, torch.zeros(len(d.spans), 48), d.spans, d.text) for d in docs]
    path = save_memories(tmp_path / "wide.safetensors", wide, dict(meta, memory_width="48"))
    with pytest.raises(UserError, match="width 48, but this model's projector was built for width 32"):
        reader.check_memory_file(load_memories(path)[1], str(path))
    with pytest.raises(UserError, match="projector was built for width 32"):
        reader.generate(wide[0], "The", 2)
    other = save_memories(tmp_path / "other.safetensors", docs, dict(meta, encoder_sha256="0" * 64))
    with pytest.raises(UserError, match="made by encoder 000000000000"):
        reader.check_memory_file(load_memories(other)[1], str(other))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for p, expected in (
        (tmp_path / "junk.safetensors", "not a readable safetensors file"),
        (tmp_path / "missing.safetensors", "memory file not found"),
    ):
        with pytest.raises(UserError, match=expected):
            load_memories(p)


def test_exported_decoder_reloads_with_from_pretrained(tmp_path, tmp_path_factory, reader, docs, capsys):
    from transformers import AutoModelForCausalLM

    run = trained_run(tmp_path_factory)
    out = tmp_path / "export"
    assert main(["export-decoder", str(run), "--out", str(out)]) == 0
    assert "LoRA merged" in capsys.readouterr().out
    plain = AutoModelForCausalLM.from_pretrained(out / "decoder")
    assert type(plain).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in plain.state_dict())
    ids = torch.tensor([reader.decoder_tokenizer.encode("SELECT * FROM t WHERE x = 1;")])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reader.model.causal_lm()(ids).logits, atol=1e-5, rtol=1e-5)
    exported = MemoryReader.from_checkpoint(out)  # encoder + projector from out/memory, the LLM from out/decoder
    assert exported.encoder_sha256() == reader.encoder_sha256()
    a = reader.generate(docs[0], "The", 8, stop_at_eos=False)
    b = exported.generate(docs[0], "The", 8, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    assert main(["export-decoder", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_memtrain_decoders_generate_by_recomputation(tmp_path, tiny_data, capsys):
    from helpers import tiny_config

    from memtrain.engine.trainer import train

    cfg = tiny_config(tiny_data.shards, tmp_path / "mixer", "train.steps=2", "train.eval_every=0", "train.ckpt_every=0")
    shm_retry(train, cfg)
    mixer = MemoryReader.from_checkpoint(tmp_path / "mixer")
    assert not mixer.is_hf
    text = tiny_data.corpus.read_text().splitlines()[0]
    doc = mixer.encode([json.loads(text)["text"][:300]], ["d"])[0]
    assert doc.memories.shape[1] == 32 and len(doc.spans) == doc.memories.shape[0]
    g1 = mixer.generate(doc, "The", max_new_tokens=5, stop_at_eos=False)
    g2 = mixer.generate(doc, "The", max_new_tokens=5, stop_at_eos=False)
    assert g1.token_ids == g2.token_ids and len(g1.token_ids) == 5 and g1.cache == "recompute"
    with pytest.raises(UserError, match="num_beams: options of transformers' generate, for HF decoders"):
        mixer.generate(doc, "The", max_new_tokens=5, num_beams=2)
    report = mixer.compare(doc, "The", max_new_tokens=3, repeats=1, stop_at_eos=False)
    assert report["full_text"].startswith("n/a") and report["memories_used"] == 3
    clm = tiny_config(
        tiny_data.shards,
        tmp_path / "clm",
        "model.kind=clm",
        "train.steps=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "objective.weights={causal: 1.0}",
    )
    shm_retry(train, clm)
    with pytest.raises(UserError, match="memory inference needs a memory model"):
        MemoryReader.from_checkpoint(tmp_path / "clm")
