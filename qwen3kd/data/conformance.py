"""Teacher / student conformance: distillation compares the two models' distributions column by
column, so both must map the same text to the same token ids, have the same vocabulary width, and
render conversations with the same chat template. Checked before step 0; a mismatch is an error,
never a truncation (DESIGN.md, "Vocabulary")."""

from __future__ import annotations

import difflib

from qwen3kd.errors import ConfigError


def conformance_problems(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int) -> list[str]:
    problems = []
    if student_vocab != teacher_vocab:
        problems.append(f"vocabulary width: model.vocab_size={student_vocab}, "
                        f"teacher.model.vocab_size={teacher_vocab}")
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        only_s = sorted(set(s) - set(t))
        only_t = sorted(set(t) - set(s))
        moved = sorted(k for k in set(s) & set(t) if s[k] != t[k])
        detail = [f"{len(only_s)} tokens only in the student's ({_show(only_s)})" if only_s else "",
                  f"{len(only_t)} only in the teacher's ({_show(only_t)})" if only_t else "",
                  f"{len(moved)} with different ids ({_show(moved)})" if moved else ""]
        problems.append("token → id maps differ: " + "; ".join(d for d in detail if d))
    for name, a, b in (("eos token", student_tok.eos_token, teacher_tok.eos_token),
                       ("pad token", student_tok.pad_token, teacher_tok.pad_token)):
        if a != b:
            problems.append(f"{name}: student {a!r}, teacher {b!r}")
    st, tt = student_tok.chat_template or "", teacher_tok.chat_template or ""
    if st != tt:
        diff = next((d for d in difflib.unified_diff(tt.splitlines(), st.splitlines(), lineterm="", n=0)
                     if d[:1] in "+-" and not d.startswith(("+++", "---"))), "")
        problems.append(f"chat templates differ (first differing line: {diff[:120]!r})")
    return problems


def _show(tokens: list[str], n: int = 3) -> str:
    return ", ".join(repr(x) for x in tokens[:n]) + (", …" if len(tokens) > n else "")


def check_conformance(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int,
                      where: str) -> None:
    problems = conformance_problems(student_tok, teacher_tok, student_vocab, teacher_vocab)
    if problems:
        raise ConfigError(f"teacher and student do not conform ({where}): " + "; ".join(problems)
                          + ". Set teacher.skip_conformance=true to train anyway (experts only).")
