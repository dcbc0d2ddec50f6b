"""
chat.py: talk to nanoschnack in the terminal, in German.

    python chat.py                                        # newest checkpoint in out/chat (else out/base)
    python chat.py --checkpoint out/chat --temperature 0.8 --system "Du antwortest kurz."
    python chat.py --prompt "Wie heißt die Hauptstadt von Österreich?"   # one answer, then exit
    echo "Erzähl mir etwas über Bern." | python chat.py  # one answer per line of stdin

Two layers, so that the web server can reuse the first without a terminal:
- ChatSession: model, tokenizer, KV cache, history and sampling settings.
  `send(text)` answers the next user message of its own history, `stream(messages)`
  answers a whole OpenAI-style message list, `complete(text)` continues plain
  text (base models). All three return generators of text pieces; the caller stops
  an answer early by closing the generator (or just leaving the loop).
- repl() and main(): arguments, the input loop, commands, printing.

How the KV cache is kept across turns. The session keeps `cached_ids`, exactly
the tokens whose keys and values the cache holds. The history (text) is the
truth; the cache is only an optimisation of it. For every answer the whole
conversation is rendered with tok.render_prompt, the cache is truncated to the
longest common prefix of `cached_ids` and the new prompt, and only the rest is
prefilled, in one forward. Usually that is just the new user message: the decode
loop (GPT.generate, shared with training samples, sft.py and serve.py) feeds every
token it yields, so the cache already holds the previous answer's
<|assistant_end|>. The same rule covers
every other case without special code: an answer stopped by the token limit or
Ctrl-C (history keeps the text shown so far; the rendering closes it with
<|assistant_end|>), an answer whose tokens differ from how the tokenizer encodes
its text, a changed system message, /reset, and trimming, which changes the
prompt right after the system message, so everything after it is rebuilt.

Context: prompt + answer never go past the model's training length
(config.sequence_len). The rotary tables reach further, but the model has never
seen those positions. Before each answer the oldest whole user+assistant
exchanges are dropped (the system message stays) until the prompt leaves room
for max_new_tokens (at most half the context); the answer may then use all the
room left.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

import common
from tok import ConversationError, check_conversation, render_prompt

DEFAULT_CHECKPOINTS = ("out/chat", "out/base")  # sft.py writes the first, train.py the second
# Below these, sampling is greedy. The logits are soft-capped at +-15, so at temperature 1e-6
# a token 1e-4 below the best one is e^-100 as likely already; and logits / temperature
# overflows float32 below about 1e-37 (top_p below float32's range rounds to 0, dropping every token).
MIN_TEMPERATURE = 1e-6
MIN_TOP_P = 1e-6
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class Sampling:
    """How answers are sampled. Refuses what cannot be sampled (negative or non-finite values);
    a temperature below MIN_TEMPERATURE or a top_p below MIN_TOP_P becomes greedy (temperature 0)."""
    temperature: float = 0.6  # 0 = greedy
    top_k: int | None = 50  # None or 0: off
    top_p: float | None = None  # None or 1.0: off
    max_new_tokens: int = 512  # per answer; the context may leave less

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < MIN_TEMPERATURE or (self.top_p is not None and self.top_p < MIN_TOP_P):
            self.temperature, self.top_p = 0.0, None  # greedy: the limit of both as they go to 0


@dataclass
class Reply:
    """What one answer did; `ChatSession.last` is updated while it streams."""
    text: str = ""  # the text pieces yielded so far, joined
    ids: list[int] = field(default_factory=list)  # the answer's token ids, without the stop token
    finish_reason: str | None = None  # "stop" (a special token), "length" (token limit), "interrupted"; None while streaming
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the KV cache instead of computed
    dropped_messages: int = 0  # oldest messages left out to fit the context
    ttft: float | None = None  # seconds from the call to the first sampled token


def fit_to_context(tokenizer, messages, max_prompt_tokens: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest user+assistant exchanges (a system message stays) until the prompt fits.

    Returns the kept messages and their prompt ids (render_prompt). ConversationError
    if the messages break the template's rules or the last user message alone is too long.
    """
    messages = check_conversation(messages, ends_with="user")
    first = 1 if messages[0]["role"] == "system" else 0
    while True:
        ids = render_prompt(tokenizer, messages)
        if len(ids) <= max_prompt_tokens:
            return messages, ids
        if len(messages) - first < 3:  # only the last user message is left
            raise ConversationError(f"the message is too long: its prompt has {len(ids)} tokens, "
                                    f"the context has room for {max_prompt_tokens} (plus the answer)")
        messages = messages[:first] + messages[first + 2:]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A model in conversation: one KV cache, one history, sampling settings; no terminal.

    One session serves one answer at a time (it owns one cache); sessions can
    share a model. kind "chat" uses the chat template, kind "base" (a model that
    was only pretrained) continues plain text with complete().
    """

    def __init__(self, model, tokenizer, kind: str = "chat", sampling: Sampling | None = None,
                 system: str | None = None, seed: int | None = None):
        if kind not in ("chat", "base"):
            raise ValueError(f"kind must be 'chat' or 'base', got {kind!r}")
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.sampling = sampling or Sampling()
        self.system = system  # the system message, or None
        self.history: list[dict] = []  # complete user/assistant exchanges, oldest first
        self.device = model.lm_head.weight.device
        self.context_len = model.config.sequence_len
        # one more than the context: generate() feeds each token it yields, the last one too
        self.cache = model.new_kv_cache(1, max_len=self.context_len + 1)
        self.cached_ids: list[int] = []  # exactly the tokens the cache holds
        self.rng = torch.Generator(device=self.device)
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(seed)
        self.last = Reply()
        # Any special token ends an answer: the template never puts one inside an
        # assistant's text (normally it is <|assistant_end|>). Base models stop at <|bos|>.
        self.chat_stop_ids = set(tokenizer.special.values())
        self.base_stop_ids = {tokenizer.bos_id}

    # -- conversation -----------------------------------------------------------

    @property
    def messages(self) -> list[dict]:
        """The system message (if any) and the history, as {role, content} dicts."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reset(self) -> None:
        """Start a new conversation; the system message stays (and so does the cached prefix of it)."""
        self.history = []

    def clear_cache(self) -> None:
        """Forget what the KV cache holds: the next answer computes its whole prompt (serve.py
        calls it between requests of different clients, so none can time another's prompt)."""
        self.cache.truncate(0)
        self.cached_ids.clear()

    def send(self, text: str, sampling: Sampling | None = None) -> Iterator[str]:
        """Answer the next user message: stream text pieces, then add the exchange to the history.

        A stopped answer keeps the text shown so far. An answer with no text is
        not kept, and neither is its question. Oldest exchanges that do not fit the
        context are dropped from the history. Base models: complete(text).
        """
        if self.kind == "base":
            return self.complete(text, sampling)
        user = {"role": "user", "content": text}
        stream = self.stream(self.messages + [user], sampling)  # raises ConversationError now, not later
        return self._remember(stream, user)

    def _remember(self, stream, user):
        try:
            yield from stream
        finally:  # also when the caller stops early or Ctrl-C interrupts a forward
            self.history = self.history[self.last.dropped_messages:]
            if self.last.text.strip():
                self.history += [user, {"role": "assistant", "content": self.last.text}]

    # -- generation -------------------------------------------------------------

    def stream(self, messages: list[dict], sampling: Sampling | None = None) -> Iterator[str]:
        """Stream the assistant's answer to OpenAI-style messages (system?, user, assistant, ..., user).

        Does not touch the session's history; reuses the KV cache as far as the
        rendered prompt agrees with it. Messages that do not fit the context are
        dropped oldest first (see last.dropped_messages). Raises ConversationError
        right away for messages that break the template's rules.
        """
        sampling = sampling or self.sampling
        checked = check_conversation(messages, ends_with="user")
        reserve = min(sampling.max_new_tokens, self.context_len // 2)
        kept, prompt = fit_to_context(self.tokenizer, checked, self.context_len - reserve)
        return self._generate(prompt, sampling, self.chat_stop_ids, dropped=len(checked) - len(kept))

    def answer(self, messages: list[dict], sampling: Sampling | None = None) -> Reply:
        """stream() to the end, for callers that want the whole answer at once."""
        for _ in self.stream(messages, sampling):
            pass
        return self.last

    def complete(self, text: str, sampling: Sampling | None = None) -> Iterator[str]:
        """Continue plain text: the prompt is <|bos|> + text; stops at <|bos|> or the token limit.

        Text too long for the context loses its beginning."""
        sampling = sampling or self.sampling
        room = self.context_len - min(sampling.max_new_tokens, self.context_len // 2)
        ids = self.tokenizer.encode(text)
        dropped = max(0, len(ids) + 1 - room)
        return self._generate([self.tokenizer.bos_id] + ids[dropped:], sampling, self.base_stop_ids)

    def _generate(self, prompt: list[int], sampling: Sampling, stop_ids: set[int], dropped: int = 0):
        reply = self.last = Reply(prompt_tokens=len(prompt), dropped_messages=dropped)
        start = time.perf_counter()
        budget = min(sampling.max_new_tokens, self.context_len - len(prompt))
        decoder = self.tokenizer.stream_decoder()  # holds back half a UTF-8 character
        # Reuse the cache as far as it agrees with the prompt, but feed at least one
        # token: its logits give the first answer token.
        reply.cached_tokens = min(common_prefix_len(self.cached_ids, prompt), len(prompt) - 1)
        self.cache.truncate(reply.cached_tokens)
        received = []  # every token generate() gave us, the stop token included
        tokens = self.model.generate(prompt[reply.cached_tokens:], budget, sampling.temperature,
                                     sampling.top_k or None, sampling.top_p, kv_cache=self.cache, generator=self.rng)
        try:
            for token in tokens:
                received.append(token)
                if reply.ttft is None:
                    reply.ttft = time.perf_counter() - start
                if token in stop_ids:
                    reply.finish_reason = "stop"
                    break
                reply.ids.append(token)
                piece = decoder.push(token)
                if piece:
                    reply.text += piece
                    yield piece
            else:
                reply.finish_reason = "length"
            tail = decoder.flush()  # bytes of an unfinished character, shown as U+FFFD
            if tail:
                reply.text += tail
                yield tail
        finally:
            tokens.close()
            # The cache only advances when a forward completes, so after a Ctrl-C in
            # the middle of one it still holds a prefix of what we sent and received.
            self.cached_ids = (prompt + received)[:self.cache.pos]
            if reply.finish_reason is None:  # closed early, or an exception (Ctrl-C) went through
                reply.finish_reason = "interrupted"


# -----------------------------------------------------------------------------
# Loading

def find_checkpoint(path: str | None) -> Path:
    """The path given (a file or a folder), else the first of out/chat, out/base that holds a checkpoint."""
    if path:
        return Path(path)
    for folder in DEFAULT_CHECKPOINTS:
        if common.latest_checkpoint(Path(folder)):
            return Path(folder)
    raise SystemExit(f"error: no checkpoint in {' or '.join(DEFAULT_CHECKPOINTS)}; fine-tune one with sft.py, "
                     f"pretrain one with train.py, or pass --checkpoint FILE_OR_FOLDER")


def load_session(checkpoint: str | None = None, device: str | None = None, sampling: Sampling | None = None,
                 system: str | None = None, seed: int | None = None) -> ChatSession:
    """A ChatSession on a checkpoint file or a folder's newest one (None: out/chat, else out/base).

    The session also gets `checkpoint` (the file), `step`, and `ckpt` (the dict,
    without weights). A missing or incompatible checkpoint raises SystemExit
    with an "error: ..." message.
    """
    device = device or common.default_device()
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"error: unknown device {device!r} ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: device {device} asked for, but CUDA is not available here (use --device cpu)")
    path = find_checkpoint(checkpoint)
    model, tokenizer, ckpt = common.load_model(path, device, reader="this chat.py")
    kind = ckpt.get("kind", "base")
    if kind not in ("base", "chat"):
        raise SystemExit(f"error: {ckpt['path']} has kind {kind!r}; chat.py runs 'chat' (sft.py) or 'base' (train.py)")
    session = ChatSession(model, tokenizer, kind=kind, sampling=sampling, system=system, seed=seed)
    session.checkpoint, session.step = ckpt["path"], ckpt.get("step")
    session.ckpt = {k: v for k, v in ckpt.items() if k not in ("model", "optimizers")}
    return session


# -----------------------------------------------------------------------------
# The terminal

HELP = """\
Befehle:
  /help          diese Hilfe
  /reset         neues Gespräch (der Verlauf wird gelöscht, die Systemnachricht bleibt)
  /system TEXT   Systemnachricht setzen; /system allein zeigt sie, /system - löscht sie
  /temp ZAHL     Temperatur, z. B. /temp 0.8 (0 = immer das wahrscheinlichste Token)
  /topk ZAHL     nur aus den ZAHL wahrscheinlichsten Tokens wählen (0 = aus)
  /quit          beenden (auch Ctrl-D)
Ctrl-C bricht die laufende Antwort ab, nicht das Programm.
"""


def preview(text: str, chars: int = 80) -> str:
    """Text to echo back: whole if short, else its beginning and its length."""
    return text if len(text) <= chars else f"{text[:chars]}… ({len(text):,} Zeichen)"


def check_system(session: ChatSession, text: str | None) -> None:
    """ConversationError unless the system message leaves at least half of the prompt's room
    to the conversation: else every later message would be refused as too long."""
    if not text:
        return
    room = session.context_len - min(session.sampling.max_new_tokens, session.context_len // 2)
    ids = render_prompt(session.tokenizer, [{"role": "system", "content": text}, {"role": "user", "content": "."}])
    if len(ids) > room // 2:
        raise ConversationError(f"the system message is too long: {len(ids):,} tokens with a one-word question, "
                                f"at most {room // 2} (half the room for prompts) are allowed")


def run_command(session: ChatSession, line: str, out) -> bool:
    """Carry out a /command; True means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return True
    if name in ("/help", "/?"):
        out.write(HELP)
    elif name == "/reset":
        session.reset()
        out.write("(neues Gespräch)\n")
    elif name == "/system":
        if session.kind == "base":
            out.write("(Basismodell: ohne Chat-Vorlage gibt es keine Systemnachricht)\n")
        elif arg:
            try:
                check_system(session, None if arg == "-" else arg)
            except ConversationError as e:
                out.write(f"(Systemnachricht nicht übernommen: {e})\n")
            else:
                session.system = None if arg == "-" else arg
                out.write(f"(Systemnachricht: {preview(session.system or 'keine')})\n")
        else:
            out.write(f"(Systemnachricht: {preview(session.system or 'keine')})\n")
    elif name in ("/temp", "/topk"):
        try:
            if name == "/temp":
                session.sampling = Sampling(**{**vars(session.sampling), "temperature": float(arg)})
            else:
                session.sampling = Sampling(**{**vars(session.sampling), "top_k": int(arg)})
        except ValueError as e:
            out.write(f"({name} braucht eine Zahl: {e})\n")
        else:
            s = session.sampling
            out.write(f"(Temperatur {s.temperature}, top-k {s.top_k or 'aus'})\n")
    else:
        out.write(f"(unbekannter Befehl {name}; /help zeigt alle)\n")
    return False


def reply_to(session: ChatSession, text: str, out, label: str = "", notes=None) -> None:
    """Stream the answer to one message to `out`, remarks to `notes`; Ctrl-C stops the answer."""
    notes = notes or out
    try:
        stream = session.send(text)
    except ConversationError as e:
        notes.write(f"({e})\n")
        return
    out.write(label)
    try:
        for piece in stream:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        stream.close()
        out.write(" (abgebrochen)")
    out.write("\n")
    out.flush()
    last = session.last
    if last.finish_reason == "length":
        notes.write(f"(Längengrenze von {len(last.ids)} Tokens erreicht)\n")
    if last.dropped_messages:
        notes.write(f"({last.dropped_messages} ältere Nachrichten vergessen, damit das Gespräch in den Kontext passt)\n")
    if session.kind == "chat" and not last.text.strip():
        notes.write("(keine Antwort)\n")
    notes.flush()


def repl(session: ChatSession, read=input, out=None, interactive: bool = True) -> None:
    """Read lines until /quit or end of input; each is a command or a message to answer.

    interactive: show the "Du:" prompt and the answer's label (a terminal).
    Otherwise (a pipe) `out` gets only the answers, one per message line, and
    command replies and remarks go to stderr.
    """
    out = out or sys.stdout
    notes = out if interactive else sys.stderr
    prompt, label = ("Du: ", "Schnack: " if session.kind == "chat" else "… ") if interactive else ("", "")
    while True:
        try:
            line = read(prompt)
        except EOFError:  # Ctrl-D
            if interactive:
                out.write("\n")
            return
        except OSError as e:  # e.g. stdin is a directory
            raise SystemExit(f"error: cannot read stdin ({e})")
        except KeyboardInterrupt:  # Ctrl-C while typing: drop the line, keep going
            out.write("\n(Ctrl-D oder /quit beendet)\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if run_command(session, line, notes):
                return
            continue
        reply_to(session, line, out, label, notes)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat with nanoschnack in the terminal (German).",
                                epilog="REPL commands: /help /reset /system /temp /topk /quit; Ctrl-C stops an answer.")
    p.add_argument("--checkpoint", help="checkpoint file or folder (its newest); default: out/chat, else out/base")
    p.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=Sampling.top_k, help="0 = off (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, 1 = off (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens,
                   help="per answer; the context may leave fewer (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling (default: random)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--prompt", default=None,
                   help="answer this one message and exit; '-' reads the message from stdin")
    return p.parse_args(argv)


def main(argv=None) -> None:
    try:
        run(argv)
    except BrokenPipeError:
        # Whoever reads our output has gone (e.g. `python chat.py ... | head -c 1`): stop
        # with a note, as Unix tools stop. stdout now points at /dev/null, so that Python's
        # last flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        try:
            print("chat.py: the output was closed; stopping", file=sys.stderr, flush=True)
        except (BrokenPipeError, ValueError, AttributeError):  # stderr went with it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def run(argv=None) -> None:
    args = parse_args(argv)
    for stream in (sys.stdin, sys.stdout, sys.stderr):  # a terminal that is not UTF-8 gets '?' rather than a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.seed is not None and not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise SystemExit(f"error: --seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {preview(str(args.seed), 40)}")
    if sys.stdin is None and (args.prompt is None or args.prompt == "-"):  # started with stdin closed (0<&-)
        raise SystemExit("error: stdin is closed, there is nothing to read; pass the message with --prompt TEXT")
    session = load_session(args.checkpoint, args.device, sampling, args.system, args.seed)
    if session.kind == "chat":
        try:
            check_system(session, args.system)
        except ConversationError as e:
            raise SystemExit(f"error: --system: {e}")

    m = session.model
    log = lambda text: print(text, file=sys.stderr, flush=True)  # stdout is for answers only
    log(f"nanoschnack: {session.checkpoint} ({session.kind}, step {session.step}), "
        f"{m.num_params() / 1e6:.1f}M parameters, {m.config.n_layer} layers, context {session.context_len} tokens, "
        f"device {session.device}")
    if session.kind == "base":
        log("Basismodell, nicht feinabgestimmt: Vervollständigungsmodus (completion mode). "
            "Jede Eingabe wird als Text fortgesetzt, ohne Gesprächsverlauf.")
        if args.system:
            log("(--system wird im Vervollständigungsmodus nicht verwendet)")

    if args.prompt is not None:
        try:
            text = sys.stdin.read() if args.prompt == "-" else args.prompt
        except OSError as e:  # e.g. stdin is a directory
            raise SystemExit(f"error: cannot read the message from stdin ({e})")
        try:
            stream = session.send(text)
        except ConversationError as e:
            raise SystemExit(f"error: {e}")
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            raise SystemExit(130)
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        if session.kind == "chat":
            log("Chat-Modus. /help zeigt die Befehle, Ctrl-D oder /quit beendet.")
        repl(session, interactive=True)
    else:
        repl(session, interactive=False)


if __name__ == "__main__":
    main()
