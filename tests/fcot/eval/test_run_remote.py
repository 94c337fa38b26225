"""fcot eval on OpenGVLab-style remote-code checkpoints (tests/fcot/models/remote_code): the
prompt is the one the model's own chat() builds, answers equal its batch_chat() answers, the
Qwen2 (InternVL2-1B) and InternLM2 (InternVL2-2B/8B) variants, and training-free compression."""

from __future__ import annotations

import json

import pytest
import torch

from fcot import demo
from fcot.eval.run import Answerer, evaluate, load_eval_set, load_model
from fcot.models import FcotError

from ..models.remote_checkpoint import load_remote, write_remote_checkpoint

GEN = dict(max_new_tokens=4, do_sample=False)


def _lm_generates(model) -> bool:
    return callable(getattr(model.language_model, "generate", None))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_eval")
    return demo.make_task(root / "data", 4, seed=3, cols=2)


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def ckpt(request, tmp_path_factory):
    return write_remote_checkpoint(tmp_path_factory.mktemp("rc") / f"internvl2_{request.param}", llm=request.param,
                                   seed=1), request.param


def test_prompt_is_chat_prompt(ckpt, data):
    """fcot's prompt ids for a question equal the ids chat() passes to generate."""
    folder, _ = ckpt
    model, tok = load_remote(folder)
    q = load_eval_set(data)[0]
    ans = Answerer(model, tok, _tiler(folder), max_tiles=2) if _lm_generates(model) else None
    if ans is None:
        with pytest.raises(FcotError, match="has no generate\\(\\) under transformers"):
            Answerer(model, tok, _tiler(folder), max_tiles=2)
        return
    ids, pixels, tiles = ans.encode(q)
    seen = {}

    def spy(pixel_values=None, input_ids=None, attention_mask=None, **kw):
        seen["ids"] = input_ids[0].tolist()
        return torch.zeros(1, 1, dtype=torch.long)

    model.generate = spy
    model.chat(tok, pixels, q.question.replace("<image>\n", "", 1), dict(GEN))
    assert seen["ids"] == ids
    assert ids.count(ans.image_token_id) == 16 * tiles


def _tiler(folder):
    from fcot.models import get_family

    config = json.loads((folder / "config.json").read_text())
    return get_family(config).tiler(config)


def test_eval_matches_batch_chat_and_compresses(ckpt, data, tmp_path):
    folder, llm = ckpt
    model, tok = load_remote(folder)
    if not _lm_generates(model):  # OpenGVLab's InternLM2 on transformers >= 5: a clear error before any forward
        with pytest.raises(FcotError, match="InternLM2ForCausalLM .* has no generate"):
            evaluate([str(folder)], data, trust_remote_code=True, batch_size=2, max_new_tokens=3, max_tiles=2,
                     progress=False, latency_samples=1, out=tmp_path)
        assert not (tmp_path / "eval.json").exists()
        return
    results = evaluate([str(folder)], data, compressors=["avg"], ratios=[0.5], trust_remote_code=True, batch_size=3,
                       max_new_tokens=3, max_tiles=2, progress=False, latency_samples=1, out=tmp_path)
    assert [(r.role, r.family, r.tokens_per_tile) for r in results] == \
        [("teacher", "internvl_chat", 16), ("training-free", "internvl_chat", 8)]
    # the teacher's answers are what the model's own batch_chat answers, question by question
    questions = load_eval_set(data)
    tiler = _tiler(folder)
    from PIL import Image

    pixels = []
    for q in questions:
        with Image.open(q.images[0]) as im:
            pixels.append(tiler(im.convert("RGB"), 2))
    replies = model.batch_chat(tok, torch.cat(pixels), [q.question for q in questions], dict(GEN, max_new_tokens=3),
                               num_patches_list=[p.shape[0] for p in pixels])
    assert [r["raw"] for r in results[0].predictions] == replies
    data_json = json.loads((tmp_path / "eval.json").read_text())
    assert data_json["complete"] is True and [m["name"] for m in data_json["models"]] == [folder.name, f"{folder.name}+avg@0.5"]


def test_remote_folder_needs_trust(ckpt, data):
    folder, _ = ckpt
    with pytest.raises(ValueError, match="pass --trust-remote-code"):
        load_model(folder)


def test_eval_compressed_remote_folder(tmp_path, data):
    """A compressed remote-code checkpoint (saved after apply_fcot) is a `student` in fcot eval,
    answering with the compressed token count, the same answers as the patched model in memory."""
    import fcot

    teacher = write_remote_checkpoint(tmp_path / "qwen_teacher", llm="qwen2", seed=4)
    model, tok = load_remote(teacher)
    fcot.apply_fcot(model, tok, compressor="avg", ratio=0.75)
    model.save_pretrained(tmp_path / "qwen_student")
    tok.save_pretrained(tmp_path / "qwen_student")
    kw = dict(batch_size=4, max_new_tokens=3, max_tiles=2, progress=False, latency_samples=1)
    with pytest.raises(ValueError, match="pass --trust-remote-code"):
        evaluate([str(tmp_path / "qwen_student")], data, **kw)
    (result,) = evaluate([str(tmp_path / "qwen_student")], data, trust_remote_code=True, **kw)
    assert (result.role, result.compressor, result.ratio, result.tokens_per_tile) == ("student", "avg", 0.75, 4)
    from fcot.eval.run import evaluate_model

    in_memory = evaluate_model(model, tok, _tiler(teacher), load_eval_set(data), name="m", role="x", **kw)
    assert [r["raw"] for r in result.predictions] == [r["raw"] for r in in_memory.predictions]
