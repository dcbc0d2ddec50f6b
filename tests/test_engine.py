"""engine.py's batch cache (a kvcache.KVCache of many rows): rows decoded together give what each gives alone (fp32 CPU), whatever the others are:
the same greedy tokens, logits equal up to float rounding."""
import random
import threading

import pytest
import torch

import common
import engine
import gpt
import session
from conftest import make_checkpoint, stop_from_the_middle


@pytest.mark.parametrize("n_kv_head, compiled", [(1, False), (2, False), (1, True)],
                         ids=["gqa", "mha", "gqa-compiled"])  # grouped-query attention and plain
def test_batched_decode_equals_decoding_alone(tmp_path, small_tokenizer, n_kv_head, compiled, request):
    """compiled: the step compiled as on CUDA (conftest: without Inductor) for batch sizes 1, 2, 4 and 8, so
    that a step of 3 or 5 rows feeds rows that are not kept; compiled at the start, never again."""
    graphs = request.getfixturevalue("decode_compiled_on_cpu") if compiled else None
    model, _, _ = common.load_model(make_checkpoint(tmp_path, small_tokenizer, n_kv_head=n_kv_head,
                                                   sequence_len=256), torch.device("cpu"))
    rng = random.Random(n_kv_head)
    prompts = [[rng.randrange(512) for _ in range(rng.randrange(2, 60))] for _ in range(5)]
    steps = 30

    def alone(prompt):  # the single-sequence path session.ChatSession uses
        cache, out, logits_seen = model.new_kv_cache(1, 256), [], []
        with torch.inference_mode():
            logits = model(torch.tensor([prompt]), kv_cache=cache)[:, -1]
            for _ in range(steps):
                logits_seen.append(logits)
                out.append(int(logits.argmax()))
                logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[:, -1]
        return out, logits_seen

    expected = [alone(p) for p in prompts]
    cache = session.batch_cache(model, 8, 256)
    assert cache.compiled == compiled and (not compiled or (cache.batch_sizes == [1, 2, 4, 8] and len(graphs) == 4))
    # as BatchEngine keeps them: the running sequences in rows 0..n-1, joining one per step at
    # row n, and a leaving one swapping places with the last (so its cache row moves)
    slot, out, seen, logits, active = {}, [[] for _ in prompts], [[] for _ in prompts], {}, []
    for step in range(steps + len(prompts)):
        if step < len(prompts):
            slot[step] = len(active)
            logits[step] = session.prefill(model, cache, slot[step], [0], [prompts[step]])
            active.append(step)
        for i in list(active):
            seen[i].append(logits[i])
            out[i].append(int(logits[i].argmax()))
            if len(out[i]) == steps:
                last = max(active, key=lambda j: slot[j])
                cache.swap(slot[i], slot[last])
                slot[i], slot[last] = slot[last], slot[i]
                active.remove(i)
        if active:
            feed = sorted(active, key=lambda i: slot[i])
            assert [slot[i] for i in feed] == list(range(len(feed)))
            new = session.decode(model, cache, [out[i][-1] for i in feed])
            for j, i in enumerate(feed):
                logits[i] = new[j:j + 1]
    assert not compiled or len(graphs) == 4
    # each row holds its prompt and every answer token but the last (never fed); rows a padded step fed a dummy
    # token to (compiled: 3 rows run as 4) did not keep it, whoever's cached tokens they hold
    assert [cache.lengths[slot[i]] for i in range(len(prompts))] == [len(p) + steps - 1 for p in prompts]
    for i, (tokens, logits_alone) in enumerate(expected):
        assert out[i] == tokens
        diff = max(float((a - b).abs().max()) for a, b in zip(seen[i], logits_alone))
        assert diff < 1e-4, f"prompt {i}: logits differ by {diff}"  # rounding only (matmuls of other shapes)
        print(f"prompt {i}: largest logit difference {diff:.2e}")


def test_prefill_of_several_rows_equals_each_alone(tmp_path, small_tokenizer):
    """Newcomers are prefilled in one forward, right-padded to the longest prompt, each after its own
    kept prefix: each row's logits and its next greedy tokens are those of its sequence alone."""
    model, _, _ = common.load_model(make_checkpoint(tmp_path, small_tokenizer, sequence_len=256),
                                    torch.device("cpu"))
    rng = random.Random(0)
    full = [[rng.randrange(512) for _ in range(n)] for n in (3, 40, 12, 1)]
    keeps = [0, 0, 7, 0]  # row 2 holds a prefix of its sequence from an earlier turn

    def alone(seq, steps=8):
        cache, out = model.new_kv_cache(1, 256), []
        with torch.inference_mode():
            logits = model(torch.tensor([seq]), kv_cache=cache)[:, -1]
            first = logits
            for _ in range(steps):
                out.append(int(logits.argmax()))
                logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[:, -1]
        return first, out

    cache = session.batch_cache(model, 6, 256)
    session.prefill(model, cache, 2, [0], [full[2][:7] + [1, 2, 3]])  # the earlier turn, then other tokens
    logits = session.prefill(model, cache, 0, keeps, [seq[keep:] for seq, keep in zip(full, keeps)])
    assert cache.lengths[:4] == [len(seq) for seq in full]
    prefilled, out = logits, [[] for _ in full]
    for _ in range(8):
        tokens = [int(row.argmax()) for row in logits]
        for o, t in zip(out, tokens):
            o.append(t)
        logits = session.decode(model, cache, tokens)
    for i, seq in enumerate(full):
        first, tokens = alone(seq)
        diff = float((first[0] - prefilled[i]).abs().max())
        assert diff < 1e-4 and out[i] == tokens, f"row {i}: logit difference {diff}, {out[i]} vs {tokens}"


def test_penalties_are_applied_alike_batched_and_alone(tmp_path, small_tokenizer):
    """Frequency and presence penalties count each answer's own tokens: the batched engine (rows next to each
    other, each its own counts) gives the answers of the one-at-a-time engine (GPT.generate's counts)."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="base", sequence_len=256)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    texts = ["Die Sonne scheint", "Berlin ist", "Im Wattenmeer leben", "Ein Satz über"]

    def answers(eng, sampling):
        done, jobs = threading.Semaphore(0), []
        for text in texts:
            jobs.append(engine.Job([tok.bos_id] + tok.encode(text), sampling, stop_ids={tok.bos_id}, text=text,
                                   deliver=lambda event: event[0] in engine.FINAL and done.release()))
            eng.submit(jobs[-1])
        for _ in jobs:
            assert done.acquire(timeout=600), "the engine did not finish"
        return [job.reply.ids for job in jobs]

    penalised = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=24, frequency_penalty=1.0,
                                 presence_penalty=0.5)
    batched = answers(engine.BatchEngine(chat.model, tok, chat.context_len, 4, 16), penalised)
    alone = answers(engine.Engine(chat, 16), penalised)
    assert batched == alone
    no_repeats = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=24, no_repeat_ngram_size=2)
    batched = answers(engine.BatchEngine(chat.model, tok, chat.context_len, 4, 16), no_repeats)
    assert batched == answers(engine.Engine(chat, 16), no_repeats)
    assert all(len(set(zip(ids, ids[1:]))) == len(ids) - 1 for ids in batched)
    assert alone != answers(engine.Engine(chat, 16), session.Sampling(temperature=0.0, top_k=None, max_new_tokens=24))


@pytest.mark.parametrize("stops, pieces, shown, found, held", [
    (("\n\n",), ["Hallo", "\n", "Welt", "\n", "\n", "x"], ["Hallo", "", "\nWelt", "", ""], "\n\n", ""),
    (("ENDE",), ["Das E", "N", "DE hier"], ["Das ", "", ""], "ENDE", ""),  # completed over three pieces
    (("ENDE",), ["Das E", "N", "D!"], ["Das ", "", "END!"], None, ""),  # held back, then shown: no stop after all
    (("ENDE",), ["Das E", "N"], ["Das ", ""], None, "EN"),  # the answer ends while text is held: flush() shows it
    (("ab", "b"), ["xab"], ["x"], "ab", ""),  # the earliest of two
    (("Hallo",), ["Hallo Welt"], [""], "Hallo", ""),  # at the very start: nothing shown
])
def test_stop_sequences_hold_back_only_what_may_begin_one(stops, pieces, shown, found, held):
    stop, out = session.StopSequences(stops), []
    for piece in pieces:
        out.append(stop.push(piece))
        if stop.found:
            break
    assert out == shown and stop.found == found and stop.flush() == held


def test_stop_sequences_end_answers_alike_batched_and_alone(tmp_path, small_tokenizer):
    """OpenAI's stop: an answer ends at the token that completes the first stop sequence in its text and
    shows the text before it; streamed pieces never show part of it. The batched engine ends each row
    there as the one-at-a-time engine does (ChatSession), and counts every sampled token, no stop token."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="base", sequence_len=256)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    texts = ["Die Sonne scheint", "Berlin ist", "Im Wattenmeer leben", "Ein Satz über"]

    def answers(eng, stops):
        done, jobs, pieces = threading.Semaphore(0), [], []
        for text, stop in zip(texts, stops):
            sampling = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=24, stop=stop)
            shown = []
            deliver = lambda event, shown=shown: (shown.append(event[1]) if event[0] == "piece" else
                                                  event[0] in engine.FINAL and done.release())
            jobs.append(engine.Job([tok.bos_id] + tok.encode(text), sampling, stop_ids={tok.bos_id}, text=text,
                                   deliver=deliver))
            pieces.append(shown)
            eng.submit(jobs[-1])
        for _ in jobs:
            assert done.acquire(timeout=600), "the engine did not finish"
        return [job.reply for job in jobs], pieces

    free, _ = answers(engine.Engine(chat, 16), [()] * len(texts))
    assert all(len(reply.text) >= 4 for reply in free), [reply.text for reply in free]
    # a stop sequence from the middle of each answer, and one that never appears
    stops = [(stop_from_the_middle(reply.text), "§§§") for reply in free]
    for eng in (engine.BatchEngine(chat.model, tok, chat.context_len, 4, 16), engine.Engine(chat, 16)):
        replies, pieces = answers(eng, stops)
        for reply, before, (stop, _), shown in zip(replies, free, stops, pieces):
            assert reply.text == before.text[:before.text.index(stop)] == "".join(shown)
            assert reply.finish_reason == "stop" and reply.stop_sequence == stop
            assert reply.ids == before.ids[:len(reply.ids)]  # the same greedy tokens, up to the one that completes it
            assert stop in tok.decode(reply.ids) and stop not in tok.decode(reply.ids[:-1])
            assert engine.completion_tokens(reply) == len(reply.ids)
    never, _ = answers(engine.BatchEngine(chat.model, tok, chat.context_len, 4, 16), [("§§§",)] * len(texts))
    assert [(r.text, r.ids, r.finish_reason, r.stop_sequence) for r in never] == [
        (r.text, r.ids, r.finish_reason, None) for r in free]


@pytest.mark.parametrize("max_batch", [1, 3])
def test_an_engine_compiles_the_decode_step_for_the_cache_it_decodes_on_only(tmp_path, small_tokenizer, max_batch,
                                                                             decode_compiled_on_cpu, monkeypatch):
    """serve.py (engine process or --single-process) loads a session and makes its engine on it: the batched
    engine decodes on a cache of its own, so compiling the session's one-row cache too (load_session's default
    on CUDA) was load time and graph memory for a step never run."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, sequence_len=64)
    compiled_for = []
    compile_decode = gpt.compile_decode
    monkeypatch.setattr(gpt, "compile_decode", lambda model, cache, *a, **k: (compiled_for.append(cache),
                                                                               compile_decode(model, cache, *a, **k)))
    chat = engine.load_engine_session(str(checkpoint), "cpu", max_batch)
    eng = engine.make_engine(chat, max_batch, 4)
    assert compiled_for == [eng.cache if max_batch > 1 else chat.cache]
    assert [shapes[0][0] for shapes in decode_compiled_on_cpu] == ([1, 2, 3] if max_batch > 1 else [1])  # rows


def run_jobs(eng, jobs, together: bool = False, ending: str = "done"):
    """Submit the jobs (their deliver replaced here) and wait for their last events; their replies (the done events' values). together:
    submitted under the engine's lock, so the batched engine admits them all in one step, rows side by side. ending:
    the kind of every job's last event."""
    done, replies = threading.Semaphore(0), [None] * len(jobs)
    for i, job in enumerate(jobs):
        job.deliver = lambda event, i=i: event[0] in engine.FINAL and (replies.__setitem__(i, event), done.release())
    with eng.cond if together else threading.Lock():
        for job in jobs:
            eng.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=600), "the engine did not finish"
    assert [kind for kind, _ in replies] == [ending] * len(jobs), replies
    return [reply for _, reply in replies]


def test_rows_with_other_penalties_in_one_batch_each_get_their_own(tmp_path, small_tokenizer):
    """Rows are sampled in groups of the same settings: penalties and no_repeat_ngram_size are settings too. Penalised
    and plain requests running side by side each get the answer they get alone (a group keyed on temperature, top_k
    and top_p only gave all of them the first row's penalties)."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="base", sequence_len=256)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    texts = ["Die Sonne scheint", "Berlin ist", "Im Wattenmeer leben", "Ein Satz über"]
    settings = [dict(frequency_penalty=1.0, presence_penalty=0.5), {}, dict(no_repeat_ngram_size=2), {}]
    jobs = lambda: [engine.Job([tok.bos_id] + tok.encode(text), session.Sampling(
        temperature=0.0, top_k=None, max_new_tokens=24, **extra), stop_ids={tok.bos_id}, text=text, deliver=lambda event: None)
        for text, extra in zip(texts, settings)]
    alone = [reply.ids for reply in run_jobs(engine.Engine(chat, 16), jobs())]
    together = [reply.ids for reply in run_jobs(engine.BatchEngine(chat.model, tok, chat.context_len, 4, 16), jobs(),
                                                together=True)]
    assert together == alone


def test_an_answer_never_runs_past_the_context(tmp_path, small_tokenizer):
    """max_tokens beyond what the context leaves: the batched engine's answer ends at the context's end with
    finish_reason "length", the same tokens as the one-at-a-time engine's, never past the cache's last row."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="base", sequence_len=64)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    sampling = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=100)
    text = "Die Sonne scheint"
    prompt = chat.completion_prompt(text, sampling)  # fits: at most half of the 64 tokens
    jobs = lambda: [engine.Job(prompt, sampling, stop_ids={tok.bos_id}, text=text, deliver=lambda event: None)]
    [alone] = run_jobs(engine.Engine(chat, 4), jobs())
    [batched] = run_jobs(engine.BatchEngine(chat.model, tok, chat.context_len, 2, 4), jobs())
    for reply in (alone, batched):
        assert reply.finish_reason == "length" and len(reply.ids) == chat.context_len - len(prompt), reply
    assert batched.ids == alone.ids and batched.text == alone.text


def test_a_stop_token_as_the_first_token_ends_the_answer_at_once(tmp_path, small_tokenizer, monkeypatch):
    """The model's first token is <|assistant_end|>: an empty answer, finish_reason "stop", one completion token
    (the stop token), in both engines; the token is never shown as text."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="chat", sequence_len=128)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    end = tok.special["<|assistant_end|>"]
    monkeypatch.setattr(gpt, "sample_next_token", lambda logits, *a, **k: torch.full((logits.shape[0], 1), end))
    messages = [{"role": "user", "content": "Hallo"}]
    sampling = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=8)
    prompt = session.render_prompt(tok, messages)
    jobs = lambda: [engine.Job(prompt, sampling, stop_ids=chat.chat_stop_ids, messages=messages, deliver=lambda event: None)]
    for eng in (engine.Engine(chat, 4), engine.BatchEngine(chat.model, tok, chat.context_len, 2, 4)):
        [job] = jobs()
        [reply] = run_jobs(eng, [job])
        assert job.reply is reply, eng  # the job holds its answer too, though no piece of text ever came
        assert (reply.text, reply.ids, reply.finish_reason, reply.stop_sequence) == ("", [], "stop", None), eng
        assert engine.completion_tokens(reply) == eng.counts["completion_tokens"] == 1  # usage and /health alike


def test_a_cancelled_answer_stops_before_its_next_token_in_both_engines(tmp_path, small_tokenizer):
    """A client that leaves (Queue.cancel) while its answer runs: each engine stops it before the next token, ends
    it "interrupted" and counts it as cancelled, with the one token it generated (the model moves on at once)."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="base", sequence_len=128)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    sampling = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=50)
    for eng in (engine.Engine(chat, 4), engine.BatchEngine(chat.model, tok, chat.context_len, 2, 4)):
        eng.on_piece = eng.cancel  # the client leaves when its first piece is on its way
        job = engine.Job([tok.bos_id] + tok.encode("Die Sonne scheint"), sampling, stop_ids={tok.bos_id},
                         text="Die Sonne scheint", deliver=lambda event: None)
        [reply] = run_jobs(eng, [job])
        assert reply.finish_reason == "interrupted" and len(reply.ids) == 1, (eng, reply)
        assert (eng.counts["cancelled"], eng.counts["completed"], eng.counts["completion_tokens"]) == (1, 0, 1), eng


def test_an_answer_cut_inside_a_character_ends_with_its_replacement_in_both_engines(tmp_path, small_tokenizer,
                                                                                   monkeypatch):
    """max_tokens ends an answer after half of a character's UTF-8 bytes: the stream decoder held them back, and the
    answer's end shows them as U+FFFD, as tok.decode does, in both engines (they were never dropped)."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="chat", sequence_len=128)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    byte_token = {b[0]: i for i, b in enumerate(tok.id_to_bytes) if len(b) == 1}
    script = [byte_token[b] for b in "Brezel ".encode() + "🥨".encode()[:2]]
    messages = [{"role": "user", "content": "Hallo"}]
    sampling = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=len(script))
    for eng in (engine.Engine(chat, 4), engine.BatchEngine(chat.model, tok, chat.context_len, 2, 4)):
        tokens = iter(script)
        monkeypatch.setattr(gpt, "sample_next_token", lambda logits, *a, **k: torch.tensor([[next(tokens)]]))
        job = engine.Job(session.render_prompt(tok, messages), sampling, stop_ids=chat.chat_stop_ids,
                         messages=messages, deliver=lambda event: None)
        [reply] = run_jobs(eng, [job])
        assert reply.ids == script and reply.finish_reason == "length", eng
        assert reply.text == tok.decode(script) == "Brezel \ufffd", (eng, reply.text)


def test_a_clients_next_turn_reuses_its_longest_cached_row_answer_included(tmp_path, small_tokenizer):
    """The batched engine's prefix cache: a client (cache_key) with several free rows of its own takes the one that
    shares the longest prefix with its prompt, and a row holds its answer's tokens too (all but the last, which was
    never fed): a next turn that starts with an earlier prompt and its answer computes only what is new."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="base", sequence_len=256)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    eng = engine.BatchEngine(chat.model, tok, chat.context_len, 3, 4)
    sampling = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=6)
    job = lambda prompt: engine.Job(prompt, sampling, cache_key=("key", "me"), stop_ids={tok.bos_id}, text="",
                                    deliver=lambda event: None)
    prompts = [[tok.bos_id] + tok.encode(text) for text in ("Die Sonne scheint", "Im Wattenmeer leben")]
    answers = run_jobs(eng, [job(p) for p in prompts], together=True)  # two rows of this client's
    assert [reply.cached_tokens for reply in answers] == [0, 0]
    for prompt, reply in (*zip(prompts, answers), *zip(prompts[::-1], answers[::-1])):
        turn = prompt + reply.ids + tok.encode(" und dann")
        [again] = run_jobs(eng, [job(turn)])
        assert again.cached_tokens == len(prompt) + len(reply.ids) - 1, (prompt, again)
        prompt[:], reply.ids[:] = turn, again.ids  # that row holds this turn now


def test_a_job_sent_to_the_engine_process_keeps_everything_that_shapes_its_answer():
    """engine_process.py sends a job as Job.spec() through a pipe and rebuilds it there with Job(**spec): every
    argument a Job takes (its stop ids, seed, cache key, deadline, ...; not where its events go) arrives as it was,
    else the engine process answers another request (without its stop ids, <|assistant_end|> ended no answer)."""
    import inspect
    import pickle
    job = engine.Job([1, 2, 3], session.Sampling(temperature=0.5, max_new_tokens=9, stop=("x",)), seed=5,
                     cache_key=("key", "k"), deadline=123.0, stop_ids={7, 8}, dropped=2,
                     messages=[{"role": "user", "content": "Hallo"}], text=None, submitted=4.5, deliver=lambda e: None)
    again = engine.Job(**pickle.loads(pickle.dumps(job.spec())), deliver=lambda e: None)
    names = [name for name in inspect.signature(engine.Job).parameters if name != "deliver"]
    assert {name: getattr(again, name) for name in names} == {name: getattr(job, name) for name in names}


def test_an_answer_past_its_deadline_stops_before_its_next_token_in_both_engines(tmp_path, small_tokenizer):
    """--request-timeout: an answer whose deadline passes while it runs is stopped by the engine before its next
    token (serve.py answers the client at the deadline itself and leaves the job to the engine), told with a
    RequestTimeout and counted as a timeout, its one generated token counted too."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="base", sequence_len=128)
    chat = session.load_session(str(checkpoint), "cpu", session.Sampling(temperature=0.0, top_k=None))
    tok = small_tokenizer
    sampling = session.Sampling(temperature=0.0, top_k=None, max_new_tokens=50)
    for eng in (engine.Engine(chat, 4), engine.BatchEngine(chat.model, tok, chat.context_len, 2, 4)):
        eng.on_piece = lambda job: setattr(job, "deadline", 0.0)  # the time runs out as its first piece is ready
        job = engine.Job([tok.bos_id] + tok.encode("Die Sonne scheint"), sampling, stop_ids={tok.bos_id},
                         text="Die Sonne scheint", deliver=lambda event: None)
        [error] = run_jobs(eng, [job], ending="error")
        assert isinstance(error, engine.RequestTimeout) and len(job.reply.ids) == 1, (eng, error)
        assert (eng.counts["timeouts"], eng.counts["completed"], eng.counts["completion_tokens"]) == (1, 0, 1), eng
