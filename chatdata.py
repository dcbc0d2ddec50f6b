"""
chatdata.py: sft.py's training rows from any source: conversations in the common chat shapes (to_messages),
checked against the chat template and cut to the context (load_conversations, each rejection counted with an
example), long answers cut to their first sentences (first_sentences), and plain-text rows that continue the
base model's pretraining stream (load_text_rows).
"""
import itertools
import re

import data
import dataloader
from tok import ConversationError, check_conversation, render_conversation


ROLE_NAMES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "model": "assistant", "system": "system"}


def to_messages(row: dict):
    """One dataset row to {role, content} messages, whatever common chat shape it has."""
    for column in ("messages", "conversations", "conversation"):
        turns = row.get(column)
        if isinstance(turns, list):
            return [{"role": ROLE_NAMES.get(t.get("role", t.get("from")), t.get("role", t.get("from"))),
                     "content": t.get("content", t.get("value", t.get("text")))} if isinstance(t, dict) else t
                    for t in turns]
    if "instruction" in row:
        extra = row.get("input") or row.get("context") or ""
        question = f"{row['instruction']}\n\n{extra}" if isinstance(extra, str) and extra.strip() else row["instruction"]
        return [{"role": "user", "content": question},
                {"role": "assistant", "content": row.get("output", row.get("response"))}]
    raise ConversationError(f"no conversation in the row: no 'messages', 'conversations', 'conversation' or "
                            f"'instruction' column (columns: {', '.join(row)})")


class Rejections:
    """Counts of rejected conversations by reason, with the first example of each."""

    def __init__(self):
        self.reasons: dict[str, list] = {}

    def add(self, where: str, error: Exception):
        reason = re.sub(r"\d+", "N", str(error))  # "message 3 has empty content" -> "message N ..."
        entry = self.reasons.setdefault(reason, [0, where])
        entry[0] += 1

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.reasons.values())

    def report(self, log, seen: int):
        if self.total:
            log(f"rejected {self.total:,} of {seen:,} conversations:")
            for reason, (n, where) in sorted(self.reasons.items(), key=lambda kv: -kv[1][0]):
                log(f"  {n:>7,} x {reason} (e.g. {where})")


# A sentence ends at . ! ? or … (and any closing quotes) before a space and a capital letter or an opening
# quote, not after a digit ("am 1. Januar"), a one-letter word ("z. B. Kiel") or a capitalised two-letter one
# ("Dr. Müller", "Nr. 5"); "ging er." does end one.
SENTENCE_ENDS = re.compile(r"(?<!\d)(?<!\b\w)(?<!\b[A-ZÄÖÜ][a-zäöüß])[.!?…][\"'“”»«)]*(?=\s+[A-ZÄÖÜ„\"»(])")


def first_sentences(text: str, limit: int) -> str:
    """`text` cut after its last sentence end within `limit` characters (whole if it is not longer, or if no
    sentence ends that early: a cut in mid-sentence would teach the model to stop in mid-sentence)."""
    if len(text) <= limit:
        return text
    ends = [m.end() for m in SENTENCE_ENDS.finditer(text) if m.end() <= limit]
    return text[:ends[-1]] if ends else text


def load_conversations(sources: list[data.Source], tokenizer, max_tokens: int, log=print,
                       stats: dict | None = None, answer_chars: int = 0) -> list[tuple[list[int], list[int]]]:
    """Every valid conversation of the sources, rendered as (ids, mask), in order.

    A source's weight w repeats its conversations: the integer part whole, the
    fraction as a deterministic prefix (weight 0.5 keeps the first half).
    answer_chars: assistant turns longer than this are cut to their first sentences (first_sentences; 0: off).
    """
    rendered, rejected, seen, truncated, shortened = [], Rejections(), 0, 0, 0
    end_id = tokenizer.special["<|assistant_end|>"]
    for source in sources:
        if source.weight_by_size:
            raise data.DataError(f"{source.spec}: weight=size mixes pretraining text by its size; here a weight "
                                 f"repeats a source's conversations (weight=2: twice), so give a number")
        mine = []
        for where, row in data.iter_rows(source):
            seen += 1
            try:
                if isinstance(row, Exception):
                    raise ConversationError(f"not valid JSON: {row}")
                if not isinstance(row, dict):
                    raise ConversationError(f"a row must be a JSON object, not {type(row).__name__}")
                messages = check_conversation(to_messages(row))
                if answer_chars:
                    cut = [dict(m, content=first_sentences(m["content"], answer_chars)) if m["role"] == "assistant"
                           else m for m in messages]
                    shortened += cut != messages
                    messages = cut
                ids, mask = render_conversation(tokenizer, messages, max_tokens)
            except ConversationError as e:
                rejected.add(where, e)
                continue
            truncated += ids.count(end_id) < sum(m["role"] == "assistant" for m in messages)
            mine.append((ids, mask))
        whole, part = int(source.weight), source.weight - int(source.weight)
        rendered += mine * whole + mine[:round(part * len(mine))]
    rejected.report(log, seen)
    if stats is not None:
        stats.update(read=seen, rejected=rejected.total, cut=truncated)
    if shortened:
        log(f"shortened the answers of {shortened:,} conversations to their first sentences (--answer-chars "
            f"{answer_chars})")
    if truncated:
        log(f"cut {truncated:,} conversations at a turn boundary to fit {max_tokens} tokens")
    if not rendered:
        raise data.DataError(f"no usable conversations in {' '.join(s.spec for s in sources)} "
                             f"({seen:,} read, {rejected.total:,} rejected)")
    return rendered


def load_text_rows(sources: list[data.Source], tokenizer, max_tokens: int, count: int,
                   base: dict | None = None, bestfit: float = -1.0) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """(`count` rows of plain text, whether they continue the base model's pretraining): rows of max_tokens
    tokens packed as train.py packs its rows (dataloader.PretrainBatches), (ids, mask) like a conversation's
    with every token trained. The first rows are concatenated documents (packing "concat"), the last share
    `bestfit` of them best-fit rows (packing "bestfit": each begins at a document's start), read on from
    where the concatenated ones stopped; `bestfit` -1 (--text-bestfit's default): the base model's packing
    for all of them.

    If `sources` are the base model's own pretraining mix (the same specs), the rows continue the data
    stream of its checkpoint (its first process's share) where pretraining stopped: text the base model
    has not read, spread over the sources as its pretraining was, not the documents it began with a
    second time. Other text is read from its start. On the demo's base model (bench/RESULTS.md, "Text
    rows as pretraining's"), chat - base bits per byte on the manuals' held-out pages: +0.071 with one
    document a row (as before), +0.031 with packed rows from the mix's start, +0.007 continued; the
    price is on UD German-GSD's single sentences: +0.005, +0.034, +0.026. Which packing decides how the
    chat model begins a text ("Half the text rows best-fit"): concatenated rows hold about 0.3 document
    beginnings a row, so alone they let the conversations teach it to begin every text as a question."""
    state = ((base or {}).get("loader") or [None])[0]
    continued = isinstance(state, dict) and state.get("sources") == [s.spec for s in sources]
    state = state if continued else None
    world_size = state["world_size"] if state else 1
    if bestfit == -1:
        bestfit = float(bool(state) and state.get("packing") == "bestfit")
    rows, bestfit_rows = [], round(count * bestfit)
    for packing, wanted in (("concat", count - bestfit_rows), ("bestfit", count)):
        if len(rows) == wanted:  # none of this packing
            continue
        # concat: a row a block, so the state after its last row taken is where the best-fit rows read on;
        # best-fit's blocks of 64 rows, because each block's state copies its buffers (1,000 documents a source)
        loader = dataloader.PretrainBatches(sources, tokenizer, batch_size=1 if packing == "concat" else 64,
                                            seq_len=max_tokens - 1, loop=False, world_size=world_size, packing=packing)
        if state is not None:
            loader.continue_reading(state)
        rows += [(row.tolist(), [1] * len(row)) for row in itertools.islice(loader.rows(), wanted - len(rows))]
        if len(rows) < wanted:
            break
        state = loader.state_dict()
    else:
        return rows, continued
    raise data.DataError(f"--text-data {' '.join(s.spec for s in sources)} gave {len(rows):,} rows of text"
                         f"{' after what the base model read' if continued else ''}, {count:,} were asked for; "
                         f"add text or lower --text-frac")
