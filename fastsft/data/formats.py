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


KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


def _label(index, where: Optional[str]) -> str:
    """Where a record is, for messages: 'file, line N' from the caller, else 'record N' (1-based)."""
    return where if where is not None else f"record {index + 1}"


def detect_format(record: dict, index: int = 0, where: Optional[str] = None, text_field: str = "text") -> str:
    """The format of one record, from its fields."""
    index = _label(index, where)
    if "messages" in record or "conversations" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "instruction"
    if text_field in record:
        return "text"
    raise DataError(
        f"{index}: cannot detect the format from fields {sorted(record)}; expected "
        "'messages', 'prompt'+'completion', 'instruction'+'output' or 'text' (or set format explicitly)"
    )


def to_sample(record: dict, fmt: str, index: int, where: Optional[str] = None, text_field: str = "text") -> Sample:
    """Convert one record of format `fmt`; a missing or wrong field names the record and the field.

    `where` says where the record is ('file, line N'); without it messages say 'record N' (1-based).
    `text_field` is the field of the text format (TRL's dataset_text_field).
    """
    index = _label(index, where)
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
        return Plain("", _string(_field(record, text_field, index, fmt), index, text_field), is_text=True)
    raise DataError(f"unknown data format {fmt!r}")


def _field(record: dict, name: str, index: str, fmt: str):
    if name not in record:
        raise _missing(index, name, fmt)
    return record[name]


def _missing(index: str, name: str, fmt: str) -> DataError:
    return DataError(f"{index}: missing field '{name}' (format '{fmt}')")


def _string(value, index: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{index}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _messages(value, index: str, name: str, allow_empty: bool = False) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{index}: field '{name}' must be a list of messages, got {type(value).__name__}")
    if not value and not allow_empty:
        raise DataError(f"{index}: field '{name}' is an empty list of messages")
    messages = []
    for position, message in enumerate(value):
        where = f"{name}[{position}]"
        if not isinstance(message, dict):
            raise DataError(f"{index}: field '{where}' must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{index}: missing field '{where}.{key}'")
            if not isinstance(message[key], str):
                raise DataError(
                    f"{index}: field '{where}.{key}' must be a string, got {type(message[key]).__name__}"
                )
        if message["role"] not in KNOWN_ROLES:
            raise DataError(f"{index}: field '{where}.role' is {message['role']!r}, expected one of "
                            f"{', '.join(KNOWN_ROLES)}")
        # Drop None-valued extras (as transformers does); keep the others for the template.
        messages.append({key: item for key, item in message.items() if item is not None})
    return messages


def _sharegpt(value, index: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{index}: field 'conversations' must be a non-empty list of turns")
    messages = []
    for position, turn in enumerate(value):
        where = f"conversations[{position}]"
        if not isinstance(turn, dict):
            raise DataError(f"{index}: field '{where}' must be an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                raise DataError(f"{index}: missing or non-string field '{where}.{key}'")
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(
                f"{index}: field '{where}.from' is {turn['from']!r}, expected one of {sorted(_SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def records_to_samples(records, indices: list[int], fmt: str = "auto", text_field: str = "text") -> tuple:
    """(format, samples) of `records[i]` for i in indices; errors say where each record is
    (records from fastsft.data.load know their file and line)."""
    where = getattr(records, "where", None)
    place = (lambda i: where(i)) if where is not None else (lambda i: None)
    if fmt == "auto":
        fmt = detect_format(records[0], 0, place(0), text_field=text_field)
    return fmt, [to_sample(records[i], fmt, i, place(i), text_field=text_field) for i in indices]
