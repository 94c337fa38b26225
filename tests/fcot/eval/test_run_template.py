"""fcot eval's prompt for the native InternVL family: the checkpoint's own chat template, applied
as transformers' InternVLProcessor applies it (``apply_chat_template`` on a user message with the
image and the question, generation prompt added, each image token expanded to ``<img>`` + context
tokens + ``</img>``), stopping at the template's end-of-turn token; ChatML only when the checkpoint
has no template, and then recorded as a fallback."""

from __future__ import annotations

import json

import pytest
import torch

import fcot
from fcot import demo
from fcot.data.tiling import internvl_image_processor
from fcot.eval.run import Answerer, EvalSetError, evaluate, load_eval_set, load_model
from fcot.models.internvl import CHATML, TemplateChat, end_of_turn, native_chat

from ..tiny_internvl import _processor_class

EOT = "<|end|>"
# Not ChatML: BOS, "role" words instead of <|im_start|> markers, its own end-of-turn token, the
# image token with a space after it (InternVL -hf templates write "<IMG_CONTEXT>\n").
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} number "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} " + EOT + " {% endfor %}{% if add_generation_prompt %}assistant is {% endif %}"
)


def _tokenizer(template: str | None):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = demo.VOCAB + [EOT]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"<[^>]+>"), behavior="isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", extra_special_tokens=dict(start_image_token="<img>", end_image_token="</img>",
                                  context_image_token="<IMG_CONTEXT>", video_token="<video>"),
        model_input_names=["input_ids", "attention_mask"],
    )
    out.add_tokens(demo.SPECIALS[4:] + [EOT], special_tokens=True)  # already in the vocabulary: ids unchanged
    assert len(out) == len(vocab)
    out.chat_template = template
    return out


def _save(folder, template: str | None) -> None:
    import transformers

    config = demo.build_config()
    config.text_config.vocab_size = len(demo.VOCAB) + 1  # + EOT
    torch.manual_seed(0)
    transformers.InternVLForConditionalGeneration(config).eval().save_pretrained(folder)
    _tokenizer(template).save_pretrained(folder)
    internvl_image_processor(64, max_tiles=1).save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_template")
    _save(root / "templated", TEMPLATE)
    _save(root / "plain", None)
    jsonl = demo.make_task(root / "data", 3, seed=2, cols=2)
    return root, jsonl


def _processor(tokenizer, image_seq_length=16):
    return _processor_class()(image_processor=internvl_image_processor(64, max_tiles=1), tokenizer=tokenizer,
                              image_seq_length=image_seq_length, chat_template=tokenizer.chat_template)


def _processor_inputs(processor, q):
    """What transformers' processor gives for the question and its image: apply_chat_template on a
    user message with the image and the question (generation prompt added), then the processor's
    image expansion and tiling."""
    from PIL import Image

    text = q.question.replace("<image>", "").strip()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with Image.open(q.images[0]) as im:
        return processor(text=[prompt], images=[[im.convert("RGB")]], return_tensors="pt")


def test_prompt_ids_and_answers_follow_the_checkpoints_chat_template(setup, tmp_path):
    root, jsonl = setup
    questions = load_eval_set(jsonl)
    model, tokenizer, tiler, _ = load_model(root / "templated")
    ans = Answerer(model, tokenizer, tiler, max_tiles=1, max_new_tokens=4)
    assert isinstance(ans.format, TemplateChat) and ans.format.template == TEMPLATE and not ans.format.note
    # stops: the template's end-of-turn token, then the tokenizer's eos
    assert ans.stop == [tokenizer.convert_tokens_to_ids(EOT), tokenizer.eos_token_id]
    processor = _processor(tokenizer)
    expected = []
    for q in questions:
        ids, pixels, tiles = ans.encode(q)
        ref = _processor_inputs(processor, q)
        assert ids == ref["input_ids"][0].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # no second BOS
        assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids  # not the ChatML fallback
        assert torch.equal(pixels, ref["pixel_values"]) and tiles == 1
        with torch.no_grad():
            out = model.generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                                 pixel_values=ref["pixel_values"], max_new_tokens=4, do_sample=False,
                                 eos_token_id=ans.stop, pad_token_id=ans.pad)
        new = out[0, ref["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in ans.stop), len(new))
        expected.append(tokenizer.decode(new[:cut], skip_special_tokens=True).strip())
    results = evaluate([str(root / "templated")], jsonl, out=tmp_path, batch_size=1, max_new_tokens=4, max_tiles=1,
                       progress=False, latency_samples=1, compressors=["avg"], ratios=[0.5])
    assert [r["raw"] for r in results[0].predictions] == expected
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [(m["chat_format"], m["chat_note"], m["tokens_per_tile"]) for m in data["models"]] == \
        [("chat_template", "", 16), ("chat_template", "", 8)]
    # the training-free compressed model: the same template, with the compressed count of image tokens
    patched = fcot.apply_fcot(model, tokenizer, compressor="avg", ratio=0.5)
    try:
        ids, _, _ = Answerer(patched, tokenizer, tiler, max_tiles=1).encode(questions[0])
    finally:
        fcot.revert_fcot(model)
    ref = _processor_inputs(_processor(tokenizer, image_seq_length=8), questions[0])["input_ids"][0].tolist()
    assert ids == ref


def test_without_a_template_chatml_is_used_and_recorded(setup, tmp_path):
    root, jsonl = setup
    with pytest.warns(UserWarning, match="no chat template"):
        results = evaluate([str(root / "plain")], jsonl, out=tmp_path, max_new_tokens=2, max_tiles=1, progress=False,
                           latency_samples=1)
    model = json.loads((tmp_path / "eval.json").read_text())["models"][0]
    assert model["chat_format"] == "chatml" and "no chat template" in model["chat_note"]
    assert results[0].chat_format == "chatml"
    m, tokenizer, tiler, _ = load_model(root / "plain")
    ans = Answerer(m, tokenizer, tiler, max_tiles=1)
    assert ans.format is CHATML
    q = load_eval_set(jsonl)[0]
    ids, _, _ = ans.encode(q)
    text = q.question.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 16 + "</img>")
    assert ids == tokenizer(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert ans.stop == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]


def test_legacy_processor_template_file_is_read(setup, tmp_path):
    """A processor saved in the older format keeps its template in chat_template.json, which the
    tokenizer does not read: the native loader takes it from there."""
    import shutil

    root, _ = setup
    folder = tmp_path / "legacy"
    shutil.copytree(root / "plain", folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    _, tokenizer, _, _ = load_model(folder)
    assert tokenizer.chat_template == TEMPLATE


def test_template_helpers():
    tok = _tokenizer(TEMPLATE)
    assert end_of_turn(tok, TEMPLATE) == EOT
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{{ c.get('text', '') }}"
              "{% endfor %}<|im_end|>\n{% endfor %}")
    assert end_of_turn(tok, chatml) == "<|im_end|>"
    plain_end = "{% for m in messages %}{{ m['role'] }} {{ m['content'][0]['text'] }} . {% endfor %}"
    assert end_of_turn(tok, plain_end) is None
    assert end_of_turn(tok, "{% if messages[-1]['role'] == 'assistant' %}{{ raise_exception('no') }}{% endif %}x") is None
    chat = native_chat(_tokenizer(plain_end))  # stops at eos only, and says so
    assert chat.stop == () and "end-of-turn token was not found" in chat.note
    assert native_chat(_tokenizer(None)) is CHATML
    assert native_chat(_tokenizer("   ")) is CHATML
    named = _tokenizer(None)
    named.chat_template = {"default": TEMPLATE, "tool_use": "x"}  # named templates: "default" is applied
    chat = native_chat(named)
    assert chat.prompt("<image>\nwhat is") == "<s>user number <IMG_CONTEXT> what is <|end|> assistant is "
    # a processor: its template and image token
    proc = _processor(_tokenizer(None))
    proc.chat_template = TEMPLATE
    assert isinstance(native_chat(proc), TemplateChat) and native_chat(proc).placeholder == "<IMG_CONTEXT>"


def test_template_that_drops_the_image_is_an_error(setup):
    root, jsonl = setup
    model, tokenizer, tiler, _ = load_model(root / "plain")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}"
    ans = Answerer(model, tokenizer, tiler, max_tiles=1)
    with pytest.raises(EvalSetError, match="0 image placeholders '<IMG_CONTEXT>' for 1 images"):
        ans.encode(load_eval_set(jsonl)[0])
