"""Text corpora as lists of documents: the built-in default corpus, user files, and the split.

The default corpus needs no download. It is English technical prose that ships with Python:
the reference documentation of ``pydoc_data.topics`` (one document per topic) and the
docstrings of ``DEFAULT_MODULES``, read by parsing their source files with ``ast`` (nothing is
imported, so no module side effects run). Modules missing from an installation are skipped.
The documents are ordered by a hash of their title, a fixed pseudo-random order, so the
validation tail mixes reference topics and docstrings. About 1.5 MB on Python 3.11; the
content follows the Python version, and ``corpus_fingerprint`` tells versions apart.

User data (``DataConfig.path``):
    a file: one document; a ``.jsonl`` file: one document per line, ``{"text": "..."}``;
    a folder: every ``.txt``/``.md``/``.rst``/``.jsonl`` file below it (hidden files and folders
    skipped; other suffixes ignored), in sorted order of relative path, one document per text
    file. Files must be UTF-8 (a BOM is dropped). Empty documents are dropped.

Split (``split_documents``): the last ``val_fraction`` of the characters, with the cut moved
forward to the next line start, is validation; the rest is train.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from xmoe.errors import UsageError

from .files import check_regular_file

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")

# Pure-Python standard-library modules rich in docstrings, chosen to exist from Python 3.10 on
# (none of the modules removed in 3.13, no tkinter/turtle which some distributions split off).
# Sorted; a test keeps it so. Where a module moved (datetime -> _pydatetime in 3.12) both are
# listed and whichever exists is read.
DEFAULT_MODULES = (
    "_collections_abc",
    "_pydatetime",
    "_pydecimal",
    "_pyio",
    "argparse",
    "ast",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.locks",
    "asyncio.streams",
    "asyncio.tasks",
    "base64",
    "bdb",
    "bz2",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "collections",
    "concurrent.futures._base",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "email.utils",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "json.decoder",
    "json.encoder",
    "locale",
    "logging",
    "logging.handlers",
    "lzma",
    "mailbox",
    "mimetypes",
    "multiprocessing.pool",
    "numbers",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zipimport",
)


def default_corpus() -> list[str]:
    """The built-in corpus: Python's reference topics and standard-library docstrings."""
    titled: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics  # a plain dict of str -> str; no side effects
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    titled += [(f"topic {name}", text) for name, text in topics.items()]
    stdlib = Path(sysconfig.get_path("stdlib"))
    for name in DEFAULT_MODULES:
        text = _module_document(stdlib, name)
        if text:
            titled.append((f"module {name}", text))
    titled.sort(key=lambda item: hashlib.sha256(item[0].encode()).digest())
    documents = [text for _, text in titled if text.strip()]
    if not documents:
        raise UsageError(
            "the default corpus is empty in this Python installation (no pydoc_data and no "
            "standard-library sources); set DataConfig.path to a text file or folder"
        )
    return documents


def load_corpus(path: str | None) -> list[str]:
    """Documents of the corpus at ``path`` (see the module docstring); None: the default corpus."""
    if path is None:
        return default_corpus()
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data path {str(root)!r} does not exist; give a text file, a .jsonl file with a "
            f"'text' field per line, or a folder of {'/'.join(TEXT_SUFFIXES)} files"
        )
    check_regular_file(root, "data path")
    files = _text_files(root) if root.is_dir() else [root]
    if not files:
        raise UsageError(
            f"data folder {str(root)!r} holds no {'/'.join(TEXT_SUFFIXES)} files (hidden files "
            f"and other suffixes are skipped); add some or point the data path at a file"
        )
    documents: list[str] = []
    for file in files:
        if file.suffix.lower() == ".jsonl":
            documents += _read_jsonl(file)
        else:
            documents.append(_read_text(file))
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise UsageError(
            f"data path {str(root)!r} holds no text (every file or line is empty or blank); "
            f"give a corpus with text in it"
        )
    return documents


def split_documents(
    documents: Sequence[str], val_fraction: float, *, source: str = "the corpus"
) -> tuple[list[str], list[str]]:
    """(train, validation) documents: validation is the last ``val_fraction`` of the characters.

    The cut is moved forward to the next line start in its document (or to the document's end
    when no line break follows, unless that would leave validation empty), so lines stay whole.
    """
    total = sum(len(doc) for doc in documents)
    cut = round(total * (1 - val_fraction))
    train: list[str] = list(documents)
    val: list[str] = []
    seen = 0
    for k, doc in enumerate(documents):
        if seen + len(doc) > cut:
            offset = cut - seen
            if offset > 0:
                newline = doc.find("\n", offset - 1)
                line_start = newline + 1 if newline >= 0 else len(doc)
                if line_start < len(doc) or k + 1 < len(documents):
                    offset = line_start
            head, tail = doc[:offset], doc[offset:]
            train = list(documents[:k]) + ([head] if head.strip() else [])
            val = ([tail] if tail.strip() else []) + list(documents[k + 1 :])
            break
        seen += len(doc)
    if not train or not val:
        raise UsageError(
            f"{source} has {total} characters, too few to split into train and validation with "
            f"val_fraction={val_fraction}; give a larger corpus or change val_fraction"
        )
    return train, val


def corpus_fingerprint(documents: Sequence[str]) -> str:
    """SHA-256 of the documents' text and boundaries (not of file names or times)."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _text_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and Path(name).suffix.lower() in TEXT_SUFFIXES
        ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(file: Path) -> str:
    check_regular_file(file)  # a named pipe in a data folder would block forever
    data = file.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UsageError(
            f"{str(file)!r} looks binary (NUL byte at offset {nul}); give UTF-8 text files only, "
            f"or move it out of the data folder"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{str(file)!r} is not UTF-8 text (undecodable byte at offset {err.start}); convert "
            f"it to UTF-8 or move it out of the data folder"
        ) from None


def _read_jsonl(file: Path) -> list[str]:
    documents = []
    example = 'a JSON object like {"text": "..."}'
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators
    for lineno, line in enumerate(_read_text(file).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"{str(file)!r} line {lineno}: not valid JSON ({err.msg}); each line must be "
                f"{example}"
            ) from None
        if not isinstance(record, dict) or "text" not in record:
            raise UsageError(
                f"{str(file)!r} line {lineno}: no \"text\" field; each line must be {example}"
            )
        if not isinstance(record["text"], str):
            raise UsageError(
                f"{str(file)!r} line {lineno}: \"text\" is a {type(record['text']).__name__}, "
                f"not a string; each line must be {example}"
            )
        documents.append(record["text"])
    return documents


def _module_document(stdlib: Path, name: str) -> str | None:
    """Docstrings of one standard-library module, read from its source with ``ast``."""
    base = stdlib.joinpath(*name.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            break
    else:
        return None
    with warnings.catch_warnings():  # e.g. SyntaxWarning for old escape sequences in 3.12+
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError):
            return None
    parts = [f"Module {name}"]
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)
    parts += _docstrings(tree.body, prefix="")
    return "\n\n".join(parts) + "\n" if len(parts) > 1 else None


def _docstrings(body: list[ast.stmt], *, prefix: str) -> Iterator[str]:
    """``title\\ndocstring`` of each class and function in ``body``, depth-first, source order."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            title = f"{prefix}{node.name}({ast.unparse(node.args)})"
        elif isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(base) for base in node.bases)
            title = f"class {prefix}{node.name}" + (f"({bases})" if bases else "")
        else:
            continue
        doc = ast.get_docstring(node)
        if doc:
            yield f"{title}\n{doc}"
        yield from _docstrings(node.body, prefix=f"{prefix}{node.name}.")
