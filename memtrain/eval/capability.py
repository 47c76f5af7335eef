"""General capability of an LLM decoder before and after memory training (docs/reference.md §8.8: benchmarks of the
Llama-3.2-1B decoder fall as memory copy training goes on).

    memtrain capability RUN_OR_CKPT_OR_HF_DIR [--baseline HF_DIR] --text held-out.jsonl [--tasks arc_easy,...]

Both models are plain causal LMs: an HF-decoder run's LLM with LoRA merged (:mod:`memtrain.convert.export_decoder`),
or any Hugging Face model directory. The baseline defaults to the run's ``model.hf_decoder.path`` (the LLM it
started from). Reported:

- **held-out perplexity**: each document tokenized by the LLM's tokenizer (with its BOS, if it adds one), cut into
  windows of ``max_len`` tokens; exp of the mean next-token NLL over every token that has context in its window.
- **lm-eval tasks** (optional): the loaded (merged) model and its tokenizer go to lm-eval's own ``HFLM``, which
  batches requests (``--batch-size``), and ``lm_eval.simple_evaluate`` runs the tasks (0-shot). lm-eval comes with
  ``memtrain[hf]``; without it the tasks are skipped with a note. lm-eval's tasks download their datasets, so they
  need a network connection or a populated Hugging Face datasets cache; ``--include-path DIR`` adds task YAML
  files of local data.

:class:`CausalLMScorer` is the unbatched reference: one forward pass per request, written out here. With
``--reference`` the tasks also run through it (:func:`lm_eval_adapter`), and the report gives both timings and the
largest score difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from memtrain.errors import UserError
from memtrain.fileio import write_json


def load_causal_lm_and_tokenizer(path: str | Path, device: torch.device):
    """(causal LM in eval mode, its tokenizer, description) from a Hugging Face model directory, or from an
    HF-decoder run / checkpoint / export (its trained LLM, LoRA merged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memtrain.models.hf_memory import check_causal_lm_dir

    p = Path(path)
    if (p / "config.json").is_file():
        check_causal_lm_dir(p, field=str(p))
        lm = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        # PreTrainedModel.to is wrapped with functools.wraps, whose type pyright does not bind as a method
        return cast(torch.nn.Module, lm).to(device).eval(), tok, f"{p} (Hugging Face model)"
    from memtrain.inference import load_memory_model, read_run_checkpoint
    from memtrain.models.hf_memory import HFMemoryModel

    ck, cfg, meta = read_run_checkpoint(p)
    if cfg.model.hf_decoder is None:
        raise UserError(
            f"{p}: a memtrain run without an HF decoder (model.hf_decoder is null); give a run that "
            "trained a Hugging Face LLM decoder, or a Hugging Face model directory"
        )
    model = load_memory_model(ck, cfg, meta, torch.device("cpu"))
    assert isinstance(model, HFMemoryModel)  # the model of a config with model.hf_decoder
    tok = AutoTokenizer.from_pretrained(cfg.model.hf_decoder.path, local_files_only=True)
    lm = cast(torch.nn.Module, model.merged_causal_lm().float())
    return lm.to(device).eval(), tok, f"{ck} (step {meta.get('step', '?')}, mode {cfg.model.hf_decoder.mode})"


def default_baseline(path: str | Path) -> str | None:
    """The LLM an HF-decoder run started from (its ``model.hf_decoder.path``), or None for an HF directory."""
    if (Path(path) / "config.json").is_file():
        return None
    from memtrain.inference import EXPORT_KEY, read_run_checkpoint

    ck, cfg, meta = read_run_checkpoint(path)
    if meta.get(EXPORT_KEY):  # an export's config points at the exported LLM; the original is in its source run
        _, src_cfg, _ = read_run_checkpoint(meta[EXPORT_KEY]["source"])
        if src_cfg.model.hf_decoder is None:
            raise UserError(f"{meta[EXPORT_KEY]['source']}: the source run of export {ck} has no model.hf_decoder")
        return src_cfg.model.hf_decoder.path
    return cfg.model.hf_decoder.path if cfg.model.hf_decoder is not None else None


class CausalLMScorer:
    """Log-likelihoods and greedy continuations of a causal LM, in the three forms lm-eval asks for. Requests
    are the ``args`` tuples of lm-eval instances, so this class needs no lm-eval to run or to test.

    Every text is scored after a start token: the tokenizer's BOS, or its EOS when it has no BOS (lm-eval's
    convention for models without BOS). Inputs longer than ``max_len`` keep their last ``max_len`` tokens.
    """

    def __init__(self, lm, tokenizer, device: torch.device, max_len: int = 1024):
        self.lm, self.tok, self.device, self.max_len = lm, tokenizer, torch.device(device), int(max_len)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise UserError("the LLM's tokenizer has neither a BOS nor an EOS token to start a text with")
        self.start = int(start)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [n] -> (log-probabilities [n-1, V] of ids[1:], greedy tokens [n-1])."""
        logits = self.lm(torch.tensor([ids], device=self.device)).logits[0, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        return logp, logp.argmax(-1)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(context, continuation) -> (log P(continuation | context), whether greedy decoding gives it).
        The pair is tokenized together and split where the context's own tokens end, so a token that straddles
        the boundary is not double counted; trailing spaces of the context move to the continuation."""
        out = []
        for context, continuation in requests:
            moved = len(context) - len(context.rstrip(" "))
            context, continuation = context[: len(context) - moved], context[len(context) - moved :] + continuation
            ctx = [self.start] + self._encode(context)
            whole = [self.start] + self._encode(context + continuation)
            if whole[: len(ctx)] != ctx or len(whole) == len(ctx):  # the boundary merged: score the parts apart
                whole = ctx + self._encode(continuation)
            n_cont = len(whole) - len(ctx)
            if n_cont == 0:
                out.append((0.0, True))
                continue
            ids = whole[-(self.max_len + 1) :]
            logp, greedy = self._logprobs(ids)
            target = torch.tensor(ids[1:], device=logp.device)[-n_cont:]
            lp = logp[-n_cont:].gather(1, target[:, None]).sum()
            out.append((float(lp), bool((greedy[-n_cont:] == target).all())))
        return out

    def loglikelihood_rolling(self, requests: Sequence[tuple[str]]) -> list[float]:
        """(text,) -> log P(text) after the start token, over consecutive windows of ``max_len`` predictions
        (each window starts from the last token of the previous one)."""
        out = []
        for (text,) in requests:
            ids = [self.start] + self._encode(text)
            total = 0.0
            for s in range(0, len(ids) - 1, self.max_len):
                window = ids[s : s + self.max_len + 1]
                logp, _ = self._logprobs(window)
                total += float(logp.gather(1, torch.tensor(window[1:], device=logp.device)[:, None]).sum())
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """(context, {"until": [...], "max_gen_toks": N}) -> the greedy continuation, cut before the first stop
        string (default stop: the EOS token)."""
        out = []
        for context, kwargs in requests:
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = ([self.start] + self._encode(context))[-self.max_len :]
            gen = self.lm.generate(
                torch.tensor([ids], device=self.device),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=self.tok.eos_token_id,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            )
            text = self.tok.decode(gen[0, len(ids) :], skip_special_tokens=True)
            cut = min([text.find(u) for u in until if u and u in text] or [len(text)])
            out.append(text[:cut])
        return out


def lm_eval_adapter(scorer: CausalLMScorer):
    """``scorer`` as an ``lm_eval.api.model.LM`` (raises ImportError when lm-eval is not installed)."""
    from lm_eval.api.model import LM  # pyright: ignore[reportMissingImports]  (optional: lm-eval, memtrain[hf])

    class MemtrainCausalLM(LM):
        """lm-eval's model interface over a memtrain :class:`CausalLMScorer`."""

        def __init__(self, inner: CausalLMScorer):
            super().__init__()
            self.inner = inner

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.inner.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.inner.loglikelihood_rolling([r.args for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.inner.generate_until([r.args for r in requests])

    return MemtrainCausalLM(scorer)


def lm_eval_available() -> bool:
    """Whether ``import lm_eval`` works here."""
    try:
        import lm_eval  # noqa: F401  # pyright: ignore[reportMissingImports]  (optional: lm-eval, memtrain[hf])
    except ImportError:
        return False
    return True


def _task_manager(tasks: list[str], include_path: str | Path | None):
    """lm-eval's ``TaskManager``: only the tasks of ``include_path`` when they are all the tasks asked for
    (indexing lm-eval's own thousands of task files takes tens of seconds), else those and lm-eval's own."""
    from lm_eval.tasks import TaskManager  # pyright: ignore[reportMissingImports]  (optional: lm-eval, memtrain[hf])

    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise UserError(f"--include-path: {include_path} is not a folder of lm-eval task YAML files")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if set(tasks) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=str(include_path))


def hflm(lm, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's ``HFLM`` around an already-loaded causal LM and its tokenizer."""
    from lm_eval.models.huggingface import HFLM  # pyright: ignore[reportMissingImports]  (optional: lm-eval)

    make = cast(Any, HFLM)  # its decorated __init__ hides the signature from type checkers
    return make(pretrained=lm, tokenizer=tokenizer, batch_size=int(batch_size), max_length=max_length)


def run_tasks(model, tasks: list[str], limit: int | None = None, manager=None) -> dict[str, dict]:
    """lm-eval results ({task: {metric: value}}) of ``tasks`` 0-shot for ``model`` (an ``lm_eval`` LM: :func:`hflm`
    or :func:`lm_eval_adapter`), with lm-eval's ``TaskManager`` ``manager`` (default: its own tasks);
    UserError when a task cannot run."""
    import lm_eval  # pyright: ignore[reportMissingImports]  (optional: lm-eval, memtrain[hf])

    evaluate = cast(Any, lm_eval.simple_evaluate)  # decorated: its signature is hidden from type checkers
    try:
        res = evaluate(
            model=model,
            tasks=tasks,
            num_fewshot=0,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            task_manager=manager,
        )
    except Exception as exc:  # unknown task names, datasets that cannot be downloaded, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--tasks {','.join(tasks)}: lm-eval could not run them ({detail[:200]})") from None
    if res is None or not res.get("results"):
        raise UserError(f"--tasks {','.join(tasks)}: lm-eval returned no results")
    return {t: {k: v for k, v in r.items() if isinstance(v, (int, float))} for t, r in res["results"].items()}


def timed_tasks(
    lm,
    tok,
    device: torch.device,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_len: int = 1024,
    include_path: str | Path | None = None,
    reference: bool = False,
) -> dict:
    """{"tasks": scores through HFLM, "seconds"} and, with ``reference``, the same through the unbatched
    :class:`CausalLMScorer`: {"reference": {"tasks", "seconds"}, "speedup", "max_abs_diff"} (over every metric).
    The seconds are ``simple_evaluate``'s wall time, with the task index built before; HFLM runs first, so it
    also pays for reading the task's data (the reference finds it cached)."""
    import time

    manager = _task_manager(tasks, include_path)
    t0 = time.perf_counter()
    scores = run_tasks(hflm(lm, tok, batch_size, max_len), tasks, limit, manager)
    out: dict = {"tasks": scores, "seconds": time.perf_counter() - t0, "batch_size": batch_size}
    if reference:
        t0 = time.perf_counter()
        ref = run_tasks(lm_eval_adapter(CausalLMScorer(lm, tok, device, max_len)), tasks, limit, manager)
        seconds = time.perf_counter() - t0
        diffs = [abs(v - ref[t][k]) for t, r in scores.items() for k, v in r.items() if k in ref.get(t, {})]
        out.update(
            reference={"tasks": ref, "seconds": seconds},
            speedup=seconds / out["seconds"],
            max_abs_diff=max(diffs, default=float("nan")),
        )
    return out


@torch.no_grad()
def perplexity(lm, tokenizer, texts: Sequence[str], device: torch.device, max_len: int = 512) -> dict:
    """Held-out perplexity: texts -> {"perplexity", "nll", "tokens", "documents"} (see the module docstring)."""
    nll, n = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for s in range(0, len(ids), max_len):
            window = ids[s : s + max_len]
            if len(window) < 2:
                continue
            x = torch.tensor([window], device=device)
            logits = lm(x).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
            n += len(window) - 1
    if n == 0:
        raise UserError("the held-out text holds no window of 2 or more tokens to score")
    return {"perplexity": math.exp(nll / n), "nll": nll / n, "tokens": n, "documents": len(texts)}


def capability_report(
    target: str | Path,
    baseline: str | Path | None,
    texts: Sequence[str],
    tasks: Sequence[str] = (),
    device: str = "cpu",
    max_len: int = 512,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
    reference: bool = False,
) -> dict:
    """Perplexity (and lm-eval task scores through ``HFLM``, when lm-eval is installed; see :func:`timed_tasks`)
    of ``baseline`` and ``target``."""
    dev = torch.device(device)
    report: dict = {"models": {}, "tasks_requested": list(tasks)}
    pairs = [("before", baseline), ("after", target)] if baseline else [("after", target)]
    for label, path in pairs:
        lm, tok, what = load_causal_lm_and_tokenizer(path, dev)
        entry = {"model": what, "held_out": perplexity(lm, tok, texts, dev, max_len)}
        if tasks:
            if lm_eval_available():
                timed = timed_tasks(
                    lm,
                    tok,
                    dev,
                    list(tasks),
                    limit=limit,
                    batch_size=batch_size,
                    max_len=max_len,
                    include_path=include_path,
                    reference=reference,
                )
                entry["tasks"] = timed.pop("tasks")
                entry["lm_eval"] = timed
            else:
                report["tasks_skipped"] = (
                    "lm-eval is not installed (pip install lm-eval); only held-out perplexity was measured"
                )
        report["models"][label] = entry
    if "before" in report["models"]:
        b, a = (report["models"][k]["held_out"]["perplexity"] for k in ("before", "after"))
        report["perplexity_ratio"] = a / b
    return report


def format_report(report: dict) -> str:
    """The capability report as a few lines of text."""
    lines = []
    for label, entry in report["models"].items():
        h = entry["held_out"]
        lines.append(
            f"{label:6s} {entry['model']}: held-out perplexity {h['perplexity']:.3f} "
            f"(NLL {h['nll']:.4f} over {h['tokens']:,} tokens of {h['documents']} documents)"
        )
        for task, metrics in entry.get("tasks", {}).items():
            lines.append(f"       {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        timing = entry.get("lm_eval")
        if timing:
            line = f"       lm-eval HFLM (batch {timing['batch_size']}): {timing['seconds']:.2f} s"
            if "reference" in timing:
                line += (
                    f"; unbatched reference scorer: {timing['reference']['seconds']:.2f} s "
                    f"(HFLM {timing['speedup']:.2f}x faster), largest score difference {timing['max_abs_diff']:.2e}"
                )
            lines.append(line)
    if "perplexity_ratio" in report:
        lines.append(f"after / before perplexity: {report['perplexity_ratio']:.4f}")
    if "tasks_skipped" in report:
        lines.append(f"tasks {','.join(report['tasks_requested'])}: skipped: {report['tasks_skipped']}")
    return "\n".join(lines)


def _cmd_capability(args) -> int:
    from memtrain.data.documents import iter_documents

    texts = [t for _, t in iter_documents(args.text)][: args.max_docs]
    if not texts:
        raise UserError(f"{', '.join(args.text)}: no documents found")
    baseline = args.baseline if args.baseline is not None else default_baseline(args.model)
    tasks = [t for t in (args.tasks or "").split(",") if t]
    lm_eval_options = {k: getattr(args, k) for k in ("limit", "batch_size", "include_path", "reference")}
    report = capability_report(args.model, baseline, texts, tasks, args.device, args.max_len, **lm_eval_options)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0


def register(subparsers) -> None:
    """Add ``memtrain capability``."""
    c = subparsers.add_parser(
        "capability", help="held-out perplexity (and lm-eval tasks) of an LLM decoder before and after memory training"
    )
    c.add_argument("model", help="an HF-decoder run / checkpoint / export, or a Hugging Face model directory")
    c.add_argument(
        "--baseline",
        metavar="HF_DIR",
        help="the model before memory training (default: the run's model.hf_decoder.path)",
    )
    c.add_argument("--text", nargs="+", required=True, metavar="SRC", help="held-out jsonl / txt / parquet text")
    c.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. hellaswag,arc_easy (needs lm-eval)")
    c.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many examples per task")
    c.add_argument("--batch-size", type=int, default=8, help="lm-eval: requests per forward pass (default 8)")
    c.add_argument("--include-path", metavar="DIR", help="lm-eval: a folder of extra task YAML files (local data)")
    c.add_argument(
        "--reference",
        action="store_true",
        help="lm-eval: also score the tasks with the unbatched reference scorer; print both timings and the difference",
    )
    c.add_argument("--max-len", type=int, default=512, help="perplexity window in tokens (default 512)")
    c.add_argument("--max-docs", type=int, default=None, help="score at most this many documents")
    c.add_argument("--device", default="cpu")
    c.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    c.set_defaults(func=_cmd_capability)
