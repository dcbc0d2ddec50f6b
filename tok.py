"""
tok.py: nanoschnack's tokenizer, a byte-level BPE trained on German text.

    python tok.py --data 'parquet://DATA/pretrain/wiki/train-*.parquet' --max-chars 50M

trains with HF `tokenizers` (Rust, multi-threaded) and writes
out/tokenizer/tokenizer.json plus tokenizer_meta.json (training statistics).
The `Tokenizer` class below is what every later stage imports. It encodes with
`tiktoken`, built on load from the same vocabulary: 5-6x faster than HF's
encoder on German text (bench/RESULTS.md), which is what lets one process pack
over 1M tokens/s; the tests check both give the same ids on German text.

Design:
- Byte-level: every string is representable, nothing is ever <unk>.
- NFC normalisation first, so "Größe" typed with a combining diaeresis and
  the precomposed "Größe" become the same tokens.
- A pre-tokenisation regex for German (SPLIT_PATTERN below); BPE merges never
  cross the boundaries it draws.
- Special tokens for the chat template exist in the vocabulary, but encoding
  text never produces them: a user typing "<|user_start|>" gets ordinary
  tokens. Only the explicit API (`tok.special["<|bos|>"]`) yields their ids.
"""
import argparse
import codecs
import gc
import json
import os
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from report import markdown_table, report_path, update_report

BOS = "<|bos|>"
SPECIAL_TOKENS = [
    BOS,  # starts every document; the model also uses it as a document separator
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|system_start|>", "<|system_end|>",
]

# The split pattern follows GPT-4's (cl100k) in its whitespace handling, with
# three changes for German:
# - no English contraction rules ('s, 't, 're, ...): German elides differently
#   ("geht's", "hab'") and those rules would glue English suffixes onto German;
#   an apostrophe is simply allowed to lead a word like any punctuation mark;
# - a word is letters plus combining marks (\p{M}), so letters whose accent has
#   no precomposed form stay one word; ä ö ü ß and all other Latin letters are \p{L};
# - numbers split into groups of at most three digits, the width of German
#   thousands groups ("1.000.000", "1.000,50 €"), and punctuation (incl. „ “ ‚ ‘
#   » « – …) never merges with letters or digits except for one leading mark.
# GPT-4's possessive quantifiers (?+, ++) are dropped: no match can backtrack
# differently here (the word prefix excludes everything a word may start with),
# and without them HF's regex engine trains about twice as fast.
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{M}\p{N}]?[\p{L}\p{M}]+"  # a word, optionally led by one space or mark: " Straße", "„Haus"
    r"|\p{N}{1,3}"                             # digits, three at most: "1", ".", "000"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"             # a run of punctuation/symbols: " „", "…", "€"
    r"|\s*[\r\n]"                              # newlines, with the spaces before them
    r"|\s+(?!\S)"                              # spaces, leaving the last one to lead the next word
    r"|\s+"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel model uses in its vocab."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class Tokenizer:
    """A thin wrapper around a HF byte-level BPE tokenizer with our special tokens."""

    def __init__(self, hf: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; retrain it with tok.py")
        self.hf = hf
        self.special = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id = self.special[BOS]
        char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        self.id_to_bytes = [b""] * hf.get_vocab_size()  # special tokens stay b"": they are not text
        for token, i in hf.get_vocab().items():
            if i not in self.special.values():
                self.id_to_bytes[i] = bytes(char_to_byte[c] for c in token)
        # UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte.
        self.token_bytes = np.array([len(b) for b in self.id_to_bytes], dtype=np.int32)
        self.id_to_text_bytes = list(self.id_to_bytes)  # for decode, which names special tokens
        for name, i in self.special.items():
            self.id_to_text_bytes[i] = name.encode()
        # HF's merges were learnt in id order, so the ids are tiktoken's merge ranks.
        ranks = {b: i for i, b in enumerate(self.id_to_bytes) if b}
        self.encoding = tiktoken.Encoding("nanoschnack", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={})

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @classmethod
    def train(cls, texts, vocab_size: int, show_progress: bool = True) -> "Tokenizer":
        """Train a fresh tokenizer on an iterator of strings."""
        check_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        # NFC in Python (C code) is much faster than HF's normalizer inside the trainer;
        # the normalizer is attached afterwards so tokenizer.json is complete for other tools.
        hf.train_from_iterator((unicodedata.normalize("NFC", t) for t in texts), trainer)
        hf.normalizer = normalizers.NFC()
        return cls(hf)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load from a tokenizer folder (as written by `save`) or a tokenizer.json."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {file}; train one with: python tok.py --out {path}")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a damaged file
            raise ValueError(f"{file} is not a readable tokenizer.json ({e}); give the folder tok.py wrote "
                             f"(its --out)") from None
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        """From the tokenizer.json text, as checkpoints store it."""
        return cls(HFTokenizer.from_str(text))

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, folder):
        """Write folder/tokenizer.json atomically: a failed save (disk full) leaves an older one as it was."""
        file = Path(folder) / "tokenizer.json"
        tmp = file.with_name(file.name + ".tmp")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            self.hf.save(str(tmp))
            os.replace(tmp, file)
        except Exception as e:  # tokenizers raises a bare Exception when the write fails
            if tmp.is_file():
                tmp.unlink()
            raise OSError(f"cannot write {file} ({e})") from None

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it (NFC): decode(encode(text)) == normalize(text)."""
        return unicodedata.normalize("NFC", text)

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; never yields special tokens, whatever the text says."""
        return self.encoding.encode_ordinary(self.normalize(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel threads."""
        return self.encoding.encode_ordinary_batch([self.normalize(t) for t in texts],
                                                   num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        """Ids to text; special tokens are shown by name."""
        return b"".join(map(self.id_to_text_bytes.__getitem__, ids)).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text one token at a time, holding back incomplete UTF-8.

    A character such as "ü" or an emoji can be split over two tokens; printing
    each token's bytes on its own would show broken characters. Special tokens
    print nothing.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.id_to_bytes = tokenizer.id_to_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.id_to_bytes[token_id])

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def check_vocab_size(vocab_size: int):
    smallest = -(-(256 + len(SPECIAL_TOKENS)) // 64) * 64
    if vocab_size < smallest:
        raise ValueError(f"vocab size {vocab_size} is too small: 256 byte tokens + {len(SPECIAL_TOKENS)} "
                         f"special tokens need at least {smallest}")
    if vocab_size % 64:
        raise ValueError(f"vocab size {vocab_size} is not a multiple of 64 (it sizes GPU matrices); "
                         f"use {vocab_size // 64 * 64} or {-(-vocab_size // 64) * 64}")


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(tokenizer.normalize(t).encode()) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return n_bytes / max(n_tokens, 1)


# -----------------------------------------------------------------------------
# The chat template: the one place that turns a conversation into tokens.
#
#   <|bos|> [<|system_start|> text <|system_end|>]
#           <|user_start|> text <|user_end|> <|assistant_start|> text <|assistant_end|>  (repeated)
#
# Messages are the common {"role": ..., "content": ...} dicts. sft.py trains on
# render_conversation's ids with its mask (1 = trained: assistant text and the
# <|assistant_end|> that ends it, so the model learns when to stop); chat.py
# prompts with render_prompt. Message text goes through encode(), so a user who
# types "<|assistant_end|>" gets ordinary tokens, never the special one.

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation that does not follow the template's rules; the message says which."""


def check_conversation(messages, ends_with: str = "assistant") -> list[dict]:
    """Validate a conversation and return its messages as plain {role, content} dicts.

    Rules: a non-empty list of messages, each with a known role and non-empty
    string content; an optional system message first; then user and assistant
    strictly alternating, starting with user and ending with `ends_with`.

    One exception: a prompt (ends_with="user") may hold an empty or whitespace-only
    earlier answer. A server's answer is "" when a stop sequence matches at once, and
    OpenAI clients send it back as it is (OpenAI and vLLM take it). An empty one renders
    as <|assistant_start|><|assistant_end|>, what the model itself generates when it ends
    at once; a whitespace-only one keeps its whitespace, as sent. Conversations to train
    on (ends_with="assistant") stay strict: an empty answer there would teach the model
    to say nothing.
    """
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"messages must be a non-empty list, got {type(messages).__name__}"
                                + (" (empty)" if isinstance(messages, list) else ""))
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"message {i} is not a {{'role': ..., 'content': ...}} object: {str(m)[:80]!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ConversationError(f"message {i} has unknown role {role!r} (roles: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ConversationError(f"message {i} ({role}) has non-string content of type {type(content).__name__}")
        if not content.strip() and not (role == "assistant" and ends_with == "user"):
            raise ConversationError(f"message {i} ({role}) has empty content")
        checked.append({"role": role, "content": content})
    turns = checked[1:] if checked[0]["role"] == "system" else checked
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = i + len(checked) - len(turns)
            raise ConversationError(f"message {where} is {m['role']!r} where {expected!r} must come "
                                    f"(system first if any, then user and assistant alternating)")
    if not turns or turns[-1]["role"] != ends_with:
        raise ConversationError(f"the conversation must end with a(n) {ends_with} message")
    return checked


def render_messages(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of already checked messages after <|bos|>, and the training mask for each id."""
    s = tokenizer.special
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        text = tokenizer.encode(m["content"])
        if m["role"] == "assistant":
            ids += [s["<|assistant_start|>"], *text, s["<|assistant_end|>"]]
            mask += [0] + [1] * (len(text) + 1)
        else:
            ids += [s[f"<|{m['role']}_start|>"], *text, s[f"<|{m['role']}_end|>"]]
            mask += [0] * (len(text) + 2)
    return ids, mask


def render_conversation(tokenizer: Tokenizer, messages, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """A training conversation to (ids, mask), cut at a turn boundary to fit max_tokens.

    Truncation drops whole user+assistant exchanges from the end (the system
    message stays); if not even the first exchange fits, ConversationError.
    """
    messages = check_conversation(messages, ends_with="assistant")
    ids, mask = render_messages(tokenizer, messages)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, mask
    start = 1 if messages[0]["role"] == "system" else 0
    for end in range(len(messages) - 2, start, -2):  # drop the last exchange until it fits
        ids, mask = render_messages(tokenizer, messages[:end])
        if len(ids) <= max_tokens:
            return ids, mask
    raise ConversationError(f"too long: even the first exchange needs more than {max_tokens} tokens")


def render_prompt(tokenizer: Tokenizer, messages) -> list[int]:
    """A conversation ending with the user's message, plus <|assistant_start|>: what the model answers."""
    ids, _ = render_messages(tokenizer, check_conversation(messages, ends_with="user"))
    return ids + [tokenizer.special["<|assistant_start|>"]]


def parse_conversation(tokenizer: Tokenizer, ids: list[int]) -> list[dict]:
    """The inverse of render_messages: ids back to {role, content} messages."""
    starts = {tokenizer.special[f"<|{r}_start|>"]: r for r in ROLES}
    ends = {tokenizer.special[f"<|{r}_end|>"]: r for r in ROLES}
    if not ids or ids[0] != tokenizer.bos_id:
        raise ConversationError("a rendered conversation starts with <|bos|>")
    messages, role, text = [], None, []
    for i in ids[1:]:
        if role is None and i in starts:
            role, text = starts[i], []
        elif role is not None and ends.get(i) == role:
            messages.append({"role": role, "content": b"".join(map(tokenizer.id_to_bytes.__getitem__, text)).decode()})
            role = None
        elif role is not None and i not in starts and i not in ends:
            text.append(i)
        else:
            raise ConversationError(f"token {tokenizer.decode([i])!r} out of place in a rendered conversation")
    if role is not None:
        raise ConversationError(f"the {role} message is not closed")
    return messages


# -----------------------------------------------------------------------------
# Training from dataset specs

class TrainingText:
    """Documents for training, capped in length and total; every Nth one held out.

    An iterator (for `train_from_iterator`) that prints progress as it reads.
    """

    def __init__(self, documents, max_chars: int, max_doc_chars: int, holdout_every: int = 100,
                 holdout_max_chars: int = 2_000_000):
        self.documents = documents
        self.max_chars, self.max_doc_chars = max_chars, max_doc_chars
        self.holdout_every, self.holdout_max_chars = holdout_every, holdout_max_chars
        self.heldout: list[str] = []
        self.chars = self.docs = 0

    def __iter__(self):
        start = last_print = time.time()
        for i, doc in enumerate(self.documents):
            doc = doc[:self.max_doc_chars]
            if i % self.holdout_every == self.holdout_every - 1 and sum(map(len, self.heldout)) < self.holdout_max_chars:
                self.heldout.append(doc)
                continue
            take = doc[:self.max_chars - self.chars]
            self.chars += len(take)
            self.docs += 1
            yield take
            if time.time() - last_print > 5 or self.chars >= self.max_chars:
                last_print = time.time()
                rate = self.chars / max(last_print - start, 1e-9)
                eta = (self.max_chars - self.chars) / max(rate, 1)
                print(f"read {self.chars / 1e6:,.1f}M chars from {self.docs:,} documents "
                      f"({rate / 1e6:.1f}M chars/s, ETA {eta:,.0f}s at most)", file=sys.stderr, flush=True)
            if self.chars >= self.max_chars:
                return

    def close(self) -> None:
        """Stop reading the documents now, and collect what read them. A datasets stream left half read
        until the interpreter's teardown can abort the process there, after the work is done ("terminate
        called without an active exception"; apache/arrow#34314, huggingface/datasets#7566): pyarrow's
        readers must go while Arrow is still alive."""
        if hasattr(self.documents, "close"):
            self.documents.close()
        gc.collect()


def parse_count(text: str) -> int:
    """'2B', '50M', '10k', '1e6' or '1_000' to a positive int (every flag it reads counts something that
    must exist: --max-doc-chars -20 cut 20 characters off every document)."""
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "kMB" else text
    try:
        count = int(float(number.replace("_", "")) * scale)
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (write e.g. 2B, 50M, 10k)") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count (write e.g. 2B, 50M, 10k)")
    return count


def main(argv=None):
    import data  # only the command line reads dataset specs; chat.py and serve.py load the tokenizer without data.py
    default_mix = "\n".join(f"  {spec}" for spec in data.DEFAULT_PRETRAIN_SPEC.split())
    parser = argparse.ArgumentParser(
        description="Train nanoschnack's German byte-level BPE tokenizer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"default --data: data.DEFAULT_PRETRAIN_SPEC, the pretraining mix (each hub source\n"
               f"read in a seeded random shard order; README, \"The default mix\"):\n{default_mix}")
    parser.add_argument("--data", nargs="+", default=[data.DEFAULT_PRETRAIN_SPEC],
                        help="dataset spec(s), see data.py (default: the pretraining mix of the hub sources "
                             "below, as train.py reads it)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="a multiple of 64 (default: 32768)")
    parser.add_argument("--max-chars", type=parse_count, default=parse_count("2B"), help="characters to train on (default: 2B)")
    parser.add_argument("--max-doc-chars", type=parse_count, default=10_000, help="cap on each document's length (default: 10k)")
    parser.add_argument("--out", default="out/tokenizer", help="output folder (default: out/tokenizer)")
    args = parser.parse_args(argv)
    text = None
    try:
        check_vocab_size(args.vocab_size)
        sources = data.parse_specs(args.data)
        data.check_folder(args.out)  # a bad --out fails now, not after training
        text = TrainingText(data.interleave_documents(sources), args.max_chars, args.max_doc_chars)
        start = time.time()
        tokenizer = Tokenizer.train(text, args.vocab_size)
        seconds = time.time() - start
    except (ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # the trainer (Rust) sees it when it next hands control back: seconds, at most
        sys.exit("interrupted: nothing was saved; run the same command again")
    finally:
        if text is not None:
            text.close()
    if text.chars == 0:
        sys.exit(f"error: no text found in {' '.join(args.data)} (empty dataset?)")
    # Fewer than 100 documents leave nothing held out: then compression is not measured.
    compression = bytes_per_token(tokenizer, text.heldout) if text.heldout else None  # JSON's null: NaN is no JSON
    meta = dict(vocab_size=tokenizer.vocab_size, requested_vocab_size=args.vocab_size, data=args.data,
                chars=text.chars, documents=text.docs, heldout_documents=len(text.heldout),
                heldout_bytes_per_token=None if compression is None else round(compression, 4), train_seconds=round(seconds, 1),
                split_pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS)
    meta_file = Path(args.out) / "tokenizer_meta.json"
    try:
        tokenizer.save(args.out)
        Path(f"{meta_file}.tmp").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(f"{meta_file}.tmp", meta_file)
    except OSError as e:
        Path(f"{meta_file}.tmp").unlink(missing_ok=True)
        sys.exit(f"error: {e}; free disk space or choose another --out")
    if tokenizer.vocab_size < args.vocab_size:  # BPE ran out of pairs to merge: the model gets this odd size
        print(f"warning: the text gave only {tokenizer.vocab_size:,} tokens of the {args.vocab_size:,} asked (not a "
              f"multiple of 64, which GPU matrices prefer): train on more text, or ask for fewer")
    measured = (f"{compression:.3f} bytes/token on {len(text.heldout)} documents" if compression is not None
                else "not measured (fewer than 100 documents)")
    print(f"vocab size {tokenizer.vocab_size:,} (asked {args.vocab_size:,}), trained in {seconds:.1f}s on "
          f"{text.chars:,} characters from {text.docs:,} documents; held-out compression {measured}; saved to "
          f"{args.out}/tokenizer.json")
    rows = [["vocabulary", f"{tokenizer.vocab_size:,} tokens (256 bytes, {len(SPECIAL_TOKENS)} special tokens)"],
            ["trained on", f"{text.chars:,} characters in {text.docs:,} documents (each cut to "
                           f"{args.max_doc_chars:,})"],
            ["held-out compression", measured],
            ["training time", f"{seconds:.1f} s"], ["data", " ".join(f"`{d}`" for d in args.data)],
            ["tokenizer", f"`{Path(args.out).resolve() / 'tokenizer.json'}`"]]
    print(f"report: {update_report(report_path(args.out), 'Tokenizer', markdown_table(['', ''], rows))}")
    return tokenizer


if __name__ == "__main__":
    main()
