"""fcot.distill.pair_answer_tokens: pairing teacher and student rows on the supervised tokens."""

from __future__ import annotations

import pytest
import torch

import fcot_kernels as fk
from fcot.distill import pair_answer_tokens
from fcot_kernels.reference import fused_linear_distill_ref

IGNORE = -100


def _sequence(prompt: int, image: int, answer: torch.Tensor, h: int, *, pad: int = 0):
    """Hidden states and shifted labels of [image tokens, prompt, answer, padding]: only the
    answer positions are supervised; returns (hidden (L, h), labels (L,), answer positions)."""
    length = image + prompt + answer.numel() + pad
    hidden = torch.randn(length, h)
    labels = torch.full((length,), IGNORE, dtype=torch.int64)
    start = image + prompt
    labels[start:start + answer.numel()] = answer
    return hidden, labels, torch.arange(start, start + answer.numel())


def _batch(answers, image_tokens, h, prompt=3):
    seqs = [_sequence(prompt, img, a, h) for a, img in zip(answers, image_tokens)]
    return [s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs]


def _pad(seqs, value):
    length = max(s.shape[0] for s in seqs)
    out = torch.full((len(seqs), length, *seqs[0].shape[1:]), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


@pytest.mark.parametrize("teacher_padded", [False, True])
@pytest.mark.parametrize("student_padded", [False, True])
def test_pairs_rows_across_different_lengths(teacher_padded, student_padded):
    h, v = 8, 50
    answers = [torch.randint(0, v, (n,)) for n in (5, 1, 7)]
    # The teacher keeps 256 image tokens per tile, the student 64 or 128: sequences differ in length.
    t_h, t_l, t_pos = _batch(answers, [256, 256, 512], h)
    s_h, s_l, s_pos = _batch(answers, [64, 128, 128], h)
    s_h = [x.requires_grad_() for x in s_h]
    t_args = (_pad(t_h, 0.0), _pad(t_l, IGNORE)) if teacher_padded else (t_h, t_l)
    s_args = (_pad(s_h, 0.0), _pad(s_l, IGNORE)) if student_padded else (s_h, s_l)
    paired = pair_answer_tokens(*t_args, *s_args)
    assert paired.student_hidden.shape == (13, h)
    assert paired.teacher_hidden.shape == (13, h)
    torch.testing.assert_close(paired.labels, torch.cat(answers))
    torch.testing.assert_close(paired.teacher_hidden, torch.cat([x[p] for x, p in zip(t_h, t_pos)]))
    torch.testing.assert_close(paired.student_hidden, torch.cat([x[p] for x, p in zip(s_h, s_pos)]).detach())
    assert not paired.teacher_hidden.requires_grad
    # Gradients flow back to exactly the student's answer positions.
    paired.student_hidden.sum().backward()
    for x, p in zip(s_h, s_pos):
        expected = torch.zeros_like(x)
        expected[p] = 1
        torch.testing.assert_close(x.grad, expected)


def test_feeds_fused_linear_distill():
    h, v = 16, 97
    answers = [torch.randint(0, v, (n,)) for n in (4, 6)]
    t_h, t_l, _ = _batch(answers, [40, 40], h)
    s_h, s_l, _ = _batch(answers, [10, 20], h)
    paired = pair_answer_tokens(t_h, t_l, s_h, s_l)
    w = torch.randn(v, h)
    loss = fk.fused_linear_distill(*paired[:2], w, labels=paired.labels, ce_weight=1.0, backend="reference")
    expected = fused_linear_distill_ref(paired.student_hidden, paired.teacher_hidden, w, labels=paired.labels, ce_weight=1.0)
    torch.testing.assert_close(loss, expected)


def test_no_supervised_tokens_gives_empty_rows():
    t_h, t_l = torch.randn(2, 9, 4), torch.full((2, 9), IGNORE)
    s_h, s_l = torch.randn(2, 5, 4), torch.full((2, 5), IGNORE)
    paired = pair_answer_tokens(t_h, t_l, s_h, s_l)
    assert paired.student_hidden.shape == (0, 4) and paired.labels.shape == (0,)


def test_custom_ignore_index():
    t_h, s_h = torch.randn(1, 6, 4), torch.randn(1, 4, 4)
    t_l = torch.tensor([[-1, -1, -1, 3, 4, -1]])
    s_l = torch.tensor([[-1, 3, 4, -1]])
    paired = pair_answer_tokens(t_h, t_l, s_h, s_l, ignore_index=-1)
    torch.testing.assert_close(paired.teacher_hidden, t_h[0, 3:5])
    torch.testing.assert_close(paired.student_hidden, s_h[0, 1:3])


def test_mismatched_count_names_the_sequence():
    h = 4
    t_h, t_l, _ = _batch([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], [8, 8], h)
    s_h, s_l, _ = _batch([torch.tensor([1, 2, 3]), torch.tensor([4])], [2, 2], h)
    with pytest.raises(ValueError, match=r"sequence 1: teacher has 2 supervised tokens but student has 1"):
        pair_answer_tokens(t_h, t_l, s_h, s_l)


def test_mismatched_token_names_the_position():
    h = 4
    t_h, t_l, _ = _batch([torch.tensor([1, 2, 3])], [8], h)
    s_h, s_l, _ = _batch([torch.tensor([1, 9, 3])], [2], h)
    with pytest.raises(ValueError, match=r"sequence 0: supervised token 1 differs \(teacher label 2, student label 9\)"):
        pair_answer_tokens(t_h, t_l, s_h, s_l)


def test_bad_inputs():
    h = torch.randn(2, 5, 4)
    lab = torch.full((2, 5), IGNORE)
    with pytest.raises(ValueError, match="teacher has 2 sequences but student has 1"):
        pair_answer_tokens(h, lab, h[:1], lab[:1])
    with pytest.raises(ValueError, match=r"student_labels must be a tensor of shape \(2, 5\)"):
        pair_answer_tokens(h, lab, h, lab[:, :4])
    with pytest.raises(ValueError, match=r"teacher_hidden must be a padded batch"):
        pair_answer_tokens(h[0], lab[0], h, lab)
    with pytest.raises(TypeError, match="teacher_hidden must be a"):
        pair_answer_tokens("x", lab, h, lab)
    with pytest.raises(ValueError, match=r"student_labels\[1\] must have shape \(5,\)"):
        pair_answer_tokens(h, lab, list(h), [lab[0], lab[1, :3]])
    with pytest.raises(TypeError, match=r"teacher_labels\[0\] must hold integer token ids"):
        pair_answer_tokens(list(h), [lab[0].float(), lab[1]], h, lab)
    with pytest.raises(ValueError, match=r"student_hidden\[1\] has width 3"):
        pair_answer_tokens(h, lab, [h[0], h[1, :, :3]], list(lab))
    with pytest.raises(ValueError, match="holds no sequences"):
        pair_answer_tokens([], [], h, lab)
