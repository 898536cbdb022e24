"""serve.py: the OpenAI-compatible API against a real uvicorn on 127.0.0.1, with the real openai client.

A tiny model (2 layers, a one-byte-per-token vocabulary, a 64-token context so long replies slide, and never
<|endoftext|>, so a long reply runs as long as a test needs) serves at a free port in this process; the
command line is tested in a subprocess (Ctrl-C and SIGTERM exit 0).
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import tiktoken
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gptmini import GPT, GPTConfig
from gptmini.common import GptMiniError
from gptmini.data.chat_template import TEMPLATES, render, to_entry
from gptmini.data.tokenizer import EOT, tokenizer_to_spec
from gptmini.generation.text import GenerateTextConfig, generate_text
from gptmini.serve.config import ServeConfig, register_config
from gptmini.serve.protocol import parse_chat
from gptmini.serve.run import BackgroundServer, bind, load_site, serve
from gptmini.weights import save_model_checkpoint

BLOCK = 64


def byte_encoding() -> tiktoken.Encoding:
    """One token per byte, plus <|endoftext|>."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(
        name="bytes-test", pat_str=r"""\S+|\s+""", mergeable_ranks=ranks, special_tokens={EOT: 256}
    )


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return byte_encoding()


def tiny_checkpoint(path: Path, enc: tiktoken.Encoding) -> Path:
    """A random 2-layer model that never chooses <|endoftext|>: the final norm's bias is all ones and the
    (tied) <|endoftext|> vector all minus ones, so its logit is -n_embd (-32) while the others stay near 0."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.ln_f.bias.fill_(1.0)
        model.wte.weight[enc.eot_token] = -1.0
    return save_model_checkpoint(path, model, tokenizer_to_spec(enc))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, enc) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", enc)


@contextmanager
def running_server(ckpt, **options):
    """A real uvicorn serving ``ckpt`` on 127.0.0.1 at a free port, stopped the graceful way at the end."""
    settings = dict(ckpt=str(ckpt), port=0, device="cpu", threads=1, max_batch=4, max_tokens_cap=5000)
    cfg = ServeConfig(**{**settings, **options})
    server = BackgroundServer(load_site(cfg, torch.device("cpu")), bind("127.0.0.1", 0))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.join(10)


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(ckpt, max_queue=16, default_max_tokens=24) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(client, prompt="Hello", **options) -> openai.types.Completion:
    return client.completions.create(model="tiny", prompt=prompt, **{"max_tokens": 80, **options})


def streamed(client, chat: bool, **options) -> tuple[str, list]:
    """The text and the chunks of a streamed request."""
    create = client.chat.completions.create if chat else client.completions.create
    chunks = list(create(model="tiny", stream=True, **options))
    pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks if c.choices]
    return "".join(pieces), chunks


def wait_until(condition, seconds: float = 20.0) -> bool:
    """Poll ``condition`` (no timing is asserted: only that it becomes true at all)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---------------------------------------------------------------------------------------------------------
# The API with the openai client
# ---------------------------------------------------------------------------------------------------------


def test_models_list_names_the_checkpoint(client, ckpt, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.site.model_id]
    assert Path(models[0].id).name == ckpt.name


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.0),
        dict(temperature=1.0, seed=7),
        dict(temperature=0.9, seed=3, top_k=20, top_p=0.9, repetition_penalty=1.3),
    ],
    ids=["greedy", "seeded", "filters"],
)
def test_completion_equals_generate_py_with_the_same_settings(client, ckpt, settings, capsys):
    """80 tokens after a 5-token prompt cross the 64-token context, so the slide is compared too."""
    extra = {k: settings[k] for k in ("top_k", "repetition_penalty") if k in settings}
    options = {k: v for k, v in settings.items() if k not in extra}
    reply = complete(client, **options, extra_body=extra)
    cfg = GenerateTextConfig(
        ckpt=str(ckpt), prompt="Hello", max_new_tokens=80, device="cpu", threads=1, stream=False, **settings
    )
    assert reply.choices[0].text == generate_text(cfg)[0]
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.prompt_tokens == 5 and reply.usage.total_tokens == 5 + reply.usage.completion_tokens


def test_same_seed_same_text_and_another_seed_another(client):
    def text(seed):
        return complete(client, temperature=1.0, seed=seed).choices[0].text

    assert text(11) == text(11)
    assert text(11) != text(12)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_streaming_gives_the_same_text_and_ends_with_finish_reason_and_usage(client, chat):
    options = dict(max_tokens=30, temperature=0.0)
    options.update({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"})
    text, chunks = streamed(client, chat, **options)
    create = client.chat.completions.create if chat else client.completions.create
    whole = create(model="tiny", **options)
    expected = whole.choices[0].message.content if chat else whole.choices[0].text
    assert text == expected
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert last.usage.completion_tokens == whole.usage.completion_tokens == 30
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    if chat:
        assert chunks[0].choices[0].delta.role == "assistant"


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {
        "prompt": "Hi",
        "max_completion_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [e for e in reply.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    usage_only = json.loads(events[-2][6:])
    assert usage_only["choices"] == [] and usage_only["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_string_is_cut_and_never_sent(client, stream):
    full = complete(client, temperature=0.0, max_tokens=30).choices[0].text
    stop = full[10:13]  # a stop in the middle of the greedy text
    options = dict(prompt="Hello", max_tokens=30, temperature=0.0, stop=["never there", stop])
    if stream:
        text, chunks = streamed(client, False, **options)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = client.completions.create(model="tiny", **options)
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
    assert text == full[: full.index(stop)]
    assert finish == "stop"


def test_chat_uses_the_default_template_and_stops_at_the_next_user_turn(client, enc):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|endoftext|>"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, temperature=0.0)
    turns = [(m["role"], m["content"]) for m in messages]
    ids = render(TEMPLATES["chat"], turns, enc, add_generation_prompt=True).ids
    assert enc.decode(ids) == f"{EOT}System:\nBe brief.\n\nUser:\nHi {EOT}\n\nAssistant:\n"
    assert reply.usage.prompt_tokens == len(ids)
    assert ids.count(enc.eot_token) == 1  # the template's opening; the user's "<|endoftext|>" is text
    plain = complete(client, prompt=ids, max_tokens=60, temperature=0.0).choices[0].text
    assert reply.choices[0].message.content == plain.split("\nUser:\n")[0]


def with_template(path: Path, entry) -> Path:
    """The checkpoint at ``path`` with ``entry`` as its gptmini entry's chat_template (as training writes)."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["gptmini"]["chat_template"] = entry
    torch.save(checkpoint, path)
    return path


def test_the_checkpoints_template_is_served_a_foreign_one_refused_and_none_noted(tmp_path, enc, capsys):
    def site_of(entry):
        path = tiny_checkpoint(tmp_path / "t.ckpt", enc)
        if entry is not None:
            with_template(path, entry)
        cfg = ServeConfig(ckpt=str(path), port=0, device="cpu", threads=1)
        site = load_site(cfg, torch.device("cpu"))
        site.engine.shutdown()
        return site

    alpaca = TEMPLATES["alpaca"]
    limits = site_of(to_entry(alpaca)).limits
    assert limits.template == alpaca
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}]
    request = parse_chat({"messages": messages}, limits)
    expected = f"{EOT}S\n\n### Instruction:\n2+2?\n\n### Response:\n"
    assert enc.decode(request.prompt_ids) == expected
    assert request.stop == ["\n\n### Instruction:"]  # the template's stop string, added to the request's
    assert "note:" not in capsys.readouterr().err

    assert site_of(None).limits.template == TEMPLATES["chat"]
    note = "note: this checkpoint was not trained on a chat template; using the 'chat' template."
    assert capsys.readouterr().err.count(note) == 1

    with pytest.raises(GptMiniError, match="keys \\['jinja'\\] this gptmini does not know"):
        site_of({**to_entry(alpaca), "jinja": "{{ messages }}"})
    with pytest.raises(GptMiniError, match="chat_template is not one this gptmini reads .*upgrade gptmini"):
        site_of({"format": 2, "user": "{content}"})


def test_a_cache_row_prefills_exactly_like_a_fresh_one_row_cache_and_touches_only_its_row():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 300, (1, 7))
    with torch.inference_mode():
        alone = model.next_token_logits(prompt, kv_cache=model.new_kv_cache(1))
        slots = model.new_kv_cache(4)
        before = [k.clone() for k in slots.keys]
        row = slots.row(2)
        assert torch.equal(model.next_token_logits(prompt, kv_cache=row), alone)
    assert row.length == 7 and slots.length == 0
    for keys, old in zip(slots.keys, before, strict=True):
        assert torch.equal(keys[[0, 1, 3]], old[[0, 1, 3]]) and not torch.equal(keys[2], old[2])
    with pytest.raises(IndexError, match="row 4 is outside the cache's 4 rows"):
        slots.row(4)


# ---------------------------------------------------------------------------------------------------------
# Bad requests: OpenAI's error object, naming the field
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "x", "temperature": "hot"}, "temperature", "'temperature' must be a number"),
        ({"prompt": "x", "temperature": -1}, "temperature", "'temperature' must be >= 0"),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens", "'max_tokens' must be at least 1"),
        ({"prompt": "x", "max_tokens": 6000}, "max_tokens", "above this server's cap of 5000"),
        ({"prompt": "x", "n": 2}, "n", "'n' must be 1"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "x", "top_p": 0}, "top_p", "'top_p' must be > 0"),
        ({"prompt": "x", "seed": -1}, "seed", "'seed' must be in 0.."),
        ({"prompt": "x", "stream": "yes"}, "stream", "'stream' must be true or false"),
        ({"prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        (
            {"prompt": "x" * (BLOCK + 8)},
            "prompt",
            f"the prompt is {BLOCK + 8} tokens, longer than this model's context of {BLOCK}",
        ),
    ],
)
def test_bad_completion_fields_are_400_naming_the_field(server, body, param, message):
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"]


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        ([{"role": "wizard", "content": "hi"}], "messages[0].role", "use system, user or assistant"),
        ([{"role": "user", "content": 5}], "messages[0].content", "must be a string"),
        (
            [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}],
            "messages[1]",
            "message 1 is a system message; only the first may be one.",
        ),
        ([], "messages", "non-empty list"),
        ([{"role": "user", "content": "y" * 100}], "messages", "longer than this model's context"),
    ],
)
def test_bad_chat_messages_are_400_naming_the_field(server, messages, param, message):
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages}, timeout=30)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param and message in reply.json()["error"]["message"]


def test_malformed_json_oversize_body_and_unknown_route(server):
    bad = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    huge = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x" * 1_100_000}, timeout=30)
    assert huge.status_code == 413 and "max_body_bytes" in huge.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_failing_decoding_step_is_a_500_and_the_server_goes_on(client, server, monkeypatch):
    engine = server.site.engine
    real = engine._decode

    def fail_once(jobs):
        monkeypatch.setattr(engine, "_decode", real)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine, "_decode", fail_once)
    with pytest.raises(openai.InternalServerError, match="generation failed: RuntimeError: out of memory"):
        complete(client, max_tokens=5)
    assert complete(client, max_tokens=5).usage.completion_tokens == 5
    assert engine.active == 0


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client.completions.create(model="tiny", prompt="x", n=3)


# ---------------------------------------------------------------------------------------------------------
# Keys, CORS, the page and /health
# ---------------------------------------------------------------------------------------------------------


def test_api_key_guards_v1_only_and_cors_only_for_listed_origins(ckpt, server):
    origin = "http://localhost:3000"
    with running_server(ckpt, api_key="s3cret", cors_origins=[origin]) as guarded:
        wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="has a wrong API key"):
            wrong.models.list()
        none = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "x"}, timeout=30)
        assert none.status_code == 401 and "has no API key" in none.json()["error"]["message"]
        good = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="s3cret", max_retries=0)
        assert complete(good, max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(f"{guarded.url}/", timeout=30).status_code == 200  # the page and health are public
        assert httpx.get(f"{guarded.url}/health", timeout=30).json()["status"] == "ok"
        allowed = httpx.get(f"{guarded.url}/health", headers={"Origin": origin}, timeout=30)
        assert allowed.headers.get("access-control-allow-origin") == origin
        other = httpx.get(f"{guarded.url}/health", headers={"Origin": "http://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in other.headers
    default = httpx.get(f"{server.url}/health", headers={"Origin": origin}, timeout=30)
    assert "access-control-allow-origin" not in default.headers  # CORS is off unless origins are listed


def test_page_is_one_self_contained_file(server):
    page = httpx.get(f"{server.url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # nothing from a CDN
    assert "innerHTML" not in page.text  # text goes in as text


# ---------------------------------------------------------------------------------------------------------
# Continuous batching
# ---------------------------------------------------------------------------------------------------------


def test_eight_concurrent_requests_each_get_what_they_get_alone(client, server):
    """8 threads on 4 slots (4 wait in the queue), prompts of different lengths, greedy and seeded."""
    requests = [
        dict(prompt="a" * (1 + 3 * i), max_tokens=30 + 5 * i, temperature=0.0 if i % 2 else 0.8, seed=i)
        for i in range(8)
    ]
    alone = [complete(client, **r).choices[0].text for r in requests]
    together = [None] * 8
    start = threading.Barrier(8)

    def run(i):
        start.wait()
        together[i] = complete(client, **requests[i]).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert server.site.engine.peak_batch > 1  # they did share steps


def test_a_full_queue_is_503_with_retry_after(ckpt):
    with running_server(ckpt, max_batch=1, max_queue=1) as small:
        body = {"prompt": "x", "max_tokens": 4000, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{small.url}/v1/completions", json=body) as first:
                lines = first.iter_lines()  # kept: a dropped iterator closes the connection
                next(lines)
                with http.stream("POST", f"{small.url}/v1/completions", json=body):
                    assert wait_until(lambda: len(small.site.engine.waiting) == 1)
                    refused = httpx.post(f"{small.url}/v1/completions", json=body, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["error"]["message"]


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting"])
def test_a_client_that_disconnects_frees_its_slot_within_one_step(server, stream, monkeypatch):
    engine = server.site.engine
    jobs = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *args: jobs.append(submit(*args)) or jobs[-1])
    body = {"prompt": "x", "max_tokens": 4000, "stream": stream}
    with httpx.Client(timeout=httpx.Timeout(30, read=30 if stream else 1.0)) as http:
        if stream:  # read the first event, then hang up
            with http.stream("POST", f"{server.url}/v1/completions", json=body) as reply:
                lines = reply.iter_lines()
                next(lines)
        else:  # give up waiting for the whole reply after a second
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{server.url}/v1/completions", json=body)
    [job] = jobs
    assert wait_until(lambda: job.finish_reason is not None)
    assert job.finish_reason == "cancelled" and engine.active == 0
    assert job.produced <= job.produced_at_cancel + 1 < 4000  # at most the step already under way


def test_shutdown_ends_running_streams_with_a_final_chunk(ckpt):
    with running_server(ckpt) as doomed:
        body = {"prompt": "x", "max_tokens": 4000, "stream": True}
        lines = []
        with httpx.stream("POST", f"{doomed.url}/v1/completions", json=body, timeout=30) as reply:
            for line in filter(None, reply.iter_lines()):
                lines.append(line)
                if len(lines) == 3:
                    doomed.stop()
        doomed.join(10)
        assert not doomed.thread.is_alive()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "abort"
    assert lines[-1] == "data: [DONE]"


# ---------------------------------------------------------------------------------------------------------
# The config and the command line
# ---------------------------------------------------------------------------------------------------------


def test_yaml_matches_the_schema_and_rejects_typos(repo_root):
    register_config()
    with initialize_config_dir(config_dir=str(repo_root / "configs"), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=["port=9000", "cors_origins=[http://a.b]"])
        assert OmegaConf.to_object(cfg) == ServeConfig(port=9000, cors_origins=["http://a.b"])
        with pytest.raises(Exception, match="max_bacth"):
            compose(config_name="serve", overrides=["max_bacth=4"])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (dict(port=70000), "port=70000 must be a whole number in 0..65535"),
        (dict(max_batch=0), "max_batch=0 must be a whole number in 1..1024"),
        (
            dict(default_max_tokens=500, max_tokens_cap=100),
            "default_max_tokens=500 must be a whole number in 1..100",
        ),
        (dict(api_key=" "), "api_key must be a non-empty string"),
        (dict(threads=0), "threads=0"),
    ],
)
def test_bad_options_name_the_option(option, message):
    with pytest.raises(GptMiniError, match=re.escape(message)):
        ServeConfig(**option)


def test_port_in_use_and_public_host_without_key(ckpt, capsys):
    with bind("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(GptMiniError) as error:
            serve(ServeConfig(ckpt=str(ckpt), port=port, device="cpu"))
    assert str(error.value) == (
        f"cannot listen on 127.0.0.1:{port}: Address already in use. Pick another port=... "
        "(port=0 takes any free one) or another host."
    )
    with pytest.raises(GptMiniError, match="checkpoint not found: /no/such.ckpt"):
        serve(ServeConfig(ckpt="/no/such.ckpt", host="0.0.0.0", port=0, device="cpu"))
    assert "warning: serving on 0.0.0.0 without an api_key" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter loads torch and the web stack: about 20 s on 2 busy cores
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serves_and_a_signal_ends_streams_and_exits_0(ckpt, tmp_path, repo_root, signum):
    command = [
        sys.executable,
        str(repo_root / "serve.py"),
        f"ckpt={ckpt}",
        "port=0",
        "device=cpu",
        "threads=1",
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in process.stderr:
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server never said where it listens"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as reply:
            for line in filter(None, reply.iter_lines()):
                lines.append(line)
                if len(lines) == 4:
                    process.send_signal(signum)
        assert process.wait(timeout=30) == 0
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert "stopped" in process.stderr.read()
        assert list(tmp_path.iterdir()) == []  # no outputs/, no .hydra/
    finally:
        process.kill()
        process.wait()
