"""OpenAI's wire format as the simulator writes it: pure, no I/O.

:class:`ChunkEncoder` gives a stream's ``chat.completion.chunk`` events as
SSE bytes; :func:`completion_body` gives a non-streamed ``chat.completion``.
"""

from __future__ import annotations

import msgspec

from streamsvc.simulator.text import MODELS, Choice

__all__ = ["DONE_EVENT", "MODELS_BODY", "ChunkEncoder", "completion_body"]

_encode = msgspec.json.encode

DONE_EVENT = b"data: [DONE]\n\n"
MODELS_BODY = _encode(
    {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "streamsvc-simulator"}
            for model in MODELS
        ],
    }
)


class ChunkEncoder:
    """Encodes one completion's ``chat.completion.chunk`` events as SSE bytes.

    Everything but the token text is encoded once, in the constructor; a
    content chunk is then ``prefix[index] + json(token) + suffix``.

    Example:
        >>> enc = ChunkEncoder(completion_id="chatcmpl-sim-1", created=0, model="echo")
        >>> enc.content(0, " hi")[:6]
        b'data: '
    """

    def __init__(
        self, *, completion_id: str, created: int, model: str, include_usage: bool = False
    ) -> None:
        self._head = b"".join(
            (
                b'data: {"id":',
                _encode(completion_id),
                b',"object":"chat.completion.chunk","created":',
                _encode(created),
                b',"model":',
                _encode(model),
                b',"system_fingerprint":"fp_sim","choices":[',
            )
        )
        # OpenAI sends "usage": null on every chunk once include_usage is asked.
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self._content_suffix = b'},"logprobs":null,"finish_reason":null}' + self._tail
        self._content_prefixes: list[bytes] = []

    def _content_prefix(self, index: int) -> bytes:
        prefixes = self._content_prefixes
        while len(prefixes) <= index:
            prefixes.append(self._head + b'{"index":%d,"delta":{"content":' % len(prefixes))
        return prefixes[index]

    def role(self, index: int) -> bytes:
        """The first chunk of a choice: ``delta {"role": "assistant", "content": ""}``."""
        return b"".join(
            (
                self._head,
                b'{"index":%d,"delta":{"role":"assistant","content":""},' % index,
                b'"logprobs":null,"finish_reason":null}',
                self._tail,
            )
        )

    def content(self, index: int, token: str) -> bytes:
        """One token of one choice: ``delta {"content": token}``."""
        return self._content_prefix(index) + _encode(token) + self._content_suffix

    def content_json(self, index: int, token: bytes) -> bytes:
        """One token given as a JSON string already (it may hold lone surrogate escapes)."""
        return self._content_prefix(index) + token + self._content_suffix

    def finish(self, index: int, reason: str) -> bytes:
        """The last chunk of a choice: ``delta {}`` and its ``finish_reason``."""
        return b"".join(
            (
                self._head,
                b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":' % index,
                _encode(reason),
                b"}",
                self._tail,
            )
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The usage chunk: ``"choices": []`` and the token counts."""
        counts = _usage(prompt_tokens, completion_tokens)
        return self._head + b'],"usage":' + _encode(counts) + b"}\n\n"


def completion_body(
    *, completion_id: str, created: int, model: str, choices: list[Choice], prompt_tokens: int
) -> bytes:
    """A non-streamed ``chat.completion`` JSON body, usage included."""
    return _encode(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_sim",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(choice.tokens)},
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
                for i, choice in enumerate(choices)
            ],
            "usage": _usage(prompt_tokens, sum(len(choice.tokens) for choice in choices)),
        }
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
