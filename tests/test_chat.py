"""`align chat`: multi-turn history through the chat template, streaming, commands and context overflow,
on the tiny SFT -> DPO run."""

import io
import os

import pytest
import torch

import align.chat as chat_mod
from align.chat import ChatSession, chat
from align.errors import AlignError
from align.models.tokens import encode_prompt
from align.runs import load_stage_model, open_stage


@pytest.fixture(scope="module")
def loaded(tiny_run, tmp_path_factory):
    # Module scope runs before the autouse cache fixture; the nf4 tiny model must be read from the test cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_CACHE", os.environ.get("ALIGN_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache"))
        return load_stage_model(*open_stage(tiny_run / "dpo"))


def greedy(loaded, **kwargs) -> ChatSession:
    return ChatSession(*loaded, temperature=0, max_new_tokens=kwargs.pop("max_new_tokens", 8), **kwargs)


def test_chat_from_disk_answers_each_line_until_exit(tiny_run):
    buf = io.StringIO()
    messages = chat(str(tiny_run / "dpo"), temperature=0, max_new_tokens=8,
                    input_stream=io.StringIO("hello\n\nwhat next?\n/exit\nnever read\n"), output_stream=buf)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [messages[0]["content"], messages[2]["content"]] == ["hello", "what next?"]
    out = buf.getvalue()
    assert out.count("you> ") == 4  # the empty line is asked again; nothing is asked after /exit
    for reply in (messages[1]["content"], messages[3]["content"]):
        assert reply and f"assistant> {reply}\n" in out


def test_second_turn_sends_the_whole_history_and_matches_plain_generate(loaded, monkeypatch):
    model, tokenizer = loaded
    session = greedy(loaded)
    first = session.reply("hello")
    history = session.messages + [{"role": "user", "content": "and then?"}]

    calls = []
    real_generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs["input_ids"][0].tolist())
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    second = session.reply("and then?")
    monkeypatch.undo()

    assert history[:2] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    assert calls == [encode_prompt(tokenizer, history)]
    ids = torch.tensor(calls)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert second == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert session.messages == history + [{"role": "assistant", "content": second}]


def test_reply_is_streamed_in_pieces_that_join_to_it(loaded):
    pieces = []
    reply = greedy(loaded, max_new_tokens=12).reply("hello", on_token=pieces.append)
    assert len(pieces) > 1
    assert "".join(pieces) == reply


def test_seed_makes_sampling_repeatable(loaded):
    replies = [ChatSession(*loaded, temperature=1.0, max_new_tokens=6, seed=7).reply("hello") for _ in range(2)]
    assert replies[0] == replies[1]


def test_reset_and_system_commands(tiny_run, loaded, monkeypatch):
    session = greedy(loaded, system="be kind")
    session.reply("hello")
    session.reset()
    assert session.messages == [{"role": "system", "content": "be kind"}]

    monkeypatch.setattr(chat_mod, "load_stage_model", lambda run, stage: loaded)  # no second load
    messages = chat(str(tiny_run / "dpo"), temperature=0, max_new_tokens=4, output_stream=io.StringIO(),
                    input_stream=io.StringIO("hello\n/system be brief\nhi\n/reset\n/help\n/nope\nbye\n"))
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert [(m["role"], m["content"]) for m in messages[:2]] == [("system", "be brief"), ("user", "bye")]
    assert len(messages) == 3  # "hello" went with /system, "hi" with /reset; EOF ends the chat


def test_unknown_stage_is_a_user_error(tiny_run):
    with pytest.raises(AlignError, match="no stage 'nope'"):
        chat(str(tiny_run / "nope"), input_stream=io.StringIO(""), output_stream=io.StringIO())


def test_context_overflow_drops_the_oldest_turns_and_keeps_the_system_message(loaded):
    model, tokenizer = loaded
    session = greedy(loaded, system="be brief", max_new_tokens=4)
    session.reply("first question")
    session.reply("second question")
    third = session.messages[3:] + [{"role": "user", "content": "third question"}]
    # Room for the system message and the last exchange plus the new question, not for the first exchange.
    session.max_context = len(encode_prompt(tokenizer, session.messages[:1] + third)) + 4
    session.reply("third question")
    assert session.dropped == 1
    assert session.messages[0] == {"role": "system", "content": "be brief"}
    assert session.messages[1:4] == third
    assert len(session.messages) == 5

    session.max_context = 8  # not even the system message and the question fit
    with pytest.raises(AlignError, match="too long"):
        session.reply("fourth")
    assert len(session.messages) == 5  # the unanswerable question is not left in the history


def test_chat_says_once_that_turns_are_dropped(tiny_run, loaded, monkeypatch, capsys):
    monkeypatch.setattr(chat_mod, "load_stage_model", lambda run, stage: loaded)
    monkeypatch.setattr(loaded[0].config, "max_position_embeddings", 60)
    messages = chat(str(tiny_run / "dpo"), temperature=0, max_new_tokens=4, output_stream=io.StringIO(),
                    input_stream=io.StringIO("".join(f"question number {i}\n" for i in range(6))))
    assert messages[-2]["content"] == "question number 5"
    assert len(messages) < 12
    assert capsys.readouterr().err.count("oldest turns are being dropped") == 1
