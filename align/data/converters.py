"""Converters: one function per data format, from a row (a dict) to the schema objects stages accept.

Each is pure: it takes one row and returns one schema object, or a list of them (an OASST tree holds many
ranked groups, possibly none), or raises `DataError(field=...)` naming the field it looked at;
`align.data.formats` registers them, detects which one a file needs, and adds the file and row number.
"""

from __future__ import annotations

import math
import re

from align.data.invariants import check_answer, check_differ, checked_prompt, checked_response, said, short
from align.data.rules import RULE_FIELDS, RULE_KINDS
from align.data.schemas import (
    Message,
    PreferenceExample,
    RankedExample,
    SFTExample,
    TaskExample,
    UnpairedExample,
)
from align.errors import DataError

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


# field helpers: every check names the field it looked at
def _at(within: str, key: str) -> str:
    """The name of field `key` of the object at field `within` ("" for the row itself)."""
    return f"{within}.{key}" if within else key


def _get(row: dict, key: str, types: type | tuple, what: str, within: str = ""):
    """`row[key]`, checked; `within` names where `row` sits, when it is an object inside the row."""
    if key not in row or row[key] is None:
        raise DataError(f"missing; this format needs {what}", field=_at(within, key))
    if not isinstance(row[key], types):
        raise DataError(f"expected {what}, got {type(row[key]).__name__} {short(row[key])}", field=_at(within, key))
    return row[key]


def _finite(value: object, field: str) -> float:
    # bool is an int to Python, but `true` is no number; NaN or infinity would poison the loss.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"expected a finite number, got {type(value).__name__} {short(value)}", field=field)
    return float(value)


def _messages(value: list, field: str, role_key="role", content_key="content", roles=ROLES) -> list[Message]:
    """Validate chat messages and normalise them to [{role, content}]; `roles` maps names (ShareGPT's)."""
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"expected a message {{{role_key}, {content_key}}}, got {short(message)}", field=where)
        role, content = message.get(role_key), message.get(content_key)
        if role not in roles:
            raise DataError(f"unknown role {short(role)}; expected one of {list(roles)}", field=f"{where}.{role_key}")
        if not isinstance(content, str):
            raise DataError(f"expected a string, got {short(content)}", field=f"{where}.{content_key}")
        out.append({"role": roles[role], "content": content})
    return out


def _as_messages(value: object, field: str, role: str) -> list[Message]:
    """TRL's standard format holds a plain string (one `role` message); its conversational format a list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, field)
    raise DataError(f"expected a string or a list of messages, got {type(value).__name__} {short(value)}",
                    field=field)


def _turns(row: dict, key: str, role: str) -> list[Message]:
    return _as_messages(_get(row, key, (str, list), "a string or a list of messages"), key, role)


def _prompt_in(row: dict) -> list[Message]:
    return checked_prompt(_turns(row, "prompt", "user"), "prompt", listed=isinstance(row["prompt"], list))


def _response_in(row: dict, key: str) -> list[Message]:
    return checked_response(_turns(row, key, "assistant"), key)


def _split_last_assistant(messages: list[Message], field: str) -> SFTExample:
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("the conversation must end with an assistant message (the completion)", field=field)
    last = len(messages) - 1
    return SFTExample(checked_prompt(messages[:last], field), checked_response(messages[last:], f"{field}[{last}]"))


# HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ..."
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(text: str, field: str) -> list[Message]:
    parts = HH_TURN.split(text)  # [text before the first turn, role, text, role, text, ...]
    if parts[0].strip():
        raise DataError(f"text before the first 'Human:' turn: {short(parts[0])}", field=field)
    return [{"role": HH_ROLES[r], "content": _hh_text(t)} for r, t in zip(parts[1::2], parts[2::2])]


def _hh_text(text: str) -> str:
    return text[1:] if text.startswith(" ") else text  # HH writes "Assistant: text"; keep the rest exactly


def _hh_reply_marker(text: str, field: str) -> re.Match:
    """The marker of the Assistant turn that answers the last Human turn: the prompt ends before it.

    All after it is the reply, further "\n\nAssistant:" markers included: real replies go on with their
    own turn that way (HH-RLHF helpful-base rows 157, 324). A Human turn after it would be a later prompt.
    """
    markers = list(HH_TURN.finditer(text))
    humans = [i for i, marker in enumerate(markers) if marker.group(1) == "Human"]
    if not humans:
        raise DataError("the transcript has no 'Human:' turn", field=field)
    if humans[-1] == len(markers) - 1:
        raise DataError("no 'Assistant:' turn answers the last 'Human:' turn", field=field)
    return markers[humans[-1] + 1]


def _hh_transcript(row: dict, key: str) -> tuple[str, SFTExample]:
    """The text up to the reply (the prompt and the marker that starts the reply), and prompt and reply."""
    text = _get(row, key, str, "a Human/Assistant transcript string")
    marker = _hh_reply_marker(text, key)
    prompt = checked_prompt(_hh_turns(text[: marker.start()], key), key, listed=False)
    reply = [{"role": "assistant", "content": _hh_text(text[marker.end():])}]
    return text[: marker.end()], SFTExample(prompt, checked_response(reply, key))


def hh_sft(row: dict) -> SFTExample:
    return _hh_transcript(row, "chosen")[1]


def hh_preference(row: dict) -> PreferenceExample:
    (head, chosen), (rejected_head, rejected) = (_hh_transcript(row, key) for key in ("chosen", "rejected"))
    # Transcripts that part before the reply answer different prompts: two conversations, not a pair.
    if rejected_head != head:
        raise DataError("differs from 'chosen' before the reply to the last 'Human:' turn; the two must share the "
                        "prompt", field="rejected")
    check_differ(chosen.completion, rejected.completion)
    return PreferenceExample(chosen.prompt, chosen.completion, rejected.completion)


# the other formats
def messages_sft(row: dict) -> SFTExample:
    messages = _get(row, "messages", list, "a list of {role, content} messages")
    return _split_last_assistant(_messages(messages, "messages"), "messages")


def prompt_completion(row: dict) -> SFTExample:
    return SFTExample(_prompt_in(row), _response_in(row, "completion"))


def alpaca(row: dict) -> SFTExample:
    instruction = _get(row, "instruction", str, "a string")
    extra = row.get("input") or ""  # optional: missing, null and "" all mean no input
    if not isinstance(extra, str):
        raise DataError(f"expected a string, got {type(extra).__name__} {short(extra)}", field="input")
    output = _get(row, "output", str, "a string")
    # the instruction is the question: an input alone asks nothing
    checked_prompt([{"role": "user", "content": instruction}], "instruction", listed=False)
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    completion = checked_response([{"role": "assistant", "content": output}], "output")
    return SFTExample(prompt=[{"role": "user", "content": user}], completion=completion)


def sharegpt(row: dict) -> SFTExample:
    turns = _get(row, "conversations", list, "a list of {from, value} turns")
    return _split_last_assistant(_messages(turns, "conversations", "from", "value", SHAREGPT_ROLES), "conversations")


def _margin(row: dict) -> float | None:
    """The optional `margin` key (TRL's RewardTrainer column): how much better `chosen` is."""
    margin = row.get("margin")
    return None if margin is None else _finite(margin, "margin")


def preference(row: dict) -> PreferenceExample:
    chosen, rejected = (_response_in(row, key) for key in ("chosen", "rejected"))
    check_differ(chosen, rejected)
    return PreferenceExample(_prompt_in(row), chosen, rejected, _margin(row))


def implicit_prompt(row: dict) -> PreferenceExample:
    chosen, rejected = (_messages(_get(row, key, list, "a list of messages"), key) for key in ("chosen", "rejected"))
    shared = 0  # the prompt is the leading messages both conversations have in common
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    check_differ(chosen[shared:], rejected[shared:])
    # The responses are where the two part: a user turn there means two conversations, not one prompt's pair.
    conversations = (("chosen", chosen), ("rejected", rejected))
    replies = [checked_response(messages[shared:], key, first=shared) for key, messages in conversations]
    return PreferenceExample(checked_prompt(chosen[:shared], "chosen"), *replies, margin=_margin(row))


def task(row: dict) -> TaskExample:
    prompt = _prompt_in(row)
    rule = _get(row, "rule", dict, 'an object such as {"kind": "exact", "answer": "12"}')
    kind = rule.get("kind")
    if kind not in RULE_KINDS:
        raise DataError(f"expected one of {', '.join(RULE_KINDS)}, got {short(kind)}", field="rule.kind")
    needed = RULE_FIELDS[kind]
    if needed not in rule:
        raise DataError(f"a rule of kind {kind!r} needs '{needed}'", field=f"rule.{needed}")
    if kind == "one_of":
        answers = rule["answers"]
        if not isinstance(answers, list) or not answers:  # a string would be read as a list of its characters
            raise DataError(f"expected a list of answers, got {short(answers)}", field="rule.answers")
        for i, answer in enumerate(answers):
            check_answer(answer, f"rule.answers[{i}]")
    elif kind in ("exact", "math"):
        check_answer(rule["answer"], "rule.answer")
    return TaskExample(prompt=prompt, rule=rule)


def gsm8k(row: dict) -> TaskExample:
    """GSM8K's {question, answer}: the answer is a worked solution ending `#### <final answer>`, which becomes a
    `math` rule."""
    question = _get(row, "question", str, "the question as a string")
    solution = _get(row, "answer", str, "a worked solution ending '#### <final answer>'")
    final = re.search(r"####\s*(\S.*)$", solution.strip())
    if final is None:
        raise DataError("has no '#### <final answer>' at its end", field="answer")
    return TaskExample(prompt=checked_prompt([{"role": "user", "content": question}], "question", listed=False),
                       rule={"kind": "math", "answer": final.group(1).strip()})


def bare_prompt(row: dict) -> TaskExample:
    return TaskExample(prompt=_prompt_in(row), rule={})


# ranked formats: K >= 2 responses to one prompt, each with a score
def _ranking(prompt: list[Message], responses: list[list[Message]], scores: list[float], responses_field: str,
             scores_field: str) -> RankedExample:
    """The checks on a whole group, once each response and score has been read and checked."""
    if len(responses) < 2:
        raise DataError(f"has {len(responses)} response(s); a ranking needs at least 2", field=responses_field)
    if len(set(scores)) == 1:
        raise DataError(f"all {len(scores)} responses have the same score; a ranking needs at least two different "
                        "scores", field=scores_field)
    # A response scored two ways contradicts itself; as a pair, best against worst, it could beat itself.
    first_score: dict[tuple, float] = {}
    for response, score in zip(responses, scores):
        if first_score.setdefault(said(response), score) != score:
            raise DataError(f"the response {short(' '.join(m['content'] for m in response))} appears twice, with "
                            "two different scores", field=scores_field)
    return RankedExample(prompt, responses, scores)


def _rank_score(value: object, field: str) -> float:
    rank = _finite(value, field)
    if rank < 0 or not rank.is_integer():
        raise DataError(f"expected a rank: a whole number, 0 for the best, got {short(value)}", field=field)
    return 0.0 - rank  # rank 0 is the best; `-rank` would make it -0.0, which prints as "-0"


def _listed(row: dict, responses_key: str, scores_key: str, ranks: bool = False) -> RankedExample:
    """A prompt, a list of responses and a parallel list of scores (or of ranks, 0 = best)."""
    values = _get(row, responses_key, list, "a list of responses (strings or message lists)")
    responses = [checked_response(_as_messages(value, f"{responses_key}[{i}]", "assistant"), f"{responses_key}[{i}]")
                 for i, value in enumerate(values)]
    numbers = _get(row, scores_key, list, "a list of numbers, one per response")
    if len(numbers) != len(responses):
        raise DataError(f"has {len(numbers)} entries for the {len(responses)} responses in '{responses_key}'; "
                        "give one per response", field=scores_key)
    score = _rank_score if ranks else _finite
    scores = [score(number, f"{scores_key}[{i}]") for i, number in enumerate(numbers)]
    return _ranking(_prompt_in(row), responses, scores, responses_key, scores_key)


def ranked(row: dict) -> RankedExample:
    # A null counts as absent: a Parquet file with both columns has one of them null in every row.
    has_ranks, has_scores = row.get("ranks") is not None, row.get("scores") is not None
    if has_ranks == has_scores:
        raise DataError("give exactly one of 'ranks' (0 = best) and 'scores' (higher is better)",
                        field="scores" if has_ranks else "ranks")
    return _listed(row, "responses", "ranks", ranks=True) if has_ranks else _listed(row, "responses", "scores")


def scored_responses(row: dict) -> RankedExample:
    return _listed(row, "all_generated_responses", "all_rm_scores")


def ultrafeedback(row: dict) -> RankedExample:
    prompt = checked_prompt([{"role": "user", "content": _get(row, "instruction", str, "a string")}], "instruction",
                     listed=False)
    responses, scores = [], []
    for i, completion in enumerate(_get(row, "completions", list, "a list of {response, overall_score} objects")):
        where = f"completions[{i}]"
        if not isinstance(completion, dict):
            raise DataError(f"expected an object {{response, overall_score}}, got {short(completion)}", field=where)
        text = _get(completion, "response", str, "a string", within=where)
        responses.append(checked_response([{"role": "assistant", "content": text}], _at(where, "response")))
        # UltraFeedback's overall score (the critique's) is its headline rating; the mean of the
        # fine-grained ratings stands in where a dataset has only that.
        key = "overall_score" if completion.get("overall_score") is not None else "fine-grained_score"
        if completion.get(key) is None:
            raise DataError("missing, and so is 'fine-grained_score'; every completion needs a score",
                            field=_at(where, "overall_score"))
        scores.append(_finite(completion[key], _at(where, key)))
    return _ranking(prompt, responses, scores, "completions", "completions")


def oasst_tree(row: dict) -> list[RankedExample]:
    """Every ranked group in an OpenAssistant message tree, at any depth; a tree may have none."""
    # Exports hold {message_tree_id, prompt: root message}; some give the root message as the row itself.
    root, field = (row["prompt"], "prompt") if isinstance(row.get("prompt"), dict) else (row, "")
    groups: list[RankedExample] = []
    _oasst_walk(root, field, [], groups)
    return groups


def _oasst_walk(node: object, field: str, path: list[Message], groups: list[RankedExample]) -> None:
    """Collect the groups at and below `node`; `path` is the conversation from the root down to its parent."""
    path = [*path, _oasst_message(node, field, path[-1] if path else None)]
    replies = node.get("replies", [])
    if not isinstance(replies, list):
        raise DataError(f"expected a list of messages, got {short(replies)}", field=_at(field, "replies"))
    # Moderators deleted these messages: neither they nor the conversations under them are used.
    kept = [(f"{_at(field, 'replies')}[{i}]", reply) for i, reply in enumerate(replies)
            if not (isinstance(reply, dict) and reply.get("deleted"))]
    ranked = [(where, reply) for where, reply in kept if isinstance(reply, dict) and reply.get("rank") is not None]
    # Humans ranked the assistant replies to a prompter message; one ranked reply has nothing to beat.
    if path[-1]["role"] == "user" and len(ranked) >= 2:
        responses = [checked_response([_oasst_message(reply, where, path[-1])], _at(where, "text"))
                     for where, reply in ranked]
        scores = [_rank_score(reply["rank"], _at(where, "rank")) for where, reply in ranked]
        prompt = checked_prompt(path, _at(field, "text"), listed=False)
        groups.append(_ranking(prompt, responses, scores, _at(field, "replies"), _at(field, "replies")))
    for where, reply in kept:
        _oasst_walk(reply, where, path, groups)


def _oasst_message(node: object, field: str, parent: Message | None) -> Message:
    if not isinstance(node, dict):
        raise DataError(f"expected a message object {{text, role, replies}}, got {short(node)}", field=field)
    role = node.get("role")
    if role not in OASST_ROLES:
        raise DataError(f"unknown role {short(role)}; expected one of {list(OASST_ROLES)}", field=_at(field, "role"))
    # A tree alternates from a prompter message at its root: each reply is the other role's turn.
    if OASST_ROLES[role] == (parent["role"] if parent else "assistant"):
        raise DataError(f"is '{role}' where the other role's turn is due: a tree alternates prompter and assistant "
                        "messages, from a prompter message at its root", field=_at(field, "role"))
    return {"role": OASST_ROLES[role], "content": _get(node, "text", str, "a string", within=field)}


def unpaired(row: dict) -> UnpairedExample:
    return UnpairedExample(_prompt_in(row), _response_in(row, "completion"), _get(row, "label", bool, "true or false"))


def fastchat_question(row: dict) -> TaskExample:
    turns = _get(row, "turns", list, "a list of question strings")
    if not turns or not isinstance(turns[0], str) or not turns[0].strip():
        raise DataError("expected a non-empty first question", field="turns[0]")
    return TaskExample(prompt=[{"role": "user", "content": turns[0]}], rule={})
