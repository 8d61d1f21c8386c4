"""The interactive `isthmus chat`: a multi-turn session on a terminal, as `ollama run`.

Each turn sends the whole conversation (the --system message, every earlier turn, the new
message) to `isthmus.chat` with the same options, and the reply joins the history.

- `/bye` or Ctrl-D ends the session (exit 0); Ctrl-C at the prompt only prints a hint.
- Ctrl-C while a reply is being written stops that reply and returns to the prompt. The
  interrupted turn (the message and the partial reply) is dropped from the history, so the next
  message continues the conversation as it stood before it; type it again to retry.
- When the conversation no longer leaves room for a reply in the model's context window, the
  oldest turns are dropped (said on stderr); a single message too long for the window is a
  one-line error and the session goes on without it.
"""

from __future__ import annotations

import sys
import time

from isthmus.errors import IsthmusError

PROMPT, CONTINUATION = ">>> ", "... "
EXIT_HINT = "Use Ctrl + d or /bye to exit."
HELP = """Available commands:
  /clear          forget the conversation so far (the --system message stays)
  /bye            exit (Ctrl + d does too)
  /?, /help       this help
  \"\"\"             begin and end a message of several lines

Ctrl + c stops the reply being written; the interrupted turn is left out of the history."""


class ChatSession:
    """The conversation and the options every turn uses; `send` runs one turn."""

    def __init__(self, exe, args, out=None, err=None):
        from isthmus.compiler.executable import context_length

        self.exe, self.args = exe, args
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict] = []      # alternating user / assistant messages
        self.n_ctx = context_length(exe)
        # room kept for the reply when old turns must go: max_tokens, but at most a quarter of the window
        self.reserve = max(1, min(args.max_tokens, self.n_ctx // 4))

    def _stream(self, messages):
        from isthmus.runtime.generate import chat

        a = self.args
        return chat(self.exe, messages, max_tokens=a.max_tokens, temperature=a.temperature,
                    top_p=a.top_p, top_k=a.top_k, seed=a.seed, stop=a.stop)

    def _fit(self, message: dict):
        """The stream for history + `message`, dropping the oldest turns if it does not leave room for
        a reply; None (and a one-line error) when `message` alone does not fit the window."""
        stream = self._stream(self.system + self.history + [message])
        if len(stream.prompt_ids) + self.reserve <= self.n_ctx:
            return stream
        alone = stream if not self.history else self._stream(self.system + [message])
        if len(alone.prompt_ids) >= self.n_ctx:
            print(f"isthmus: error: this message is {len(alone.prompt_ids)} tokens with the chat template"
                  f"{' and the system message' if self.system else ''}; the model's context window is "
                  f"{self.n_ctx}; nothing was sent", file=self.err)
            return None
        dropped = 0
        while self.history and len(stream.prompt_ids) + self.reserve > self.n_ctx:
            del self.history[:2]
            dropped += 1
            stream = self._stream(self.system + self.history + [message]) if self.history else alone
        if dropped:
            print(f"isthmus: the conversation no longer fits the context window ({self.n_ctx} tokens); "
                  f"dropped the oldest {dropped} turn(s)", file=self.err)
        return stream

    def send(self, text: str, load_seconds: float = 0.0, timings=None) -> bool:
        """One turn: stream the reply to `text`; True if it completed and joined the history.
        `load_seconds` and `timings` (the model's load, for --verbose) are counted in this turn."""
        t0 = time.perf_counter()
        message = {"role": "user", "content": text}
        try:
            stream = self._fit(message)
            if stream is None:
                return False
            for piece in stream:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:     # stop this reply only
            self.out.write("\n")
            self.out.flush()
            return False
        except IsthmusError as e:     # a user mistake: one line, the session goes on
            self.out.write("\n")
            print(f"isthmus: error: {e}", file=self.err)
            return False
        self.out.write("\n\n")
        self.out.flush()
        self.history += [message, {"role": "assistant", "content": stream.text}]
        if self.args.verbose:
            from isthmus.cli import print_timings
            print_timings(stream.stats, time.perf_counter() - t0 + load_seconds, load_seconds, timings or {})
        return True


def _read_line(prompt: str) -> str | None:
    """One line from the terminal; None at end of input. Ctrl-C here only prints the hint."""
    while True:
        try:
            return input(prompt)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print(f"\n{EXIT_HINT}\n")


def _read_block(first: str) -> str | None:
    """A message over several lines, from after an opening \"\"\" to the closing one (as ollama);
    None at end of input."""
    lines = [first]
    while not lines[-1].rstrip().endswith('"""'):
        line = _read_line(CONTINUATION)
        if line is None:
            return None
        lines.append(line)
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines)


def repl(exe, args, load_seconds: float, timings=None) -> int:
    """Run the interactive session until /bye or end of input; the first turn's --verbose
    timings include the model's load."""
    try:
        import readline  # noqa: F401  (line editing and in-session history for input())
    except ImportError:   # not on every platform; input() works without it
        pass
    session = ChatSession(exe, args)
    while True:
        line = _read_line(PROMPT)
        if line is None:
            return 0
        text = line.strip()
        if text.startswith('"""'):
            text = _read_block(text[3:])
            if text is None:
                return 0
            text = text.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0]
            if cmd == "/bye":
                return 0
            if cmd in ("/?", "/help"):
                print(HELP + "\n")
            elif cmd == "/clear":
                session.history.clear()
                print("Cleared session context\n")
            else:
                print(f"Unknown command '{cmd}'. Type /? for help\n")
            continue
        session.send(text, load_seconds, timings)
        load_seconds, timings = 0.0, None
