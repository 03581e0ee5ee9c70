"""Vocabulary compatibility of teacher and student before logit KD."""

from __future__ import annotations


def shared_vocab_size(
    teacher_tokenizer, student_tokenizer, teacher_rows: int, student_rows: int
) -> int:
    """The number of logit columns both models share, or a ValueError before any training.

    Logit KD compares distributions position by position over token ids, so both tokenizers
    must map the same strings to the same ids. Embedding tables padded past the tokenizer (for
    tensor-core friendly sizes) differ only by rows no token uses; those are sliced away.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        moved = [tok for tok in set(t_vocab) & set(s_vocab) if t_vocab[tok] != s_vocab[tok]][:5]
        raise ValueError(
            "logit KD needs the same tokenizer for teacher and student, but they differ "
            f"({len(t_vocab)} vs {len(s_vocab)} tokens; only in teacher: {only_t}, only in "
            f"student: {only_s}, different ids: {moved}). Use a student with the teacher's "
            "tokenizer or a loss without logits (loss.kd_weight=0)."
        )
    used = len(t_vocab)
    for name, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < used:
            raise ValueError(f"{name} has {rows} output rows for a {used}-token vocabulary")
    return min(teacher_rows, student_rows)
