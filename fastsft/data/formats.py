"""Dataset formats: detect them and turn each record into a Chat or a Plain sample.

- messages:          {"messages": [{"role": ..., "content": ...}, ...]}  (also
                     ShareGPT {"conversations": [{"from": "human", "value": ...}]})
- prompt_completion: {"prompt": str, "completion": str} -> Plain (concatenated, no template);
                     {"prompt": [messages], "completion": [messages]} -> Chat
- instruction:       {"instruction": str, "input": str (optional), "output": str} -> Chat:
                     one user turn (instruction, a blank line, then input when non-empty)
                     and one assistant turn (output), rendered with the chat template
- text:              {"text": str} -> Plain with an empty prompt
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from fastsft.errors import DataError

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool"}


@dataclass
class Chat:
    """Messages to render with a chat template.

    completion_start: index of the first message of the completion (prompt/completion
    and instruction data); None for plain conversations.
    """

    messages: list[dict]
    completion_start: Optional[int] = None


@dataclass
class Plain:
    """Text rendered as prompt + completion with no template; `is_text` for plain text data."""

    prompt: str
    completion: str
    is_text: bool = False


Sample = Union[Chat, Plain]


def detect_format(record: dict, index: int = 0) -> str:
    """The format of one record, from its fields."""
    if "messages" in record or "conversations" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    raise DataError(
        f"example {index}: cannot detect the format from fields {sorted(record)}; expected "
        "'messages', 'prompt'+'completion', 'instruction'+'output' or 'text' (or set format explicitly)"
    )


def to_sample(record: dict, fmt: str, index: int) -> Sample:
    """Convert one record of format `fmt`; a missing or wrong field names the example and the field."""
    if fmt == "messages":
        if "messages" in record:
            return Chat(_messages(record["messages"], index, "messages"))
        if "conversations" in record:
            return Chat(_sharegpt(record["conversations"], index))
        raise _missing(index, "messages", fmt)
    if fmt == "prompt_completion":
        prompt, completion = _field(record, "prompt", index, fmt), _field(record, "completion", index, fmt)
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt_messages = _messages(prompt, index, "prompt", allow_empty=True)
            completion_messages = _messages(completion, index, "completion")
            return Chat(prompt_messages + completion_messages, completion_start=len(prompt_messages))
        return Plain(_string(prompt, index, "prompt"), _string(completion, index, "completion"))
    if fmt == "instruction":
        instruction = _string(_field(record, "instruction", index, fmt), index, "instruction")
        output = _string(_field(record, "output", index, fmt), index, "output")
        extra = record.get("input")
        extra = "" if extra is None else _string(extra, index, "input")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        return Chat([{"role": "user", "content": user}, {"role": "assistant", "content": output}], completion_start=1)
    if fmt == "text":
        return Plain("", _string(_field(record, "text", index, fmt), index, "text"), is_text=True)
    raise DataError(f"unknown data format {fmt!r}")


def _field(record: dict, name: str, index: int, fmt: str):
    if name not in record:
        raise _missing(index, name, fmt)
    return record[name]


def _missing(index: int, name: str, fmt: str) -> DataError:
    return DataError(f"example {index}: missing field '{name}' (format '{fmt}')")


def _string(value, index: int, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"example {index}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _messages(value, index: int, name: str, allow_empty: bool = False) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"example {index}: field '{name}' must be a list of messages, got {type(value).__name__}")
    if not value and not allow_empty:
        raise DataError(f"example {index}: field '{name}' is an empty list of messages")
    messages = []
    for position, message in enumerate(value):
        where = f"{name}[{position}]"
        if not isinstance(message, dict):
            raise DataError(f"example {index}: field '{where}' must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"example {index}: missing field '{where}.{key}'")
            if not isinstance(message[key], str):
                raise DataError(
                    f"example {index}: field '{where}.{key}' must be a string, got {type(message[key]).__name__}"
                )
        # Drop None-valued extras (as transformers does); keep the others for the template.
        messages.append({key: item for key, item in message.items() if item is not None})
    return messages


def _sharegpt(value, index: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"example {index}: field 'conversations' must be a non-empty list of turns")
    messages = []
    for position, turn in enumerate(value):
        where = f"conversations[{position}]"
        if not isinstance(turn, dict):
            raise DataError(f"example {index}: field '{where}' must be an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                raise DataError(f"example {index}: missing or non-string field '{where}.{key}'")
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(
                f"example {index}: field '{where}.from' is {turn['from']!r}, expected one of {sorted(_SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages
