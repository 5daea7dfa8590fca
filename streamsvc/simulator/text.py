"""The simulator's models and the text each one streams: pure functions, no I/O.

Model ``echo`` answers with the last user message, any other model with
generated prose. Two sources of tokens:

- :func:`echo_tokens` splits a text into tokens that carry their leading
  white space, so that ``"".join(echo_tokens(text)) == text`` for every
  text: spaces, ``\\r``, ``\\n``, ``\\r\\n``, blank lines, CJK and emoji
  come back unchanged, only cut into pieces.
- :func:`generated_tokens` makes deterministic prose from a model name and a
  prompt, in the shape real tokenizers give (``"The"``, ``" quick"``,
  ``","``, ``"\\n\\n"``), with a few non-ASCII words mixed in.

:func:`answer_choices` puts them together into the ``n`` choices of one
answer, cut at ``max_tokens``.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

__all__ = [
    "DEFAULT_TOKENS",
    "ECHO_MODEL",
    "MAX_TOKENS",
    "MAX_TOKEN_CHARS",
    "MODELS",
    "Choice",
    "answer_choices",
    "echo_tokens",
    "generated_tokens",
    "words_in",
]

ECHO_MODEL = "echo"
MODELS = (ECHO_MODEL, "sim-small", "sim-large")
# Tokens of a generated answer unless simulate.tokens says otherwise.
DEFAULT_TOKENS = 40
# The most tokens any count in a request may ask for.
MAX_TOKENS = 1_000_000

# Longer tokens are cut into pieces of this many characters, so that a long
# run without white space (CJK text, a URL, base64) still streams.
MAX_TOKEN_CHARS = 8

# A token is white space followed by a word, or trailing white space alone.
# Both alternatives together cover every character, so the tokens
# concatenate back to the input exactly.
_TOKEN_RE = re.compile(r"\s*\S+|\s+")

_WORDS = (
    "the", "stream", "relay", "token", "answer", "browser", "event", "model",
    "quick", "server", "message", "latency", "buffer", "river", "signal", "light",
    "of", "and", "a", "to", "in", "is", "that", "with", "for", "on", "as", "by",
    "reactive", "observable", "upstream", "journal", "chunk", "window", "socket",
    "careful", "steady", "quiet", "bright", "simple", "gentle", "distant",
    "naïve", "café", "façade", "東京", "世界", "🙂", "straße", "añejo",
)  # fmt: skip

# Out of every 100 words: this many are followed by a full stop, this many
# more by a comma; a full stop starts a new paragraph this often.
_FULL_STOP_PERCENT = 9
_COMMA_PERCENT = 6
_PARAGRAPH_PERCENT = 25


def echo_tokens(text: str, *, max_chars: int = MAX_TOKEN_CHARS) -> list[str]:
    """Split ``text`` into tokens that carry their leading white space.

    Args:
        text: any text.
        max_chars: tokens longer than this are cut into pieces this long.

    Returns:
        The tokens; joined, they give ``text`` back exactly.

    Example:
        >>> echo_tokens("Hi  there\\n\\n東京タワーは高いです")
        ['Hi', '  there', '\\n\\n東京タワーは', '高いです']
    """
    tokens: list[str] = []
    for token in _TOKEN_RE.findall(text):
        if len(token) <= max_chars:
            tokens.append(token)
        else:
            tokens.extend(token[i : i + max_chars] for i in range(0, len(token), max_chars))
    return tokens


def generated_tokens(model: str, prompt: str, count: int, *, choice: int = 0) -> list[str]:
    """Deterministic prose of exactly ``count`` tokens.

    The same model, prompt and choice index always give the same tokens;
    different ones almost always give different tokens.

    Args:
        model: the requested model name (part of the seed).
        prompt: the last user message (part of the seed).
        count: how many tokens.
        choice: the choice index, so that ``n > 1`` gives different answers.

    Example:
        >>> generated_tokens("sim-small", "hello", 3) == generated_tokens("sim-small", "hello", 3)
        True
    """
    seed = zlib.crc32(f"{model}\x00{prompt}\x00{choice}".encode())
    rng = random.Random(seed)
    tokens: list[str] = []
    sentence_start = True
    line_start = True
    while len(tokens) < count:
        word = rng.choice(_WORDS)
        if sentence_start:
            word = word[:1].upper() + word[1:]
        tokens.append(word if line_start else " " + word)
        sentence_start = line_start = False
        roll = rng.randrange(100)
        if roll < _FULL_STOP_PERCENT:
            tokens.append(".")
            sentence_start = True
            if rng.randrange(100) < _PARAGRAPH_PERCENT:
                tokens.append("\n\n")
                line_start = True
        elif roll < _FULL_STOP_PERCENT + _COMMA_PERCENT:
            tokens.append(",")
    return tokens[:count]


def _rest(tokens: list[str], prefix: str) -> list[str]:
    """The tokens after ``prefix``, when the tokens' text begins with it; else all of them."""
    if not "".join(tokens).startswith(prefix):
        return tokens
    at = 0
    for i, token in enumerate(tokens):
        if at + len(token) > len(prefix):
            return [token[len(prefix) - at:], *tokens[i + 1:]]
        at += len(token)
    return []


def words_in(text: str) -> int:
    """A rough token count: the number of white-space separated words."""
    return len(text.split())


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of an answer: its tokens and why it ends (``"stop"`` or ``"length"``)."""

    tokens: list[str]
    finish_reason: str


def answer_choices(
    model: str, prompt: str, *, n: int, tokens: int, max_tokens: int | None,
    continues: str | None = None,
) -> list[Choice]:
    """The ``n`` choices a model answers to ``prompt``.

    Args:
        model: :data:`ECHO_MODEL` echoes ``prompt``; any other generates ``tokens`` tokens.
        prompt: the text of the last user message.
        n: how many choices.
        tokens: how many tokens a generated choice has.
        max_tokens: a longer choice is cut here and ends with ``"length"``.
        continues: a final assistant message: when the answer begins with it, only the
            rest is answered (a continuation), from inside a token if it ends there.

    Example:
        >>> [c.finish_reason for c in answer_choices("echo", "a b c", n=1, tokens=0, max_tokens=2)]
        ['length']
    """
    if model == ECHO_MODEL:
        texts = [echo_tokens(prompt)] * n
    else:
        texts = [generated_tokens(model, prompt, tokens, choice=i) for i in range(n)]
    if continues:
        texts = [_rest(text, continues) for text in texts]
    return [
        Choice(text[:max_tokens], "length")
        if max_tokens is not None and len(text) > max_tokens
        else Choice(text, "stop")
        for text in texts
    ]
