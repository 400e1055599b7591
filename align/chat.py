"""`align chat RUN/STAGE`: talk to a stage's model turn by turn, each reply streamed as it is generated.

The whole conversation goes through the chat template every turn (`encode_prompt`, the same encoding
as training and eval), so the model sees exactly the format it was trained on. When it no longer fits
the model's context, the oldest user/assistant turns are dropped; the system message always stays.
"""

from __future__ import annotations

import importlib
import sys

import torch

from align.errors import AlignError
from align.models.generation import Decoding, TextStream
from align.models.tokens import encode_prompt
from align.runs import load_stage_model, open_stage
from align.ui import console

USER_PROMPT = "you> "
ASSISTANT_PREFIX = "assistant> "
COMMANDS = "/reset, /system TEXT, /help, /exit"
HELP = """\
/reset         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt and start over (/system alone removes it)
/help          this list
/exit, /quit   leave (so do Ctrl-D and Ctrl-C)"""


class ChatSession:
    """A conversation with a loaded model: `reply(text)` answers the next user turn, keeping history."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_p: float = 0.9, seed: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.dropped = 0  # user/assistant turn pairs dropped to fit the context since the last reset
        if seed is not None:
            torch.manual_seed(seed)
        self.set_system(system)

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.dropped = 0

    def _fit(self) -> list[int]:
        """The conversation's prompt ids, its oldest turns dropped until the reply has room in the context."""
        first = 1 if self.system else 0
        for cut in range(first, len(self.messages), 2):  # keep messages[:first] and messages[cut:]
            messages = self.messages[:first] + self.messages[cut:]
            ids = encode_prompt(self.tokenizer, messages)
            if self.max_context is None or len(ids) + self.max_new_tokens <= self.max_context:
                self.dropped += (cut - first) // 2
                self.messages = messages
                return ids
        raise AlignError(f"the message is too long: the prompt is {len(ids)} tokens and the model's context of "
                         f"{self.max_context} must also hold the {self.max_new_tokens} new tokens of the reply")

    @torch.no_grad()
    def reply(self, user_text: str, on_token=None) -> str:
        """The model's answer to `user_text`; `on_token(piece)` sees the text as it is generated."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = self._fit()
            decoding = Decoding(self.max_new_tokens, self.temperature > 0, self.temperature or 1.0, self.top_p)
            stream = TextStream(self.tokenizer, on_token or (lambda piece: None))
            input_ids = torch.tensor([ids], device=self.model.device)
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                streamer=stream,
                **decoding.kwargs(),
            )
        except BaseException:  # an interrupted or failed turn leaves no unanswered user message behind
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": stream.text})
        return stream.text


def _line_reader(input_stream, output_stream):
    """A function returning the user's next line, or None at end of input."""
    if input_stream is None and output_stream is None:  # a terminal: input() gives line editing and history
        try:
            importlib.import_module("readline")  # importing it is what turns editing on for input()
        except ImportError:
            pass

        def read():
            try:
                return input(USER_PROMPT)
            except EOFError:  # Ctrl-D: end the prompt's line, so the shell's starts on its own
                print()
                return None

        return read

    input_stream, output_stream = input_stream or sys.stdin, output_stream or sys.stdout

    def read():
        output_stream.write(USER_PROMPT)
        output_stream.flush()
        line = input_stream.readline()
        if not line:
            output_stream.write("\n")
            return None
        return line.rstrip("\r\n")

    return read


def _note(text: str, style: str = "dim") -> None:
    # soft_wrap: the terminal wraps; rich's hard line breaks would split paths when copied
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def chat(spec: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
         seed: int | None = None, input_stream=None, output_stream=None) -> list[dict]:
    """Chat with RUN/STAGE; returns the conversation (messages) when the user leaves: the history as it
    stands then, so turns cleared by /reset or dropped to fit the context are not in it."""
    run, stage = open_stage(spec)  # an unknown or unfinished stage fails here, before the model loads
    adapter = run.adapter(stage)
    model, tokenizer = load_stage_model(run, stage)
    session = ChatSession(model, tokenizer, system, max_new_tokens, temperature, top_p, seed)
    read = _line_reader(input_stream, output_stream)
    out = output_stream or sys.stdout
    adapter_text = adapter or "none (the base model)"
    _note(f"chatting with {run.name}/{stage}: base {run.recipe.model.base}, adapter {adapter_text}; "
          f"commands: {COMMANDS}")

    def show(piece):
        out.write(piece)
        out.flush()

    told_dropped = False
    try:
        while (line := read()) is not None:
            text = line.strip()
            if not text:
                continue
            command, _, argument = text.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/help":
                _note(HELP)
            elif command == "/reset":
                session.reset()
                _note("conversation cleared")
            elif command == "/system":
                session.set_system(argument.strip())
                _note(f"system prompt {'set' if session.system else 'removed'}; conversation cleared")
            elif command.startswith("/"):
                _note(f"unknown command {command}; commands: {COMMANDS}")
            else:
                show(ASSISTANT_PREFIX)
                try:
                    session.reply(text, on_token=show)
                except AlignError as err:
                    _note(str(err), style="red")
                out.write("\n")
                if session.dropped and not told_dropped:
                    _note("the conversation no longer fits the model's context: the oldest turns are being dropped")
                    told_dropped = True
    except KeyboardInterrupt:
        out.write("\n")
    return session.messages
