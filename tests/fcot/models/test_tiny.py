"""The tiny model: an untied LM head, and weights that are a fixed function of the seed."""

from __future__ import annotations

import zlib

import pytest
import torch

from fcot.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=3).model


def test_head_is_not_tied_to_the_embeddings(tiny, tmp_path):
    """Separate storage, flags off on both configs, and a change to the embeddings leaves the head
    alone; also after a save_pretrained / from_pretrained round trip."""
    import transformers

    head, embed = tiny.get_output_embeddings().weight, tiny.get_input_embeddings().weight
    assert head.untyped_storage().data_ptr() != embed.untyped_storage().data_ptr()
    assert tiny.config.tie_word_embeddings is False and tiny.config.text_config.tie_word_embeddings is False
    assert not torch.equal(head, embed)  # drawn from different seeds
    tiny.save_pretrained(tmp_path)
    loaded = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path)
    for model in (tiny, loaded):
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        before, saved = head.detach().clone(), embed.detach().clone()
        with torch.no_grad():
            embed.add_(1.0)
        assert torch.equal(head, before), "the head moved with the embeddings: it is tied"
        with torch.no_grad():
            embed.copy_(saved)
    torch.testing.assert_close(loaded.get_output_embeddings().weight, tiny.get_output_embeddings().weight, rtol=0, atol=0)


def _expected(seed: int, name: str, shape) -> torch.Tensor:
    # Written out independently of fcot.models.tiny.init_value: the documented rule.
    g = torch.Generator()
    g.manual_seed(zlib.crc32(("%d:%s" % (seed, name)).encode("utf-8")))
    z = torch.randn(*shape, generator=g, dtype=torch.float32)
    if len(shape) != 1:
        return 0.05 * z
    return 0.1 * z + (1.0 if name.endswith("weight") else 0.0)


def test_weights_are_a_fixed_function_of_the_seed(tiny):
    """Every parameter equals the documented seeded draw (from the seed and its name alone), the
    global RNG state at build time does not matter, and another seed gives other weights."""
    params = dict(tiny.named_parameters())
    assert "lm_head.weight" in params
    checksum = 0.0
    for name, p in sorted(params.items()):
        want = _expected(3, name, tuple(p.shape))
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        checksum += float(want.double().abs().sum())
    torch.manual_seed(12345)
    torch.rand(7)  # a different global RNG state, as any caller may leave it
    again = build_tiny(seed=3).model
    assert sum(float(p.detach().double().abs().sum()) for _, p in sorted(again.named_parameters())) == checksum
    state = torch.get_rng_state()
    other = build_tiny(seed=4).model
    assert torch.equal(torch.get_rng_state(), state), "build_tiny changed the global RNG state"
    assert not torch.equal(other.get_output_embeddings().weight, tiny.get_output_embeddings().weight)
