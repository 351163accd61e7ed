"""Supervised rows for Hugging Face tokenizers: prompt/response and chat JSONL, rendered to ids.

A file holds one JSON object a line, either

    {"prompt": "What is 2 plus 3?", "response": "5"}
    {"messages": [{"role": "system", "content": ...}, {"role": "user", "content": ...},
                  {"role": "assistant", "content": ...}, ...]}

A prompt/response row is the conversation ``[user: prompt, assistant: response]``. The answer is
the *last* assistant message; every earlier turn is the prompt (a multi-turn row trains its
final reply, as LLaDA's SFT treats a dialogue: Nie et al., 2025, arXiv 2502.09992, §2.3).

Rendering (:func:`render`): with a tokenizer that has a chat template, the prompt is
``apply_chat_template(turns[:-1], add_generation_prompt=True)`` and the response is what the full
conversation's rendering adds after it (the reply and the template's end-of-turn text). Without a
template it is a plain concatenation: the earlier turns' contents joined by newlines (a
prompt/response row: the prompt itself), encoded with the tokenizer's special tokens (BOS), then
the reply followed by EOS where the tokenizer has one. Prompt and response are tokenized
separately, exactly as ``anyorder generate`` tokenizes a prompt before decoding an answer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

ROLES = ("system", "user", "assistant")


def load_tokenizer(path: Any, key: str):
    """A local Hugging Face tokenizer (or model) directory; ``key`` names the config key in errors.
    Nothing is downloaded (a hub id works only once it is in the local cache)."""
    import transformers  # lazy: optional dependency (the 'hf' extra)

    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{key} must be a local tokenizer or model directory, got {path!r}")
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{key} {path!r} holds no loadable tokenizer here (nothing is downloaded): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _bad(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def check_row(row: Any, where: str) -> List[Dict[str, str]]:
    """The conversation of one JSONL row (a list of {role, content}), or a one-line error naming
    the row (``where``: file and line) and the key at fault."""
    if not isinstance(row, dict):
        raise _bad(where, f"a row must be a JSON object with 'prompt' and 'response' or 'messages', got {type(row).__name__}")
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns:
            raise _bad(where, "key 'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        for k, m in enumerate(turns):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise _bad(where, f"key 'messages[{k}]' must be {{\"role\": one of {', '.join(ROLES)}, "
                                  f"\"content\": a string}}, got {json.dumps(m)[:80]}")
        if turns[-1]["role"] != "assistant":
            raise _bad(where, f"key 'messages': the last message is the answer and must have role 'assistant', "
                              f"got {turns[-1]['role']!r}")
        turns = [{"role": m["role"], "content": m["content"]} for m in turns]
    elif "prompt" in row or "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise _bad(where, f"key {key!r} must be a string, got {json.dumps(row.get(key))[:80]}")
        turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise _bad(where, f"a row needs keys 'prompt' and 'response', or 'messages'; got keys {sorted(row)}")
    if not turns[-1]["content"].strip():
        key = "response" if "messages" not in row else f"messages[{len(turns) - 1}].content"
        raise _bad(where, f"key {key!r}: the response is empty (nothing to train on)")
    return turns


def read_jsonl(path: str) -> Iterator[Tuple[str, List[Dict[str, str]]]]:
    """(``file:line``, conversation) of every non-blank line of a local JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task.path {str(path)!r} is not a file: give a local JSONL file of "
                                f"{{\"prompt\", \"response\"}} or {{\"messages\"}} rows")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad(where, f"not valid JSON ({exc.msg}, column {exc.colno})") from None
            yield where, check_row(row, where)


def read_hub(spec: Dict[str, Any]) -> Iterator[Tuple[str, List[Dict[str, str]]]]:
    """The rows of a dataset loaded with ``datasets.load_dataset(**spec)`` (``task.hub``): a hub
    id needs a network (never used by the tests); ``{path: json, data_files: FILE}`` reads a local
    file through the same code."""
    try:
        import datasets  # lazy: optional dependency (the 'text' extra), only for task.hub
    except ImportError:
        raise ModuleNotFoundError("task.hub needs `pip install datasets`") from None
    spec = dict(spec)
    split = spec.pop("split", "train")
    name = spec.get("path", "?")
    ds = datasets.load_dataset(**spec, split=split)
    for n, row in enumerate(ds):
        where = f"{name}[{split}][{n}]"
        # a column a row lacks comes back as None (datasets unifies the schema): drop those
        yield where, check_row({k: v for k, v in row.items() if v is not None}, where)


def _encode(tok, text: str) -> List[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])   # rendered text holds its specials


def _template_prompt(tok, turns: Sequence[Dict[str, str]]) -> str:
    return tok.apply_chat_template(list(turns), add_generation_prompt=True, tokenize=False)


def render(tok, turns: Sequence[Dict[str, str]]) -> Tuple[List[int], List[int]]:
    """(prompt ids, response ids) of one conversation (see the module doc)."""
    if getattr(tok, "chat_template", None):
        prefix = _template_prompt(tok, turns[:-1])
        full = tok.apply_chat_template(list(turns), tokenize=False)
        if not full.startswith(prefix):
            raise ValueError("the tokenizer's chat template does not render a conversation as its prompt (with the "
                             "generation prompt) followed by the reply; use a tokenizer without a template")
        return _encode(tok, prefix), _encode(tok, full[len(prefix):])
    prompt = "\n".join(m["content"] for m in turns[:-1])
    ids = list(tok(prompt)["input_ids"]) if prompt else []
    eos = getattr(tok, "eos_token_id", None)
    return ids, _encode(tok, turns[-1]["content"]) + ([int(eos)] if eos is not None else [])


def generation_prompt_ids(tok, prompt: str, chat: bool) -> List[int]:
    """The ids ``anyorder generate`` decodes after: the prompt as a user turn with the generation
    prompt (``chat``), encoded as :func:`render` encodes a training prompt, or the raw text with
    the tokenizer's special tokens (BOS)."""
    if chat:
        return _encode(tok, _template_prompt(tok, [{"role": "user", "content": prompt}]))
    return list(tok(prompt)["input_ids"])


# -- a small tokenizer for the example data and the tests ----------------------------------------
SPECIALS = ["[PAD]", "[UNK]", "[MASK]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORD_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_level_tokenizer(texts: Sequence[str], chat_template: Optional[str] = WORD_TEMPLATE):
    """A ``transformers`` fast tokenizer over the words and punctuation of ``texts`` (sorted, so
    the ids depend only on the words), with [PAD]/[UNK]/[MASK], role markers and <|end|> (EOS)."""
    import tokenizers  # lazy: optional dependency (the 'text' extra)
    import transformers  # lazy: optional dependency (the 'hf' extra)

    pre = tokenizers.pre_tokenizers.Sequence([tokenizers.pre_tokenizers.WhitespaceSplit(),
                                              tokenizers.pre_tokenizers.Punctuation()])
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} - set(SPECIALS))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre
    tk.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                               mask_token="[MASK]", eos_token="<|end|>",
                                               additional_special_tokens=SPECIALS[3:])
    tok.chat_template = chat_template
    return tok


def save_example_tokenizer(jsonl: str, out_dir: str):
    """The word-level tokenizer of every message in ``jsonl``, saved to ``out_dir`` (how
    data/examples/chat_tokenizer was made from data/examples/chat.jsonl)."""
    texts = [m["content"] for _, turns in read_jsonl(jsonl) for m in turns]
    tok = word_level_tokenizer(texts)
    tok.save_pretrained(out_dir)
    return tok
