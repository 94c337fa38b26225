"""fcot demo --quick: the whole chain (teacher, training-free compressors, distill, posttrain,
merge, eval, report) in a few steps, so CI proves it runs end to end."""

from __future__ import annotations

import json

import pytest

from fcot.cli import main


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out / "report" / "report.md"
    assert printed.strip().splitlines()[-1].endswith(f"report: {report} (plots next to it)")
    models = json.loads((out / "eval.json").read_text())["models"]
    got = [(m["name"], m["role"], m["compressor"], m["visual_tokens_per_image"]) for m in models]
    assert got == [("teacher", "teacher", "none", 16),
                   ("avg@0.5", "training-free", "avg", 8), ("avg@0.75", "training-free", "avg", 4),
                   ("tome@0.5", "training-free", "tome", 8), ("tome@0.75", "training-free", "tome", 4),
                   ("prune@0.5", "training-free", "prune", 8), ("prune@0.75", "training-free", "prune", 4),
                   ("conv@0.5 distilled", "student", "conv", 8), ("conv@0.75 distilled", "student", "conv", 4),
                   ("conv@0.5 posttrained", "student", "conv", 8), ("conv@0.5 merged", "student", "conv", 8),
                   ("conv@0.75 posttrained", "student", "conv", 4)]
    # every stage logged its loss, and the report was drawn from those files
    for stage in ("teacher", "distill-0.5", "distill-0.75", "posttrain-0.5-a", "posttrain-0.5-b", "posttrain-0.75"):
        assert any("loss" in json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()), stage
    for png in ("loss.png", "accuracy_vs_tokens.png", "latency.png"):
        assert (out / "report" / png).stat().st_size > 1000
    text = report.read_text()
    assert "| conv@0.5 merged | student | conv | 0.5 | 8 |" in text
    # the prefill comparison (a toy shape under --quick): interleaved timings with a spread, FLOP-ideal next to them
    prefill = json.loads((out / "prefill.json").read_text())
    assert [r["setting"] for r in prefill["rows"]] == ["none", "avg@0.5", "avg@0.75"]
    assert [r["tokens_per_tile"] for r in prefill["rows"]] == [16, 8, 4]
    assert all(r["total_ms"]["p20"] <= r["total_ms"]["median"] <= r["total_ms"]["p80"] for r in prefill["rows"])
    ideal = [r["ideal_llm"] for r in prefill["rows"]]
    assert ideal[0] == 1.0 and 1.0 < ideal[1] < ideal[2]
    assert "## Prefill at real widths" in text and "| avg@0.75 | 4 |" in text
    assert all(m["prefill_ms_p20"] <= m["prefill_ms"] <= m["prefill_ms_p80"] for m in models)
    with pytest.raises(SystemExit) as e:  # an existing run folder is not overwritten silently
        main(["demo", "--quick", "--quiet", "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_task_splits_share_no_number(tmp_path):
    from fcot.demo import held_out, make_task

    numbers = {}
    for split, n in (("train", 120), ("test", 30)):
        jsonl = make_task(tmp_path / split, n, seed=3, cols=2, split=split)
        numbers[split] = {json.loads(x)["conversations"][1]["value"] for x in jsonl.read_text().splitlines()}
    assert numbers["train"] and numbers["test"] and not numbers["train"] & numbers["test"]
    assert all(held_out(v.split()) for v in numbers["test"])
    # every digit appears at both positions in the training split
    assert all({v.split()[k] for v in numbers["train"]} == set("0123456789") for k in (0, 1))
    with pytest.raises(ValueError, match="split='dev'"):
        make_task(tmp_path / "x", 1, seed=0, split="dev")


def test_prefill_flops_match_torch_flop_counter():
    """The FLOP formula of the real-width comparison equals torch's count of the same forward."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from fcot.demo import prefill_flops

    vit = dict(hidden=128, heads=2, intermediate=192, layers=2, image=64, patch=8)
    llm = dict(hidden=128, heads=2, kv_heads=1, intermediate=160, layers=3, vocab=300)
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=128, num_attention_heads=2, intermediate_size=192, num_hidden_layers=2,
                           image_size=[64, 64], patch_size=[8, 8], use_qk_norm=False),
        text_config=dict(model_type="qwen2", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=160, num_hidden_layers=3, vocab_size=300, tie_word_embeddings=True),
        image_token_id=299, downsample_ratio=0.5, image_seq_length=16)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    tiles, text = 2, 7
    ids = torch.cat([torch.randint(0, 290, (3,)), torch.full((tiles * 16,), 299), torch.randint(0, 290, (text - 3,))])[None]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(tiles, 3, 64, 64),
              logits_to_keep=1)
    flops = prefill_flops(vit=vit, llm=llm, tiles=tiles, tokens_per_tile=16, text_tokens=text)
    counted = {str(op) for ops in counter.get_flop_counts().values() for op in ops}
    want = flops["vit"] + flops["projector"] + flops["llm"]
    if any("attention" in op for op in counted):  # a torch whose counter sees the attention kernel
        want += flops["attention"]
    assert counter.get_total_flops() == want
    # attention by hand: 2 products x 2 FLOPs x (tokens x keys x width) per layer
    assert flops["attention"] == 2 * 2 * 2 * 65 * 65 * 128 * tiles + 3 * 2 * 2 * 39 * 39 * 128


def test_demo_chat_template_prompts_as_its_chatml_training_format():
    # The demo trains on ChatML records; its tokenizer's template must give fcot eval the same ids.
    from fcot.demo import build_tokenizer
    from fcot.models.internvl import CHATML, native_chat

    tok = build_tokenizer()
    fmt = native_chat(tok)
    assert fmt.name == "chat_template" and "<|im_end|>" in fmt.stop

    def expand(f, n=16):
        before, after = f.prompt("<image>\nwhat is the number").split(f.placeholder)
        return before + f.image.format(context="<IMG_CONTEXT>" * n) + after

    ours, chatml = expand(fmt), expand(CHATML)
    assert tok(ours, **fmt.tokenize_kwargs(ours, tok))["input_ids"] == tok(chatml)["input_ids"]
