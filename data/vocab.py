"""The WordPiece vocabulary: load a BERT ``vocab.txt`` into transformers' fast tokenizer, checked.

Every data path (pre-training preparation, GLUE) tokenizes through :func:`load_tokenizer`, so a
vocab that lacks a special token, or a path that does not exist, is reported once, here, before
any work starts.

Note on transformers >= 5: ``BertTokenizerFast`` is the tokenizers-backed ``BertTokenizer`` and
its constructor takes the vocab as ``vocab=`` (a path or a dict). A ``vocab_file=`` keyword is
silently ignored there and yields a tokenizer that knows only the five special tokens, mapping
every word to ``[UNK]``; :func:`load_tokenizer` passes ``vocab=`` and checks the result.
"""

from __future__ import annotations

import os

from transformers import BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class VocabError(ValueError):
    """The vocab file is missing, unreadable or lacks what BERT needs; the message says which."""


def read_vocab(vocab_path: str | os.PathLike) -> list[str]:
    """The tokens of a BERT ``vocab.txt``, one per line, in id order; checked for BERT's needs.

    Raises :class:`VocabError` naming the file when it cannot be read, is empty, lacks one of
    ``[PAD] [UNK] [CLS] [SEP] [MASK]``, or has ``[PAD]`` anywhere but id 0 (sequences are padded
    with id 0 and attention mask 0, which is what transformers' BERT expects by default).
    """
    path = os.fspath(vocab_path)
    try:
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n").rstrip("\r") for line in f]
    except FileNotFoundError:
        raise VocabError(f"{path}: no such vocab file (pass --vocab_path with a BERT vocab.txt, "
                         "one WordPiece token per line)") from None
    except IsADirectoryError:
        raise VocabError(f"{path}: is a directory; pass --vocab_path with the vocab.txt file "
                         "itself") from None
    except OSError as e:
        raise VocabError(f"{path}: cannot read vocab file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise VocabError(f"{path}: vocab file is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    while tokens and tokens[-1] == "":
        tokens.pop()
    if not tokens:
        raise VocabError(f"{path}: vocab file is empty")
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise VocabError(f"{path}: vocab lacks the special token(s) {' '.join(missing)}; a BERT "
                         f"vocab needs all of {' '.join(SPECIAL_TOKENS)} (add them as lines, "
                         "[PAD] first)")
    if tokens[0] != "[PAD]":
        raise VocabError(f"{path}: [PAD] must be the first line (id 0), found it on line "
                         f"{tokens.index('[PAD]') + 1}; sequences are padded with id 0")
    return tokens


def load_tokenizer(vocab_path: str | os.PathLike, do_lower_case: bool = True) -> BertTokenizerFast:
    """transformers' fast WordPiece tokenizer of ``vocab_path``, after :func:`read_vocab`."""
    tokens = read_vocab(vocab_path)
    tokenizer = BertTokenizerFast(vocab=os.fspath(vocab_path), do_lower_case=do_lower_case)
    if len(tokenizer) != len(set(tokens)):
        raise VocabError(f"{os.fspath(vocab_path)}: the tokenizer loaded {len(tokenizer)} tokens "
                         f"but the file has {len(set(tokens))} distinct lines; check the file "
                         "is a plain one-token-per-line BERT vocab")
    return tokenizer


def maskable_token_ids(tokenizer: BertTokenizerFast) -> list[int]:
    """Ids a masked-LM "random token" may be drawn from: every token but ``[...]`` specials.

    Google's ``create_pretraining_data.py`` draws from the whole vocab, specials included; we leave
    out ``[PAD] [CLS] [SEP] [MASK] [UNK]`` and ``[unusedN]`` so that a random replacement is
    always an ordinary word piece.
    """
    vocab = tokenizer.get_vocab()
    ids = sorted(i for t, i in vocab.items() if not (t.startswith("[") and t.endswith("]")))
    if not ids:
        raise VocabError("the vocab has only bracketed special tokens; it needs word pieces too")
    return ids
