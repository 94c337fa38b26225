"""``fcot eval``: answer the questions of a JSONL set with ``generate`` and score them.

The set is in :mod:`fcot.data.records`' format. Every ``human``/``gpt`` pair of a record is one
question; its reference answers are the record's ``answers`` (one entry per pair: a string or a
list of strings, e.g. TextVQA's ten) when present, else the ``gpt`` text. Question ids are
``<record id>#<pair index>`` (the record's ``id`` or ``line<N>``). Each question is asked on
its own with the record's image(s), in the prompt the model family's own chat code builds
(:meth:`fcot.models.ModelFamily.chat_for`: for OpenGVLab's remote-code models the conversation
template named by ``config.template``, with the model's system message; for the native family
the checkpoint's own chat template as transformers' processor applies it, or ChatML when the
checkpoint has none, recorded as ``chat_format`` / ``chat_note`` in ``eval.json`` and warned),
and answered greedily in batches (left padding).

Bad records never stop an evaluation: a line that is not JSON, a record without questions or
answers, an image that is missing, empty (0 bytes), truncated / undecodable, or over the pixel
cap (:mod:`fcot.data.images`, shared with training) is left out and counted by reason, each with ``file:line`` examples
(:class:`EvalSkips`, in ``eval.json`` under ``skipped``). All of it is checked when the set is
read, before any model is loaded.

Answers: the raw generated text is kept in the predictions file (``raw``); the scored
``prediction`` is the final answer :func:`fcot.eval.answer.extract_answer` finds (the text after
the last ``Answer:``, for chain-of-thought outputs), or the whole text when there is none.

Models (any family registered in :mod:`fcot.models`: transformers-native ``internvl``,
OpenGVLab remote-code ``internvl_chat`` with ``trust_remote_code=True``):

- a folder with an ``fcot`` section in its config (saved from a patched model):
  :func:`fcot.load_compressed`; role ``student``;
- a plain folder: ``from_pretrained``; role ``teacher``; with ``compressors`` it is also
  evaluated after :func:`fcot.apply_fcot` with each compressor and ratio (training-free, role
  ``training-free``), reverted in between.

Every option and every model folder is validated before the first model loads; with ``out``,
``eval.json`` and ``predictions/<name>.jsonl`` are rewritten as soon as each model's results
exist (``"complete": false`` until the last one).

Per model it reports each metric's mean, visual tokens per image (tokens per tile x tiles),
prefill latency (batch-1 forwards of the first ``latency_samples`` questions in three
interleaved rounds, each after a warm-up; median with p20/p80) and peak memory:
``torch.cuda.max_memory_allocated`` on a GPU; on CPU the process's
peak resident set size (``ru_maxrss``), which includes everything loaded before and only grows,
as the JSON's ``memory_kind`` says.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from fcot.data.records import count_skip
from fcot.eval.answer import DEFAULT_ANSWER_PATTERN, compile_answer_pattern, extract_answer
from fcot.eval.metrics import METRICS, check_metric_options, score

IMAGE = "<image>"


class EvalSetError(ValueError):
    """The eval set cannot be scored (no answers, malformed records)."""


@dataclass
class Question:
    qid: str
    images: list[Path]
    question: str
    answers: list[str]


@dataclass
class EvalSkips:
    """Records and questions left out of an eval set, by reason, with ``file:line`` examples."""

    source: str
    records: int = 0
    questions: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str) -> None:
        count_skip(self.skipped, self.examples, reason, f"{where}: {detail}", keep=5)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "records": self.records, "questions": self.questions,
                "skipped": dict(sorted(self.skipped.items())), "examples": self.examples}

    def __str__(self) -> str:
        head = f"{self.source}: {self.questions} questions from {self.records} records"
        if not self.skipped:
            return head + ", none skipped"
        parts = [f"{reason}={n} (e.g. {self.examples[reason][0]})" for reason, n in sorted(self.skipped.items())]
        return head + f"; skipped {sum(self.skipped.values())}: " + "; ".join(parts)


def check_image(path: Path, max_pixels: int | None = None) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``path`` cannot be used as an image, else None: ``image_missing``,
    ``image_empty`` (0 bytes), then the shared loader's typed errors
    (:func:`fcot.data.images.load_image`, which decodes the whole file): ``image_too_large``
    (over the pixel cap, refused before decoding) and ``corrupt_image`` (not an image, or
    truncated)."""
    from fcot.data.images import ImageError, load_image

    if not path.is_file():
        return "image_missing", f"{str(path)!r} does not exist"
    if path.stat().st_size == 0:
        return "image_empty", f"{str(path)!r} is 0 bytes"
    try:
        load_image(path, max_pixels=max_pixels, mode=None).close()
    except ImageError as e:
        return e.reason, str(e)
    return None


def load_eval_set(jsonl: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                  max_pixels: int | None = None, check_images: bool = True,
                  skips: EvalSkips | None = None) -> list[Question]:
    """Questions with their reference answers from a records JSONL (see the module docstring).
    Bad records and images are skipped and counted in ``skips`` (pass an :class:`EvalSkips` to
    read them); a set with no usable question raises :class:`EvalSetError`."""
    path = Path(jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"eval set {str(path)!r}: no such file")
    root = Path(image_root) if image_root is not None else path.parent
    skips = skips if skips is not None else EvalSkips(str(path))
    checked: dict[Path, tuple[str, str] | None] = {}
    out: list[Question] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            skips.records += 1
            where = f"{path.name}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                skips.add("bad_json", where, f"not JSON ({e})")
                continue
            convs = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(convs, list):
                skips.add("bad_schema", where, "expected an object with 'conversations' (fcot.data.records format)")
                continue
            turns = [(t.get("from"), t.get("value")) for t in convs if isinstance(t, dict) and t.get("from") != "system"]
            humans = [v for r, v in turns if r in ("human", "user")]
            gpts = [v for r, v in turns if r in ("gpt", "assistant")]
            raw = rec.get("image")
            images = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else None
            if images is None and raw is not None or images is not None and not all(isinstance(i, str) for i in images):
                skips.add("bad_schema", where, f"'image' must be a path or a list of paths, got {raw!r}")
                continue
            images = list(images or [])
            answers = rec.get("answers")
            if answers is not None and (not isinstance(answers, list) or len(answers) != len(humans)):
                skips.add("bad_answers", where, f"'answers' must be a list with one entry per question ({len(humans)})")
                continue
            if not humans:
                skips.add("no_questions", where, "no human turn")
                continue
            bad = None
            for img in images:
                p = root / img
                if p not in checked:
                    checked[p] = check_image(p, max_pixels) if check_images else None
                bad = bad or checked[p]
            if bad is not None:
                skips.add(bad[0], where, bad[1])
                continue
            rid = str(rec.get("id", f"line{n}"))
            for k, q in enumerate(humans):
                refs = answers[k] if answers is not None else (gpts[k] if k < len(gpts) else None)
                refs = [refs] if isinstance(refs, str) else refs
                if not isinstance(q, str):
                    skips.add("bad_schema", where, f"question {k} is not a string")
                    continue
                if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs) or \
                        not any(r.strip() for r in refs):
                    skips.add("no_answer", where, f"question {k} ({q[:40]!r}) has no reference answer: give each question "
                              "a 'gpt' turn or an 'answers' entry")
                    continue
                q = q.replace(IMAGE, "").strip()
                if images:
                    q = "\n".join([IMAGE] * len(images) + [q])
                out.append(Question(f"{rid}#{k}", [root / p for p in images], q, list(refs)))
                skips.questions += 1
    if not out:
        raise EvalSetError(f"eval set {str(path)!r} holds no usable questions with answers ({skips})")
    return out


def score_predictions(questions: Sequence[Question], predictions: dict[str, str],
                      metrics: Sequence[str] = tuple(METRICS), *,
                      answer_pattern: str | re.Pattern | None = DEFAULT_ANSWER_PATTERN,
                      metric_options: dict[str, dict] | None = None) -> tuple[dict[str, float], list[dict]]:
    """Mean of each metric, and per-question rows; every question needs a prediction and every
    prediction a question. Each raw prediction is reduced to its final answer
    (:func:`~fcot.eval.answer.extract_answer` with ``answer_pattern``) before scoring; a row
    holds the scored ``prediction``, the ``raw`` text and whether an answer line was ``extracted``.
    ``metric_options`` (``{metric: {option: value}}``) selects a metric's non-default convention."""
    pattern = compile_answer_pattern(answer_pattern)
    options = check_metric_options(metric_options)
    known = {q.qid for q in questions}
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise EvalSetError(f"{len(unknown)} predictions for unknown question ids (e.g. {unknown[:3]}); ids are "
                           "'<record id>#<question index>' of the eval set")
    missing = [q.qid for q in questions if q.qid not in predictions]
    if missing:
        raise EvalSetError(f"{len(missing)} questions have no prediction (e.g. {missing[:3]})")
    rows = []
    for q in questions:
        raw = predictions[q.qid]
        p, found = extract_answer(raw, pattern)
        rows.append({"id": q.qid, "prediction": p, "raw": raw, "extracted": found, "answers": q.answers,
                     **{m: score(m, p, q.answers, **options.get(m, {})) for m in metrics}})
    return {m: sum(r[m] for r in rows) / len(rows) for m in metrics}, rows


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures (see the module docstring)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process_peak_rss"


class Answerer:
    """Builds each question's prompt as the model family's chat code does (template, system
    message, ``<img>`` + context tokens + ``</img>`` per image), and answers batches greedily."""

    def __init__(self, model, tokenizer, tiler, *, max_tiles: int = 12, max_new_tokens: int = 16):
        from fcot.models import get_family

        self.model, self.tokenizer, self.tiler, self.max_tiles = model, tokenizer, tiler, max_tiles
        self.family = get_family(model)
        self.family.check_generate(model)
        self.tokens_per_tile = self.family.tokens_per_tile(model)
        self.format = self.family.chat_for(model.config, model, tokenizer)
        self.image_token_id = self.family.image_token_id(model, tokenizer)
        self.max_new_tokens = max_new_tokens
        unk = tokenizer.unk_token_id
        stops = [tokenizer.convert_tokens_to_ids(s) for s in self.format.stop] + [tokenizer.eos_token_id]
        self.stop = list(dict.fromkeys(t for t in stops if t is not None and t != unk))
        if not self.stop:
            raise ValueError(f"the tokenizer has none of the stop tokens {self.format.stop} and no eos_token: answers "
                             "could not end")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def prompt(self, question: str, tiles: Sequence[int]) -> str:
        """The prompt text of one question whose images have ``tiles`` tiles each: the chat
        format's text with its image placeholders expanded in order (``<img>`` + context tokens
        x tokens per tile x tiles + ``</img>``, as transformers' InternVLProcessor expands them)."""
        text = self.format.prompt(question)
        parts = text.split(self.format.placeholder)
        if len(parts) - 1 != len(tiles):
            raise EvalSetError(f"the {self.format.name} prompt of {question[:60]!r} holds {len(parts) - 1} image "
                               f"placeholders {self.format.placeholder!r} for {len(tiles)} images: the chat template "
                               "must write one per image")
        out = parts[0]
        for n, part in zip(tiles, parts[1:]):
            out += self.format.image.format(context="<IMG_CONTEXT>" * (self.tokens_per_tile * n)) + part
        return out

    def encode(self, q: Question) -> tuple[list[int], torch.Tensor | None, int]:
        from PIL import Image

        pixels = []
        per_image = max(1, self.max_tiles // max(1, len(q.images)))
        for path in q.images:
            with Image.open(path) as im:
                pixels.append(self.tiler(im.convert("RGB"), per_image))
        tiles = [p.shape[0] for p in pixels]
        text = self.prompt(q.question, tiles)
        ids = self.tokenizer(text, **self.format.tokenize_kwargs(text, self.tokenizer))["input_ids"]
        found, expected = sum(1 for t in ids if t == self.image_token_id), self.tokens_per_tile * sum(tiles)
        if found != expected:
            raise EvalSetError(f"question {q.qid}: its prompt holds {found} image tokens, expected {expected} "
                               f"({self.tokens_per_tile} per tile x {sum(tiles)} tiles): the tokenizer splits <IMG_CONTEXT>")
        return ids, (torch.cat(pixels) if pixels else None), sum(tiles)

    def batch(self, encoded: Sequence[tuple[list[int], torch.Tensor | None, int]]) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((len(encoded), length), self.pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for b, (ids, _, _) in enumerate(encoded):  # left padding: generation continues every row at the end
            input_ids[b, length - len(ids):] = torch.tensor(ids)
            mask[b, length - len(ids):] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        pixels = [p for _, p, _ in encoded if p is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.dtype)
        return inputs

    @torch.no_grad()
    def prefill_ms(self, encoded, repeats: int = 3) -> list[float]:
        """``repeats`` timed batch-1 forwards (ms) after one warm-up."""
        inputs = self.batch([encoded])
        return self._time(lambda: self.family.prefill(self.model, inputs), repeats)

    def _time(self, fn, repeats: int) -> list[float]:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    @torch.no_grad()
    def generate(self, encoded) -> list[str]:
        inputs = self.batch(encoded)
        new = self.family.generate(self.model, inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   eos_token_id=self.stop, pad_token_id=self.pad)
        texts = []
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stop), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts


@dataclass
class ModelResult:
    """One evaluated model: what the table, the JSON and ``fcot report`` show."""

    name: str
    role: str  # teacher | training-free | student
    compressor: str
    ratio: float
    tokens_per_tile: int
    visual_tokens_per_image: float
    metrics: dict[str, float]
    prefill_ms: float
    peak_memory_mb: float
    memory_kind: str
    n_questions: int
    path: str = ""
    family: str = ""
    answers_extracted: int = 0
    prefill_ms_p20: float = 0.0
    prefill_ms_p80: float = 0.0
    chat_format: str = ""
    """The prompt format: ``chat_template`` (the checkpoint's own), a remote-code template name, or ``chatml``."""
    chat_note: str = ""
    """Why ``chat_format`` is a fallback (e.g. the native checkpoint has no chat template), else empty."""
    predictions: list[dict] = field(default_factory=list, repr=False)


def evaluate_model(model, tokenizer, tiler, questions: Sequence[Question], *, name: str, role: str,
                   batch_size: int = 16, max_new_tokens: int = 16, max_tiles: int = 12, latency_samples: int = 8,
                   metrics: Sequence[str] = tuple(METRICS), progress: bool = True, path: str = "",
                   answer_pattern: str | re.Pattern | None = DEFAULT_ANSWER_PATTERN,
                   metric_options: dict[str, dict] | None = None) -> ModelResult:
    """Answer and score ``questions`` with one (possibly fcot-patched) model."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    model.eval()
    ans = Answerer(model, tokenizer, tiler, max_tiles=max_tiles, max_new_tokens=max_new_tokens)
    if ans.format.note:
        # named by folder, so a folder's training-free variants repeat nothing (one warning per message)
        warnings.warn(f"fcot eval {path or name}: {ans.format.note}", stacklevel=2)
    encoded = [ans.encode(q) for q in questions]
    device = ans.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    predictions: dict[str, str] = {}
    bar = tqdm(total=len(questions), desc=f"eval {name}", unit="q", disable=not progress, leave=False)
    for start in range(0, len(questions), batch_size):
        chunk = encoded[start:start + batch_size]
        for q, text in zip(questions[start:start + batch_size], ans.generate(chunk)):
            predictions[q.qid] = text
        bar.update(len(chunk))
    bar.close()
    # Repeats interleaved over the questions (round r times every sampled question once), so a
    # burst of load on the machine hits all of them alike; median and p20/p80 of all timings.
    sampled = encoded[:max(1, latency_samples)]
    times = [t for _ in range(3) for e in sampled for t in ans.prefill_ms(e, repeats=1)]
    latency = statistics.median(times)
    p20, _, _, p80 = statistics.quantiles(times, n=5) if len(times) > 1 else [latency] * 4
    means, rows = score_predictions(questions, predictions, metrics, answer_pattern=answer_pattern,
                                    metric_options=metric_options)
    mem, kind = peak_memory_mb(device)
    section = getattr(model.config, "fcot", None) or {}
    return ModelResult(
        name=name, role=role, compressor=section.get("compressor", "none"), ratio=float(section.get("ratio", 0.0)),
        tokens_per_tile=ans.tokens_per_tile, visual_tokens_per_image=ans.tokens_per_tile * sum(e[2] for e in encoded) / len(encoded),
        metrics=means, prefill_ms=latency, prefill_ms_p20=p20, prefill_ms_p80=p80, peak_memory_mb=mem, memory_kind=kind,
        n_questions=len(questions), path=path,
        family=ans.family.model_type, chat_format=ans.format.name, chat_note=ans.format.note,
        answers_extracted=sum(r["extracted"] for r in rows), predictions=rows,
    )


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False):
    """(model, tokenizer, tiler, role) for a model folder of any registered family
    (:func:`fcot.models.get_family`); a clear error for anything else."""
    from fcot.models import get_family

    config = check_model_folder(path, trust_remote_code=trust_remote_code)
    family = get_family(config)
    loaded = family.load(str(path), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tiler = family.tiler(config, loaded.image_processor)
    return loaded.model, loaded.tokenizer, tiler, "student" if loaded.compressed else "teacher"


def evaluate_training_free(model: Any, tokenizer: Any, tiler: Any, questions: list, compressors: Iterable[str],
                           ratios: Iterable[float], *, prefix: str = "", on_result=None, **kwargs: Any) -> list:
    """:func:`evaluate_model` on ``model`` compressed training-free by every compressor at every
    ratio (``apply_fcot``, then ``revert_fcot`` even on error); results named
    ``{prefix}{compressor}@{ratio}``; ``on_result(result)`` is called as each one exists."""
    import fcot

    results = []
    for comp in compressors:
        for ratio in ratios:
            fcot.apply_fcot(model, tokenizer if _has_image_token(tokenizer) else None, compressor=comp, ratio=ratio)
            try:
                results.append(evaluate_model(model, tokenizer, tiler, questions, name=f"{prefix}{comp}@{ratio:g}",
                                              role="training-free", **kwargs))
            finally:
                fcot.revert_fcot(model)
            if on_result is not None:
                on_result(results[-1])
    return results


def _has_image_token(tokenizer: Any) -> bool:
    return "<IMG_CONTEXT>" in tokenizer.get_vocab()


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an int >= 1")


def check_model_folder(path: str | os.PathLike, *, trust_remote_code: bool = False) -> dict:
    """A model folder's ``config.json`` after checking what loading it needs, without loading it:
    a registered family, weights, a tokenizer, and ``trust_remote_code`` with the code files for
    a family whose checkpoints are remote code."""
    from fcot.models import FAMILIES, FcotError, get_family

    p = Path(path)
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else ("is a file" if p.is_file() else
                                                       f"has no config.json (it holds {sorted(x.name for x in p.iterdir())[:6]})")
        raise ValueError(f"model {str(p)!r} {what}: expected a model folder written by save_pretrained")
    try:
        config = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model {str(p)!r}: config.json is not JSON ({e})") from None
    try:
        family = get_family(config)
    except FcotError:
        raise ValueError(f"model {str(p)!r} is a {config.get('model_type')!r} model ({config.get('architectures')}): "
                         f"fcot eval takes InternVL folders (model_type one of {sorted(FAMILIES)})") from None
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ValueError(f"model {str(p)!r} has no weights (*.safetensors or *.bin)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"model {str(p)!r} has no tokenizer files (tokenizer.json / tokenizer_config.json): save the "
                         "tokenizer into the model folder")
    from fcot.models.autoload import AUTOLOAD_MODULE

    auto_map = config.get("auto_map") or {}
    refs = [ref[0] if isinstance(ref, list) else ref for ref in auto_map.values() if ref]
    # fcot's own loader (fcot_autoload.py) is not run by fcot eval: load_compressed builds the model
    own_code = [r for r in refs if not r.startswith(f"{AUTOLOAD_MODULE}.")]
    if own_code and not trust_remote_code:
        raise ValueError(f"model {str(p)!r} ({family.model_type}) loads with its own code (auto_map {sorted(auto_map)}): "
                         "pass --trust-remote-code (trust_remote_code=True) if you trust that folder")
    for ref in refs:
        module = ref.split("--")[-1].rsplit(".", 1)[0]
        if "--" not in ref and not (p / f"{module}.py").is_file():
            raise ValueError(f"model {str(p)!r}: config.json's auto_map names {module}.py, which the folder lacks")
    return config


def check_options(*, compressors: Sequence[str] = (), ratios: Sequence[float] = (0.5,), names: Sequence[str] | None = None,
                  models: Sequence[str] = (), batch_size: int = 16, max_new_tokens: int = 16, max_tiles: int = 12,
                  latency_samples: int = 8, metrics: Sequence[str] = tuple(METRICS), limit: int | None = None,
                  device: str = "cpu", answer_pattern: Any = DEFAULT_ANSWER_PATTERN, max_pixels: int | None = None,
                  progress: bool = True, metric_options: dict[str, dict] | None = None, **unknown: Any) -> None:
    """Every option of :func:`evaluate`, checked before anything loads."""
    from fcot.compress import get_compressor

    if unknown:
        raise TypeError(f"evaluate() got unexpected options {sorted(unknown)}")
    from fcot.data.images import max_pixels_setting

    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("max_tiles", max_tiles),
                        ("latency_samples", latency_samples)):
        _positive_int(name, value)
    max_pixels_setting(max_pixels)  # None (FCOT_MAX_IMAGE_PIXELS or the default) or an int >= 0
    if limit is not None:
        _positive_int("limit", limit)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics={list(metrics)!r}: expected one or more of {sorted(METRICS)}")
    compile_answer_pattern(answer_pattern)
    check_metric_options(metric_options)
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e})") from None
    if names is not None and len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models: give one --name per model")
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"names={list(names)}: each model needs its own name (they name the predictions files)")
    for comp in compressors:
        cls = get_compressor(comp)
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ValueError(f"ratio={r!r}: expected a fraction of visual tokens removed in [0, 1)")
            if comp != "none" and cls.ratios is not None and r not in cls.ratios:
                raise ValueError(f"compressor={comp!r} does not support ratio={r}; supported: {list(cls.ratios)}")


def evaluate(models: Sequence[str], eval_set: str | os.PathLike, *, compressors: Sequence[str] = (),
             ratios: Sequence[float] = (0.5,), names: Sequence[str] | None = None, limit: int | None = None,
             out: str | os.PathLike | None = None, device: str = "cpu", trust_remote_code: bool = False,
             image_root: str | os.PathLike | None = None, max_pixels: int | None = None,
             skips: EvalSkips | None = None, **kwargs: Any) -> list[ModelResult]:
    """Evaluate model folders (and, for uncompressed ones, each training-free compressor x ratio).
    Options, model folders and the eval set are all checked before the first model loads; with
    ``out`` the results are written as each model's exist (see the module docstring). Pass an
    :class:`EvalSkips` as ``skips`` to read which records were left out."""
    check_options(compressors=compressors, ratios=ratios, names=names, models=models, limit=limit, device=device,
                  max_pixels=max_pixels, **kwargs)
    configs = [check_model_folder(path, trust_remote_code=trust_remote_code) for path in models]
    for path, config in zip(models, configs):
        if compressors and "fcot" in config:
            raise ValueError(f"model {str(path)!r} is already compressed ({config['fcot'].get('compressor')}): --compressor "
                             "applies to uncompressed models only")
    skips = skips if skips is not None else EvalSkips(str(eval_set))
    questions = load_eval_set(eval_set, image_root, max_pixels=max_pixels, skips=skips)[:limit]
    results: list[ModelResult] = []

    def done(result: ModelResult) -> None:
        results.append(result)
        if out is not None:
            write_results(out, results, eval_set=str(eval_set), extra={"skipped": skips.as_dict(), "complete": False})

    for k, path in enumerate(models):
        model, tokenizer, tiler, role = load_model(path, device=device, trust_remote_code=trust_remote_code)
        name = names[k] if names is not None else Path(path).name
        done(evaluate_model(model, tokenizer, tiler, questions, name=name, role=role, path=str(path), **kwargs))
        evaluate_training_free(model, tokenizer, tiler, questions, compressors, ratios, prefix=f"{name}+",
                               path=str(path), on_result=done, **kwargs)
        del model
    if out is not None:
        write_results(out, results, eval_set=str(eval_set), extra={"skipped": skips.as_dict(), "complete": True})
    return results


def write_results(out: str | os.PathLike, results: Sequence[ModelResult], *, eval_set: str, extra: dict | None = None) -> Path:
    """``out/eval.json`` (summary per model) and ``out/predictions/<name>.jsonl``, each written
    to a temporary file and renamed, so a reader never sees half a file."""
    out = Path(out)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    models = []
    for r in results:
        d = asdict(r)
        rows = d.pop("predictions")
        safe = "".join(c if c.isalnum() or c in "-_.@+" else "_" for c in r.name)
        target = out / "predictions" / f"{safe}.jsonl"
        _atomic_write(target, "".join(json.dumps(row) + "\n" for row in rows))
        models.append(d)
    payload = {"eval_set": eval_set, "models": models, **(extra or {})}
    path = out / "eval.json"
    _atomic_write(path, json.dumps(payload, indent=2) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_table(results: Sequence[ModelResult | dict], metrics: Sequence[str] = tuple(METRICS)) -> str:
    """The terminal table: one row per model."""
    rows = [asdict(r) if isinstance(r, ModelResult) else r for r in results]
    short = {"exact_match": "EM", "anls": "ANLS", "relaxed_accuracy": "relaxed", "vqa_accuracy": "VQA acc"}
    head = f"{'model':<24}{'role':<14}{'tok/img':>8}" + "".join(f"{short.get(m, m):>9}" for m in metrics) + \
        f"{'prefill ms':>11}{'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'][:23]:<24}{r['role']:<14}{r['visual_tokens_per_image']:>8.0f}" +
                     "".join(f"{100 * r['metrics'][m]:>8.1f}%" for m in metrics) +
                     f"{r['prefill_ms']:>11.2f}{r['peak_memory_mb']:>9.0f}")
    return "\n".join(lines)
