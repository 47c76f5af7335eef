"""The general-capability check: held-out perplexity before/after memory training and the lm-eval scorer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import corpus, tiny_llm, trained_run

from memtrain.cli import main
from memtrain.errors import UserError
from memtrain.eval import capability
from memtrain.eval.capability import CausalLMScorer, capability_report, lm_eval_available, perplexity


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llm(tmp_path_factory)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _direct_logprob(lm, ids: list[int], n_last: int) -> tuple[float, bool]:
    with torch.no_grad():
        logp = F.log_softmax(lm(torch.tensor([ids])).logits[0, :-1].float(), -1)
    target = torch.tensor(ids[1:])
    lp = logp.gather(1, target[:, None])[:, 0]
    return float(lp[-n_last:].sum()), bool((logp.argmax(-1)[-n_last:] == target[-n_last:]).all())


def test_scorer_loglikelihoods_match_a_direct_computation(llama):
    lm, tok = llama
    scorer = CausalLMScorer(lm, tok, torch.device("cpu"), max_len=64)
    bos = tok.bos_token_id
    ctx, cont = "The table holds", " rows of data"
    ((lp, greedy),) = scorer.loglikelihood([(ctx, cont)])
    whole = [bos] + tok.encode(ctx + cont, add_special_tokens=False)
    n_cont = len(whole) - 1 - len(tok.encode(ctx, add_special_tokens=False))
    assert (lp, greedy) == pytest.approx(_direct_logprob(lm, whole, n_cont), rel=1e-5)
    # a trailing space of the context moves to the continuation: the same text scores the same
    ((lp2, _),) = scorer.loglikelihood([(ctx + " ", cont.lstrip(" "))])
    assert lp2 == pytest.approx(lp, rel=1e-5)
    text = "SELECT name FROM users WHERE id = 42; -- the documentation explains the rest"
    full = scorer.loglikelihood_rolling([(text,)])[0]
    assert full == pytest.approx(scorer.loglikelihood([("", text)])[0][0], rel=1e-5)
    ids = [bos] + tok.encode(text, add_special_tokens=False)
    assert full == pytest.approx(_direct_logprob(lm, ids, len(ids) - 1)[0], rel=1e-5)
    short = CausalLMScorer(lm, tok, torch.device("cpu"), max_len=8)  # windows of 8 predictions
    windows = sum(_direct_logprob(lm, ids[s : s + 9], len(ids[s : s + 9]) - 1)[0] for s in range(0, len(ids) - 1, 8))
    assert short.loglikelihood_rolling([(text,)])[0] == pytest.approx(windows, rel=1e-5)
    assert short.loglikelihood_rolling([(text,)])[0] < full  # less context per prediction


def test_generate_until_stops_at_the_stop_string(llama):
    lm, tok = llama
    scorer = CausalLMScorer(lm, tok, torch.device("cpu"))
    free = scorer.generate_until([("The", {"max_gen_toks": 10, "until": []})])[0]
    ids = [tok.bos_token_id] + tok.encode("The", add_special_tokens=False)
    n_in = len(ids)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(lm(torch.tensor([ids])).logits[0, -1].argmax()))
    assert free == tok.decode(ids[n_in:], skip_special_tokens=True)
    stop = free[3:5]
    cut = scorer.generate_until([("The", {"max_gen_toks": 10, "until": [stop]})])[0]
    assert cut == free[: free.find(stop)] and stop not in cut


@pytest.mark.skipif(
    not lm_eval_available(), reason="lm-eval is not installed (optional); the scorer's tests above cover the same code"
)
def test_lm_eval_adapter_answers_lm_eval_instances(llama):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM

    lm, tok = llama
    scorer = CausalLMScorer(lm, tok, torch.device("cpu"))
    adapter = capability.lm_eval_adapter(scorer)
    assert isinstance(adapter, LM)
    pair = Instance("loglikelihood", {}, ("The table", " holds rows"), 0)
    rolling = Instance("loglikelihood_rolling", {}, ("The table holds rows",), 0)
    gen = Instance("generate_until", {}, ("The", {"max_gen_toks": 5, "until": ["\n"]}), 0)
    assert adapter.loglikelihood([pair]) == scorer.loglikelihood([pair.args])
    assert adapter.loglikelihood_rolling([rolling]) == scorer.loglikelihood_rolling([rolling.args])
    assert adapter.generate_until([gen]) == scorer.generate_until([gen.args])


def cloze_task(folder, records, name: str = "memtrain_cloze") -> str:
    """A local lm-eval multiple-choice task in ``folder`` (a YAML file and its jsonl data): for each document,
    which of four 3-word pieces continues a 10-word context (the true one or pieces of other documents)."""
    rows = []
    for i, r in enumerate(records):
        words = r["text"].split()
        gold = " ".join(words[30:33])
        others = [" ".join(records[(i + k) % len(records)]["text"].split()[40:43]) for k in (1, 2, 3)]
        choices = sorted([gold] + others)
        rows.append({"context": " ".join(words[20:30]), "choices": choices, "label": choices.index(gold)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "cloze.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return name


def test_hflm_scores_equal_the_reference_scorer_on_a_local_task(tmp_path, tmp_path_factory, llama):
    """The capability check's lm-eval tasks run through lm-eval's batched HFLM; on a tiny local task its
    scores equal those of the unbatched reference scorer, request by request and as task metrics."""
    from lm_eval.api.instance import Instance

    torch.set_num_threads(1)  # a tiny model: one thread is fastest (the autouse fixture restores the count)
    lm, tok = llama
    records = [r for r in corpus(tmp_path_factory)[1] if len(r["text"].split()) > 45][:12]
    task = cloze_task(tmp_path / "tasks", records)
    timed = capability.timed_tasks(
        lm, tok, torch.device("cpu"), [task], batch_size=4, max_len=64, include_path=tmp_path / "tasks", reference=True
    )
    assert timed["tasks"][task]["sample_len"] == 12 and 0 <= timed["tasks"][task]["acc,none"] <= 1
    assert timed["tasks"] == timed["reference"]["tasks"] and timed["max_abs_diff"] == 0
    assert timed["seconds"] > 0 and timed["reference"]["seconds"] > 0
    requests = [("The table holds", " rows of data"), ("", "SELECT name FROM users"), ("A  b ", "c")]
    batched = capability.hflm(lm, tok, batch_size=3, max_length=64)
    got = batched.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    expect = CausalLMScorer(lm, tok, torch.device("cpu"), max_len=64).loglikelihood(requests)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, expect):
        assert lp == pytest.approx(lp_ref, rel=1e-5, abs=1e-5) and greedy == greedy_ref
    with pytest.raises(UserError, match="--include-path"):
        capability.timed_tasks(lm, tok, torch.device("cpu"), [task], include_path=tmp_path / "nothing")


def test_perplexity_before_and_after_memory_training(tmp_path_factory, llama):
    lm, tok = llama
    texts = [r["text"] for r in corpus(tmp_path_factory)[1][-4:]]
    base = perplexity(lm, tok, texts, torch.device("cpu"), max_len=64)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"]
            for s in range(0, len(ids), 64):
                w = torch.tensor([ids[s : s + 64]])
                if w.shape[1] > 1:
                    nll += float(F.cross_entropy(lm(w).logits[0, :-1], w[0, 1:], reduction="sum"))
                    n += w.shape[1] - 1
    assert base["tokens"] == n and base["perplexity"] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-5)
    lora = capability_report(
        trained_run(tmp_path_factory), capability.default_baseline(trained_run(tmp_path_factory)), texts, max_len=64
    )
    assert lora["models"]["before"]["held_out"]["perplexity"] == pytest.approx(base["perplexity"], rel=1e-6)
    assert lora["perplexity_ratio"] != pytest.approx(1.0, abs=1e-6)  # the merged LoRA changed the LLM
    frozen = capability_report(
        trained_run(tmp_path_factory, "frozen", "frozen", steps=2), tiny_llm(tmp_path_factory), texts, max_len=64
    )
    assert frozen["perplexity_ratio"] == pytest.approx(1.0, abs=1e-6)  # a frozen LLM keeps its capability


def test_capability_command(tmp_path, tmp_path_factory, capsys, monkeypatch):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in corpus(tmp_path_factory)[1][-3:]))
    monkeypatch.setattr(capability, "lm_eval_available", lambda: False)
    out = tmp_path / "cap.json"
    assert (
        main(
            [
                "capability",
                str(trained_run(tmp_path_factory)),
                "--text",
                str(held),
                "--tasks",
                "hellaswag,arc_easy",
                "--max-len",
                "64",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "after / before perplexity" in printed
    assert "tasks hellaswag,arc_easy: skipped: lm-eval is not installed" in printed
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"before", "after"} and report["tasks_requested"] == ["hellaswag", "arc_easy"]
    # an HF directory alone: one column
    assert main(["capability", str(tiny_llm(tmp_path_factory)), "--text", str(held), "--max-len", "64"]) == 0
    assert "before" not in capsys.readouterr().out
    with pytest.raises(UserError):
        capability.load_causal_lm_and_tokenizer(tmp_path / "nothing-here", torch.device("cpu"))
