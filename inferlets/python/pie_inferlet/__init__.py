"""Pie inferlet SDK for Python (lite).

Thin helpers over the `pie:inferlet` WIT bindings that componentize-py
generates (`wit_world`): arguments, messages to the client, a KV context
with a chat history, and a generation loop that submits one forward pass
per token. Everything runs synchronously: `forward.wait-any` blocks the
inferlet (not the host) until one of its passes has run.

An app module implements the world's export as

    import pie_inferlet as pie

    class WitWorld(wit_world.WitWorld):
        def run(self) -> None:
            pie.run(main)

`run` turns any exception raised by `main` into the inferlet's error,
naming the exception and its traceback, so the client reads what failed.
"""

import traceback
from typing import Callable, List, Optional

from componentize_py_types import Err, Ok
from wit_world.imports import forward, kv, model, runtime

__all__ = [
    "args",
    "arg_value",
    "send",
    "log",
    "greedy",
    "temperature",
    "Context",
    "run",
]


def args() -> List[str]:
    """The arguments the client launched the inferlet with."""
    return runtime.get_arguments()


def arg_value(argv: List[str], name: str, default: Optional[str] = None) -> Optional[str]:
    """The value after `name` in `argv` (`--name VALUE`), else `default`."""
    for i, a in enumerate(argv[:-1]):
        if a == name:
            return argv[i + 1]
    return default


def send(message: str) -> None:
    """Sends one message to the client."""
    runtime.send(message)


def log(message: str, level: str = "info") -> None:
    levels = {
        "debug": runtime.Level.DEBUG,
        "info": runtime.Level.INFO,
        "warn": runtime.Level.WARN,
        "error": runtime.Level.ERROR,
    }
    runtime.log(levels[level], message)


def greedy() -> forward.Sampler:
    return temperature(0.0)


def temperature(t: float, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0) -> forward.Sampler:
    """A sampler; temperature 0 is greedy."""
    return forward.Sampler(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)


def _wait(pending: forward.Pending) -> List[forward.Output]:
    """Blocks until `pending` has run; its outputs, or RuntimeError."""
    while True:
        result = pending.poll()
        if result is not None:
            break
        if not forward.wait_any():
            raise RuntimeError("the pass is neither queued nor running")
    if isinstance(result, Err):
        raise RuntimeError(f"forward pass failed: {result.value}")
    return result.value if isinstance(result, Ok) else result


class Context:
    """A KV context with a conversation. Tokens not yet run through the
    model wait in `pending` and go with the next pass."""

    def __init__(self) -> None:
        self.kv = kv.Context()
        self.messages: List[model.Message] = []
        self.pending: List[int] = []
        self.stop_tokens = set(model.stop_tokens())

    def system(self, text: str) -> "Context":
        self.messages.append(model.Message(role="system", content=text))
        return self

    def user(self, text: str) -> "Context":
        self.messages.append(model.Message(role="user", content=text))
        return self

    def _sync_chat(self) -> None:
        """Queues the rendered conversation's tokens past what the context
        (and its pending tokens) already hold."""
        if not self.messages:
            return
        text = model.render_chat(self.messages, True)
        want = model.tokenize(text, False)
        have = list(self.kv.tokens()) + self.pending
        if want[: len(have)] != have:
            raise RuntimeError("the rendered chat does not extend the context's tokens")
        self.pending.extend(want[len(have):])

    def step(self, tokens: List[int], sampler: forward.Sampler) -> int:
        """Runs `tokens` through the model; the token sampled after the last."""
        p = forward.Pass(
            tokens=tokens,
            positions=None,
            mask=None,
            outputs=[forward.OutputRequest(index=len(tokens) - 1,
                                           kind=forward.OutputKind_Sample(sampler))],
        )
        out = _wait(forward.submit(self.kv, p))
        if not out or not isinstance(out[0], forward.Output_Token):
            raise RuntimeError("the runtime returned no token for a sample request")
        return out[0].value.token

    def generate(self, sampler: forward.Sampler, max_tokens: int = 256,
                 stop_tokens: Optional[set] = None) -> List[int]:
        """Samples up to `max_tokens` tokens, ending at a stop token (left
        out of the result, kept pending so the context stays whole)."""
        stops = self.stop_tokens if stop_tokens is None else stop_tokens
        self._sync_chat()
        if not self.pending:
            raise RuntimeError("nothing to generate from: the context is empty")
        out: List[int] = []
        while len(out) < max_tokens:
            tokens, self.pending = self.pending, []
            token = self.step(tokens, sampler)
            self.pending.append(token)
            if token in stops:
                break
            out.append(token)
        return out

    def generate_text(self, sampler: forward.Sampler, max_tokens: int = 256) -> str:
        tokens = self.generate(sampler, max_tokens)
        text = model.detokenize(tokens, True)
        self.messages.append(model.Message(role="assistant", content=text))
        return text


def run(main: Callable[[], None]) -> None:
    """Runs `main`; an exception becomes the inferlet's error (the
    exception's type, message and traceback)."""
    try:
        main()
    except Err:
        raise
    except Exception as e:  # noqa: BLE001 - every failure goes to the client
        raise Err(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
