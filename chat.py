"""
chat.py: talk to nanoschnack in the terminal, in German.

    python chat.py                                        # newest checkpoint in out/chat (else out/base)
    python chat.py --checkpoint out/chat --temperature 0.8 --system "Du antwortest kurz."
    python chat.py --prompt "Wie heißt die Hauptstadt von Österreich?"   # one answer, then exit
    echo "Erzähl mir etwas über Bern." | python chat.py  # one answer per line of stdin

The model side (ChatSession: model, tokenizer, KV cache, history, sampling; load_session)
lives in session.py, which serve.py's engines share; this file is the terminal: repl() and
main(): arguments, the input loop, commands, printing. How the KV cache is kept across
turns and how the context is trimmed: session.py.
"""
import argparse
import os
import sys

INTERRUPTED = 130  # the exit code of a program stopped by Ctrl-C (128 + SIGINT), as shells report it

try:  # importing torch takes seconds: a Ctrl-C then is one line too, as during loading (main)
    from session import SEED_RANGE, ChatSession, PromptTooLong, Sampling, SystemTooLong, check_system, load_session
    from tok import ConversationError
except KeyboardInterrupt:
    print("chat.py: interrupted", file=sys.stderr)
    raise SystemExit(INTERRUPTED)

HELP = """\
Befehle:
  /help          diese Hilfe
  /reset         neues Gespräch (der Verlauf wird gelöscht, die Systemnachricht bleibt)
  /system TEXT   Systemnachricht setzen; /system allein zeigt sie, /system - löscht sie
  /temp ZAHL     Temperatur, z. B. /temp 0.8 (0 = immer das wahrscheinlichste Token); /temp allein zeigt sie
  /topk ZAHL     nur aus den ZAHL wahrscheinlichsten Tokens wählen (0 = aus); /topk allein zeigt es
  /quit          beenden (auch Ctrl-D)
Ctrl-C bricht die laufende Antwort ab, nicht das Programm.
"""


def preview(text: str, chars: int = 80) -> str:
    """Text to echo back: whole if short, else its beginning and its length."""
    return text if len(text) <= chars else f"{text[:chars]}… ({len(text):,} Zeichen)"


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
            except SystemTooLong as e:
                out.write(f"(Systemnachricht nicht übernommen: zu lang, {e.tokens:,} Tokens mit einer Frage aus "
                          f"einem Wort, höchstens {e.allowed:,}: die Hälfte des Platzes für Prompts)\n")
            else:
                session.system = None if arg == "-" else arg
                out.write(f"(Systemnachricht: {preview(session.system or 'keine')})\n")
        else:
            out.write(f"(Systemnachricht: {preview(session.system or 'keine')})\n")
    elif name in ("/temp", "/topk"):
        try:
            if name == "/temp" and arg:
                session.sampling = Sampling(**{**vars(session.sampling), "temperature": float(arg)})
            elif arg:
                session.sampling = Sampling(**{**vars(session.sampling), "top_k": int(arg)})
        except ValueError:  # not a number (int("1.5")), or one Sampling refuses (nan, inf, below 0)
            out.write("(/temp braucht eine Zahl ab 0, z. B. /temp 0.7)\n" if name == "/temp" else
                      "(/topk braucht eine ganze Zahl ab 0, z. B. /topk 50; 0 schaltet es aus)\n")
        else:  # without a number: the settings as they are
            s = session.sampling
            out.write(f"(Temperatur {s.temperature}{' = greedy' if s.greedy else ''}, top-k {s.top_k or 'aus'})\n")
    else:
        out.write(f"(unbekannter Befehl {name}; /help zeigt alle)\n")
    return False


def reply_to(session: ChatSession, text: str, out, label: str = "", notes=None) -> None:
    """Stream the answer to one message to `out`, remarks to `notes`; Ctrl-C stops the answer."""
    notes = notes or out
    try:
        stream = session.send(text)
    except PromptTooLong as e:
        notes.write(f"({'Text' if session.kind == 'base' else 'Nachricht'} zu lang: {e.tokens:,} Tokens, Platz ist "
                    f"für {e.room:,}; bitte kürzer fassen)\n")
        return
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
    p.add_argument("--frequency-penalty", type=float, default=Sampling.frequency_penalty,
                   help="-2 to 2: lowers a token's logit per time the answer has it already, against loops "
                        "(OpenAI's; default %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=Sampling.presence_penalty,
                   help="-2 to 2: lowers the logit of every token the answer has already (default %(default)s)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=Sampling.no_repeat_ngram_size,
                   help="n > 0: the answer never repeats n tokens in a row that it has had already, so never a "
                        "sentence (transformers'; 0 = off, default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens,
                   help="per answer; the context may leave fewer (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling (default: random)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--prompt", default=None,
                   help="answer this one message and exit; '-' reads the message from stdin")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """run() with the ways it can end early each one line on stderr: the reader of the output gone,
    the output failing (a full disk, /dev/full), Ctrl-C before the chat began (loading the model)."""
    try:
        run(argv)
    except BrokenPipeError:
        # Whoever reads our output has gone (e.g. `python chat.py ... | head -c 1`): stop
        # with a note, as Unix tools stop.
        say_last("chat.py: the output was closed; stopping")
    except OSError as e:  # run() turns every error reading its input into SystemExit: this is the output's
        say_last(f"error: cannot write the answer to stdout ({e}); stopping")
        raise SystemExit(1)
    except KeyboardInterrupt:  # the REPL and --prompt handle their own; this is before them
        say_last("chat.py: interrupted")
        raise SystemExit(INTERRUPTED)


def say_last(text: str) -> None:
    """The last line chat.py writes. stdout is pointed at /dev/null first, so that Python's final flush
    of what it still holds does not fail a second time (with an "Exception ignored" message)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):  # stderr went with it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def run(argv=None) -> None:
    args = parse_args(argv)
    for stream in (sys.stdin, sys.stdout, sys.stderr):  # a terminal that is not UTF-8 gets '?' rather than a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.frequency_penalty,
                            args.presence_penalty, args.no_repeat_ngram_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.seed is not None and not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise SystemExit(f"error: --seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {preview(str(args.seed), 40)}")
    if sys.stdin is None and (args.prompt is None or args.prompt == "-"):  # started with stdin closed (0<&-)
        raise SystemExit("error: stdin is closed, there is nothing to read; pass the message with --prompt TEXT")
    if sys.stdout is None:  # started with stdout closed (>&-): Python has no sys.stdout then
        raise SystemExit("error: stdout is closed, there is nowhere to write the answers; redirect it instead "
                         "(> answers.txt, or > /dev/null)")
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
            # a file or echo ends with a newline that is no part of the message (the piped lines lose theirs too)
            text = sys.stdin.read().rstrip("\r\n") if args.prompt == "-" else args.prompt
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
            raise SystemExit(INTERRUPTED)
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
        repl(session, read=read_line, interactive=False)


def read_line(prompt: str) -> str:
    """input() for a pipe: without input()'s flush of stdout, so that an output that fails (e.g.
    /dev/full) is reported as the output, not as stdin."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n")


if __name__ == "__main__":
    main()
