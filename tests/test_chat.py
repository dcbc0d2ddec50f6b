"""chat.py: KV cache across turns, streaming, trimming, --prompt, the REPL (stdin and a pseudo-terminal)."""
import fcntl
import io
import os
import re
import select
import signal
import subprocess
import sys
import termios
import types
import time

import pytest
import torch

import chat
import gpt
from session import Sampling, fit_to_context, load_session
from conftest import REPO_ROOT, make_checkpoint, refusal, sigint_as_in_a_shell, stop_from_the_middle
from tok import ConversationError, render_prompt

GREEDY = Sampling(temperature=0, top_k=None, max_new_tokens=12)
TURNS = ["Hallo! Wie geht es dir heute?", "Was ist die Hauptstadt von Österreich?",
         "Und wie groß ist Wien?", "Danke für die Auskunft."]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, small_tokenizer):
    return make_checkpoint(tmp_path_factory.mktemp("chat"), small_tokenizer, kind="chat", sequence_len=256)


@pytest.fixture(scope="module")
def session_factory(chat_ckpt):
    def make(sampling=GREEDY, seed=0, **kw):
        return load_session(str(chat_ckpt), "cpu", sampling=sampling, seed=seed, **kw)
    return make


def recompute(model, prompt, max_new_tokens, stop_ids):
    """Greedy answer without a cache: the whole sequence through the model for every token."""
    ids, answer = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token in stop_ids:
                break
            answer.append(token)
            ids.append(token)
    return answer


def check_turn(session, prompt):
    """The answer just given equals recomputation, and the cache holds exactly cached_ids."""
    budget = min(GREEDY.max_new_tokens, session.context_len - len(prompt))
    assert session.last.ids == recompute(session.model, prompt, budget, session.chat_stop_ids)
    assert session.cache.pos == len(session.cached_ids)
    assert session.cached_ids[:len(prompt)] == prompt


def test_kv_cache_across_turns_equals_recompute(session_factory):
    session = session_factory(system="Du bist ein hilfsbereiter Assistent.")
    for i, text in enumerate(TURNS):
        prompt = render_prompt(session.tokenizer, session.messages + [{"role": "user", "content": text}])
        pieces = list(session.send(text))
        check_turn(session, prompt)
        assert "".join(pieces) == session.last.text
        assert session.last.prompt_tokens == len(prompt)
        if i:  # only the new part was computed: at least the whole previous prompt came from the cache
            assert session.last.cached_tokens >= previous_prompt_len
        previous_prompt_len = len(prompt)
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * len(TURNS)
    assert [m["content"] for m in session.history[::2]] == TURNS


def test_compiled_decode_step_across_turns(session_factory, decode_compiled_on_cpu):
    """The session's decode step compiled at load as on CUDA (conftest: torch.compile without Inductor), and
    never again: not over hundreds of tokens, five turns, an answer stopped early and the rollback after it,
    and the oldest turns dropped to fit the context. Every answer is the recomputation's."""
    graphs = decode_compiled_on_cpu
    sampling = Sampling(temperature=0, top_k=None, max_new_tokens=100)
    session = session_factory(sampling=sampling, system="Du bist ein hilfsbereiter Assistent.", compile_decode=True)
    assert session.cache.compiled and len(graphs) == 1
    decoded = dropped = 0
    for i, text in enumerate(TURNS + ["Noch eine Frage?"]):
        if i == 2:  # stopped after three pieces: the next prompt rolls the cache back to what it agrees with
            stream = session.send("Erzähl mir etwas.")
            [next(stream) for _ in range(3)]
            stream.close()
        room = session.context_len - min(sampling.max_new_tokens, session.context_len // 2)  # older turns dropped
        _, prompt = fit_to_context(session.tokenizer, session.messages + [{"role": "user", "content": text}], room)
        list(session.send(text))
        budget = min(sampling.max_new_tokens, session.context_len - len(prompt))
        assert session.last.ids == recompute(session.model, prompt, budget, session.chat_stop_ids)
        assert session.cache.pos == len(session.cached_ids)
        decoded, dropped = decoded + len(session.last.ids), dropped + session.last.dropped_messages
    assert decoded >= 200 and dropped, (decoded, dropped)
    assert len(graphs) == 1


def test_prefill_warmed_up_at_load(session_factory, decode_compiled_on_cpu, monkeypatch):
    """Where the decode step is compiled at load (as on CUDA), the prefill runs there too, once for each kind of
    prompt its attention meets: into an empty row at a length that divides by 16 and one that does not (on CUDA
    our Triton kernel compiles once for each: Triton specialises the length on it) and after cached tokens
    (SDPA with a mask); then it is forgotten. (test_compiled_decode_step_across_turns checks that every answer
    after it is the recomputation's.)"""
    import kvcache
    attended = []
    attend = kvcache.KVCache.attend

    def spy(self, layer, q, k, v, window=None, start=0):
        if layer == 0 and not torch.compiler.is_compiling():  # (q's length, the row's cached tokens) of a forward
            attended.append((q.shape[2], self.lengths[start]))
        return attend(self, layer, q, k, v, window, start)
    monkeypatch.setattr(kvcache.KVCache, "attend", spy)
    session = session_factory(compile_decode=True)
    assert [a for a in attended if a[0] > 1] == [(16, 0), (17, 0), (16, 17)]
    assert session.cache.lengths == [0] and session.cached_ids == []
    assert session.cache.prefill_warm_up_seconds > 0  # what bench/gpu_serving.py reports
    attended.clear()
    session_factory(compile_decode=False)  # the CPU's default: nothing compiled, nothing warmed up
    assert attended == []


def test_stopped_answer_keeps_history_and_cache_consistent(session_factory):
    session = session_factory(sampling=Sampling(temperature=1.0, top_k=None, max_new_tokens=40))
    stream = session.send(TURNS[0])
    shown = "".join(next(stream) for _ in range(3))
    stream.close()  # the caller stops early (the server: client gone; the REPL: Ctrl-C)
    assert session.last.finish_reason == "interrupted"
    assert session.history == [{"role": "user", "content": TURNS[0]},
                               {"role": "assistant", "content": shown}]
    session.sampling = GREEDY
    prompt = render_prompt(session.tokenizer, session.messages + [{"role": "user", "content": TURNS[1]}])
    list(session.send(TURNS[1]))
    check_turn(session, prompt)
    # the stream API for a whole message list (the web server's) also reuses the cache
    messages = session.messages[:-1]  # ends with the user's message
    reply = session.answer(messages)
    assert reply.cached_tokens == len(render_prompt(session.tokenizer, messages)) - 1
    assert reply.text == session.history[-1]["content"]  # the same greedy answer again


def test_answer_ended_by_a_stop_sequence_keeps_history_and_cache_consistent(session_factory):
    """A stop sequence ends the answer before it: the history keeps the text shown, and the next turn reuses
    the cache as far as it agrees (it holds the token that completed the stop sequence, which the rendered
    history does not) and answers as a recomputation does."""
    free = session_factory().answer([{"role": "user", "content": TURNS[0]}])
    assert len(free.text) >= 4, free.text
    stop = stop_from_the_middle(free.text)
    session = session_factory(sampling=Sampling(temperature=0, top_k=None, max_new_tokens=12, stop=(stop,)))
    assert "".join(session.send(TURNS[0])) == free.text[:free.text.index(stop)] == session.history[-1]["content"]
    assert session.last.finish_reason == "stop" and session.last.stop_sequence == stop
    session.sampling = GREEDY
    prompt = render_prompt(session.tokenizer, session.messages + [{"role": "user", "content": TURNS[1]}])
    list(session.send(TURNS[1]))
    check_turn(session, prompt)


def test_ctrl_c_in_the_repl_stops_the_answer_not_the_program(session_factory):
    session = session_factory()

    class Output(io.StringIO):  # Ctrl-C arrives while the third piece is printed
        writes = 0

        def write(self, s):
            self.writes += 1
            if self.writes == 4:  # label, piece, piece, piece
                raise KeyboardInterrupt
            return super().write(s)

    lines = iter([TURNS[0], TURNS[1], "/quit"])
    out = Output()
    chat.repl(session, read=lambda prompt: next(lines), out=out, interactive=True)
    text = out.getvalue()
    assert "(abgebrochen)" in text
    assert len(session.history) == 4  # both exchanges kept: the stopped one with the text shown
    assert session.history[1]["content"] and text.count("Schnack: ") == 2


def test_stream_decoder_reassembles_split_characters(small_tokenizer):
    tok = small_tokenizer
    byte_token = {b[0]: i for i, b in enumerate(tok.id_to_bytes) if len(b) == 1}
    text = "Grüße aus Köln: 5 € für 🐍 und 👍🏽!"
    # every character as single bytes, then the tokenizer's own ids, then a mix
    sequences = [[byte_token[b] for b in text.encode()], tok.encode(text)]
    mixed = []
    for word in text.split(" "):
        mixed += [byte_token[b] for b in word.encode()] if any(ord(c) > 127 for c in word) else tok.encode(word)
        mixed.append(byte_token[ord(" ")])
    sequences.append(mixed[:-1])
    for ids in sequences:
        decoder = tok.stream_decoder()
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == text == tok.decode(ids)
    assert sequences[0] != sequences[1]  # the multi-byte characters really were split


def test_session_streams_whole_characters(session_factory, monkeypatch):
    """Force the model's tokens: "ü", "€" and an emoji split into single bytes, then <|assistant_end|>."""
    session = session_factory(Sampling(max_new_tokens=64))
    tok = session.tokenizer
    byte_token = {b[0]: i for i, b in enumerate(tok.id_to_bytes) if len(b) == 1}
    text = "Tschüss, 3 € 🥨"
    script = iter([byte_token[b] for b in text.encode()] + [tok.special["<|assistant_end|>"]])
    monkeypatch.setattr(gpt, "sample_next_token", lambda *a, **k: torch.tensor([[next(script)]]))
    out, lines = io.StringIO(), iter(["Hallo", "/quit"])
    chat.repl(session, read=lambda prompt: next(lines), out=out, interactive=False)
    assert out.getvalue() == text + "\n"
    assert session.last.finish_reason == "stop" and session.history[-1]["content"] == text


def test_history_trimming_keeps_newest_turns(tmp_path, small_tokenizer):
    ckpt = make_checkpoint(tmp_path, small_tokenizer, kind="chat", sequence_len=64)
    sampling = Sampling(temperature=0, top_k=None, max_new_tokens=8)
    session = load_session(str(ckpt), "cpu", sampling=sampling, system="Sei kurz.")
    sent, dropped, previous_prompt_len = [], 0, 0
    for i in range(8):
        text = f"Frage {i}: {TURNS[i % len(TURNS)]}"
        sent.append(text)
        kept, prompt = fit_to_context(session.tokenizer, session.messages + [{"role": "user", "content": text}],
                                           64 - 8)
        list(session.send(text))
        budget = min(8, 64 - len(prompt))
        assert session.last.ids == recompute(session.model, prompt, budget, session.chat_stop_ids)
        assert session.cache.pos == len(session.cached_ids) <= 64
        dropped += session.last.dropped_messages
        if session.last.dropped_messages:  # the prompt changed right after the system message: rebuilt from there
            assert session.last.cached_tokens < previous_prompt_len
            assert kept[0]["role"] == "system" and len(kept) < len(session.messages) + session.last.dropped_messages
        previous_prompt_len = len(prompt)
    assert dropped > 0
    assert session.messages[0] == {"role": "system", "content": "Sei kurz."}
    users = [m["content"] for m in session.history[::2]]
    assert users == sent[-len(users):] and len(users) < len(sent)  # the newest turns, in order
    with pytest.raises(ConversationError, match="too long"):
        session.send("sehr lange Nachricht " * 40)
    out = io.StringIO()  # in the REPL: a German note, the conversation kept
    history = list(session.history)
    chat.reply_to(session, "sehr lange Nachricht " * 40, out)
    assert re.fullmatch(r"\(Nachricht zu lang: \d+ Tokens, Platz ist für \d+; bitte kürzer fassen\)\n", out.getvalue())
    assert session.history == history


def test_base_checkpoint_runs_in_completion_mode(tmp_path, small_tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path, small_tokenizer, kind="base")
    chat.main(["--checkpoint", str(ckpt), "--prompt", "Es war einmal", "--temperature", "0", "--max-new-tokens", "10"])
    out, err = capsys.readouterr()
    assert "completion mode" in err and "(base" in err
    session = load_session(str(ckpt), "cpu", sampling=Sampling(temperature=0, max_new_tokens=10))
    assert session.kind == "base"
    answer = "".join(session.send("Es war einmal"))
    prompt = [small_tokenizer.bos_id] + small_tokenizer.encode("Es war einmal")
    assert session.last.ids == recompute(session.model, prompt, 10, {small_tokenizer.bos_id})
    assert out == answer + "\n"
    with pytest.raises(ConversationError, match="the text is too long"):  # never continued with its start cut off
        session.send("sehr langer Text " * (session.context_len // 2))
    out = io.StringIO()
    chat.reply_to(session, "sehr langer Text " * (session.context_len // 2), out)
    assert out.getvalue().startswith("(Text zu lang: "), out.getvalue()


def test_clear_errors(tmp_path, small_tokenizer, monkeypatch):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            chat.main([*argv, "--prompt", "Hallo"])
        assert str(e.value.code).startswith("error: ")
        return str(e.value.code)
    assert "no checkpoint" in error("--checkpoint", str(tmp_path / "missing"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot read" in error("--checkpoint", str(tmp_path / "junk.pt"))
    torch.save({"model": {}, "model_config": {"n_layers": 3}}, tmp_path / "other.pt")
    assert "not a checkpoint this chat.py can use" in error("--checkpoint", str(tmp_path / "other.pt"))
    monkeypatch.chdir(tmp_path)  # no out/chat, no out/base here
    assert "out/chat or out/base" in error()
    ckpt = make_checkpoint(tmp_path / "c", small_tokenizer)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in error("--checkpoint", str(ckpt), "--device", "cuda")
    assert "temperature" in error("--checkpoint", str(ckpt), "--temperature", "-1")


# -----------------------------------------------------------------------------
# chat.py as a program

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8"}
CHAT = [sys.executable, str(REPO_ROOT / "chat.py")]


def test_prompt_mode(chat_ckpt, session_factory):
    args = ["--checkpoint", str(chat_ckpt), "--temperature", "0", "--max-new-tokens", "12"]
    run = subprocess.run(CHAT + args + ["--prompt", TURNS[1]], capture_output=True, timeout=180, env=ENV)
    assert run.returncode == 0, run.stderr.decode()
    err = run.stderr.decode()
    assert str(chat_ckpt) in err and "parameters" in err and "device cpu" in err
    expected = session_factory().answer([{"role": "user", "content": TURNS[1]}]).text
    assert run.stdout.decode() == expected + "\n"
    # "--prompt -" reads the message from stdin, without the newline a file or echo ends with (it was sent along)
    run = subprocess.run(CHAT + args + ["--prompt", "-"], input=(TURNS[1] + "\n").encode(), capture_output=True,
                         timeout=180, env=ENV)
    assert run.returncode == 0 and run.stdout.decode() == expected + "\n"


def test_repl_through_stdin(chat_ckpt, session_factory):
    lines = [TURNS[0], "/temp 0", "/topk 7", "/system Du antwortest kurz.", "/reset", TURNS[1], "/quit", "nie gelesen"]
    run = subprocess.run(CHAT + ["--checkpoint", str(chat_ckpt), "--max-new-tokens", "12", "--seed", "3"],
                         input="\n".join(lines).encode() + b"\n", capture_output=True, timeout=180, env=ENV)
    assert run.returncode == 0, run.stderr.decode()
    out, err = run.stdout.decode(), run.stderr.decode()
    # stdout: only the answers, one per message; the replies to commands go to stderr
    assert "(Temperatur 0.0 = greedy, top-k 50)" in err and "(Temperatur 0.0 = greedy, top-k 7)" in err
    assert "(Systemnachricht: Du antwortest kurz.)" in err and "(neues Gespräch)" in err
    first = session_factory(Sampling(max_new_tokens=12), seed=3)  # sampled, as the program's first answer
    first = "".join(first.send(TURNS[0]))
    # after /reset the conversation is the system message and one question, answered greedily
    second = session_factory(Sampling(temperature=0, top_k=7, max_new_tokens=12)).answer(
        [{"role": "system", "content": "Du antwortest kurz."}, {"role": "user", "content": TURNS[1]}]).text
    assert out == first + "\n" + second + "\n"
    assert "Traceback" not in err


class Terminal:
    """The parent's side of a pseudo-terminal: what chat.py wrote, read up to each expected text in turn."""

    def __init__(self, fd, proc):
        self.fd, self.proc, self.text, self.pos = fd, proc, "", 0

    def expect(self, needle: str, timeout=120) -> None:
        end = time.time() + timeout
        while (found := self.text.find(needle, self.pos)) < 0:
            ready = select.select([self.fd], [], [], 0.5)[0]
            if time.time() > end or not ready and self.proc.poll() is not None:
                raise AssertionError(f"no {needle!r} in the terminal output:\n{self.text}")
            if ready:
                try:
                    self.text += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    pass
        self.pos = found + len(needle)

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)


def test_repl_through_a_terminal(chat_ckpt):
    master, slave = os.openpty()

    def controlling_terminal():  # so that Ctrl-C typed into the terminal becomes SIGINT for chat.py
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        sigint_as_in_a_shell()

    proc = subprocess.Popen(CHAT + ["--checkpoint", str(chat_ckpt), "--max-new-tokens", "10", "--seed", "1"],
                            stdin=slave, stdout=slave, stderr=slave, env={**ENV, "TERM": "dumb"},
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    term = Terminal(master, proc)
    try:
        term.expect("parameters")
        term.expect("/help")
        term.expect("Du: ")
        term.type(b"Hallo, wer bist du?\r")
        term.expect("Schnack: ")
        term.expect("Du: ")
        term.type(b"/reset\r")
        term.expect("(neues Gespräch)")
        term.expect("Du: ")
        term.type(b"halb getippt")
        term.expect("getippt")  # echoed: typed together with Ctrl-C, the terminal would drop it unread
        # Ctrl-C while typing: the line is dropped, chat.py goes on. CPython's readline notices a
        # SIGINT that comes between its reads only at the next key (on a loaded machine, often), so
        # Ctrl-C again until chat.py answers: at an empty prompt each one only repeats the hint.
        for _ in range(30):
            term.type(b"\x03")
            try:
                term.expect("/quit beendet", timeout=2)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError(f"Ctrl-C never reached chat.py:\n{term.text}")
        term.expect("Du: ")
        term.type(b"\x04")  # Ctrl-D quits
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "Traceback" not in term.text


# -----------------------------------------------------------------------------
# Bad numbers and I/O edges (issue 20): an `error:` line or a one-line note, never a traceback

def test_sampling_refuses_non_finite_and_makes_tiny_values_greedy():
    for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=float("nan")),
                dict(temperature=-1e-9), dict(top_p=-1e-9), dict(top_p=1.5), dict(stop=("",)), dict(stop="\n")):
        with pytest.raises(ValueError):
            Sampling(**bad)
    for tiny in (dict(temperature=1e-40), dict(temperature=5e-324), dict(temperature=0.8, top_p=1e-300),
                 dict(temperature=0.8, top_p=0.0)):
        s = Sampling(**tiny)
        assert s.greedy and s.sampler() == (0.0, None, None), tiny
        assert (s.temperature, s.top_p) == (tiny["temperature"], tiny.get("top_p")), tiny  # as asked: kept
    small = Sampling(temperature=1e-3, top_p=0.01)  # small but samplable
    assert not small.greedy and small.sampler() == (1e-3, 50, 0.01)


def test_settings_made_from_greedy_ones_keep_the_rest():
    """`--temperature 0 --top-p 0.9`, then `/temp 0.8`: sampled with top_p 0.9 (the greedy settings once
    forgot their top_p, so the new ones had none)."""
    session = types.SimpleNamespace(sampling=Sampling(temperature=0.0, top_k=None, top_p=0.9))
    assert session.sampling.greedy
    out = io.StringIO()
    chat.run_command(session, "/temp 0.8", out)
    assert session.sampling.sampler() == (0.8, None, 0.9), out.getvalue()


def test_tiny_values_sample_greedily(session_factory):
    greedy = session_factory().answer([{"role": "user", "content": TURNS[1]}]).ids
    for tiny in (dict(temperature=1e-40), dict(temperature=1.0, top_p=1e-300)):
        session = session_factory(Sampling(top_k=None, max_new_tokens=12, **tiny))
        assert session.answer([{"role": "user", "content": TURNS[1]}]).ids == greedy


def test_repl_commands_with_bad_numbers_and_a_huge_system_message(session_factory):
    session = session_factory()
    out = io.StringIO()
    for line in ("/temp nan", "/temp inf", "/temp -1", "/temp 1e999", "/topk 1e3", "/topk -5"):
        chat.run_command(session, line, out)
    notes = out.getvalue().splitlines()  # in German, what it takes (it passed Sampling's English on, "a number" to -5)
    assert notes == ["(/temp braucht eine Zahl ab 0, z. B. /temp 0.7)"] * 4 + [
        "(/topk braucht eine ganze Zahl ab 0, z. B. /topk 50; 0 schaltet es aus)"] * 2, notes
    assert session.sampling == GREEDY  # nothing changed
    out = io.StringIO()
    for line in ("/temp", "/topk"):  # was "could not convert string to float: ''"
        chat.run_command(session, line, out)
    assert out.getvalue() == "(Temperatur 0 = greedy, top-k aus)\n" * 2 and session.sampling == GREEDY
    out = io.StringIO()
    chat.run_command(session, "/temp 1e-40", out)
    assert session.sampling.greedy and "Temperatur 1e-40 = greedy" in out.getvalue()
    huge = "Sei freundlich. " * 65_536  # 1 MB
    out = io.StringIO()
    chat.run_command(session, "/system " + huge, out)
    note = out.getvalue()  # in German, as every note of the REPL (it showed the API's English)
    assert note.startswith("(Systemnachricht nicht übernommen: zu lang, ") and "höchstens" in note, note
    assert "too long" not in note and len(note) < 300
    assert session.system is None
    long_ok = "Sei freundlich und antworte kurz. " * 3
    out = io.StringIO()
    chat.run_command(session, "/system " + long_ok, out)
    assert session.system == long_ok.strip() and "Zeichen)" in out.getvalue() and len(out.getvalue()) < 200
    list(session.send(TURNS[0]))  # the conversation goes on
    assert session.last.finish_reason in ("stop", "length") and session.last.prompt_tokens > 10


def run_chat(args, **kw):
    run = subprocess.run(CHAT + args, capture_output=True, timeout=180, env=ENV, **kw)
    return run.returncode, run.stdout.decode(), run.stderr.decode()


def test_program_bad_numbers_are_one_error_line(chat_ckpt, capsys):
    """The first as a process of its own (exit code, the last line of stderr, no traceback); the others through
    the same main() here (conftest's refusal)."""
    code, out, err = run_chat(["--checkpoint", str(chat_ckpt), "--prompt", "Hallo", "--temperature", "nan"])
    assert code == 1 and out == "", err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ") and "temperature" in err, err
    for flags, words in ((["--temperature", "inf"], "temperature"), (["--top-p", "nan"], "top_p"),
                         (["--seed", str(2**70)], "--seed must be between"),
                         (["--system", "Sei kurz. " * 2000], "system message is too long")):
        said, out = refusal(chat.main, ["--checkpoint", str(chat_ckpt), "--prompt", "Hallo", *flags], capsys)
        assert out == "", (flags, out)
        last = said.strip().splitlines()[-1]  # the SystemExit message
        assert last.startswith("error: ") and words in last, (flags, said)


def test_program_io_edges(chat_ckpt, session_factory):
    args = ["--checkpoint", str(chat_ckpt), "--temperature", "0", "--max-new-tokens", "12"]
    # --top-p 1e-300 underflowed in float32: now greedy, the same answer as --temperature 0
    expected = session_factory().answer([{"role": "user", "content": TURNS[1]}]).text
    code, out, err = run_chat(args + ["--temperature", "1", "--top-p", "1e-300", "--prompt", TURNS[1]])
    assert code == 0 and out == expected + "\n", err
    # stdout closed before the first piece (as `| head -c 1` does, but without racing head)
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run(CHAT + args + ["--prompt", TURNS[1]], stdout=write_end, stderr=subprocess.PIPE,
                          timeout=180, env=ENV)
    os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == "chat.py: the output was closed; stopping"
    # stdin closed (0<&-): --prompt - and the REPL have nothing to read
    for mode in (["--prompt", "-"], []):
        proc = subprocess.run(CHAT + args + mode, capture_output=True, timeout=180, env=ENV,
                              stdin=None, preexec_fn=lambda: os.close(0))
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Traceback" not in err and "error: stdin is closed" in err, err


# chat.main with loading held: common.load_model says so on stderr and then waits until interrupted,
# so that the test's Ctrl-C (SIGINT) arrives while the model is loading, not before or after it
HELD_LOADING = """
import sys, threading, common
def held_load_model(*args, **kwargs):
    print("loading held", file=sys.stderr, flush=True)
    threading.Event().wait()  # until Ctrl-C (a read of stdin would race the test closing it)
common.load_model = held_load_model
import chat
chat.main(sys.argv[1:])
"""


def one_line_error(err: bytes) -> str:
    """The last line of a chat.py that failed cleanly: no traceback, nothing Python printed at exit."""
    err = err.decode()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a stdout that is full")
def test_output_failures_and_ctrl_c_while_loading_are_one_line(chat_ckpt):
    """A full stdout (/dev/full: every write fails with ENOSPC), a closed one (>&-) and Ctrl-C while the
    model loads each end chat.py with one line on stderr and a non-zero exit code (they were tracebacks)."""
    args = ["--checkpoint", str(chat_ckpt), "--temperature", "0", "--max-new-tokens", "12"]
    for mode, stdin in ((["--prompt", TURNS[1]], b""), ([], f"{TURNS[0]}\n{TURNS[1]}\n".encode())):  # --prompt, a pipe
        with open("/dev/full", "wb") as full:
            proc = subprocess.run(CHAT + args + mode, input=stdin, stdout=full, stderr=subprocess.PIPE, timeout=180,
                                  env=ENV)
        assert proc.returncode == 1 and one_line_error(proc.stderr) == (
            "error: cannot write the answer to stdout ([Errno 28] No space left on device); stopping"), mode
    proc = subprocess.run(CHAT + args + ["--prompt", TURNS[1]], stderr=subprocess.PIPE, timeout=180, env=ENV,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 1 and one_line_error(proc.stderr).startswith("error: stdout is closed, there is nowhere")
    proc = subprocess.Popen([sys.executable, "-c", HELD_LOADING, *args, "--prompt", TURNS[1]], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO_ROOT,
                            preexec_fn=sigint_as_in_a_shell)
    try:
        assert proc.stderr.readline().decode().strip() == "loading held"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == chat.INTERRUPTED and out == b"" and one_line_error(err) == "chat.py: interrupted"


def test_max_new_tokens_past_half_the_context_leaves_the_prompt_half_and_the_answer_the_rest(session_factory):
    """Sampling's default max_new_tokens (512) on a 256-token model: a prompt still gets half the context
    (not refused as too long), and the answer runs until the context is full, never past it."""
    session = session_factory(Sampling(temperature=0, top_k=None, max_new_tokens=1000))
    messages = [{"role": "user", "content": TURNS[1]}]
    prompt = render_prompt(session.tokenizer, messages)
    reply = session.answer(messages)
    assert reply.ids == recompute(session.model, prompt, session.context_len - len(prompt), session.chat_stop_ids)
    assert len(prompt) + len(reply.ids) <= session.context_len and session.cache.pos == len(session.cached_ids)
    assert reply.finish_reason == "length"  # this random model never says <|assistant_end|> here


def test_top_k_0_is_off(session_factory):
    """top_k 0 means off (Sampling, /topk 0): the same sampled answer as top_k None with the same seed."""
    messages = [{"role": "user", "content": TURNS[0]}]
    off = session_factory(Sampling(temperature=1.0, top_k=None, max_new_tokens=12), seed=4).answer(messages).ids
    zero = session_factory(Sampling(temperature=1.0, top_k=0, max_new_tokens=12), seed=4).answer(messages).ids
    assert zero == off
    session, out = session_factory(), io.StringIO()
    chat.run_command(session, "/topk 0", out)
    assert not session.sampling.top_k and "top-k aus" in out.getvalue()


def test_fit_to_context_keeps_a_prompt_that_fits_exactly_and_drops_whole_exchanges(small_tokenizer):
    tok = small_tokenizer
    system = {"role": "system", "content": "Sei kurz."}
    turns = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": "Gut, danke."},
             {"role": "user", "content": TURNS[1]}, {"role": "assistant", "content": "Wien."},
             {"role": "user", "content": TURNS[2]}]
    messages = [system] + turns
    ids = render_prompt(tok, messages)
    assert fit_to_context(tok, messages, len(ids)) == (messages, ids)  # exactly the room: nothing dropped
    kept, got = fit_to_context(tok, messages, len(ids) - 1)  # one token short: the oldest exchange goes
    assert kept == [system] + turns[2:] and got == render_prompt(tok, kept)


def test_program_flags_reach_the_sessions_sampling(monkeypatch):
    """chat.py's sampling flags, each to its own Sampling field (and the seed to the session)."""
    seen = {}

    def load_session(checkpoint, device, sampling, system, seed):
        seen.update(sampling=sampling, seed=seed, checkpoint=checkpoint, system=system)
        raise SystemExit("error: stop here")
    monkeypatch.setattr(chat, "load_session", load_session)
    with pytest.raises(SystemExit, match="stop here"):
        chat.main(["--checkpoint", "ckpt", "--temperature", "0.9", "--top-k", "7", "--top-p", "0.8",
                   "--max-new-tokens", "33", "--frequency-penalty", "0.5", "--presence-penalty", "-1",
                   "--no-repeat-ngram-size", "3", "--seed", "11", "--system", "Sei kurz.", "--prompt", "Hallo"])
    assert seen == dict(sampling=Sampling(temperature=0.9, top_k=7, top_p=0.8, max_new_tokens=33,
                                          frequency_penalty=0.5, presence_penalty=-1.0, no_repeat_ngram_size=3),
                        seed=11, checkpoint="ckpt", system="Sei kurz.")


def test_a_system_message_may_take_half_the_prompts_room_not_more(session_factory):
    """check_system: a system message whose prompt (with a one-word question) takes more than half the room for
    prompts is refused; one within half is taken."""
    session, tok = session_factory(), None
    tok = session.tokenizer
    room = session.context_len - min(session.sampling.max_new_tokens, session.context_len // 2)
    length = lambda text: len(render_prompt(tok, [{"role": "system", "content": text},
                                                  {"role": "user", "content": "."}]))
    words = "Sei freundlich und hilfsbereit. ".split()
    text = ""
    for i in range(1000):  # the longest text of these words within half the room, and one more word
        longer = (text + " " + words[i % len(words)]).strip()
        if length(longer) > room // 2:
            break
        text = longer
    assert room // 2 - 3 <= length(text) <= room // 2 < length(longer) <= room
    chat.check_system(session, text)
    with pytest.raises(chat.ConversationError, match="system message is too long"):
        chat.check_system(session, longer)


def test_ctrl_c_inside_the_prefill_keeps_cache_and_cached_ids_consistent(session_factory):
    """Ctrl-C while the prompt's forward runs (after some layers wrote their keys, before the cache advanced):
    cached_ids stays exactly what the cache holds, and the next answer equals recomputation."""
    session = session_factory(system="Du bist ein hilfsbereiter Assistent.")
    list(session.send(TURNS[0]))
    attend = session.cache.attend

    def interrupted(layer, q, k, v, window=None, start=0):
        if layer == 1 and q.shape[2] > 1:
            raise KeyboardInterrupt
        return attend(layer, q, k, v, window, start)
    session.cache.attend = interrupted
    with pytest.raises(KeyboardInterrupt):
        list(session.send(TURNS[1]))
    del session.cache.attend
    assert session.last.finish_reason == "interrupted" and session.history[2:] == []
    assert session.cache.pos == len(session.cached_ids) < session.last.prompt_tokens
    prompt = render_prompt(session.tokenizer, session.messages + [{"role": "user", "content": TURNS[2]}])
    list(session.send(TURNS[2]))
    budget = min(GREEDY.max_new_tokens, session.context_len - len(prompt))
    assert session.last.ids == recompute(session.model, prompt, budget, session.chat_stop_ids)
    assert session.cache.pos == len(session.cached_ids)


@pytest.mark.parametrize("special", ["<|user_start|>", "<|bos|>", "<|assistant_end|>"])
def test_any_special_token_ends_a_chat_answer(session_factory, monkeypatch, special):
    """The template never puts a special token inside an assistant's text: whichever the model samples
    ends the answer there (finish_reason "stop"), and nothing after it is shown or kept."""
    session = session_factory(Sampling(max_new_tokens=20))
    tok = session.tokenizer
    script = iter(tok.encode("Ja") + [tok.special[special]] + tok.encode(" und noch mehr"))
    monkeypatch.setattr(gpt, "sample_next_token", lambda *a, **k: torch.tensor([[next(script)]]))
    assert "".join(session.send("Hallo")) == "Ja"
    assert session.last.finish_reason == "stop" and session.last.ids == tok.encode("Ja")
    assert session.history[-1] == {"role": "assistant", "content": "Ja"}


def test_system_minus_removes_it_and_a_system_message_of_exactly_half_the_room_is_taken(session_factory):
    """/system - removes the system message (it is not kept as the text "-"). check_system takes a system message whose
    prompt (with a one-word question) is exactly half the room for prompts, and refuses it with one token less."""
    session, out = session_factory(), io.StringIO()
    chat.run_command(session, "/system Sei kurz.", out)
    assert session.system == "Sei kurz." and session.messages == [{"role": "system", "content": "Sei kurz."}]
    chat.run_command(session, "/system -", out)
    assert session.system is None and session.messages == []
    assert out.getvalue().splitlines()[-1] == "(Systemnachricht: keine)"
    text = "Sei freundlich und hilfsbereit."
    length = len(render_prompt(session.tokenizer, [{"role": "system", "content": text}, {"role": "user", "content": "."}]))
    edge = types.SimpleNamespace(tokenizer=session.tokenizer, sampling=Sampling(max_new_tokens=10**6))
    edge.context_len = 4 * length  # the answer's share is half the context: room for prompts 2 * length
    chat.check_system(edge, text)
    edge.context_len = 4 * length - 4  # half the room: length - 1
    with pytest.raises(chat.ConversationError, match="system message is too long"):
        chat.check_system(edge, text)


def test_reply_notes_and_an_empty_answer_is_not_kept(session_factory, monkeypatch):
    """reply_to's notes: an answer cut by its token limit says so with its length; an answer with no text says
    "(keine Antwort)", and neither it nor its question joins the history (the next turn is asked as if it never was)."""
    session = session_factory(Sampling(temperature=0, top_k=None, max_new_tokens=5))
    out, notes = io.StringIO(), io.StringIO()
    chat.reply_to(session, TURNS[0], out, notes=notes)
    assert session.last.finish_reason == "length" and notes.getvalue() == "(Längengrenze von 5 Tokens erreicht)\n"
    assert out.getvalue() == session.last.text + "\n" and len(session.history) == 2
    history = list(session.history)
    monkeypatch.setattr(gpt, "sample_next_token",
                        lambda *a, **k: torch.tensor([[session.tokenizer.special["<|assistant_end|>"]]]))
    out, notes = io.StringIO(), io.StringIO()
    chat.reply_to(session, TURNS[1], out, notes=notes)
    assert (session.last.text, session.last.finish_reason) == ("", "stop")
    assert out.getvalue() == "\n" and notes.getvalue() == "(keine Antwort)\n"
    assert session.history == history
