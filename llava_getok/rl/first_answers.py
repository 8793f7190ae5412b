"""The refine stage on the policy's own first answers (as at inference), not the ones stored in the data; the same
for every backend: the trainer renders and generates (``first_answer_ids``, ``with_turns``), this class decides what.
"""
from __future__ import annotations

import json

from ..records import TASK_SHAPES


class PolicyFirstAnswers:
    """For each distinct row of a generation batch: greedy first answer to the first question (under the GETok
    grammar restricted to the shape the task asks for), then the refine question re-rendered around it (the
    data's first answer, which the question restates, is replaced by the model's). ``first_answer``, ``prompt`` and
    ``conversation`` of the rows are rewritten; the rewards then judge the refinement of the model's answer.

    The trainer provides ``first_answer_ids(rows, ks, conversations, generation_config, processors)`` (the new token
    ids of rows ``ks`` answering ``conversations``, with those rows' images) and ``with_turns(row, turns)`` (the row
    asking ``turns``, rendered by the trainer's template).
    """

    def __init__(self, cfg, token_ids: dict[str, int], max_new_tokens: int):
        self.token_ids, self.max_new_tokens = token_ids, max_new_tokens
        self.grid_cfg = cfg.with_mode("grid")
        self.getok_ids = set(token_ids.values())

    def __call__(self, trainer, rows):
        from transformers import GenerationConfig

        from ..generation import GETokLogitsProcessor, space_token_ids

        tok = trainer._tokenizer
        first_of = {}  # prompt -> index of its first row (a group's G rows share a prompt)
        for k, x in enumerate(rows):
            first_of.setdefault(x["prompt"], k)
        by_kind: dict[str | None, list[int]] = {}
        for k in first_of.values():
            task = json.loads(rows[k]["getok"])["task"]
            by_kind.setdefault(TASK_SHAPES.get(task), []).append(k)
        greedy = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=trainer.eos_token_ids)
        answer = {}
        for only, ks in by_kind.items():
            turns = [json.loads(rows[k]["conversation"]) for k in ks]
            firsts = [t[: self._first_gpt(t, rows[k])] for t, k in zip(turns, ks)]
            proc = GETokLogitsProcessor(self.token_ids, self.grid_cfg, tok.eos_token_id, len(tok),
                                        never_ids=[i for i in (tok.bos_token_id,) if i is not None], only=only,
                                        max_new_tokens=self.max_new_tokens, space_ids=space_token_ids(tok))
            ids = trainer.first_answer_ids(rows, ks, firsts, greedy, [proc])
            for k, t, a in zip(ks, turns, ids):
                answer[rows[k]["prompt"]] = (t, self._text(tok, a, trainer.eos_token_ids))
        out = []
        for x in rows:
            turns, first = answer[x["prompt"]]
            out.append({**trainer.with_turns(x, self._refine_turns(turns, x, first)), "first_answer": first})
        return out

    def _text(self, tok, ids, eos) -> str:
        from ..generation import space_token_ids

        ids = [i for i in ids if i not in eos]
        if ids and ids[0] in space_token_ids(tok):  # the template's space before the answer, not part of it
            ids = ids[1:]
        if all(i in self.getok_ids for i in ids):  # the GETok tokens exactly, as the converter writes them
            return "".join(tok.convert_ids_to_tokens(ids))
        return tok.decode(ids, skip_special_tokens=False)

    @staticmethod
    def _first_gpt(turns, row) -> int:
        k = next((i for i, t in enumerate(turns) if t["from"] == "gpt"), None)
        if k is None:
            raise ValueError(f"record {row.get('id')!r}: a refine conversation needs its first answer turn")
        return k

    def _refine_turns(self, turns, row, first: str) -> list[dict]:
        k = self._first_gpt(turns, row)
        question = turns[-1]["value"]
        if row["first_answer"] not in question:
            raise ValueError(f"record {row.get('id')!r}: the refine question does not restate the first answer "
                             f"{row['first_answer']!r}; cannot re-ask it about the model's own answer")
        return [*turns[:k], {"from": "gpt", "value": first}, *turns[k + 1 : -1],
                {"from": "human", "value": question.replace(row["first_answer"], first)}]
