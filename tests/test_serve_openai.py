"""OpenAI's API beyond one answer to one question, through serve.py on loopback (the servers and helpers of
tests/test_serve.py): stop sequences, n answers, lists of prompts, lm-eval's API model, the official openai
client, retrieving the model, and prompts that do not fit the context."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install -e '.[web]'")

from conftest import stop_from_the_middle
from test_serve import (LONG, MAX_BATCH, QUESTIONS, Stream, chat_body, get, health_when, post, read_stream, request,
                        user, wait_idle)
from test_serve import base_server, server  # noqa: F401 (this module's own servers, as test_serve.py starts them)


def test_stop_sequences(server, base_server):
    """OpenAI's stop, a string or a list: the answer ends before the first stop sequence in it, streamed or
    not, with finish_reason "stop"; usage counts every token sampled. Both endpoints, both engines."""
    for url, path, body, text in [
            (server, "/v1/chat/completions", chat_body(QUESTIONS[1], max_tokens=30),
             lambda a: a["choices"][0]["message"]["content"]),
            (base_server, "/v1/completions", {"prompt": "Die Hauptstadt von Deutschland ist", "temperature": 0,
                                              "max_tokens": 30}, lambda a: a["choices"][0]["text"])]:
        free = post(url, path, body)[1]
        assert len(text(free)) >= 4, free
        stop = stop_from_the_middle(text(free))
        for stops in (stop, ["§§§", stop], [f"§{i}§" for i in range(5)] + [stop]):  # 6: more than OpenAI's 4
            status, stopped = post(url, path, {**body, "stop": stops})
            assert status == 200, stopped
            assert text(stopped) == text(free)[:text(free).index(stop)]
            assert stopped["choices"][0]["finish_reason"] == "stop"
            assert 0 < stopped["usage"]["completion_tokens"] <= free["usage"]["completion_tokens"]
            events = read_stream(url, {**body, "stop": stops, "stream_options": {"include_usage": True}}, path=path)
            assert events[-3]["choices"][0]["finish_reason"] == "stop" and events[-2]["usage"] == stopped["usage"]
            pieces = [e["choices"][0]["delta"].get("content", "") if "delta" in e["choices"][0] else e["choices"][0]["text"]
                      for e in events[:-2]]
            assert "".join(pieces) == text(stopped)
        assert text(post(url, path, {**body, "stop": "§§§"})[1]) == text(free)


LM_EVAL_TASK = """\
task: nanoschnack_answers
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: 30
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow  # about 15 s, most of it importing lm-eval in a fresh process
def test_lm_eval_generates_through_the_api(server, tmp_path):
    """lm-evaluation-harness's local-chat-completions model, as a user points it at serve.py: a generate_until
    task, whose `until` lm-eval sends as stop sequences. Its answers are the server's own with that stop."""
    questions = QUESTIONS[:3]
    free = [post(server, "/v1/chat/completions", chat_body(q, max_tokens=30))[1]["choices"][0]["message"]["content"]
            for q in questions]
    assert len(free[0]) >= 4, free
    until = [stop_from_the_middle(free[0]), "§§§"]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": q, "answer": "Berlin"}) + "\n" for q in questions))
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "nanoschnack_answers.yaml").write_text(
        LM_EVAL_TASK.format(file=tmp_path / "qa.jsonl", until=json.dumps(until)))
    run = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-chat-completions", "--model_args",
                          f"model=nanoschnack,base_url={server}/v1/chat/completions,num_concurrent=1,max_retries=1",
                          "--apply_chat_template", "--tasks", "nanoschnack_answers",
                          "--include_path", str(tmp_path / "task"), "--output_path", str(tmp_path / "out"),
                          "--log_samples"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    theirs = {json.loads(s["arguments"]["gen_args_0"]["arg_0"][0])[-1]["content"]: s["resps"][0][0] for s in samples}
    ours = {q: post(server, "/v1/chat/completions", chat_body(q, max_tokens=30, stop=until))[1]["choices"][0]
            ["message"]["content"] for q in questions}
    assert theirs == ours
    assert ours[questions[0]] == free[0][:free[0].index(until[0])]  # cut at the stop sequence


def test_n_answers_to_one_prompt(server, base_server):
    """OpenAI's n: n choices, indexed 0 to n-1, generated side by side. A seeded request gives n different
    answers, the first the one n=1 gives with that seed, the same each time; the prompt counts once in usage.
    Streamed, each answer's pieces carry its index and join to its text; each gets a finish chunk."""
    body = chat_body(QUESTIONS[3], max_tokens=20, temperature=1.0, seed=11)
    one = post(server, "/v1/chat/completions", body)[1]
    status, two = post(server, "/v1/chat/completions", {**body, "n": 2})
    assert status == 200, two
    texts = [c["message"]["content"] for c in two["choices"]]
    assert [c["index"] for c in two["choices"]] == [0, 1] and texts[0] == one["choices"][0]["message"]["content"]
    assert texts[0] != texts[1] and post(server, "/v1/chat/completions", {**body, "n": 2})[1]["choices"] == two["choices"]
    second = post(server, "/v1/chat/completions", {**body, "seed": 12})[1]  # answer i has seed + i
    assert texts[1] == second["choices"][0]["message"]["content"]
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert two["usage"]["completion_tokens"] == one["usage"]["completion_tokens"] + second["usage"]["completion_tokens"]
    events = read_stream(server, {**body, "n": 2, "stream_options": {"include_usage": True}})
    chunks = events[:-2]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    for i, text in enumerate(texts):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == text
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [two["choices"][i]["finish_reason"]]
    assert events[-2]["usage"] == two["usage"] and events[-1] == "[DONE]"
    greedy = post(server, "/v1/chat/completions", chat_body(QUESTIONS[3], max_tokens=20, n=2))[1]
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]
    status, refused = post(base_server, "/v1/completions", {"prompt": "Die Sonne", "n": 2})
    assert status == 400 and "more than this server generates at once (--max-batch 1)" in refused["error"]["message"]


def test_openai_client(server):
    openai = pytest.importorskip("openai", reason="the official openai client is not installed")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["nanoschnack"]
    messages = [{"role": "system", "content": "Du antwortest kurz."}, {"role": "user", "content": QUESTIONS[1]}]
    whole = client.chat.completions.create(model="nanoschnack", messages=messages, temperature=0, max_tokens=20)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens > 0
    pieces = [chunk.choices[0].delta.content or "" for chunk in
              client.chat.completions.create(model="gpt-4o", messages=messages, temperature=0, max_tokens=20,
                                             stream=True) if chunk.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="nanoschnack", messages=messages, temperature=2.5)
    assert client.models.retrieve("nanoschnack").id == "nanoschnack"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.BadRequestError) as e:  # what a client catches to shorten its conversation
        client.chat.completions.create(model="nanoschnack", messages=[{"role": "user", "content": "€" * 1999}],
                                       max_tokens=LONG)
    assert e.value.code == "context_length_exceeded"


def test_a_batch_of_prompts(server):
    """OpenAI's prompt as a list (lm-eval's completions model sends its batches so): each prompt's answers in
    turn, indexed in that order, each the answer that prompt gets alone; the prompts' tokens add up in usage."""
    texts = ["Die Hauptstadt von Deutschland ist", "Im Wattenmeer leben"]
    body = {"temperature": 0, "max_tokens": 12}
    alone = [post(server, "/v1/completions", {**body, "prompt": text})[1] for text in texts]
    status, batch = post(server, "/v1/completions", {**body, "prompt": texts})
    assert status == 200, batch
    assert [(c["index"], c["text"]) for c in batch["choices"]] == [(i, a["choices"][0]["text"]) for i, a in enumerate(alone)]
    assert batch["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert batch["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    events = read_stream(server, {**body, "prompt": texts}, path="/v1/completions")
    for i, a in enumerate(alone):
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i) == a["choices"][0]["text"]
    status, refused = post(server, "/v1/completions", {**body, "prompt": texts, "n": 2})
    assert status == 400 and "2 prompts with n = 2 ask for 4 answers" in refused["error"]["message"]
    status, refused = post(server, "/v1/completions", {**body, "prompt": [[1, 2, 3]]})
    assert status == 422 and "token ids are not supported" in refused["error"]["message"]


def test_client_leaving_stops_all_n_answers(server):
    """A client that hangs up on a request for n answers frees all n rows: both jobs are cancelled."""
    before = wait_idle(server)
    stream = Stream(server, chat_body(QUESTIONS[0], max_tokens=LONG, n=MAX_BATCH))
    assert stream.first_content()
    health_when(server, lambda h: h["running"] == MAX_BATCH, "both answers running")
    stream.close()
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + MAX_BATCH and after["requests"] == before["requests"] + MAX_BATCH
    assert after["completion_tokens"] - before["completion_tokens"] < MAX_BATCH * LONG


def test_retrieve_the_model_and_head_requests(server):
    """OpenAI's GET /v1/models/{model} (client.models.retrieve), a 404 for another name; HEAD on the health
    check and the page, as load balancers and uptime checks send it."""
    status, model = get(server, "/v1/models/nanoschnack")
    assert status == 200 and model == get(server, "/v1/models")[1]["data"][0]
    status, missing = get(server, "/v1/models/gpt-4o")
    assert status == 404 and missing["error"]["code"] == "model_not_found" and "'nanoschnack'" in missing["error"]["message"]
    for path in ("/health", "/"):
        status, head, body = request(server, "HEAD", path)
        assert status == 200 and body == "" and head["Content-Type"].startswith(
            "application/json" if path == "/health" else "text/html")


def test_a_completion_prompt_that_does_not_fit_is_refused_not_cut(server, base_server, small_tokenizer):
    """The base server's context is 256 tokens; an answer gets min(max_tokens, 128) of it. A prompt that
    leaves it less is a 400 context_length_exceeded (as OpenAI's), never answered with its beginning cut off."""
    text = "Das Haus ist groß. "
    while len(small_tokenizer.encode(text)) < 130:
        text += "Das Haus ist groß. "
    prompt_tokens = 1 + len(small_tokenizer.encode(text))  # <|bos|> + the text
    assert prompt_tokens <= 240
    status, answer = post(base_server, "/v1/completions", {"prompt": text, "max_tokens": 16, "temperature": 0})
    assert status == 200 and answer["usage"]["prompt_tokens"] == prompt_tokens, answer
    status, refused = post(base_server, "/v1/completions", {"prompt": text, "temperature": 0})  # max_tokens 1024
    assert status == 400 and refused["error"]["code"] == "context_length_exceeded", refused
    assert refused["error"]["param"] == "prompt" and f"its prompt has {prompt_tokens} tokens" in refused["error"]["message"]
    status, refused = post(server, "/v1/completions", {"prompt": ["Kurz", "€" * 1999], "max_tokens": 1024})
    assert status == 400 and refused["error"]["code"] == "context_length_exceeded"  # one prompt of a list


def test_dropped_messages_are_counted_in_a_header(server):
    """A conversation too long for the context loses its oldest exchanges (as in chat.py); the response says
    how many messages it left out, whole or streamed."""
    messages = [*user("€" * 1900), {"role": "assistant", "content": "€" * 1900}, *user("Hallo")]
    body = {"messages": messages, "temperature": 0, "max_tokens": 8}
    status, head, whole = request(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and head["X-Dropped-Messages"] == "2", whole
    assert whole["choices"] == post(server, "/v1/chat/completions", {**body, "messages": user("Hallo")})[1]["choices"]
    status, head, _ = request(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and head["X-Dropped-Messages"] == "2"
    status, head, _ = request(server, "POST", "/v1/chat/completions", {**body, "messages": user("Hallo")})
    assert status == 200 and head["X-Dropped-Messages"] is None


def test_the_servers_system_message_only_where_a_request_brings_none():
    """--system is for requests without a system message; one that brings its own keeps it (and gets no second)."""
    import openai_api
    limits, system = openai_api.Limits(), "Sei kurz."
    mine = [{"role": "system", "content": "Antworte auf Englisch."}, *user("Hallo")]
    assert openai_api.read_messages({"messages": mine}, limits, system) == mine
    assert openai_api.read_messages({"messages": user("Hallo")}, limits, system) == [
        {"role": "system", "content": system}, *user("Hallo")]


def test_a_system_message_too_long_for_the_context_is_refused_at_start(tmp_path, small_tokenizer, monkeypatch):
    """serve.py --system that leaves a conversation less than half the prompt's room is refused when it starts, as
    chat.py's (before the engine process loads the weights); it used to start and then refuse every request
    without a system message of its own, blaming the user's "Hallo". A request whose own system message leaves
    no room is told so in its 400 (check_fits' message)."""
    import serve
    from conftest import make_checkpoint
    from session import PromptTooLong, fit_to_context
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="chat", sequence_len=256)
    system = "Du bist ein freundlicher, hilfsbereiter Assistent und antwortest immer ausführlich. " * 8
    def start_serving(*args):
        raise AssertionError("serve.py went on to start its engine process")
    monkeypatch.setattr(serve, "EngineProcess", start_serving)
    with pytest.raises(SystemExit, match="error: --system: the system message is too long: .* lower --max-tokens"):
        serve.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--system", system])
    for messages, named in (([{"role": "system", "content": system}, *user("Hallo")], "last message with the system message"),
                            (user(system), "message")):
        with pytest.raises(PromptTooLong, match=f"^the {named} is too long: its prompt has"):
            fit_to_context(small_tokenizer, messages, 100)


def test_a_request_keeps_the_servers_other_sampling_settings():
    """serve.py --temperature 0 --top-p 0.9: a request that names only its temperature samples with top_p 0.9
    (the greedy defaults once forgot their top_p); top_p 0 is greedy."""
    import openai_api
    from session import Sampling
    limits, defaults = openai_api.Limits(), Sampling(temperature=0.0, top_k=None, top_p=0.9)
    sampling, _ = openai_api.read_sampling({"temperature": 0.8}, defaults, limits)
    assert sampling.sampler() == (0.8, None, 0.9)
    sampling, _ = openai_api.read_sampling({"temperature": 0.8, "top_p": 0}, defaults, limits)
    assert sampling.greedy


def test_top_k_minus_one_is_off_as_in_vllm():
    """vLLM's top_k -1 (its default, which clients written for vLLM send) means off, as 0 does; it was a 400.
    Both override the server's own top_k."""
    import openai_api
    from session import Sampling
    limits, defaults = openai_api.Limits(), Sampling(temperature=1.0, top_k=50)
    for off in (-1, 0):
        assert openai_api.read_sampling({"top_k": off}, defaults, limits)[0].sampler() == (1.0, None, None)
    assert openai_api.read_sampling({}, defaults, limits)[0].sampler() == (1.0, 50, None)


def test_an_empty_answer_can_come_back_in_the_next_turn(server, small_tokenizer):
    """The server answers "" when a stop sequence matches at once. An OpenAI chat loop sends that answer back with
    the next turn (OpenAI and vLLM take it); it was a 400 invalid_conversation on every later turn. An empty answer
    renders as <|assistant_start|><|assistant_end|>, a whitespace-only one as sent; training data stays strict."""
    import types
    import openai_api
    from session import Sampling
    from tok import ConversationError, check_conversation
    body = chat_body(QUESTIONS[1], max_tokens=30)
    free = post(server, "/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]
    assert free, "the model said nothing: no stop sequence can match at once"
    status, stopped = post(server, "/v1/chat/completions", {**body, "stop": free[0]})
    empty = stopped["choices"][0]["message"]
    assert status == 200 and empty == {"role": "assistant", "content": ""}, stopped
    tok, s = small_tokenizer, small_tokenizer.special
    session = types.SimpleNamespace(tokenizer=tok, context_len=2048)  # all check_fits reads of a session
    for answer in (empty, {"role": "assistant", "content": "\n"}, {"role": "assistant", "content": " "}):
        messages = [*user(QUESTIONS[1]), answer, *user(QUESTIONS[2])]
        expected = [tok.bos_id, s["<|user_start|>"], *tok.encode(QUESTIONS[1]), s["<|user_end|>"],
                    s["<|assistant_start|>"], *tok.encode(answer["content"]), s["<|assistant_end|>"],
                    s["<|user_start|>"], *tok.encode(QUESTIONS[2]), s["<|user_end|>"], s["<|assistant_start|>"]]
        status, head, reply = request(server, "POST", "/v1/chat/completions",
                                      {"messages": messages, "temperature": 0, "max_tokens": 8})
        assert status == 200, (answer, reply)
        assert reply["usage"]["prompt_tokens"] == len(expected) and head["X-Dropped-Messages"] is None
        # the prompt serve.py gives the engine for this conversation, id by id
        checked = openai_api.read_messages({"messages": messages}, openai_api.Limits(), None)
        assert openai_api.check_fits(session, checked, Sampling(max_new_tokens=8)) == (messages, expected)
        with pytest.raises(ConversationError, match=r"message 1 \(assistant\) has empty content"):
            check_conversation(messages[:2])  # the same exchange as data to train on


def test_the_http_side_fits_prompts_by_the_engines_rule_to_the_token(tmp_path, small_tokenizer):
    """serve.py's HTTP side (a session on the meta device, as serve.py has it) decides what the engine's ChatSession
    would: an answer's share of the context is min(max_tokens, half the context), so a max_tokens past the context
    still leaves prompts half of it. A conversation whose prompt is exactly the room is kept whole, one token less
    room drops its oldest exchange; a completion prompt of exactly the room is answered, one token more is a 400."""
    import openai_api
    from conftest import make_checkpoint
    from session import Sampling, load_session
    from tok import render_prompt
    meta = load_session(str(make_checkpoint(tmp_path, small_tokenizer, kind="base", sequence_len=256)), "meta")
    tok = small_tokenizer
    messages = [*user(QUESTIONS[0]), {"role": "assistant", "content": "Gut, danke."}, *user(QUESTIONS[1])]
    n = len(render_prompt(tok, messages))
    for context_len, max_tokens, kept in ((2 * n, 10 * n, messages), (2 * n - 2, 10 * n, messages[2:]),
                                          (n + 5, 5, messages), (n + 4, 5, messages[2:])):
        meta.context_len = context_len  # room for the prompt: n, n - 1, n, n - 1
        assert openai_api.check_fits(meta, messages, Sampling(max_new_tokens=max_tokens)) == (
            kept, render_prompt(tok, kept)), (context_len, max_tokens)
    text = QUESTIONS[2]
    m = 1 + len(tok.encode(text))  # <|bos|> + the text
    for context_len, fits in ((2 * m, True), (2 * m - 2, False)):
        meta.context_len = context_len
        if fits:
            assert openai_api.check_prompt_fits(meta, text, Sampling(max_new_tokens=10 * m)) == [tok.bos_id, *tok.encode(text)]
        else:
            with pytest.raises(openai_api.APIError) as e:
                openai_api.check_prompt_fits(meta, text, Sampling(max_new_tokens=10 * m))
            assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_error_types_follow_openais_by_status():
    """OpenAI's error type: rate_limit_error for a 429, server_error for a 5xx (a timeout, the engine gone, a bug),
    invalid_request_error for the other 4xx; the body has exactly OpenAI's four fields."""
    import openai_api
    types = {status: openai_api.APIError(status, "x", code="c").body()["error"]["type"] for status in (400, 413, 422, 429,
                                                                                                     500, 503, 504)}
    assert types == {400: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                     429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "server_error"}
    assert openai_api.APIError(400, "m", param="p", code="c").body() == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": "c"}}


def test_every_request_limit_takes_its_value_and_refuses_one_more():
    """Each of --max-messages, --max-message-chars, --max-total-chars (messages and prompts), --max-tokens and
    --max-batch (n) is the largest value answered: at the limit a request is taken, one over it is a 4xx naming it."""
    import openai_api
    from session import Sampling
    limits = openai_api.Limits(max_messages=3, max_message_chars=5, max_total_chars=12, max_tokens=7, max_batch=2)
    at = [{"role": "user", "content": "abcde"}, {"role": "assistant", "content": "fg"}, {"role": "user", "content": "hijkl"}]
    assert openai_api.read_messages({"messages": at}, limits, None) == at
    over = [([*at[:2], {"role": "user", "content": "hijklm"}], 413, "message_too_long"),
            ([{**at[0], "content": "abcd"}, {**at[1], "content": "fgh"}, {**at[2], "content": "hijkl"}, *at[1:]], 413,
             "too_many_messages"),
            ([*at[:1], {**at[1], "content": "fgh"}, *at[2:]], 413, "conversation_too_long")]
    for messages, status, code in over:
        with pytest.raises(openai_api.APIError) as e:
            openai_api.read_messages({"messages": messages}, limits, None)
        assert (e.value.status, e.value.code) == (status, code), messages
    assert openai_api.read_prompts({"prompt": ["abcde", "fghijkl"]}, limits) == ["abcde", "fghijkl"]
    with pytest.raises(openai_api.APIError, match="at most 12"):
        openai_api.read_prompts({"prompt": ["abcde", "fghijklm"]}, limits)
    for name in ("max_tokens", "max_completion_tokens"):
        assert openai_api.read_sampling({name: 7}, Sampling(), limits)[0].max_new_tokens == 7
        with pytest.raises(openai_api.APIError, match=f"{name} is 8, this server's limit is 7"):
            openai_api.read_sampling({name: 8}, Sampling(), limits)
    assert openai_api.read_sampling({}, Sampling(), limits)[0].max_new_tokens == 7  # none named: the limit
    assert openai_api.read_n({"n": 2}, limits) == 2 and openai_api.read_n({"n": 1}, limits, prompts=2) == 1
    for data, prompts in (({"n": 3}, 1), ({"n": 2}, 2)):
        with pytest.raises(openai_api.APIError, match="--max-batch 2"):
            openai_api.read_n(data, limits, prompts)


def test_whose_cache_a_request_may_reuse():
    """prompt_cache_key names whose KV cache a request may reuse; without one, nobody's (None: the engines clear it),
    or with --shared-cache everybody's that sent none: one key, the same for all of them."""
    import openai_api
    assert openai_api.read_cache_key({}, shared=False) is None
    everybody = openai_api.read_cache_key({}, shared=True)
    assert everybody is not None and everybody == openai_api.read_cache_key({"prompt_cache_key": None}, True)
    assert everybody != openai_api.read_cache_key({"prompt_cache_key": "shared"}, True)  # no client's key is it
    for shared in (False, True):
        assert openai_api.read_cache_key({"prompt_cache_key": "a" * 256}, shared) == ("key", "a" * 256)
        assert openai_api.read_cache_key({"prompt_cache_key": "a"}, shared) != openai_api.read_cache_key(
            {"prompt_cache_key": "b"}, shared)
    for bad in ("", "a" * 257, 7):
        with pytest.raises(openai_api.APIError, match="prompt_cache_key must be a string of 1 to 256 characters"):
            openai_api.read_cache_key({"prompt_cache_key": bad}, False)
