"""`tunesmith serve`: a tiny finished run behind the OpenAI-compatible endpoint. Chat answers equal `tunesmith
generate`'s, completions continue the bare prompt, concurrent requests share a batch and each gets its own
answer, streaming sends the same text, and bad requests and bad runs are refused."""

from __future__ import annotations

import json
import threading

import pytest
from _cli import invoke_cli
from test_commands import made  # noqa: F401 (the module's finished runs: a LoRA causal LM, a classifier)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

PROMPTS = ["one two three", "four five", "six seven eight one", "two"]


@pytest.fixture(scope="module")
def server(made):  # noqa: F811
    from tunesmith.inference import load_finetuned
    from tunesmith.rundir import RunDir
    from tunesmith.serve import create_app

    model, tokenizer, cfg = load_finetuned(RunDir(made["lm"]))
    return TestClient(create_app(model, tokenizer, cfg, "lm", max_batch=4))


def ask(client, prompt: str, **extra) -> dict:
    body = {"model": "lm", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, **extra}
    res = client.post("/v1/chat/completions", json=body)
    assert res.status_code == 200, res.text
    return res.json()


def ask_together(client, prompts: list[str]) -> dict[str, str]:
    """Each prompt from its own thread, all released at once; prompt -> answer."""
    answers: dict = {}
    start = threading.Barrier(len(prompts))

    def one(p):
        start.wait()
        answers[p] = ask(client, p)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answers


def test_models_and_a_chat_answer_equal_to_tunesmith_generate(server, made):  # noqa: F811
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == ["lm"]
    out = ask(server, PROMPTS[0])
    cli = invoke_cli("generate", made["lm"], "--prompt", PROMPTS[0], "--max-new-tokens", "12")
    assert out["choices"][0]["message"]["content"] == cli.stdout.strip()
    assert out["object"] == "chat.completion" and out["choices"][0]["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_answer(server):
    alone = {p: ask(server, p)["choices"][0]["message"]["content"] for p in PROMPTS}
    batcher = server.app.state.batcher
    before = len(batcher.batches)
    answers = ask_together(server, PROMPTS)
    assert answers == alone  # greedy: batching (left padding) changes no answer
    assert max(batcher.batches[before:]) > 1, batcher.batches[before:]  # at least two answered together


def test_a_streamed_answer_is_the_same_text_in_chunks(server):
    plain = ask(server, PROMPTS[1])["choices"][0]["message"]["content"]
    body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 12, "stream": True}
    with server.stream("POST", "/v1/chat/completions", json=body) as res:
        lines = [line for line in res.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == plain and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_continue_the_prompt_as_it_is_without_the_template(server):
    from tunesmith.evaluation.generate import generate

    app = server.app.state.batcher
    res = server.post("/v1/completions", json={"prompt": "one two three", "max_tokens": 10})
    assert res.status_code == 200 and res.json()["object"] == "text_completion"
    expected, _ = generate(app.model, app.tokenizer, ["one two three"], 10)  # a plain string: no chat template
    templated, _ = generate(app.model, app.tokenizer, [[{"role": "user", "content": "one two three"}]], 10)
    assert res.json()["choices"][0]["text"] == expected[0] and expected[0] != templated[0]
    body = {"prompt": "one two three", "max_tokens": 10, "stream": True}
    with server.stream("POST", "/v1/completions", json=body) as streamed:
        lines = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]).strip() == expected[0]
    assert server.post("/v1/completions", json={"prompt": ""}).status_code == 400


def test_temperature_samples_and_bad_requests_are_refused(server):
    greedy = ask(server, PROMPTS[2], max_tokens=8)["choices"][0]["message"]["content"]
    assert ask(server, PROMPTS[2], temperature=0, max_tokens=8)["choices"][0]["message"]["content"] == greedy
    sampled = ask(server, PROMPTS[2], temperature=1.5, max_tokens=8)["choices"][0]["message"]["content"]
    assert sampled != greedy  # 8 tokens drawn at temperature 1.5 from a random model's ~260-token vocabulary
    for body in (
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "x"}], "temperature": -1},
    ):
        res = server.post("/v1/chat/completions", json=body)
        assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error", body
    other = {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}
    assert server.post("/v1/chat/completions", json=other).status_code == 404


def test_malformed_json_an_overlong_prompt_and_too_many_tokens_are_400_with_a_message(server):
    res = server.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert res.status_code == 400 and "not valid JSON" in res.json()["error"]["message"]
    batcher = server.app.state.batcher
    context = batcher.model.config.max_position_embeddings  # 512 on the tiny model

    def tokens(text: str) -> int:
        return len(batcher.tokenizer(text, add_special_tokens=False)["input_ids"])

    assert tokens("x " * context) >= context
    res = server.post("/v1/completions", json={"prompt": "x " * context})
    assert res.status_code == 400 and f"context is {context} tokens" in res.json()["error"]["message"]
    res = server.post("/v1/completions", json={"prompt": "one", "max_tokens": 5000})
    assert res.status_code == 400 and "limit of 1024" in res.json()["error"]["message"]
    # an answer that would run past the context is cut where the context ends
    long, seen = "x " * ((context - 6) // tokens("x ")), []
    hook = batcher.model.get_base_model().register_forward_pre_hook(  # the LM generate() steps
        lambda _, args, kw: seen.append(int(kw["position_ids"].max()) + 1), with_kwargs=True
    )
    try:
        near = server.post("/v1/completions", json={"prompt": long, "max_tokens": 100}).json()
    finally:
        hook.remove()
    assert near["usage"]["prompt_tokens"] == tokens(long) == context - 6
    assert near["choices"][0]["finish_reason"] in ("length", "stop") and max(seen) <= context


def test_the_official_openai_client_chats_completes_and_streams(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=server)
    assert [m.id for m in client.models.list()] == ["lm"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat = client.chat.completions.create(model="lm", messages=messages, max_tokens=12)
    assert chat.choices[0].message.content == ask(server, PROMPTS[0])["choices"][0]["message"]["content"]
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    text = client.completions.create(model="lm", prompt="one two three", max_tokens=10).choices[0].text
    assert (
        text
        == server.post("/v1/completions", json={"prompt": "one two three", "max_tokens": 10}).json()["choices"][0][
            "text"
        ]
    )
    stream = client.chat.completions.create(model="lm", messages=messages, max_tokens=12, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces).strip() == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lm", messages=messages, max_tokens=100_000)


def test_eight_concurrent_requests_take_fewer_forward_passes_than_eight_in_a_row(made):  # noqa: F811
    from tunesmith.inference import load_finetuned
    from tunesmith.rundir import RunDir
    from tunesmith.serve import create_app

    model, tokenizer, cfg = load_finetuned(RunDir(made["lm"]))
    client = TestClient(create_app(model, tokenizer, cfg, "lm", max_batch=8))
    passes = []
    model.get_base_model().register_forward_hook(lambda *_: passes.append(1))  # each step generate() takes
    prompts = [f"{a} {b}" for a in ("one", "two") for b in ("three", "four", "five", "six")]
    in_a_row = {p: ask(client, p)["choices"][0]["message"]["content"] for p in prompts}
    sequential = len(passes)
    answers = ask_together(client, prompts)
    concurrent = len(passes) - sequential
    assert answers == in_a_row
    assert concurrent < sequential, (concurrent, sequential)


def test_an_api_key_is_required_when_set(made):  # noqa: F811
    from tunesmith.inference import load_finetuned
    from tunesmith.rundir import RunDir
    from tunesmith.serve import create_app

    model, tokenizer, cfg = load_finetuned(RunDir(made["lm"]))
    client = TestClient(create_app(model, tokenizer, cfg, "lm", api_key="k3y"))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200


def test_the_command_refuses_a_classifier_a_missing_run_and_a_bad_port(made, tmp_path):  # noqa: F811
    res = invoke_cli("serve", made["cls"])
    assert res.returncode == 2 and "classification" in res.stderr and "tunesmith predict" in res.stderr
    res = invoke_cli("serve", tmp_path / "nope")
    assert res.returncode == 2 and "not a tunesmith run directory" in res.stderr
    res = invoke_cli("serve", made["lm"], "--port", "0")
    assert res.returncode == 2 and "--port" in res.stderr
